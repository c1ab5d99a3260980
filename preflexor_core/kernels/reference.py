"""Torch references for the fused kernels, and the CPU production path for log-probs.

- ``attention_reference`` / ``attention_varlen_reference``: naive attention with explicit masks
  (materialises [T, S] scores); it defines what ``attention.py`` must match, and is the CPU path.
- ``linear_logprobs_reference``: ``log_softmax(hidden @ weight.T).gather(labels)`` (tests only).
- ``linear_logprobs_chunked``: the CPU path of ``linear_logprobs``, an autograd.Function over token
  chunks that saves hidden, weight, labels and the row log-sum-exp and recomputes in the backward.
Masking rules (shared with the kernels). Causal alignment is bottom-right, as in FlashAttention-2:
with T queries and S keys (per packed sequence: its length for both), query i sits at key
position ``i + S - T`` and may see keys ``j <= i + S - T``. So T == S: query i sees keys 0..i;
T < S: T new tokens at the end of S cached ones; T > S causal: the first T - S queries see no key
and output zeros (zero gradient).

Run the tests: ``python -m pytest tests/test_kernels_attention.py tests/test_kernels_logprobs.py -q``.
"""
from __future__ import annotations

import functools
import math

import torch

IGNORE_INDEX = -100


def autocast_off(fn):
    """Run an autograd.Function ``forward``/``backward`` with autocast disabled: the kernels choose
    their own precisions (fp32 accumulation, outputs in the input dtypes), and torch ops inside them
    must not be recast to bf16 by an enclosing ``torch.autocast`` (e.g. a backward called inside it)."""
    @functools.wraps(fn)
    def wrapped(ctx, *args):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(dev, enabled=False):
            return fn(ctx, *args)
    return wrapped

# Rows of fp32 logits per chunk in the chunked log-prob path: at most this many rows and at most
# this many bytes for one [rows, V] fp32 buffer.
CHUNK_ROWS = 1024
CHUNK_BYTES = 32 * 1024 * 1024


# ----------------------------------------------------------------------------- attention
def attention_mask(T: int, S: int, causal: bool, device=None) -> torch.Tensor:
    """Boolean [T, S] "may attend" mask implementing the rules in the module docstring."""
    if not causal:
        return torch.ones((T, S), dtype=torch.bool, device=device)
    i = torch.arange(T, device=device)[:, None]                             # (T, 1)
    j = torch.arange(S, device=device)[None, :]                             # (1, S)
    return j <= i + (S - T)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        sm_scale: float | None = None) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] -> [B, Hq, T, D] in q's dtype (computed in >= fp32)."""
    Hq, T, D = q.shape[1:]
    S, Hkv = k.shape[2], k.shape[1]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = Hq // Hkv
    kk = k.to(compute).repeat_interleave(groups, dim=1)                     # (B, Hq, S, D)
    vv = v.to(compute).repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.to(compute), kk.transpose(-1, -2)) * scale      # (B, Hq, T, S)
    allowed = attention_mask(T, S, causal, q.device)                        # (T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    any_key = allowed.any(-1, keepdim=True)                                 # (T, 1)
    probs = torch.softmax(scores.masked_fill(~any_key, 0.0), dim=-1) * any_key
    return torch.matmul(probs, vv).to(q.dtype)


def attention_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               causal: bool = True, sm_scale: float | None = None) -> torch.Tensor:
    """Packed q [total, Hq, D], k/v [total, Hkv, D], cu_seqlens [nseq + 1] -> [total, Hq, D]."""
    outs = []
    cu = cu_seqlens.tolist()
    for a, b in zip(cu, cu[1:]):
        if b == a:
            continue
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))      # (1, H, L, D)
        outs.append(attention_reference(qs, ks, vs, causal, sm_scale)[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, 0)


# ----------------------------------------------------------------------------- log-probs
def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Naive log p(label) [N] in >= fp32: materialises the [N, V] logits. 0 where ignored."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(hidden.to(compute) @ weight.to(compute).T, dim=-1)          # (N, V)
    keep = labels != ignore_index
    picked = logp.gather(1, torch.where(keep, labels, 0).long()[:, None])[:, 0]
    return torch.where(keep, picked, torch.zeros_like(picked))


def chunk_rows_for(V: int, rows: int | None = None) -> int:
    """Rows per chunk so that one [rows, V] fp32 buffer stays under CHUNK_BYTES (and <= CHUNK_ROWS)."""
    if rows is not None:
        return max(1, int(rows))
    return max(16, min(CHUNK_ROWS, CHUNK_BYTES // (4 * max(V, 1))))


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """log p(label) over token chunks; saves hidden, weight, labels and lse [N] only."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows):
        N = hidden.shape[0]
        compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        w = weight if weight.dtype == compute else weight.to(compute)
        rows = chunk_rows_for(weight.shape[0], chunk_rows)
        keep = labels != ignore_index
        safe = torch.where(keep, labels, 0).long()
        lse = torch.empty(N, dtype=compute, device=hidden.device)
        out = torch.empty(N, dtype=compute, device=hidden.device)
        for a in range(0, N, rows):
            b = min(N, a + rows)
            logits = hidden[a:b].to(compute) @ w.T                                      # (n, V)
            lse[a:b] = torch.logsumexp(logits, dim=-1)
            out[a:b] = logits.gather(1, safe[a:b, None])[:, 0] - lse[a:b]
            del logits
        out = torch.where(keep, out, torch.zeros_like(out))
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.rows = ignore_index, rows
        return out.float() if compute == torch.float32 else out

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None
        N = hidden.shape[0]
        compute = lse.dtype
        w = weight if weight.dtype == compute else weight.to(compute)
        keep = labels != ctx.ignore_index
        g = torch.where(keep, grad_out.to(compute), torch.zeros((), dtype=compute, device=grad_out.device))
        safe = torch.where(keep, labels, 0).long()
        grad_h = torch.empty(hidden.shape, dtype=compute, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_w else None
        for a in range(0, N, ctx.rows):
            b = min(N, a + ctx.rows)
            h = hidden[a:b].to(compute)
            gl = h @ w.T                                                                  # (n, V) logits
            gl.sub_(lse[a:b, None]).exp_().mul_(-g[a:b, None])                           # -g * softmax
            gl.scatter_add_(1, safe[a:b, None], g[a:b, None])                            # + g * onehot
            if need_h:
                torch.matmul(gl, w, out=grad_h[a:b])
            if need_w:
                grad_w.addmm_(gl.T, h)
            del gl
        return (grad_h.to(hidden.dtype) if need_h else None,
                grad_w.to(weight.dtype) if need_w else None, None, None, None)


def linear_logprobs_chunked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> torch.Tensor:
    """Chunked torch log p(label) [N] fp32 (fp64 for fp64 inputs); never holds more than one
    [chunk_rows, V] logits buffer (plus its temporaries)."""
    return _ChunkedLinearLogprobs.apply(hidden, weight, labels, ignore_index, chunk_rows)
