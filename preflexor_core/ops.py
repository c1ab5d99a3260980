"""Wrappers over the compiled ``preflexor_core._C`` ops with torch reference fallbacks.

    rms_norm(x, weight, eps)            -> RMSNorm in fp32, cast back (HF Llama semantics)
    rope(q, k, cos, sin)                -> rotary embedding applied to q (B,Hq,T,D) and k (B,Hkv,T,D)

The compiled extension is optional; without it these torch implementations run.
"""
from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)        # (B, 1, T, D)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps)


def rope(q, k, cos, sin):
    return rope_reference(q, k, cos, sin)
