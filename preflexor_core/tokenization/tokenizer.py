"""Tokenizer: a thin wrapper over HF ``tokenizers`` that chats in the checkpoint's own format.

    tok = Tokenizer.from_pretrained("ckpt")              # tokenizer.json (+ tokenizer_config.json, chat_template.jinja)
    tok = Tokenizer.train_bpe(texts, vocab_size=4096)    # byte-level BPE, Llama-3 pre-tokenizer and chat format
    ids = tok.encode("text"); text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    tok.stop_token_ids                                   # eos, generation_config eos ids, the template's end of turn
    vocab.setup_thinking_tokens(model, tok)               # thinking tokens: reserved reused, else added

Untrusted text (corpus, teacher / critic / judge replies, user questions) is text, never control tokens:
``encode_text`` and ``apply_chat_template`` (message contents) break every occurrence of an added token's
string (any added token of the vocabulary, found by the tokenizer's own matcher) with a zero-width space,
except the pipeline's own tags (``THINKING_TOKENS``) where the pipeline wrote them; ``strip_pipeline_tags``
removes those tags from text the pipeline did not write. ``encode`` recognises every special token, for
text the project rendered itself (a chat template's output).

The chat template is the checkpoint's Jinja template, rendered as transformers renders it (chat_template.py).
Llama-3's format (CHAT_TEMPLATE) is the default only of tokenizers trained here and of a checkpoint that has
no template but has Llama-3's header tokens. Tests: ``python -m pytest -q tests/test_tokenizer.py``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Sequence

import jinja2
import torch
from tokenizers import AddedToken, Tokenizer as TK, decoders, models, pre_tokenizers, trainers

from .pretokenize import LLAMA3_PATTERN, llama3_pre_tokenizer  # noqa: F401  (LLAMA3_PATTERN re-exported)
from ..infra.io import atomic_write
from .chat_template import SPECIAL_TOKEN_NAMES, end_of_turn_token, render_chat_template, select_template
from . import control_text
from .control_text import ZERO_WIDTH_BREAK  # noqa: F401  (re-exported)
from .errors import TokenizerError
from .gguf_vocab import load_gguf_tokenizer
from .jinja_sandbox import ChatTemplateBudgetError
from ..thinking.tokens import BOS, EOS, EOT, END_HEADER, START_HEADER, THINKING_TOKENS, TRAINED_SPECIAL_TOKENS

log = logging.getLogger(__name__)

LLAMA3_HEADER_TOKENS = (START_HEADER, END_HEADER, EOT)

# Llama-3.0's chat format: the default of tokenizers trained here (and of Llama-3 vocabularies without a template).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _token_text(v) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict):
        return v.get("content")
    return None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class Tokenizer:
    """Byte-level BPE tokenizer with the checkpoint's chat template and thinking/reflect special tokens.

    ``chat_template=None`` means: Llama-3's format if the vocabulary has its header tokens, else no template
    (``apply_chat_template`` then raises). ``eos_token_ids``: further ids that end generation (e.g. from
    generation_config.json). ``source`` names the checkpoint in error messages."""

    def __init__(self, tk, bos_token: str | None = BOS, eos_token: str | None = EOT,
                 pad_token: str | None = None, model_max_length: int | None = None, *,
                 chat_template: str | None = None, unk_token: str | None = None,
                 special_tokens: dict[str, str | None] | None = None, eos_token_ids: Iterable[int] = (),
                 source: str | None = None, named_chat_templates: dict[str, str] | None = None):
        self._tk = tk
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self._other_special = {k: v for k, v in (special_tokens or {}).items()
                               if k in SPECIAL_TOKEN_NAMES and v is not None}
        self.model_max_length = model_max_length
        self.source = source or "this tokenizer"
        self._eos_token_ids = sorted({int(i) for i in eos_token_ids})
        self._eot = None                      # cached end-of-turn token: (template, vocab size, token)
        self._named = dict(named_chat_templates) if named_chat_templates else None
        if chat_template is None and all(tk.token_to_id(t) is not None for t in LLAMA3_HEADER_TOKENS):
            if source:
                log.info("%s has no chat template; its vocabulary has Llama-3's header tokens, so Llama-3's "
                         "chat format is used", source)
            chat_template = CHAT_TEMPLATE
        self._chat_template = chat_template

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template in use (None: the checkpoint has none)."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is not None and not isinstance(template, str):
            raise TypeError(f"chat_template must be a Jinja template string or None, got {type(template).__name__}")
        self._chat_template = template
        if self._named is not None:
            if template is None:
                self._named = None
            else:
                self._named["default"] = template

    # -- construction -------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        """Load ``path``: tokenizer.json, plus tokenizer_config.json (special tokens, ``chat_template``),
        chat_template.jinja (takes priority over the config's template, as in transformers) and
        generation_config.json (``eos_token_id``: int or list) when present. A ``.gguf`` file: see gguf_vocab.py."""
        if str(path).endswith(".gguf"):
            return load_gguf_tokenizer(path, cls)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"{tj}: not found; a tokenizer directory needs tokenizer.json "
                                    f"(slow sentencepiece-only tokenizers are not supported)")
        try:
            tk = TK.from_file(tj)
        except Exception as e:
            raise TokenizerError(f"{tj}: cannot parse ({e})") from None
        kw: dict = {"source": path}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tc):
            conf = _read_json(tc)
            kw.update(bos_token=_token_text(conf.get("bos_token")), eos_token=_token_text(conf.get("eos_token")),
                      pad_token=_token_text(conf.get("pad_token")), unk_token=_token_text(conf.get("unk_token")),
                      special_tokens={k: _token_text(conf.get(k)) for k in ("sep_token", "cls_token", "mask_token")})
            mml = conf.get("model_max_length")
            if isinstance(mml, int) and mml < 10**9:
                kw["model_max_length"] = mml
            try:
                kw["chat_template"], kw["named_chat_templates"] = select_template(conf.get("chat_template"), tc)
            except ValueError as e:
                raise TokenizerError(str(e)) from None
        jinja_file = os.path.join(path, CHAT_TEMPLATE_FILE)
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                kw["chat_template"], kw["named_chat_templates"] = f.read(), None
        gc = os.path.join(path, "generation_config.json")
        if os.path.isfile(gc):
            eos = _read_json(gc).get("eos_token_id")
            eos = [eos] if isinstance(eos, int) else eos
            if eos is not None and not (isinstance(eos, list) and all(isinstance(i, int) and i >= 0 for i in eos)):
                raise TokenizerError(f"{gc}: eos_token_id must be an int or a list of ints, got {eos!r}")
            kw["eos_token_ids"] = eos or ()
        return cls(tk, **kw)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                  show_progress: bool = False) -> "Tokenizer":
        """Train a byte-level BPE (Llama-3 pre-tokenizer, Llama-3 + thinking special tokens at ids 0..8)."""
        if vocab_size < 256 + len(TRAINED_SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                             f"{256 + len(TRAINED_SPECIAL_TOKENS)} (256 bytes + special tokens)")
        tk = TK(models.BPE())
        tk.pre_tokenizer = llama3_pre_tokenizer()
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=TRAINED_SPECIAL_TOKENS, show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(list(texts), trainer=trainer)
        return cls(tk, bos_token=BOS, eos_token=EOT, pad_token=EOS, chat_template=CHAT_TEMPLATE)

    def save_pretrained(self, path: str) -> None:
        """Write tokenizer.json + tokenizer_config.json (with the chat template, as transformers' config key)
        into ``path`` (created if needed; files replaced atomically). A chat_template.jinja already in ``path``
        is rewritten with the same template, since transformers would prefer it over the config."""
        os.makedirs(path, exist_ok=True)
        added = {str(i): {"content": t.content, "special": t.special, "lstrip": False,
                          "rstrip": False, "normalized": False, "single_word": False}
                 for i, t in self._tk.get_added_tokens_decoder().items()}
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens_map,
                "clean_up_tokenization_spaces": False, "added_tokens_decoder": added,
                "model_input_names": ["input_ids", "attention_mask"]}
        conf.setdefault("pad_token", None)
        if self._named is not None and self._named.get("default") == self.chat_template:
            conf["chat_template"] = [{"name": k, "template": v} for k, v in self._named.items()]
        elif self.chat_template is not None:
            conf["chat_template"] = self.chat_template
        if self.model_max_length:
            conf["model_max_length"] = self.model_max_length
        atomic_write(os.path.join(path, "tokenizer.json"), self._tk.to_str())
        atomic_write(os.path.join(path, "tokenizer_config.json"), json.dumps(conf, indent=2, ensure_ascii=False))
        jinja_file = os.path.join(path, CHAT_TEMPLATE_FILE)
        if os.path.isfile(jinja_file):
            if self.chat_template is None:
                os.remove(jinja_file)
            else:
                atomic_write(jinja_file, self.chat_template)

    # -- vocabulary ---------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tk.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        pid = self._id(self.pad_token)
        return pid if pid is not None else self.eos_token_id

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set (bos/eos/unk/sep/pad/cls/mask), as templates see them."""
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                 "pad_token": self.pad_token, **self._other_special}
        return {k: named[k] for k in SPECIAL_TOKEN_NAMES if named.get(k) is not None}

    def _first_special(self, text: str) -> str | None:
        special = {i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}
        return next((self._tk.id_to_token(i) for i in self.encode(text) if i in special), None)

    @property
    def end_of_turn_token(self) -> str | None:
        """The special token the chat template writes after an assistant message (None without one)."""
        if self.chat_template is None:
            return None
        key = (self.chat_template, self.vocab_size)
        if self._eot is None or self._eot[0] != key:
            self._eot = (key, end_of_turn_token(self.chat_template, self.special_tokens_map, self._first_special))
        return self._eot[1]

    @property
    def end_of_turn_id(self) -> int | None:
        """Id that closes an assistant turn: the template's end-of-turn token, else eos."""
        i = self._id(self.end_of_turn_token)
        return i if i is not None else self.eos_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        """Sorted ids that end a generated turn: eos, the checkpoint's generation_config eos ids and the chat
        template's end-of-turn token (with Llama-3's default format: <|eot_id|> and <|end_of_text|>)."""
        ids = {self.eos_token_id, self._id(self.end_of_turn_token), *self._eos_token_ids}
        if self.chat_template == CHAT_TEMPLATE:
            ids |= {self._id(EOT), self._id(EOS)}
        return sorted(i for i in ids if i is not None)

    def add_special_tokens(self, tokens: Sequence[str]) -> int:
        """Add special tokens (never split, encoded to one id each); returns how many were new."""
        new = [t for t in tokens if self._tk.token_to_id(t) is None]
        self._tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return len(new)

    # -- encode / decode ----------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings inside it map to their single ids. For text the
        project rendered itself; untrusted text goes through :meth:`encode_text`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def control_ids(self, allow: Sequence[str] = ()) -> frozenset[int]:
        """Ids that untrusted text must never produce (``control_text.control_ids``)."""
        return control_text.control_ids(self, allow)

    def neutralize(self, text: str, allow: Sequence[str] = THINKING_TOKENS) -> str:
        """``text`` with every string that would encode to a control token broken by a zero-width space,
        so that it encodes as plain text; ``allow``'s tags stay special (``control_text.neutralize``)."""
        return control_text.neutralize(self, text, allow)[0]

    def encode_text(self, text: str, allow: Sequence[str] = THINKING_TOKENS) -> list[int]:
        """Token ids of untrusted ``text``: no control token but ``allow``'s (the pipeline's own tags)."""
        return control_text.neutralize(self, text, allow)[1]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, *, allow: Sequence[str] | None = THINKING_TOKENS, **extra):
        """Render ``[{"role", "content"}, ...]`` with the checkpoint's chat template (str, or ids with
        ``tokenize``), exactly as transformers' ``apply_chat_template(..., tokenize=False)`` does. ``extra``
        keyword arguments (tools=, documents=, date_string=, ...) become template variables.

        Message contents (and reasoning fields) are untrusted: strings of control tokens in them are broken
        (:meth:`neutralize`) so that only the template's own markup, ``allow``'s tags and the reasoning tags
        the template itself handles (``control_text.template_tags``) encode as control tokens; ``allow=None``
        renders the contents as given (for text that is known to be the project's)."""
        if allow is not None:
            messages = control_text.neutralize_messages(self, messages, allow)
        if self.chat_template is None:
            raise TokenizerError(
                f"{self.source}: no chat template (tokenizer_config.json has no 'chat_template', there is no "
                f"{CHAT_TEMPLATE_FILE}, and the vocabulary lacks Llama-3's header tokens); add the model's "
                f"template to tokenizer_config.json or set tok.chat_template")
        try:
            text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                        special_tokens=self.special_tokens_map, **extra)
        except ChatTemplateBudgetError as e:
            raise TokenizerError(f"{self.source}: {e}; the checkpoint's chat template is broken or hostile: replace "
                                 f"chat_template in tokenizer_config.json (or {CHAT_TEMPLATE_FILE})") from None
        except (jinja2.TemplateError, TypeError, AttributeError, KeyError, IndexError) as e:
            raise TokenizerError(f"{self.source}: the chat template failed to render: {e} "
                                 f"({type(e).__name__}); check the messages against what the template expects, "
                                 f"or fix chat_template in tokenizer_config.json") from e
        return self.encode(text) if tokenize else text
