"""Grouped-query self-attention of the decoder, its masks, and the family options it carries.

``Attention`` projects q/k/v (biases per ``attention_bias`` / ``qkv_bias``), optionally RMS-normalises
each head of q and k (``qk_norm``: Qwen3, Gemma 3), rotates them, scales q for a
``query_pre_attn_scalar`` other than head_dim (Gemma 3), writes the KV cache and attends. Sliding-window
layers (Mistral, Gemma 3, windowed Qwen) get their own mask from ``sliding_window_mask``: a query at slot
t sees key slots s with t - window < s <= t (transformers' rule, on cache slots). Masks are boolean
"may attend" tensors (B, 1, T, S). Reference: Ainslie et al. 2023 (GQA); Beltagy et al. 2020 (sliding
windows); Gemma Team 2025 (Gemma 3 report).

``_attend`` dispatches: the Triton flash-attention kernels on CUDA for plain causal or packed causal
attention; any explicit mask (padding, sliding windows) takes torch SDPA, the stated fallback for
sliding-window layers (the kernels have no window option). A packed row attends piece by piece
(``Packed.pieces``): each piece's queries see its key ranges causally, aligned to the end, so a
sequence never sees its neighbours and no (T, T) mask is built; prefix sharing is a piece whose keys
are the shared prompt followed by its own tokens.
Tests: ``python -m pytest -q tests/test_model.py tests/test_families.py``
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..infra import env
from . import ops


class RMSNorm(nn.Module):
    """RMSNorm; with ``offset`` (Gemma) the scale is ``offset + weight``, computed in fp32 before the cast."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return ops.rms_norm(x, self.weight, self.eps)


Piece = tuple[int, int, tuple[tuple[int, int], ...]]      # (query start, query end, key ranges)


@dataclass(frozen=True)
class Packed:
    """Sequences packed into one row at ``cu_seqlens`` boundaries. ``pieces``: the attention pieces,
    in order and covering the row: queries [qs, qe) see the concatenated key ranges causally, aligned
    to the end (query i sees keys up to i + S - T); None = one piece per sequence (plain packing)."""
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pieces: tuple[Piece, ...] | None = None

    @property
    def shared(self) -> bool:
        """Some piece sees keys outside its own queries (a shared prefix)."""
        return self.pieces is not None and any(kv != ((qs, qe),) for qs, qe, kv in self.pieces)

    def attention_pieces(self) -> tuple[Piece, ...]:
        if self.pieces is not None:
            return self.pieces
        cu = self.cu_seqlens.tolist()
        return tuple((a, b, ((a, b),)) for a, b in zip(cu[:-1], cu[1:]) if b > a)


def check_pieces(pieces, T: int) -> tuple[Piece, ...]:
    """``pieces`` as tuples, checked: queries in order, covering 0..T; each key range inside the row and
    at least as many keys as queries (the last keys are the queries' own)."""
    out, at = [], 0
    for qs, qe, kv in pieces:
        kv = tuple((int(a), int(b)) for a, b in kv)
        if qs != at or qe <= qs or not kv or any(not 0 <= a < b <= T for a, b in kv) or \
                sum(b - a for a, b in kv) < qe - qs or kv[-1][1] != qe:
            raise ValueError(f"attention pieces must cover the row in order, each ending with its own queries; "
                             f"got ({qs}, {qe}, {kv}) after position {at} (row of {T} tokens)")
        out.append((int(qs), int(qe), kv))
        at = qe
    if at != T:
        raise ValueError(f"attention pieces cover {at} of the row's {T} tokens")
    return tuple(out)


def packed_causal_mask(cu_seqlens: torch.Tensor, T: int, device=None) -> torch.Tensor:
    """Block-diagonal causal (1, 1, T, T) mask for sequences packed at boundaries ``cu_seqlens``."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seg = torch.bucketize(torch.arange(T, device=device), cu[1:-1], right=True)         # (T,)
    pos = torch.arange(T, device=device)
    return ((seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None]))[None, None]


def sliding_window_mask(mask, T: int, window: int, device, query_slots: torch.Tensor | None = None,
                        S: int | None = None) -> torch.Tensor:
    """``mask`` (bool (B|1, 1, T, S), ``Packed`` or None = causal) restricted to keys less than ``window``
    slots behind each query. ``query_slots`` (B|1, T): each query's cache slot (default 0..T-1)."""
    if isinstance(mask, Packed):
        mask = packed_causal_mask(mask.cu_seqlens, T, device)
    if S is None:
        S = mask.shape[-1] if mask is not None else T
    if query_slots is None:
        query_slots = torch.arange(S - T, S, device=device)[None]
    q = query_slots[:, None, :, None]                                      # (B|1, 1, T, 1)
    s = torch.arange(S, device=device)[None, None, None, :]                # (1, 1, 1, S)
    near = s > q - window
    return near & (s <= q) if mask is None else near & mask


def _attend(q, k, v, mask, causal: bool) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D).

    ``mask`` is a boolean (B, 1, T, S) "may attend" mask, a ``Packed`` layout (B = 1), or None
    (then ``causal`` applies). On CUDA (or with PREFLEXOR_KERNELS=triton), None and Packed use the
    Triton flash-attention kernels. q, k, v share one dtype (under autocast too: rope keeps q/k's).
    """
    triton = q.is_cuda or env.kernels_mode() == "triton"
    if isinstance(mask, Packed):
        if triton and not mask.shared:
            o = kernels.flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                               mask.cu_seqlens, mask.max_seqlen, causal=causal)   # (T, Hq, D)
            return o.transpose(0, 1)[None]
        return torch.cat([_attend_piece(q, k, v, piece, triton) for piece in mask.attention_pieces()], dim=2)
    if mask is None and triton:
        return kernels.flash_attention(q, k, v, causal=causal)
    if q.shape[2] == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
        return ops.decode_attention(q, k, v, mask)      # one new token per row: CPU SDPA is slow outside fp32
    gqa = q.shape[1] != k.shape[1]          # SDPA maps query head h to kv head h // (Hq / Hkv) itself
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _attend_piece(q, k, v, piece: Piece, triton: bool) -> torch.Tensor:
    """One piece of a packed row: q[..., qs:qe, :] over the concatenated key ranges, causal, end-aligned."""
    qs, qe, kv = piece
    qp = q[:, :, qs:qe]                                                          # (1, Hq, T, D)
    kp = k[:, :, kv[0][0]:kv[0][1]] if len(kv) == 1 else torch.cat([k[:, :, a:b] for a, b in kv], dim=2)
    vp = v[:, :, kv[0][0]:kv[0][1]] if len(kv) == 1 else torch.cat([v[:, :, a:b] for a, b in kv], dim=2)
    T, S = qe - qs, kp.shape[2]                                                  # kp, vp: (1, Hkv, S, D)
    if triton:
        return kernels.flash_attention(qp, kp, vp, causal=True)                 # end-aligned when S > T
    gqa = qp.shape[1] != kp.shape[1]
    if T == S:
        return F.scaled_dot_product_attention(qp, kp, vp, is_causal=T > 1, enable_gqa=gqa)
    see = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]  # (T, S)
    return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=see, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.sliding = cfg.is_sliding(layer_idx)
        qkv = dict(bias=cfg.attention_bias or cfg.qkv_bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, **qkv)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, **qkv)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, **qkv)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias,
                                device=device, dtype=dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, device, dtype, offset=cfg.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, device, dtype, offset=cfg.norm_offset)
        else:
            self.q_norm = self.k_norm = None
        # SDPA, the Triton kernels and decode_attention scale scores by head_dim ** -0.5; another
        # query_pre_attn_scalar is folded into q once.
        pre = cfg.query_pre_attn_scalar
        self.q_scale = 1.0 if pre is None or pre == self.head_dim else math.sqrt(self.head_dim / pre)

    def forward(self, x, cos, sin, mask, causal, kv_cache=None):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)                  # (B, Hq, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)                     # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)                     # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)                                      # per head
        q, k = ops.rope(q, k, cos, sin)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)                               # (B, Hkv, S, D)
        o = _attend(q, k, v, mask, causal)                                             # (B, Hq, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def project_qkv(self, x):
        """x (B, T, H) -> q, k, v projections (the sampler swaps in one fused product)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)
