"""Rotary position embedding frequencies (RoFormer, arXiv 2104.09864), with Llama-3's long-context scaling,
linear position interpolation (Chen et al. 2023; Gemma 3's global layers) and the separate base of
sliding-window layers (Gemma 3's ``rope_local_base_freq``, ``ModelConfig.rope_local_theta``).

A leaf module: the model and the GGUF reader/writer share it. Tests: tests/test_model.py, tests/test_gguf.py.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Rotary inverse frequencies (D/2,), fp32, with the configured scaling. ``local``: those of the
    sliding-window layers (base ``rope_local_theta``, no scaling; the global ones when it is None)."""
    d = cfg.head_dim
    local = local and cfg.rope_local_theta is not None
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    rs = None if local else cfg.rope_scaling
    if rs and rs.get("rope_type") == "linear":
        return (inv_freq / rs["factor"]).float()
    if rs and rs.get("rope_type") == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.float()
