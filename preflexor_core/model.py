"""Llama decoder (Llama-2/3 family) written from scratch on torch.

RMSNorm, rotary embeddings (with Llama-3 frequency scaling), grouped-query attention,
SwiGLU MLP, tied or untied LM head. Parameter names follow HF ``LlamaForCausalLM``
(``model.layers.N.self_attn.q_proj.weight`` ...) so checkpoints load in transformers.

    model = Llama(ModelConfig.preset("tiny"))
    logits = model(input_ids)                       # (B, T, V)
    hidden = model(input_ids, return_hidden=True)   # (B, T, H) final-normed hidden states

Attention runs through torch SDPA on CPU and through ``kernels.flash_attention`` on CUDA
(see ``_attend``). Reference: Touvron et al. 2023; Meta Llama 3 (2024).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig
from .rope import rope_inv_freq


# ----------------------------------------------------------------------------- norms / rope
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import ops
        return ops.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) of shape (B, T, D) for given positions; no parameters."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._inv_freq_cpu = rope_inv_freq(cfg)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dev = position_ids.device
        inv = self._cache.get(dev)
        if inv is None:
            inv = self._cache[dev] = self._inv_freq_cpu.to(dev)
        freqs = position_ids.float()[..., None] * inv                   # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                          # (B, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


# ----------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class Packed:
    """Sequences packed into one row at ``cu_seqlens`` boundaries (varlen attention on CUDA)."""
    cu_seqlens: torch.Tensor
    max_seqlen: int


def _attend(q, k, v, mask, causal: bool) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D).

    ``mask`` is a boolean (B, 1, T, S) "may attend" mask, a ``Packed`` layout (B = 1), or None
    (then ``causal`` applies). On CUDA (or with PREFLEXOR_KERNELS=triton), None and Packed use the
    Triton flash-attention kernels. q, k, v share one dtype (under autocast too: rope keeps q/k's).
    """
    kernels = q.is_cuda or os.environ.get("PREFLEXOR_KERNELS", "").strip().lower() == "triton"
    if isinstance(mask, Packed):
        if kernels:
            from .kernels import flash_attention_varlen
            o = flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                       mask.cu_seqlens, mask.max_seqlen, causal=causal)   # (T, Hq, D)
            return o.transpose(0, 1)[None]
        mask = packed_causal_mask(mask.cu_seqlens, q.shape[2], q.device)
    if mask is None and kernels:
        from .kernels import flash_attention
        return flash_attention(q, k, v, causal=causal)
    if q.shape[2] == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
        from .ops import decode_attention       # one new token per row: CPU SDPA is slow outside fp32
        return decode_attention(q, k, v, mask)
    gqa = q.shape[1] != k.shape[1]          # SDPA maps query head h to kv head h // (Hq / Hkv) itself
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(bias=cfg.attention_bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, **kw)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, **kw)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, **kw)

    def forward(self, x, cos, sin, mask, causal, kv_cache=None):
        from . import ops
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)                  # (B, Hq, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)                     # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)                     # (B, Hkv, T, D)
        q, k = ops.rope(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)                               # (B, Hkv, S, D)
        o = _attend(q, k, v, mask, causal)                                             # (B, Hq, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def project_qkv(self, x):
        """x (B, T, H) -> q, k, v projections (the sampler swaps in one fused product)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=cfg.mlp_bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def forward(self, x):
        from . import ops
        return self.down_proj(ops.swiglu(*self.project_gate_up(x)))

    def project_gate_up(self, x):
        """x (B, T, H) -> gate, up projections (the sampler swaps in one fused product)."""
        return self.gate_proj(x), self.up_proj(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.self_attn = Attention(cfg, layer_idx, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.mlp = MLP(cfg, device, dtype)

    def forward(self, x, cos, sin, mask, causal, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, causal, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """HF's ``LlamaModel``: embeddings, blocks, final norm (named ``model.*`` in checkpoints)."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, i, device, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)


# ----------------------------------------------------------------------------- the model
def build_attention_mask(attention_mask: torch.Tensor | None, T: int, S: int, offset: int | torch.Tensor = 0,
                         device=None) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask: query t (absolute position offset + t) may see key s when
    s <= offset + t and key s is not padding. Each query may always see its own slot, so fully
    padded (left-pad) rows never produce NaN. Returns None when plain causal attention suffices."""
    if attention_mask is None and T == S:
        return None
    s = torch.arange(S, device=device)
    off = torch.as_tensor(offset, device=device).reshape(-1, 1, 1)      # (B|1, 1, 1)
    t_abs = off + torch.arange(T, device=device)[None, :, None]          # (B|1, T, 1)
    allowed = s[None, None, :] <= t_abs                                  # (B|1, T, S)
    if attention_mask is not None:
        key_ok = attention_mask.to(device=device, dtype=torch.bool)[:, None, :S]    # (B, 1, S)
        allowed = allowed & (key_ok | (s[None, None, :] == t_abs))
    return allowed[:, None]                                              # (B, 1, T, S)


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones followed by zeros (right padding, or none)."""
    m = attention_mask.to(torch.bool)
    return bool((m[:, 1:] <= m[:, :-1]).all())


def packed_causal_mask(cu_seqlens: torch.Tensor, T: int, device=None) -> torch.Tensor:
    """Block-diagonal causal (1, 1, T, T) mask for sequences packed at boundaries ``cu_seqlens``."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seg = torch.bucketize(torch.arange(T, device=device), cu[1:-1], right=True)         # (T,)
    pos = torch.arange(T, device=device)
    return ((seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None]))[None, None]


class Llama(nn.Module):
    """Llama causal LM. ``Llama(cfg, device="meta")`` builds without allocating weights."""

    def __init__(self, cfg: ModelConfig, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg
        self.model = LlamaBackbone(cfg, device, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        self.rotary = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False
        if torch.device(device or "cpu").type != "meta":
            self.reset_parameters()

    # -- init ---------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Llama-style init: N(0, initializer_range) for linears and embeddings, ones for norms."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    # -- helpers ------------------------------------------------------------
    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, H) LM-head weight (the embedding when tied; with adapters, the weight they apply:
        base + LoRA update, or trainable token rows written in)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        effective = getattr(head, "effective_weight", None)
        return effective() if effective is not None else head.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward ------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, return_hidden: bool = False,
                kv_cache=None, attn_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or final hidden (B, T, H) with ``return_hidden``.

        attention_mask: (B, T) 1 for real tokens, 0 for padding (right or left).
        position_ids:   (B, T); defaults to 0..T-1 (correct for right padding).
        kv_cache / attn_mask: used by the sampler; attn_mask is an explicit (B, 1, T, S) bool mask.
        cu_seqlens:     (S + 1,) boundaries of sequences packed into one row (B = 1): each attends
                        causally within its own segment only (pass position_ids restarting per segment).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq); got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)                                         # (B, T, H)
        cos, sin = self.rotary(position_ids, x.dtype)                                  # (B, T, D)
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens needs all sequences packed into one row (batch 1); got batch {B}")
            if input_ids.is_cuda:
                cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
                mask = Packed(cu, int((cu[1:] - cu[:-1]).max()))
            else:
                mask = packed_causal_mask(cu_seqlens, T, input_ids.device)
        else:
            if attn_mask is None and attention_mask is not None and _right_padded(attention_mask):
                # Padding only after each row's tokens: plain causal attention is exact for every real
                # position (pads come later), lets SDPA / flash attention skip the explicit mask, and
                # keeps no (B, H, T, T) attention matrix for the backward. Pad positions are ignored.
                attention_mask = None
            mask = attn_mask if attn_mask is not None else build_attention_mask(
                attention_mask, T, T, device=input_ids.device)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, True, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, True, kv_cache)
        x = self.model.norm(x)                                                         # (B, T, H)
        if return_hidden:
            return x
        return self.project_logits(x)                                                 # (B, T, V)

    def project_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., H) -> logits (..., V) through the LM head."""
        return F.linear(hidden, self.output_weight)

    # -- checkpoints (implemented in checkpoint.py) --------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device: Any = "cpu") -> "Llama":
        if str(path).endswith(".gguf"):
            from .gguf import load_gguf_model
            return load_gguf_model(path, cls, dtype=dtype, device=device)
        return load_pretrained(path, cls, dtype=dtype, device=device)

    def save_pretrained(self, path: str, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> None:
        save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)

    def resize_token_embeddings(self, new_vocab_size: int) -> None:
        """Grow the embedding (and untied head); new rows = mean of the old rows."""
        from .vocab import resize_token_embeddings
        resize_token_embeddings(self, new_vocab_size)
