"""Chat templates: render a checkpoint's own Jinja chat template the way transformers does.

    text = render_chat_template(template, messages, add_generation_prompt=True,
                                special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    template = select_template(conf["chat_template"], where="ckpt/tokenizer_config.json")
    token = end_of_turn_token(template, special_tokens, is_special)    # e.g. "<|im_end|>"

Messages are passed as transformers passes them (plain JSON-like copies; a message's reasoning under
each of the names templates read), with the named special tokens as variables. The template renders in
jinja_sandbox.py: Hugging Face's Jinja environment, sandboxed and under a time and size budget
(:class:`~.jinja_sandbox.ChatTemplateBudgetError` past it), so that a checkpoint's template renders
byte-identically here and in transformers' ``apply_chat_template(..., tokenize=False)``.
Tests: ``python -m pytest -q tests/test_tokenizer.py`` (compared with transformers on real templates),
``tests/test_security_template.py`` (budgets).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jinja2

from .jinja_sandbox import compile_template, render

# Names the Hugging Face convention passes a message's reasoning under; templates read the first one.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# The named special tokens a template sees as variables (when the tokenizer has them).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_PROBE_ANSWER = "Q7ZPROBEANSWER"


def _plain(value: Any) -> Any:
    """A copy made of plain JSON-like types only (what the sandboxed template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Mapping]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role' (and usually 'content'); got {m!r}")
        m = {k: _plain(v) for k, v in m.items() if v is not None}   # a None field counts as absent
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat_template(template: str, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                         special_tokens: Mapping[str, str | None] | None = None, tools=None, documents=None,
                         **extra) -> str:
    """Render ``messages`` with ``template``. Variables: messages, tools, documents, add_generation_prompt,
    the named special tokens that are set, and ``extra`` (which overrides a special token of the same name).
    Raises ValueError for bad messages and jinja2's errors (TemplateError) from the template itself."""
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation; give at least one message")
    chat = _prepare_messages(messages)
    for what, items in (("tools", tools), ("documents", documents)):
        if items is not None and not all(isinstance(x, Mapping) for x in items):
            raise ValueError(f"{what} must be a list of dicts (JSON schemas for tools; 'title'/'text' for "
                             f"documents); got {items!r}")
    vars_ = {k: str(v) for k, v in (special_tokens or {}).items() if v is not None}
    vars_.update(_plain(extra))
    return render(compile_template(template), messages=chat, tools=_plain(tools), documents=_plain(documents),
                   add_generation_prompt=add_generation_prompt, **vars_)


def select_template(value: Any, where: str) -> tuple[str | None, dict[str, str] | None]:
    """``tokenizer_config.json``'s ``chat_template`` -> (the template to use, all named templates or None).

    A string is the template; a list of ``{"name", "template"}`` selects "default"."""
    if value is None or isinstance(value, str):
        return value, None
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" not in named:
            raise ValueError(f"{where}: chat_template lists templates {sorted(named)} but none named 'default'; "
                             f"name the one to use 'default'")
        return named["default"], named
    raise ValueError(f"{where}: chat_template must be a string or a list of {{'name', 'template'}} objects, "
                     f"got {type(value).__name__}")


def end_of_turn_token(template: str, special_tokens: Mapping[str, str | None],
                      first_special: Callable[[str], str | None]) -> str | None:
    """The special token the template writes right after an assistant message (``<|im_end|>``,
    ``<|eot_id|>``, ``<|end|>`` ...), found by rendering a probe conversation; None if there is none.
    ``first_special(text)`` returns the first special token in ``text`` (or None)."""
    probes = ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}],
              [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": _PROBE_ANSWER}])
    for chat in probes:
        try:
            text = render_chat_template(template, chat, special_tokens=special_tokens)
        except (jinja2.TemplateError, ValueError, TypeError):
            continue
        at = text.rfind(_PROBE_ANSWER)
        if at >= 0:
            return first_special(text[at + len(_PROBE_ANSWER):])
    return None
