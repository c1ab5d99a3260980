"""Tokenizer: a thin wrapper over HF ``tokenizers`` with the Llama-3 chat format.

    tok = Tokenizer.from_pretrained("ckpt")              # tokenizer.json (+ tokenizer_config.json)
    tok = Tokenizer.train_bpe(texts, vocab_size=4096)    # byte-level BPE, Llama-3 pre-tokenizer
    ids = tok.encode("text"); text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    tok.add_special_tokens(THINKING_TOKENS); resize_token_embeddings(model, tok.vocab_size)

The chat format is Llama-3's:
``<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...``
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Iterable, Sequence

import torch

BOS, EOS, START_HEADER, END_HEADER, EOT = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
THINK_START, THINK_END, REFLECT_START, REFLECT_END = "<|thinking|>", "<|/thinking|>", "<|reflect|>", "<|/reflect|>"
THINKING_TOKENS = [THINK_START, THINK_END, REFLECT_START, REFLECT_END]
# Appended to a question to ask for the thinking format (training prompts and inference alike).
THINKING_INSTRUCTION = " Use <|thinking|>."
# Order matters: train_bpe gives these ids 0..8 (see config.TRAINED_*_ID).
TRAINED_SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, *THINKING_TOKENS]

# Llama-3 pre-tokenizer split pattern (contractions, letters, 1-3 digit groups, punctuation, spaces).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The same format as a Jinja template, so transformers' tokenizers render it identically.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


class TokenizerError(ValueError):
    pass


def _token_text(v) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict):
        return v.get("content")
    return None


class Tokenizer:
    """Byte-level BPE tokenizer with Llama-3 chat formatting and thinking/reflect special tokens."""

    def __init__(self, tk, bos_token: str | None = BOS, eos_token: str | None = EOT,
                 pad_token: str | None = None, model_max_length: int | None = None):
        self._tk = tk
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.model_max_length = model_max_length

    # -- construction -------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        if str(path).endswith(".gguf"):
            from .gguf import load_gguf_tokenizer
            return load_gguf_tokenizer(path)
        from tokenizers import Tokenizer as TK
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"{tj}: not found; a tokenizer directory needs tokenizer.json "
                                    f"(slow sentencepiece-only tokenizers are not supported)")
        try:
            tk = TK.from_file(tj)
        except Exception as e:
            raise TokenizerError(f"{tj}: cannot parse ({e})") from None
        kw = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tc):
            with open(tc, encoding="utf-8") as f:
                conf = json.load(f)
            kw = dict(bos_token=_token_text(conf.get("bos_token")), eos_token=_token_text(conf.get("eos_token")),
                      pad_token=_token_text(conf.get("pad_token")))
            mml = conf.get("model_max_length")
            if isinstance(mml, int) and mml < 10**9:
                kw["model_max_length"] = mml
        return cls(tk, **kw)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                  show_progress: bool = False) -> "Tokenizer":
        """Train a byte-level BPE (Llama-3 pre-tokenizer, Llama-3 + thinking special tokens at ids 0..8)."""
        from tokenizers import Regex, Tokenizer as TK, decoders, models, pre_tokenizers, trainers
        if vocab_size < 256 + len(TRAINED_SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                             f"{256 + len(TRAINED_SPECIAL_TOKENS)} (256 bytes + special tokens)")
        tk = TK(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=TRAINED_SPECIAL_TOKENS, show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(list(texts), trainer=trainer)
        return cls(tk, bos_token=BOS, eos_token=EOT, pad_token=EOS)

    def save_pretrained(self, path: str) -> None:
        """Write tokenizer.json + tokenizer_config.json into ``path`` (created if needed; files replaced atomically)."""
        os.makedirs(path, exist_ok=True)
        added = {str(i): {"content": t.content, "special": t.special, "lstrip": False,
                                                        "rstrip": False, "normalized": False, "single_word": False}
                 for i, t in self._tk.get_added_tokens_decoder().items()}
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": self.pad_token, "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False, "added_tokens_decoder": added,
                "model_input_names": ["input_ids", "attention_mask"]}
        if self.model_max_length:
            conf["model_max_length"] = self.model_max_length
        for name, data in (("tokenizer.json", self._tk.to_str()), ("tokenizer_config.json", json.dumps(conf, indent=2))):
            fd, tmp = tempfile.mkstemp(dir=path, prefix=name + ".tmp-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(path, name))

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
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generated turn: eos plus <|eot_id|> / <|end_of_text|> when present."""
        ids = [self.eos_token_id, self._id(EOT), self._id(EOS)]
        return sorted({i for i in ids if i is not None})

    def add_special_tokens(self, tokens: Sequence[str]) -> int:
        """Add special tokens (never split, encoded to one id each); returns how many were new."""
        from tokenizers import AddedToken
        new = [t for t in tokens if self._tk.token_to_id(t) is None]
        self._tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return len(new)

    # -- encode / decode ----------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings inside it map to their single ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False):
        """Render ``[{"role", "content"}, ...]`` in the Llama-3 chat format (str, or ids with ``tokenize``)."""
        parts = [self.bos_token or ""]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'; got {m!r}")
            parts.append(f"{START_HEADER}{m['role']}{END_HEADER}\n\n{str(m['content']).strip()}{EOT}")
        if add_generation_prompt:
            parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
        text = "".join(parts)
        return self.encode(text) if tokenize else text


def resize_token_embeddings(model, new_vocab_size: int) -> None:
    """Resize ``model``'s embedding (and untied head) to ``new_vocab_size`` rows.

    New rows are initialised to the mean of the old rows; old rows are kept exactly.
    Updates ``model.config.vocab_size``.
    """
    import torch.nn as nn
    emb = model.model.embed_tokens
    old = emb.weight.shape[0]
    if new_vocab_size == old:
        return
    if new_vocab_size < old:
        raise ValueError(f"new_vocab_size={new_vocab_size} < current {old}: shrinking would drop trained rows")

    def grow(w: torch.Tensor) -> nn.Parameter:
        with torch.no_grad():
            mean = w.float().mean(0, keepdim=True).to(w.dtype)
            return nn.Parameter(torch.cat([w, mean.expand(new_vocab_size - old, -1)], 0).contiguous())

    emb.weight = grow(emb.weight)
    emb.num_embeddings = new_vocab_size
    if model.lm_head is not None:
        model.lm_head.weight = grow(model.lm_head.weight)
        model.lm_head.out_features = new_vocab_size
    model.config.vocab_size = new_vocab_size
