"""Per-row sampling pieces of the sampler: batch-independent seeds and repetition penalty.

Every (prompt, sample, step) gets its own 64-bit key (``row_key``); ``seeds_for_rows`` turns keys
into the per-row seeds of ``ops.sample`` so that a row's draw does not depend on its batch index,
hence results do not depend on batch composition, compaction or ``max_batch_size``. The draw itself
is ``ops.sample`` (semantics in ``preflexor_core/llm/ops.py``). Repetition penalty: CTRL (Keskar et al.
2019) with HF's semantics. Tests: ``python -m pytest tests/test_sampler.py -q``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..llm.ops import _MASK64, _splitmix64, sample  # noqa: F401  (sample: re-exported for the sampler)


def _unxorshift(y: int, shift: int) -> int:
    x = y
    for _ in range(64 // shift + 1):
        x = y ^ (x >> shift)
    return x


def _unsplitmix64(z: int) -> int:
    """Inverse of ``_splitmix64`` (every step of the finaliser is a bijection on 64-bit ints)."""
    z = _unxorshift(z, 31)
    z = _unxorshift((z * pow(0x94D049BB133111EB, -1, 1 << 64)) & _MASK64, 27)
    z = _unxorshift((z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & _MASK64, 30)
    return (z - 0x9E3779B97F4A7C15) & _MASK64


def row_key(seed: int, prompt_index: int, sample_index: int, step: int) -> int:
    """A 64-bit key for one (prompt, sample, step), independent of batch layout."""
    h = _splitmix64(seed & _MASK64)
    for part in (prompt_index, sample_index, step):
        h = _splitmix64(h ^ (part & _MASK64))
    return h


def seeds_for_rows(keys: Sequence[int], device: Any = None) -> torch.Tensor:
    """int64 seeds such that the sampler's uniform for batch row b depends only on ``keys[b]``.

    ``ops.sample`` draws row b's uniform from splitmix64(splitmix64(seed_b) ^ b); passing
    seed_b = splitmix64^-1(key_b ^ b) makes that splitmix64(key_b), so a row's draw does not
    change when compaction moves it to another index.
    """
    out = []
    for b, k in enumerate(keys):
        v = _unsplitmix64((k ^ b) & _MASK64)
        out.append(v - (1 << 64) if v >= 1 << 63 else v)
    return torch.tensor(out, dtype=torch.long, device=device)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF semantics: for tokens already seen (prompt or output), logit / penalty if > 0 else * penalty."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)
