"""Fused flash attention (forward + backward) in Triton, with GQA and varlen (packed) sequences.

Algorithm: FlashAttention-2 (Dao 2023; FlashAttention, Dao et al. 2022): an online-softmax forward
that saves the row log-sum-exp; a backward that recomputes P block by block, one kernel per key
block for dK, dV (over its GQA group's query heads, no atomics) and one per query block for dQ.
Layouts (only the head dim contiguous): padded q [B, Hq, T, D], k/v [B, Hkv, S, D]; varlen
q [total, Hq, D], k/v [total, Hkv, D], cu_seqlens [nseq + 1] int32. Causal alignment is
bottom-right (``kernels/reference.py``). fp16/bf16/fp32 inputs, head dims multiple of 16 up to 256,
fp32 accumulation (fp32 dots: the backend default, TF32 on recent NVIDIA GPUs).
Run the tests (CPU, Triton interpreter): ``TRITON_INTERPRET=1 python -m pytest tests/test_kernels_attention.py -q``;
on CUDA: ``python -m pytest tests/gpu/test_kernels_gpu.py``; speed: ``make bench``.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .reference import autocast_off

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _seq_bounds(CU, b, T, S, VARLEN: tl.constexpr):
    """(q_start, k_start, q_len, k_len) of batch row / packed sequence b, all int32 tensors (adding
    a tensor zero keeps T or S a tensor even when Triton specialises an argument equal to 1)."""
    zero = b * 0
    if VARLEN:
        q_start = tl.load(CU + b)
        q_len = tl.load(CU + b + 1) - q_start
        k_start = q_start
        k_len = q_len
    else:
        q_start = zero
        k_start = zero
        k_len = S + zero
        q_len = T + zero
    return q_start, k_start, q_len, k_len


@triton.jit
def _flash_attention_fwd_kernel(
    Q, K, V, O, LSE, CU,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    T, S, HQ, HEAD_DIM, qk_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    q_start, k_start, q_len, k_len = _seq_bounds(CU, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    diag = k_len - q_len                                    # query i sits at key position i + diag

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + h * stride_qh + (q_start + offs_m)[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh + k_start * stride_kt
    v_base = V + b * stride_vb + hk * stride_vh + k_start * stride_vt

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M + diag)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < k_len
        kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)                  # (D, N)
        s = tl.dot(q, kt) * qk_scale                                                 # (M, N), log2 units
        ok = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)                  # (N, D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(vb.dtype), vb, acc)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, 0.0, m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * stride_ob + h * stride_oh + (q_start + offs_m)[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=m_ok)


@triton.jit
def _flash_attention_bwd_preprocess_kernel(
    O, DO, DELTA, CU,
    stride_ob, stride_oh, stride_ot,
    stride_db, stride_dh, stride_dt,
    stride_lb, stride_lh,
    T, S, HQ, HEAD_DIM,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d O[i, d] * dO[i, d] (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    q_start, k_start, q_len, k_len = _seq_bounds(CU, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = (q_start + offs_m)[:, None]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows * stride_dt + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * stride_lb + h * stride_lh + q_start + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def _flash_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_lb, stride_lh,
    T, S, HKV, HEAD_DIM, qk_scale, sm_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One key block of one kv head: dV = sum P^T dO, dK = sum dS^T Q * scale over its query heads."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    q_start, k_start, q_len, k_len = _seq_bounds(CU, b, T, S, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    diag = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = cols < k_len
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + (k_start + cols)[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)                                             # (N, D)
    v = tl.load(V + b * stride_vb + hk * stride_vh + (k_start + cols)[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo = 0
    if CAUSAL:                                              # queries with i + diag >= n0 see this block
        lo = (tl.maximum(n0 - diag, 0) // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh + q_start * stride_qt
        do_base = DO + b * stride_db + h * stride_dh + q_start * stride_dt
        l_base = b * stride_lb + h * stride_lh + q_start
        for m0 in range(lo, q_len, BLOCK_M):
            rows = m0 + offs_m
            m_ok = rows < q_len
            qm = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=qm, other=0.0)     # (M, D)
            do = tl.load(do_base + rows[:, None] * stride_dt + offs_d[None, :], mask=qm, other=0.0)
            lse = tl.load(LSE + l_base + rows, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + l_base + rows, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale                                                     # (M, N)
            ok = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None] + diag)
            p = tl.math.exp2(tl.where(ok, s, float("-inf")) - lse[:, None])
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
            dp = tl.dot(do, tl.trans(v))                                                              # (M, N)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + (k_start + cols)[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + (k_start + cols)[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _flash_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt,
    stride_dqb, stride_dqh, stride_dqt,
    stride_lb, stride_lh,
    T, S, HQ, HEAD_DIM, qk_scale, sm_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One query block of one query head: dQ = sum dS K * scale."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    q_start, k_start, q_len, k_len = _seq_bounds(CU, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    diag = k_len - q_len

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = rows < q_len
    d_ok = offs_d < HEAD_DIM
    qm = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + (q_start + rows)[:, None] * stride_qt + offs_d[None, :],
                mask=qm, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + (q_start + rows)[:, None] * stride_dt + offs_d[None, :],
                 mask=qm, other=0.0)
    l_base = b * stride_lb + h * stride_lh + q_start
    lse = tl.load(LSE + l_base + rows, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + l_base + rows, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh + k_start * stride_kt
    v_base = V + b * stride_vb + hk * stride_vh + k_start * stride_vt
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M + diag)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < k_len
        kvm = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kvm, other=0.0)       # (N, D)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kvm, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        ok = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + diag)
        p = tl.math.exp2(tl.where(ok, s, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + (q_start + rows)[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qm)


# ----------------------------------------------------------------------------- launchers
def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, seq) element strides; packed [total, H, D] tensors have no batch stride."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _config(D: int, backward: bool, elem_size: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Small blocks under the interpreter (speed);
    on GPU sized so the fp32 accumulators fit in registers for the head dim and the pipelined tiles
    fit in shared memory (fp32 inputs: half the key block, one stage less; checked by compiling for
    sm_90 / sm_80 limits). Not autotuned."""
    if _interpreting():
        return 32, 32, 4, 1
    if elem_size >= 4:
        bm, bn, warps, stages = _config(D, backward)
        return bm, max(16, bn // 2), warps, max(1, stages - 1)
    if not backward:
        if D <= 64:
            return 128, 64, 4, 3
        if D <= 128:
            return 128, 64, 8, 2
        return 64, 32, 8, 2
    if D <= 64:
        return 64, 64, 4, 2
    if D <= 128:
        return 64, 64, 8, 2
    return 32, 32, 8, 1


class _Layout:
    """Shape bookkeeping shared by the launchers (padded vs packed)."""

    def __init__(self, q, k, cu_seqlens, max_seqlen):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            _, self.hq, self.d = q.shape
            self.hkv = k.shape[1]
            self.nbatch = cu_seqlens.shape[0] - 1
            self.t = self.s = int(max_seqlen)
        else:
            self.nbatch, self.hq, self.t, self.d = q.shape
            self.hkv, self.s = k.shape[1], k.shape[2]
        self.group = self.hq // self.hkv
        self.block_d = max(16, triton.next_power_of_2(self.d))
        self.cu = cu_seqlens.contiguous() if self.varlen else torch.empty(1, dtype=torch.int32, device=q.device)

    def lse_buffer(self, q):
        if self.varlen:                                        # [Hq, total]
            buf = torch.zeros(self.hq, q.shape[0], dtype=torch.float32, device=q.device)
            return buf, 0, buf.stride(0)
        buf = torch.zeros(self.nbatch, self.hq, self.t, dtype=torch.float32, device=q.device)
        return buf, buf.stride(0), buf.stride(1)


def flash_attention_forward(q, k, v, causal, sm_scale, cu_seqlens=None, max_seqlen=None, block_m=None,
                            block_n=None):
    """Launch the forward kernel. Returns (o, lse, layout, lse strides); lse is fp32 in log2 units."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    L = _Layout(q, k, cu_seqlens, max_seqlen)
    bm, bn, warps, stages = _config(L.d, backward=False, elem_size=q.element_size())
    bm = min(bm, max(16, triton.next_power_of_2(L.t)))     # decode: T = 1..few needs no 128-row tile
    bm, bn = block_m or bm, block_n or bn
    o = torch.zeros_like(q)
    lse, slb, slh = L.lse_buffer(q)
    grid = (triton.cdiv(max(L.t, 1), bm), L.nbatch * L.hq)
    _flash_attention_fwd_kernel[grid](
        q, k, v, o, lse, L.cu,
        *_strides(q, L.varlen), *_strides(k, L.varlen), *_strides(v, L.varlen), *_strides(o, L.varlen),
        slb, slh, L.t, L.s, L.hq, L.d, sm_scale * LOG2E,
        GROUP=L.group, CAUSAL=bool(causal), VARLEN=L.varlen,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=L.block_d, num_warps=warps, num_stages=stages,
    )
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, causal, sm_scale, cu_seqlens=None, max_seqlen=None,
                             block_m=None, block_n=None):
    """Launch the backward kernels. Returns (dq, dk, dv) in the input dtypes."""
    do = _last_dim_contiguous(do)
    L = _Layout(q, k, cu_seqlens, max_seqlen)
    bm, bn, warps, stages = _config(L.d, backward=True, elem_size=q.element_size())
    bm, bn = block_m or bm, block_n or bn
    slb, slh = (0, lse.stride(0)) if L.varlen else (lse.stride(0), lse.stride(1))
    delta = torch.zeros_like(lse)
    grid_m = (triton.cdiv(max(L.t, 1), bm), L.nbatch * L.hq)
    _flash_attention_bwd_preprocess_kernel[grid_m](
        o, do, delta, L.cu, *_strides(o, L.varlen), *_strides(do, L.varlen), slb, slh,
        L.t, L.s, L.hq, L.d, VARLEN=L.varlen, BLOCK_M=bm, BLOCK_D=L.block_d,
    )
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    common = dict(GROUP=L.group, CAUSAL=bool(causal), VARLEN=L.varlen,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=L.block_d, num_warps=warps, num_stages=stages)
    qkv_strides = (*_strides(q, L.varlen), *_strides(k, L.varlen), *_strides(v, L.varlen),
                   *_strides(do, L.varlen))
    _flash_attention_bwd_dkdv_kernel[(triton.cdiv(max(L.s, 1), bn), L.nbatch * L.hkv)](
        q, k, v, do, lse, delta, dk, dv, L.cu, *qkv_strides,
        *_strides(dk, L.varlen), *_strides(dv, L.varlen), slb, slh,
        L.t, L.s, L.hkv, L.d, sm_scale * LOG2E, sm_scale, **common,
    )
    _flash_attention_bwd_dq_kernel[grid_m](
        q, k, v, do, lse, delta, dq, L.cu, *qkv_strides, *_strides(dq, L.varlen), slb, slh,
        L.t, L.s, L.hq, L.d, sm_scale * LOG2E, sm_scale, **common,
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
