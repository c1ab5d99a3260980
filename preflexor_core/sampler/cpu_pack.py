"""CPU weight packing for inference: ``nn.Linear`` layers and the LM head through oneDNN.

Inside ``cpu_packed_linears(model)`` the plain linears and ``project_logits`` compute with
``torch.ops.mkldnn`` on weights reordered once into oneDNN's blocked layout (the kernels behind
torch.compile's CPU weight freezing) instead of ``F.linear`` (MKL). Same precision as the model
(fp32 or bf16); only the summation order differs. Packed copies are kept while their weights are
unchanged (a version-counter check repacks after an optimizer step), at the cost of one extra copy.
``PREFLEXOR_CPU_PACK=0`` turns packing off; ``auto`` (default) packs up to ``CPU_PACK_MAX_BYTES``.
Measured speed: README, "Benchmarks". Tests: ``python -m pytest tests/test_sampler.py -q -k pack``.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

CPU_PACK_MAX_BYTES = 4 << 30    # "auto" packs only when the packed copies stay below this
PACK_MIN_NUMEL = 1 << 18        # weights this large always use the packed product ...
PACK_MIN_ROWS = 8               # ... smaller ones from this many rows (tokens) on


def _pack_mode() -> str:
    mode = os.environ.get("PREFLEXOR_CPU_PACK", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"PREFLEXOR_CPU_PACK={mode!r}: use auto, 0 (off) or 1 (always on CPU)")
    return mode


# id(weight) -> (its version counter, data pointer, packed copy): reused across generate calls while
# the weight is unchanged (an optimizer step or a load bumps the version and forces a repack); an
# entry goes away with its weight.
_PACKED: dict[int, tuple[int, int, torch.Tensor]] = {}


def _packed_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if weight.is_inference():    # e.g. a LoRA head's merged weight, made afresh per call: no version counter
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    else:
        key = (weight._version, weight.data_ptr())
        hit = _PACKED.get(id(weight))
        if hit is not None and hit[:2] == key:
            packed = hit[2]
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            if hit is None:
                weakref.finalize(weight, _PACKED.pop, id(weight), None)
            _PACKED[id(weight)] = (*key, packed)
    b = None if bias is None else bias.detach()
    numel, k = weight.numel(), weight.shape[1]

    def forward(x: torch.Tensor) -> torch.Tensor:
        # oneDNN costs ~10 us a call: for a few rows through a small matrix (the tiny preset's
        # decode) F.linear is faster; from ~256k weight elements or 8 rows, the packed product wins.
        if numel >= PACK_MIN_NUMEL or x.numel() // k >= PACK_MIN_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return F.linear(x, weight, bias)
    return forward


@contextlib.contextmanager
def cpu_packed_linears(model: nn.Module):
    """Within the block, the model's plain ``nn.Linear`` layers and its LM head (``project_logits``)
    compute with oneDNN on weights reordered at entry (or reused from an earlier entry while a weight
    is unchanged). The packed weights are a snapshot: use it only where the weights do not change
    inside the block (inference). A no-op off CPU, for dtypes other than fp32 /
    bf16, without oneDNN, with ``PREFLEXOR_CPU_PACK=0``, or (``auto``) when the copies would exceed
    ``CPU_PACK_MAX_BYTES``. Yields whether it packed."""
    mode = _pack_mode()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    head = getattr(model, "output_weight", None) if hasattr(model, "project_logits") else None
    params = [m.weight for m in linears] + ([head] if head is not None else [])
    usable = (mode != "0" and bool(params) and torch.backends.mkldnn.is_available()
              and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16) for p in params))
    if usable and mode == "auto":
        usable = sum(p.numel() * p.element_size() for p in params) <= CPU_PACK_MAX_BYTES
    if not usable:
        yield False
        return
    patched: list[tuple[nn.Module, str]] = []      # instance attributes shadowing the class methods
    try:
        for m in linears:
            m.forward = _packed_linear(m.weight, m.bias)
            patched.append((m, "forward"))
        if head is not None:
            model.project_logits = _packed_linear(head, None)
            patched.append((model, "project_logits"))
        yield True
    finally:
        for m, name in patched:
            m.__dict__.pop(name, None)
