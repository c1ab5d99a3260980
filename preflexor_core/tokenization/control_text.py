"""Untrusted text as text: strings of control tokens in it are broken before it is encoded or templated.

Corpus text, teacher / critic / judge replies and user questions may hold the string of any control
token (``<|im_end|>``, ``<|start_header_id|>``, ``<start_of_turn>``, a reserved token ...). Encoded
as is, ``tokenizers`` would turn each into its single control id: a question could open a system turn,
a teacher reply could end a chosen answer early. Here the vocabulary itself says what is a control
token (every added token, special or not, but whitespace-only ones, plus the named bos / eos / pad /
unk / stop ids), and the tokenizer's own matcher finds them: the text is encoded, the offsets of any
control id found are broken after their first character with a zero-width space (U+200B), and the
text is encoded again (a vocabulary whose normaliser erases that space gets the string dropped).
Text without control strings is untouched, so benign text tokenises exactly as before.

What stays special: ``allow`` (the pipeline's own thinking tags, where the pipeline wrote them), and
inside chat messages also the reasoning tags a checkpoint's template handles itself (added tokens that
the template source names but does not write as turn markup, e.g. ``</think>`` that a template splits
an assistant message on); the turn markup the template writes around a message never does.

Tests: ``python -m pytest -q tests/test_security_tokens.py``.
"""
from __future__ import annotations

from typing import Sequence

from .chat_template import render_chat_template
from .errors import TokenizerError

ZERO_WIDTH_BREAK = "\u200b"


def control_ids(tok, allow: Sequence[str] = ()) -> frozenset[int]:
    """Ids that untrusted text must never produce: every added token (special or not, whitespace-only
    ones excepted) and the named bos/eos/pad/unk/stop ids, less those of ``allow``."""
    named = (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
    key = (tok.vocab_size, tuple(allow), tuple(tok._tk.token_to_id(t) for t in allow), named)   # renames change ids
    cached = getattr(tok, "_control_ids_cache", None)
    if cached is None or cached[0] != key:
        tk = tok._tk
        ids = {i for i, t in tk.get_added_tokens_decoder().items() if t.content.strip()}
        ids |= {tk.token_to_id(t) for t in named if t is not None} - {None}
        ids |= set(getattr(tok, "_eos_token_ids", ()))
        ids -= {tk.token_to_id(t) for t in allow}
        cached = (key, frozenset(ids))
        tok._control_ids_cache = cached
    return cached[1]


def neutralize(tok, text: str, allow: Sequence[str] = ()) -> tuple[str, list[int]]:
    """(``text`` with every control token's string broken, its token ids)."""
    if not isinstance(text, str):
        raise TypeError(f"untrusted text must be a str, got {type(text).__name__}")
    control = control_ids(tok, allow)
    for attempt in range(4):
        enc = tok._tk.encode(text, add_special_tokens=False)
        hits = sorted({enc.offsets[j] for j, i in enumerate(enc.ids) if i in control})
        if not hits:
            return text, enc.ids
        out, at = [], 0
        for a, b in hits:
            if a < at or b <= a:
                continue
            broken = text[a] + ZERO_WIDTH_BREAK + text[a + 1:b] if attempt < 2 and b - a > 1 else ""
            out += [text[at:a], broken]
            at = b
        out.append(text[at:])
        text = "".join(out)
    raise TokenizerError(f"{tok.source}: untrusted text still encodes to control tokens after breaking them")


def template_tags(tok) -> tuple[str, ...]:
    """Added tokens that the chat template names in its source but does not write as turn markup (its
    reasoning tags, e.g. ``<think>`` / ``</think>``); () without a template."""
    template = tok.chat_template
    if template is None:
        return ()
    key = (template, tok.vocab_size)
    cached = getattr(tok, "_template_tags_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    named = [t.content for t in tok._tk.get_added_tokens_decoder().values()
             if t.content.strip() and t.content in template]
    markup = ""
    for gen in (False, True):
        for chat in ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}],
                     [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]):
            try:
                markup += render_chat_template(template, chat, add_generation_prompt=gen,
                                               special_tokens=tok.special_tokens_map)
            except Exception:       # a template that refuses a probe conversation: no markup seen there
                continue
    tags = tuple(t for t in named if t not in markup and t not in tok.special_tokens_map.values())
    tok._template_tags_cache = (key, tags)
    return tags


def neutralize_messages(tok, messages, allow: Sequence[str]) -> list:
    """``messages`` with every string in them but roles and part types neutralised, nested content parts
    included (``allow`` and the template's reasoning tags stay special)."""
    allowed = tuple(allow) + template_tags(tok)

    def clean(v, key=None):
        if isinstance(v, str):
            return v if key in ("role", "type") else neutralize(tok, v, allowed)[0]
        if isinstance(v, dict):                      # e.g. content parts {"type": "text", "text": ...}
            return {k: clean(x, k) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return [clean(m) if isinstance(m, dict) else m for m in messages]
