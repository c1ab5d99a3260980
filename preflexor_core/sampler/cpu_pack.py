"""Inference-time linears: oneDNN-packed weights on CPU, fused q/k/v and gate/up products.

Inside ``cpu_packed_linears(model)`` the plain linears and ``project_logits`` compute with
``torch.ops.mkldnn`` on weights reordered once into oneDNN's blocked layout (the kernels behind
torch.compile's CPU weight freezing) instead of ``F.linear`` (MKL), and each attention's q/k/v
(``project_qkv``) and each MLP's gate/up (``project_gate_up``) run as ONE product on the
concatenated weights (fewer, larger calls per layer: the per-token overhead of deep, narrow models).
Same precision as the model (fp32 or bf16); only the summation order differs. Derived weights are
cached while their sources are unchanged (a version-counter check redoes them after an optimizer
step), at the cost of one extra copy. ``PREFLEXOR_CPU_PACK=0`` turns packing off; ``auto`` (default)
packs up to ``CPU_PACK_MAX_BYTES``. ``patch_linears`` is shared with ``int8.int8_linears``.
Measured speed: docs/benchmarks.md. Tests: ``python -m pytest tests/test_sampler.py -q -k pack``.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..llm.cpu_features import onednn_bf16_packing
from ..infra import env

CPU_PACK_MAX_BYTES = 4 << 30    # "auto" packs only when the packed copies stay below this
PACK_MIN_NUMEL = 1 << 18        # weights this large always use the packed product ...
PACK_MIN_ROWS = 8               # ... smaller ones from this many rows (tokens) on
# method of a module -> the sibling linears it runs; with all of them plain nn.Linear, one fused product
FUSED = {"project_qkv": ("q_proj", "k_proj", "v_proj"), "project_gate_up": ("gate_proj", "up_proj")}

Forward = Callable[[torch.Tensor], torch.Tensor]
MakeForward = Callable[[Sequence[torch.Tensor], torch.Tensor | None], Forward]


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes oneDNN packs on this CPU: fp32 everywhere; bf16 only where oneDNN's bf16 reorder
    runs (cpu_features.onednn_bf16_packing), else bf16 models keep their plain products."""
    return (torch.float32, torch.bfloat16) if onednn_bf16_packing() else (torch.float32,)


def _pack_mode() -> str:
    return env.cpu_pack_mode()


# (tag, id(part), ...) -> ((version, data pointer) per part, derived value): reused across generate
# calls while every source weight is unchanged; an entry goes away with its first source weight.
_PACKED: dict[tuple, tuple[tuple, Any]] = {}


def cached_derived(parts: Sequence[torch.Tensor], make: Callable[[torch.Tensor], Any], tag: str) -> Any:
    """``make(cat(parts, 0))``, computed once and reused while every part is unchanged."""
    def build():
        with torch.inference_mode(False), torch.no_grad():
            w = parts[0].detach() if len(parts) == 1 else torch.cat([p.detach() for p in parts])
            return make(w)
    if any(p.is_inference() for p in parts):    # e.g. a LoRA head's merged weight, made afresh per call
        return build()
    key = (tag, *(id(p) for p in parts))
    state = tuple((p._version, p.data_ptr()) for p in parts)
    hit = _PACKED.get(key)
    if hit is not None and hit[0] == state:
        return hit[1]
    value = build()
    if hit is None:
        weakref.finalize(parts[0], _PACKED.pop, key, None)
    _PACKED[key] = (state, value)
    return value


def _cat_bias(mods: Sequence[nn.Linear]) -> torch.Tensor | None:
    if mods[0].bias is None:
        return None
    return torch.cat([m.bias.detach() for m in mods]) if len(mods) > 1 else mods[0].bias.detach()


def patch_linears(model: nn.Module, make: MakeForward) -> list[tuple[nn.Module, str]]:
    """Shadow the model's linear products with ``make(weights, bias)`` functions (instance
    attributes); returns what was patched, for ``unpatch``. Fused groups (``FUSED``) get one
    function whose output is split back into the group's outputs."""
    patched: list[tuple[nn.Module, str]] = []
    done: set[int] = set()
    for mod in model.modules():
        for method, names in FUSED.items():
            mods = [getattr(mod, n, None) for n in names]
            if not hasattr(mod, method) or any(type(m) is not nn.Linear for m in mods) \
                    or len({m.bias is None for m in mods}) > 1:
                continue
            fwd = make([m.weight for m in mods], _cat_bias(mods))
            sizes = [m.out_features for m in mods]
            setattr(mod, method, lambda x, fwd=fwd, sizes=sizes: fwd(x).split(sizes, dim=-1))
            patched.append((mod, method))
            done.update(id(m) for m in mods)
    for m in model.modules():
        if type(m) is nn.Linear and id(m) not in done:
            m.forward = make([m.weight], m.bias)
            patched.append((m, "forward"))
    head = getattr(model, "output_weight", None) if hasattr(model, "project_logits") else None
    if head is not None:
        fwd = make([head], None)
        cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        model.project_logits = fwd if cap is None else (lambda x, fwd=fwd, cap=cap: cap * torch.tanh(fwd(x) / cap))
        patched.append((model, "project_logits"))
    return patched


def unpatch(patched: list[tuple[nn.Module, str]]) -> None:
    for m, name in patched:
        m.__dict__.pop(name, None)


def _packed_linear(weights: Sequence[torch.Tensor], bias: torch.Tensor | None) -> Forward:
    packed = cached_derived(weights, torch.ops.mkldnn._reorder_linear_weight, "mkldnn")
    numel, k = sum(w.numel() for w in weights), weights[0].shape[1]
    if numel >= PACK_MIN_NUMEL:
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    # oneDNN costs ~10 us a call: for a few rows through a small matrix (the tiny preset's decode)
    # F.linear on the plain (concatenated) weight is faster; from 8 rows on, the packed product wins.
    plain = cached_derived(weights, lambda w: w, "cat") if len(weights) > 1 else weights[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.numel() // k >= PACK_MIN_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, plain, bias)
    return forward


@contextlib.contextmanager
def cpu_packed_linears(model: nn.Module):
    """Within the block, the model's plain ``nn.Linear`` layers and its LM head (``project_logits``)
    compute with oneDNN on weights reordered at entry (or reused from an earlier entry while a weight
    is unchanged), q/k/v and gate/up fused. The packed weights are a snapshot: use it only where the
    weights do not change inside the block (inference). A no-op off CPU, for dtypes other than
    ``packable_dtypes()`` (bf16 only where oneDNN packs it), without oneDNN, with ``PREFLEXOR_CPU_PACK=0``, or (``auto``) when the copies would
    exceed ``CPU_PACK_MAX_BYTES``. Yields whether it packed."""
    mode = _pack_mode()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    head = getattr(model, "output_weight", None) if hasattr(model, "project_logits") else None
    params = [m.weight for m in linears] + ([head] if head is not None else [])
    usable = (mode != "0" and bool(params) and torch.backends.mkldnn.is_available()
              and all(p.device.type == "cpu" and p.dtype in packable_dtypes() for p in params))
    if usable and mode == "auto":
        usable = sum(p.numel() * p.element_size() for p in params) <= CPU_PACK_MAX_BYTES
    if not usable:
        yield False
        return
    patched = patch_linears(model, _packed_linear)
    try:
        yield True
    finally:
        unpatch(patched)
