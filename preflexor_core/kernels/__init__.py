"""Kernel dispatch: one public function per fused op, picking Triton or torch.

Ops: ``flash_attention`` (``flash_attention_varlen`` when packed), ``linear_logprobs``. Per call:
- ``PREFLEXOR_KERNELS=reference`` -> torch: naive attention (``reference.attention_reference``) and the
  chunked log-probs (``reference.linear_logprobs_chunked``).
- ``PREFLEXOR_KERNELS=triton`` -> the Triton kernels; on CPU tensors this needs ``TRITON_INTERPRET=1``
  (the interpreter, for tests), otherwise it is an error rather than a silent change of path.
- unset / ``auto`` / ``csrc`` (these ops have no csrc kernel) -> Triton when the tensors are on CUDA
  (triton is a runtime requirement), else torch.

Logged once per (op, path) on ``preflexor.kernels``. Inputs are validated here whichever path
runs (values only on CPU or with ``PREFLEXOR_DEBUG=1``, see ``_checks``). Kernels: FlashAttention-2 (Dao 2023).
Tests: ``python -m pytest tests/test_kernels_attention.py tests/test_kernels_logprobs.py -q``.
"""
from __future__ import annotations

import logging

import torch

from ..infra import env
from . import _checks
from .reference import (IGNORE_INDEX, attention_reference, attention_varlen_reference,
                        linear_logprobs_chunked)

__all__ = ["flash_attention", "flash_attention_varlen", "linear_logprobs", "active_path", "IGNORE_INDEX"]

logger = logging.getLogger("preflexor.kernels")
_logged: set[tuple[str, str]] = set()


def active_path(op: str, device: torch.device) -> str:
    """"triton" or "reference" for ``op`` on ``device`` under the current environment."""
    forced = env.kernels_mode()
    interpret = env.triton_interpret()
    if forced == "reference":
        path = "reference"
    elif forced == "triton":
        if device.type != "cuda" and not interpret:
            raise RuntimeError(f"{op}: PREFLEXOR_KERNELS=triton with tensors on {device}; Triton runs on CPU "
                               "only in its interpreter (set TRITON_INTERPRET=1 before importing triton)")
        path = "triton"
    else:
        path = "triton" if device.type == "cuda" else "reference"
    if (op, path) not in _logged:
        _logged.add((op, path))
        detail = {"triton": "Triton kernel" + (" (interpreter)" if device.type != "cuda" else ""),
                  "reference": "torch reference" if op.startswith("flash") else "chunked torch"}[path]
        logger.info("%s: using the %s path on %s (PREFLEXOR_KERNELS=%s)", op, detail, device.type,
                    forced)
    return path


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    sm_scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                    max_seqlen: int | None = None, *,
                    block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v, differentiable in q, k, v.

    q [B, Hq, T, D], k/v [B, Hkv, S, D], Hq % Hkv == 0 (GQA: query head h uses kv head h // (Hq/Hkv)).
    ``sm_scale`` defaults to 1/sqrt(D). Causal alignment is bottom-right: query i sits at key
    position i + S - T (T == S: query i sees keys 0..i); rows that see no key return zeros. With
    ``cu_seqlens`` the inputs are packed [total, H, D] (see ``flash_attention_varlen``).
    ``block_m`` / ``block_n`` override the Triton tile sizes.
    """
    if cu_seqlens is not None:
        return flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale,
                                      block_m=block_m, block_n=block_n)
    path = active_path("flash_attention", q.device)
    _checks.check_attention(q, k, v, triton=path == "triton")
    if path == "reference":
        return attention_reference(q, k, v, causal, sm_scale)
    from .attention import flash_attention as _triton_flash  # triton: optional, only the Triton path loads it
    return _triton_flash(q, k, v, causal, sm_scale, None, None, block_m, block_n)


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, causal: bool = True, sm_scale: float | None = None, *,
                           block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Attention over packed sequences: q [total, Hq, D], k/v [total, Hkv, D]; sequence i occupies
    rows cu_seqlens[i]:cu_seqlens[i+1] (int32, [nseq + 1]); ``max_seqlen`` >= the longest one.
    Sequences never attend to each other; ``causal`` is per sequence. Returns [total, Hq, D]."""
    path = active_path("flash_attention", q.device)
    _checks.check_attention_varlen(q, k, v, cu_seqlens, max_seqlen, triton=path == "triton")
    if path == "reference":
        return attention_varlen_reference(q, k, v, cu_seqlens, causal, sm_scale)
    from .attention import flash_attention as _triton_flash  # triton: optional, only the Triton path loads it
    return _triton_flash(q, k, v, causal, sm_scale, cu_seqlens, int(max_seqlen), block_m, block_n)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int = IGNORE_INDEX, *, chunk_rows: int | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight^T)[label] per row, fp32 [N] (fp64 for fp64 inputs on the torch path;
    0 where labels == ignore_index),
    differentiable in hidden and weight, without materialising the [N, V] logits.

    hidden [N, H], weight [V, H] (same dtype), labels [N] integer. ``chunk_rows`` sets the rows per
    recomputed chunk (default: <= 1024 rows and <= 128 MiB of fp32 logits per chunk)."""
    _checks.check_linear_logprobs(hidden, weight, labels, ignore_index)
    path = active_path("linear_logprobs", hidden.device)
    if path == "triton" and hidden.dtype == torch.float64:
        raise ValueError("linear_logprobs: the Triton kernel takes fp16/bf16/fp32, got float64 "
                         "(use PREFLEXOR_KERNELS=reference for float64)")
    if path == "reference":
        return linear_logprobs_chunked(hidden, weight, labels, ignore_index, chunk_rows)
    from .logprobs import linear_logprobs as _triton_logprobs  # triton: optional, only the Triton path loads it
    return _triton_logprobs(hidden, weight, labels, ignore_index, chunk_rows)
