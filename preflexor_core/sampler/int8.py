"""Weight-only int8 decoding: per-output-channel symmetric int8 weights for the linears and LM head.

``quantize_per_channel(w)`` gives ``q = round(w / s)`` in [-127, 127] with one fp32 scale per output
row ``s = max|w_row| / 127``; ``int8_linear(x, q, s) ~= x @ (q * s).T``. Inside ``int8_linears(model)``
every plain ``nn.Linear`` and ``project_logits`` compute from the int8 copy (weights a quarter of fp32,
so a batch-1 decode step streams a quarter of the bytes); the model's own weights stay untouched
(training keeps full precision). On CPU the product is ``torch.ops.aten._weight_int8pack_mm`` with bf16
activations (its vectorized path); elsewhere a dequantize-then-``F.linear`` reference.
Used by ``generate(..., decode_weights="int8")`` where the fused CPU step (``fused_decode``, which
reads the same per-channel int8 weights with fp32 activations) cannot run: off CPU, without the compiled
extension, for unmerged adapters. Tests: ``python -m pytest tests/test_int8.py -q``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_pack import cached_derived, cpu_packed_linears, patch_linears, unpatch

DECODE_WEIGHTS = ("fp", "int8")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (int8 (N, K), fp32 scales (N,)); all-zero rows get scale 1."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_per_channel: need a floating (N, K) weight, got {w.dtype} {tuple(w.shape)}")
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ dequantize(q, scale).T in x's dtype (the off-CPU path and the tests' reference)."""
    return F.linear(x, dequantize(q, scale, x.dtype))


def _cpu_kernel_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x (..., K) float, q (N, K) int8, scale (N,) -> (..., N) in x's dtype.

    CPU: ``_weight_int8pack_mm`` on bf16 activations (its fp32 path is scalar and many times
    slower); the bf16 rounding of x adds a relative error of ~2^-9 to that of the int8 weights.
    """
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"int8_linear: x has {x.shape[-1]} features, the weight {tuple(q.shape)} expects {q.shape[1]}")
    if not _cpu_kernel_ok(x):
        return int8_linear_reference(x, q, scale)
    s = scale_bf16 if scale_bf16 is not None else scale.to(torch.bfloat16)
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, s)
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


def _quantize_for_kernel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, scale = quantize_per_channel(w)
    return q, scale, scale.to(torch.bfloat16)


def _int8_forward(weights, bias: torch.Tensor | None):
    q, scale, s16 = cached_derived(weights, _quantize_for_kernel, "int8")

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, q, scale, s16)
        return y if bias is None else y + bias.to(y.dtype)
    return forward


@contextlib.contextmanager
def int8_linears(model: nn.Module):
    """Within the block, the model's plain ``nn.Linear`` layers and its LM head compute from int8
    copies of their weights (quantized at entry, reused while a weight is unchanged; q/k/v and
    gate/up fused as in ``cpu_packed_linears``). Inference only: no gradient reaches the weights.
    Yields the number of patched products."""
    patched = patch_linears(model, _int8_forward)
    try:
        yield len(patched)
    finally:
        unpatch(patched)


def decode_weights_context(model: nn.Module, decode_weights: str):
    """The context ``generate`` runs its steps in: ``"fp"`` = the model's precision (oneDNN-packed
    on CPU), ``"int8"`` = ``int8_linears`` (used when the fused CPU step does not take the model)."""
    if decode_weights == "fp":
        return cpu_packed_linears(model)
    if decode_weights == "int8":
        return int8_linears(model)
    raise ValueError(f"decode_weights={decode_weights!r}: use one of {DECODE_WEIGHTS} "
                     "(fp = the model's own precision, int8 = weight-only int8 with per-channel scales)")
