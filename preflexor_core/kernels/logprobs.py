"""Fused linear + log-softmax + gather in Triton: log p(label) without the [N, V] logits.

``linear_logprobs(hidden [N, H], weight [V, H], labels [N])`` returns fp32 ``log p(label)`` per row
(0 where ``labels == ignore_index``), the quantity the ORPO / DPO losses sum per sequence.

Forward: per (token block, vocab split), logit tiles with an online log-sum-exp over the vocab
(the FlashAttention trick, Dao et al. 2022, on the vocab axis); splits merged in torch. Backward:
per token chunk, recompute the tiles into grad_logits = g * (onehot(label) - softmax) [chunk, V],
then grad_hidden = grad_logits @ W and grad_W += grad_logits^T @ hidden (fp32 accumulator). Peak
extra memory: one [chunk, V] buffer. fp32 dots follow torch.get_float32_matmul_precision();
tiles per device, 64-bit row offsets and grid limits: ``_launch``. Saved: hidden, weight, labels, lse [N].
The CPU production path is ``reference.linear_logprobs_chunked`` (same chunking, torch only).
Run the tests: ``TRITON_INTERPRET=1 python -m pytest tests/test_kernels_logprobs.py -q``;
memory / speed: ``make bench``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from .reference import autocast_off, chunk_rows_for

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _logit_tile(H_blk, W_blk, offs_n, offs_v, n_ok, v_ok, HID, stride_hn, stride_wv,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 tile of hidden @ weight^T; ``H_blk`` / ``W_blk`` point at the tile's first row (64-bit
    scalar bases), ``offs_n`` / ``offs_v`` are 32-bit in-tile row offsets."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    for h0 in range(0, HID, BLOCK_H):
        cols = h0 + offs_h
        h_ok = cols < HID
        hb = tl.load(H_blk + offs_n[:, None] * stride_hn + cols[None, :], mask=n_ok[:, None] & h_ok[None, :],
                     other=0.0)
        wb = tl.load(W_blk + offs_v[:, None] * stride_wv + cols[None, :], mask=v_ok[:, None] & h_ok[None, :],
                     other=0.0)
        acc = tl.dot(hb, tl.trans(wb), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_logprobs_fwd_kernel(
    H, W, LABELS, MAX, SUMEXP, TARGET,
    N, V, HID, V_PER_SPLIT, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per (token block, vocab split): running max, running sum of exp (log2 units) and label logit."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    offs_r = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_V)
    n_ok = n0 + offs_r < N
    labels = tl.load(LABELS + n0 + offs_r, mask=n_ok, other=-1)
    h_blk = H + n0.to(tl.int64) * stride_hn
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(V, v_lo + V_PER_SPLIT)
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + offs_c
        v_ok = offs_v < v_hi
        logits = _logit_tile(h_blk, W + tl.cast(v0, tl.int64) * stride_wv, offs_r, offs_c, n_ok, v_ok, HID,
                             stride_hn, stride_wv, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        tgt += tl.sum(tl.where(offs_v[None, :] == labels[:, None], logits, 0.0), 1)
        z = tl.where(v_ok[None, :], logits * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))                  # finite: every tile has a valid column
        s_i = s_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(z - m_new[:, None]), 1)
        m_i = m_new
    out = pid_s.to(tl.int64) * N + n0 + offs_r
    tl.store(MAX + out, m_i, mask=n_ok)
    tl.store(SUMEXP + out, s_i, mask=n_ok)
    tl.store(TARGET + out, tgt, mask=n_ok)


@triton.jit
def _linear_logprobs_bwd_kernel(
    H, W, LABELS, LSE, G, GRAD_LOGITS,
    N, V, HID, stride_hn, stride_wv, stride_gn,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grad_logits tile = g * (onehot(label) - exp(logit - lse)); g is 0 on ignored rows."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    v0 = pid_v * BLOCK_V
    offs_r = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_V)
    n_ok = n0 + offs_r < N
    v_ok = v0 + offs_c < V
    n64, v64 = n0.to(tl.int64), v0.to(tl.int64)
    logits = _logit_tile(H + n64 * stride_hn, W + v64 * stride_wv, offs_r, offs_c, n_ok, v_ok, HID,
                         stride_hn, stride_wv, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    labels = tl.load(LABELS + n0 + offs_r, mask=n_ok, other=-1)
    lse = tl.load(LSE + n0 + offs_r, mask=n_ok, other=0.0)
    g = tl.load(G + n0 + offs_r, mask=n_ok, other=0.0)
    p = tl.math.exp2((logits - lse[:, None]) * 1.4426950408889634)
    onehot = ((v0 + offs_c)[None, :] == labels[:, None]).to(tl.float32)
    grad = g[:, None] * (onehot - p)
    tl.store(GRAD_LOGITS + n64 * stride_gn + v64 + offs_r[:, None] * stride_gn + offs_c[None, :],
             grad.to(GRAD_LOGITS.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])


# ----------------------------------------------------------------------------- launchers
def _plan(hidden, weight, block_n=None, block_v=None, block_h=None):
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages, dot precision, device limits or None)."""
    limits = None if _launch.interpreting() else _launch.device_limits(hidden.device)
    precision = _launch.dot_precision(hidden.dtype)
    bn, bv, bh, warps, stages = _launch.logprobs_config(hidden.dtype, limits, precision)
    bn, bv, bh = block_n or bn, block_v or bv, block_h or bh
    _launch.check_tile_span("linear_logprobs", "hidden", hidden.stride(0), bn, bh)
    _launch.check_tile_span("linear_logprobs", "weight", weight.stride(0), bv, bh)
    return bn, bv, bh, warps, stages, precision, limits


def num_splits(N: int, V: int, block_n: int, block_v: int, sm_count: int | None) -> int:
    """Vocab splits so that (token blocks x splits) fills the GPU (``sm_count`` SMs, 4 programs
    each); 2 under the interpreter (``sm_count`` None, tested). At most 64 (grid y)."""
    v_blocks = triton.cdiv(V, block_v)
    if sm_count is None:
        return max(1, min(2, v_blocks))
    want = triton.cdiv(4 * sm_count, max(1, triton.cdiv(N, block_n)))
    return max(1, min(want, v_blocks, 64))


def linear_logprobs_forward(hidden, weight, labels, ignore_index, block_n=None, block_v=None, block_h=None):
    """Returns (logp [N] fp32, lse [N] fp32, natural log)."""
    bn, bv, bh, warps, stages, precision, limits = _plan(hidden, weight, block_n, block_v, block_h)
    N, HID = hidden.shape
    V = weight.shape[0]
    splits = num_splits(N, V, bn, bv, limits.sm_count if limits else None)
    v_per_split = triton.cdiv(triton.cdiv(V, splits), bv) * bv
    splits = triton.cdiv(V, v_per_split)
    mx = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    se = torch.empty_like(mx)
    tgt = torch.empty_like(mx)
    if N:
        _linear_logprobs_fwd_kernel[_launch.grid_2d(triton.cdiv(N, bn), splits, "linear_logprobs vocab splits")](
            hidden, weight, labels, mx, se, tgt, N, V, HID, v_per_split, hidden.stride(0), weight.stride(0),
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, DOT_PRECISION=precision, num_warps=warps, num_stages=stages,
        )
    lse = torch.logsumexp((mx + torch.log2(se)) / LOG2E, dim=0)               # per-split log2 -> natural
    keep = labels != ignore_index
    logp = torch.where(keep, tgt.sum(0) - lse, torch.zeros_like(lse))
    return logp, lse


def linear_logprobs_backward(grad_out, hidden, weight, labels, lse, ignore_index, need_hidden, need_weight,
                             chunk_rows=None, block_n=None, block_v=None, block_h=None):
    """Returns (grad_hidden or None, grad_weight or None) in the input dtypes."""
    bn, bv, bh, warps, stages, precision, _ = _plan(hidden, weight, block_n, block_v, block_h)
    N, HID = hidden.shape
    V = weight.shape[0]
    if chunk_rows is None and not _launch.interpreting():        # [rows, V] buffer in the input dtype, <= 256 MiB
        chunk_rows = max(16, min(1024, (256 << 20) // (hidden.element_size() * V)))
    rows = chunk_rows_for(V, chunk_rows)
    g = torch.where(labels != ignore_index, grad_out.float(), torch.zeros((), device=grad_out.device))
    grad_h = torch.empty_like(hidden) if need_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    buf = torch.empty(min(rows, max(N, 1)), V, dtype=hidden.dtype, device=hidden.device)
    for a in range(0, N, rows):
        b = min(N, a + rows)
        gl = buf[: b - a]
        h = hidden[a:b]
        _linear_logprobs_bwd_kernel[_launch.grid_2d(triton.cdiv(b - a, bn), triton.cdiv(V, bv),
                                                    "linear_logprobs vocab blocks")](
            h, weight, labels[a:], lse[a:], g[a:], gl, b - a, V, HID, h.stride(0), weight.stride(0), gl.stride(0),
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, DOT_PRECISION=precision, num_warps=warps, num_stages=stages,
        )
        if need_hidden:
            torch.matmul(gl, weight, out=grad_h[a:b])
        if need_weight:
            _addmm_fp32_(grad_w, gl.T, h)
    return grad_h, (grad_w.to(weight.dtype) if need_weight else None)


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b in place. Half inputs use the fp32-output GEMM (addmm out_dtype, cuBLAS)
    so nothing is rounded to half between chunks; where the backend lacks it, a half product is
    added (one [V, H] temporary)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        acc += (a @ b).float()


# ----------------------------------------------------------------------------- autograd
class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows):
        hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
        logp, lse = linear_logprobs_forward(hidden, weight, labels, ignore_index)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows
        return logp

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None
        grad_h, grad_w = linear_logprobs_backward(grad_out.contiguous(), hidden, weight, labels, lse,
                                                  ctx.ignore_index, need_h, need_w, ctx.chunk_rows)
        return grad_h, grad_w, None, None, None


# Positional: (hidden, weight, labels, ignore_index, chunk_rows). Inputs are validated by the public
# dispatch in ``preflexor_core.kernels``.
linear_logprobs = _LinearLogprobs.apply
