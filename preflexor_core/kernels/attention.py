"""Fused flash attention (forward + backward) in Triton, with GQA and varlen (packed) sequences.

Algorithm: FlashAttention-2 (Dao 2023; FlashAttention, Dao et al. 2022): an online-softmax forward
that saves the row log-sum-exp; a backward that recomputes P block by block, one kernel per key
block for dK, dV (over its GQA group's query heads, no atomics) and one per query block for dQ.
Layouts (only the head dim contiguous): padded q [B, Hq, T, D], k/v [B, Hkv, S, D]; varlen
q [total, Hq, D], k/v [total, Hkv, D], cu_seqlens [nseq + 1] int32. Causal alignment is
bottom-right (``kernels/reference.py``). fp16/bf16/fp32 inputs, head dims multiple of 16 up to 256,
fp32 accumulation; fp32 inputs' dots follow torch.get_float32_matmul_precision() ("highest": IEEE,
"high"/"medium": TF32). Tiles per device, 64-bit base offsets and grids: ``_launch``; the
@triton.jit kernels themselves: ``attention_jit``.
Run the tests (CPU, Triton interpreter): ``TRITON_INTERPRET=1 python -m pytest tests/test_kernels_attention.py -q``;
on CUDA: ``python -m pytest tests/gpu/test_kernels_gpu.py``; speed: ``make bench``.
"""
from __future__ import annotations

import math

import torch
import triton

from . import _launch, attention_jit
from .reference import autocast_off

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- launchers
_strides = _launch.seq_strides          # (batch, head, seq) element strides


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_attention_forward(q, k, v, causal, sm_scale, cu_seqlens=None, max_seqlen=None, block_m=None,
                            block_n=None):
    """Launch the forward kernel. Returns (o, lse); lse is fp32 in log2 units."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    L = _launch.AttentionLayout(q, k, cu_seqlens, max_seqlen)
    bm, bn, warps, stages = L.config("fwd")
    bm = min(bm, max(16, triton.next_power_of_2(L.t)))     # decode: T = 1..few needs no 128-row tile
    bm, bn = block_m or bm, block_n or bn
    L.check_spans((("q", q), ("k", k), ("v", v)), max(bm, bn))
    o = torch.zeros_like(q)
    lse, slb, slh = L.lse_buffer(q)
    attention_jit._flash_attention_fwd_kernel[L.grid(L.t, bm, L.hq)](
        q, k, v, o, lse, L.cu,
        *_strides(q, L.varlen), *_strides(k, L.varlen), *_strides(v, L.varlen), *_strides(o, L.varlen),
        slb, slh, L.t, L.s, L.hq, L.nbatch * L.hq, L.d, sm_scale * LOG2E,
        GROUP=L.group, CAUSAL=bool(causal), VARLEN=L.varlen, DOT_PRECISION=L.precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=L.block_d, num_warps=warps, num_stages=stages,
    )
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, causal, sm_scale, cu_seqlens=None, max_seqlen=None,
                             block_m=None, block_n=None):
    """Launch the backward kernels. Returns (dq, dk, dv) in the input dtypes. dK/dV and dQ have their
    own tiles (``_launch.attention_config``); ``block_m`` / ``block_n`` override both."""
    do = _last_dim_contiguous(do)
    L = _launch.AttentionLayout(q, k, cu_seqlens, max_seqlen)
    slb, slh = (0, lse.stride(0)) if L.varlen else (lse.stride(0), lse.stride(1))
    delta = torch.zeros_like(lse)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    qkv_strides = (*_strides(q, L.varlen), *_strides(k, L.varlen), *_strides(v, L.varlen),
                   *_strides(do, L.varlen))
    common = dict(GROUP=L.group, CAUSAL=bool(causal), VARLEN=L.varlen, DOT_PRECISION=L.precision,
                  BLOCK_D=L.block_d)

    bm, bn, warps, stages = L.config("dq")
    bm, bn = block_m or bm, block_n or bn
    L.check_spans((("q", q), ("k", k), ("v", v), ("do", do), ("o", o)), max(bm, bn))
    grid_m = L.grid(L.t, bm, L.hq)
    attention_jit._flash_attention_bwd_preprocess_kernel[grid_m](
        o, do, delta, L.cu, *_strides(o, L.varlen), *_strides(do, L.varlen), slb, slh,
        L.t, L.s, L.hq, L.nbatch * L.hq, L.d, VARLEN=L.varlen, BLOCK_M=bm, BLOCK_D=L.block_d,
    )
    attention_jit._flash_attention_bwd_dq_kernel[grid_m](
        q, k, v, do, lse, delta, dq, L.cu, *qkv_strides, *_strides(dq, L.varlen), slb, slh,
        L.t, L.s, L.hq, L.nbatch * L.hq, L.d, sm_scale * LOG2E, sm_scale, **common,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    bm, bn, warps, stages = L.config("dkdv")
    bm, bn = block_m or bm, block_n or bn
    attention_jit._flash_attention_bwd_dkdv_kernel[L.grid(L.s, bn, L.hkv)](
        q, k, v, do, lse, delta, dk, dv, L.cu, *qkv_strides,
        *_strides(dk, L.varlen), *_strides(dv, L.varlen), slb, slh,
        L.t, L.s, L.hkv, L.nbatch * L.hkv, L.d, sm_scale * LOG2E, sm_scale, **common,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd
class _FlashAttention(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, causal, sm_scale, cu_seqlens, max_seqlen, block_m, block_n):
        head_dim = q.shape[-1]
        scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = flash_attention_forward(q, k, v, causal, scale, cu_seqlens, max_seqlen, block_m, block_n)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.args = (causal, scale, max_seqlen, block_m, block_n)
        return o

    @staticmethod
    @autocast_off
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        causal, scale, max_seqlen, block_m, block_n = ctx.args
        dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, causal, scale, cu_seqlens, max_seqlen,
                                              block_m, block_n)
        return dq, dk, dv, None, None, None, None, None, None


# Positional: (q, k, v, causal, sm_scale, cu_seqlens, max_seqlen, block_m, block_n).
# Inputs are validated by the public dispatch in ``preflexor_core.kernels``.
flash_attention = _FlashAttention.apply
