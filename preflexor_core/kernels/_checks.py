"""Input validation shared by every attention / log-prob path (Triton and torch).

Each check raises ``ValueError`` naming the argument, what it got and what was expected, so a
caller sees the same message whichever backend ends up running. Shapes, dtypes and devices are
always checked; checks that read tensor VALUES (label ranges, cu_seqlens offsets) run only on CPU,
or on every device with ``PREFLEXOR_DEBUG=1``, because reading a GPU tensor forces a host sync.
Tests: ``python -m pytest tests/test_kernels_attention.py tests/test_kernels_logprobs.py -q``.
"""
from __future__ import annotations


import torch

from ..infra import env

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def check_values(device: torch.device) -> bool:
    """True when value checks should run for tensors on ``device``: on CPU, or with PREFLEXOR_DEBUG=1."""
    return device.type == "cpu" or env.debug()


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, triton: bool) -> None:
    """Padded layout: q [B, Hq, T, D], k/v [B, Hkv, S, D]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D [B, H, seq, D], got shape {_shape(t)}"
                             " (for packed [total, H, D] inputs use flash_attention_varlen / cu_seqlens=)")
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}")
    if k.shape[0] != B:
        raise ValueError(f"flash_attention: batch size mismatch, q has B={B} but k/v have B={k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"flash_attention: head dim mismatch, q has D={D} but k/v have D={k.shape[3]}")
    _check_heads("flash_attention", Hq, k.shape[1])
    _check_common("flash_attention", q, k, v, D, triton)


def check_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, triton: bool) -> None:
    """Packed layout: q [total, Hq, D], k/v [total, Hkv, D], cu_seqlens [nseq + 1] int32."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"flash_attention_varlen: {name} must be 3-D packed [total, H, D], got shape {_shape(t)}")
    total, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"flash_attention_varlen: k and v must have the same shape, got k {_shape(k)} "
                         f"and v {_shape(v)}")
    if k.shape[0] != total:
        raise ValueError(f"flash_attention_varlen: q has {total} packed tokens but k/v have {k.shape[0]}; "
                         "queries and keys share cu_seqlens so their totals must match")
    if k.shape[2] != D:
        raise ValueError(f"flash_attention_varlen: head dim mismatch, q has D={D} but k/v have D={k.shape[2]}")
    _check_heads("flash_attention_varlen", Hq, k.shape[1])
    _check_common("flash_attention_varlen", q, k, v, D, triton)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError("flash_attention_varlen: cu_seqlens must be 1-D [nseq + 1] with nseq >= 1, "
                         f"got shape {_shape(cu_seqlens)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"flash_attention_varlen: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"flash_attention_varlen: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if max_seqlen is None:
        raise ValueError("flash_attention_varlen: max_seqlen is required (the longest sequence in cu_seqlens)")
    if not check_values(q.device):
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError("flash_attention_varlen: cu_seqlens must start at 0, be non-decreasing and end at the "
                         f"packed length {total}, got {cu[:4]}{'...' if len(cu) > 4 else ''} ending at {cu[-1]}")
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    if int(max_seqlen) < longest:
        raise ValueError(f"flash_attention_varlen: max_seqlen={max_seqlen} is smaller than the longest "
                         f"sequence in cu_seqlens ({longest}); pass max_seqlen >= {longest}")


def _check_heads(op: str, hq: int, hkv: int) -> None:
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{op}: number of query heads ({hq}) must be a multiple of the number of "
                         f"key/value heads ({hkv}) for grouped-query attention")


def _check_common(op: str, q, k, v, D: int, triton: bool) -> None:
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: expected a floating dtype (fp16/bf16/fp32), got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if triton:
        if q.dtype == torch.float64:
            raise ValueError(f"{op}: the Triton kernel takes fp16/bf16/fp32, got float64 "
                             "(use PREFLEXOR_KERNELS=reference for float64)")
        if D % 16 != 0 or not 16 <= D <= MAX_HEAD_DIM:
            raise ValueError(f"{op}: the Triton kernel needs a head dim that is a multiple of 16 in "
                             f"[16, {MAX_HEAD_DIM}], got D={D}")


def check_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int) -> None:
    """hidden [N, H], weight [V, H], labels [N] integer in [0, V) or == ignore_index."""
    if hidden.dim() != 2:
        raise ValueError(f"linear_logprobs: hidden must be 2-D [N, H], got shape {_shape(hidden)} "
                         "(flatten batch and time first: hidden.reshape(-1, H))")
    if weight.dim() != 2:
        raise ValueError(f"linear_logprobs: weight must be 2-D [V, H], got shape {_shape(weight)}")
    N, H = hidden.shape
    if weight.shape[0] == 0:
        raise ValueError("linear_logprobs: weight has an empty vocabulary (V=0); expected [V, H] with V >= 1")
    if weight.shape[1] != H:
        raise ValueError(f"linear_logprobs: hidden size mismatch, hidden is {_shape(hidden)} so weight must be "
                         f"[V, {H}], got {_shape(weight)}")
    if labels.dim() != 1 or labels.shape[0] != N:
        raise ValueError(f"linear_logprobs: labels must be 1-D of length N={N}, got shape {_shape(labels)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"linear_logprobs: labels must be an integer tensor, got {labels.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_logprobs: hidden and weight must share a dtype, got {hidden.dtype} and "
                         f"{weight.dtype}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"linear_logprobs: hidden, weight, labels must be on one device, got {hidden.device}, "
                         f"{weight.device}, {labels.device}")
    if N > 0 and check_values(labels.device):
        V = weight.shape[0]
        used = labels[labels != ignore_index]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= V):
            raise ValueError(f"linear_logprobs: labels must lie in [0, {V}) or equal ignore_index={ignore_index}, "
                             f"got values in [{int(used.min())}, {int(used.max())}]")
