"""GGUF <-> HF layout per llama.cpp architecture: tensor names, q/k row order, Gemma's norm shift.

Names: llama.cpp's ``ffn_norm`` is the MLP's input norm, which HF Llama/Qwen call
``post_attention_layernorm`` and Gemma 3 ``pre_feedforward_layernorm`` (Gemma 3's
``post_attention_layernorm`` is llama.cpp's ``post_attention_norm``). llama.cpp's converter stores a
Gemma norm weight w as 1 + w (its RMSNorm multiplies by the weight); ``norm_shift`` says by how much.

Row order: llama.cpp's `llama` architecture applies rotary embeddings to adjacent pairs of a head's
rows (GPT-J style), while HF Llama rotates the two halves of each head (GPT-NeoX style).
Its HF->GGUF converter therefore reorders the rows of attn_q / attn_k per head: within a
head of D rows, HF row ``half * D/2 + j`` becomes GGUF row ``2 * j + half``
(q with n_head heads, k with n_head_kv heads). ``to_gguf_rows`` applies that order,
``from_gguf_rows`` undoes it; they are exact inverses (tests/test_gguf.py). The qwen2, qwen3 and gemma3
architectures rotate halves as HF does: their rows are stored unchanged.
"""
from __future__ import annotations

import re

import torch

_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
_BLOCKS = {arch: {**_COMMON, "ffn_norm": "post_attention_layernorm"} for arch in ARCHS}
_BLOCKS["gemma3"] = {**_COMMON, "post_attention_norm": "post_attention_layernorm",
                     "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_BLOCKS_INV = {arch: {v: k for k, v in b.items()} for arch, b in _BLOCKS.items()}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_TOP_INV = {v: k for k, v in _TOP.items()}
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
ROPE_FREQS = "rope_freqs.weight"     # llama.cpp's per-frequency divisors for Llama-3 rope scaling


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if not a tensor of ``arch``."""
    m = _GGUF_BLOCK_RE.match(gguf_name)
    if m:
        mod = _BLOCKS[arch].get(m.group(2))
        return None if mod is None else f"model.layers.{m.group(1)}.{mod}.{m.group(3)}"
    base, _, leaf = gguf_name.rpartition(".")
    return f"{_TOP[base]}.{leaf}" if base in _TOP and leaf == "weight" else None


def gguf_name(hf: str, arch: str = "llama") -> str:
    """Inverse of ``hf_name``."""
    m = _HF_BLOCK_RE.match(hf)
    inv = _BLOCKS_INV[arch]
    if m and m.group(2) in inv:
        return f"blk.{m.group(1)}.{inv[m.group(2)]}.{m.group(3)}"
    base, _, leaf = hf.rpartition(".")
    if base in _TOP_INV and leaf == "weight":
        return f"{_TOP_INV[base]}.weight"
    raise KeyError(f"{hf!r} is not a tensor of a {arch} model")


def norm_shift(hf: str, arch: str) -> float:
    """What llama.cpp adds to this tensor (1.0 for Gemma's norm weights, else 0.0)."""
    return 1.0 if arch == "gemma3" and hf.endswith("norm.weight") else 0.0


def rotary_heads(hf: str, n_head: int, n_head_kv: int, arch: str = "llama") -> int | None:
    """Number of heads whose rows llama.cpp reorders in this tensor (None: not reordered)."""
    if arch != "llama":
        return None
    if ".self_attn.q_proj." in hf:
        return n_head
    if ".self_attn.k_proj." in hf:
        return n_head_kv
    return None


def to_gguf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (half, j) row order within each head -> llama.cpp's interleaved (j, half) order."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_gguf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's interleaved row order -> HF's, the inverse of ``to_gguf_rows``."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
