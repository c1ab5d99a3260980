"""Tokenizer from GGUF metadata (``tokenizer.ggml.*``): byte-level or sentencepiece BPE built with ``tokenizers``.

Supported: ``tokenizer.ggml.model == "llama"`` (sentencepiece BPE with scores and byte fallback: Gemma,
Llama 2, Mistral; ``_spm_model``), and ``"gpt2"`` (byte-level BPE) with the pre-tokenizer splits of
the ``tokenizer.ggml.pre`` names below (llama.cpp's llama-vocab.cpp defines them: ``llama-bpe`` is
Llama-3's regex with whole-word vocabulary lookups first; ``smollm`` / ``starcoder`` split digits
one by one, then apply GPT-2's regex; ``gpt2`` is GPT-2's regex alone; ``qwen2`` (Qwen2/2.5/3) is
Llama-3's regex with single digits). CONTROL tokens become
special tokens, USER_DEFINED ones added tokens. bos/eos/pad ids, ``add_bos_token`` and
``tokenizer.chat_template`` are carried over. ``pre_tokenizer_name`` is the reverse lookup the
writer (llm/gguf/writer.py) uses. The file itself is opened by gguf_file.py; this room never imports the
model's GGUF package. Tests: .venv/bin/python -m pytest -q tests/test_gguf.py
"""
from __future__ import annotations

import json
from typing import Any

from tokenizers import (AddedToken, Regex, Tokenizer as TK, decoders, models, normalizers, pre_tokenizers as pt,
                        processors)

from .gguf_file import GGUFError, open_gguf, read_metadata
from .pretokenize import LLAMA3_PATTERN, llama3_pre_tokenizer

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx")
DIGITS_GPT2_PRES = ("smollm", "starcoder", "refact", "codeshell")
GPT2_PRES = ("gpt2", "mpt", "olmo")
QWEN2_PRES = ("qwen2",)
SUPPORTED_PRES = LLAMA3_PRES + DIGITS_GPT2_PRES + GPT2_PRES + QWEN2_PRES
# Qwen2/2.5/3's split: Llama-3's regex with one digit per piece (\p{N} where Llama-3 has \p{N}{1,3}).
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def _pre_tokenizer(pre: str, path: str):
    if pre in LLAMA3_PRES:
        return llama3_pre_tokenizer()
    if pre in QWEN2_PRES:
        return pt.Sequence([pt.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    if pre in DIGITS_GPT2_PRES:
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if pre in GPT2_PRES:
        return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    raise GGUFError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported; supported pre-tokenizers: "
                    f"{', '.join(SUPPORTED_PRES)}")


def pre_tokenizer_name(tk) -> str:
    """The ``tokenizer.ggml.pre`` name of a ``tokenizers.Tokenizer``'s pre-tokenizer (GGUFError if none fits)."""
    pre = json.loads(tk.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == LLAMA3_PATTERN \
            and not parts[1].get("use_regex", True):
        return "llama-bpe"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == QWEN2_PATTERN \
            and not parts[1].get("use_regex", True):
        return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    raise GGUFError(f"pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent in this converter; "
                     f"supported: Llama-3 regex split (llama-bpe), Qwen2 regex split (qwen2), digits + GPT-2 byte "
                     f"level (smollm), GPT-2 byte level (gpt2)")


def _bpe_model(meta: dict[str, Any], tokens, path: str):
    """Byte-level BPE from tokens + merges, with the pre-tokenizer ``tokenizer.ggml.pre`` names."""
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise GGUFError(f"{path}: tokenizer.ggml.tokens / tokenizer.ggml.merges missing; a BPE vocabulary needs both")
    pre = meta.get("tokenizer.ggml.pre", "default")
    pre_tok = _pre_tokenizer(pre, path)
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFError(f"{path}: tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        pairs.append((a, b))
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = TK(models.BPE(vocab=vocab, merges=pairs, dropout=None, fuse_unk=False, byte_fallback=False,
                       ignore_merges=pre in LLAMA3_PRES))
    tk.pre_tokenizer = pre_tok
    tk.decoder = decoders.ByteLevel()
    return tk


def _spm_model(meta: dict[str, Any], tokens, types, path: str):
    """A sentencepiece BPE vocabulary (Gemma, Llama 2, Mistral) as a ``tokenizers`` BPE.

    llama.cpp's SPM tokenizer starts from characters and repeatedly merges the adjacent pair whose
    concatenation is a vocabulary piece of the highest score, falling back to <0xXX> byte pieces. A BPE
    whose merges are every (left, right) split of each piece, ranked by the piece's score, merges in the
    same order. Spaces are written as U+2581 (a leading one when ``add_space_prefix``)."""
    scores = meta.get("tokenizer.ggml.scores")
    if not tokens or scores is None or len(scores) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.tokens / tokenizer.ggml.scores missing or of different lengths; "
                        f"a sentencepiece ('llama') vocabulary needs both")
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, (piece, ty) in enumerate(zip(tokens, types)):
        if ty != TOKEN_NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left is not None and right is not None:
                ranked.append((-scores[i], left, right))
    ranked.sort()
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tk = TK(models.BPE(vocab=vocab, merges=[(tokens[a], tokens[b]) for _, a, b in ranked], dropout=None,
                       unk_token=tokens[unk] if isinstance(unk, int) else None, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    norm = [normalizers.Prepend("\u2581")] if prefix else []
    tk.normalizer = normalizers.Sequence(norm + [normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tk


def tokenizer_from_metadata(meta: dict[str, Any], path: str, tokenizer_cls):
    """Build ``tokenizer_cls`` (our ``Tokenizer``) from GGUF metadata (see the module docstring for what is
    supported). ``Tokenizer.from_pretrained(path)`` passes its class: this module never imports it."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise GGUFError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.model is missing)")
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens or ())
    if kind == "llama":
        tk = _spm_model(meta, tokens, types, path)
    elif kind == "gpt2":
        tk = _bpe_model(meta, tokens, path)
    else:
        raise GGUFError(f"{path}: tokenizer.ggml.model={kind!r} is not supported; supported: byte-level BPE "
                        f"('gpt2') and sentencepiece BPE ('llama')")
    special = (TOKEN_CONTROL, TOKEN_UNKNOWN) if kind == "llama" else (TOKEN_CONTROL,)   # sentencepiece's <unk> too
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in special]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    kw: dict[str, Any] = dict(bos_token=tok("bos_token_id"), eos_token=tok("eos_token_id"),
                              pad_token=tok("padding_token_id"))
    ctx = meta.get(f"{meta.get('general.architecture', 'llama')}.context_length")
    if isinstance(ctx, int):
        kw["model_max_length"] = ctx
    kw.update(chat_template=meta.get("tokenizer.chat_template"), unk_token=tok("unknown_token_id"), source=path,
              eos_token_ids=[i for i in (meta.get("tokenizer.ggml.eot_token_id"),) if isinstance(i, int)])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if kind == "llama" and add_bos and kw["bos_token"] is not None:
        # as the families' own tokenizer.json: transformers adds the BOS through this post-processor
        bos = kw["bos_token"]
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
    out = tokenizer_cls(tk, **kw)
    out.add_bos_token = add_bos
    return out


def load_gguf_tokenizer(path: str, tokenizer_cls):
    """``tokenizer_cls`` from a .gguf file's metadata."""
    return tokenizer_from_metadata(read_metadata(open_gguf(path)), str(path), tokenizer_cls)
