"""One CPU decode step of the whole model in one call (``torch.ops.preflexor.decode_step``).

The step of a deep, narrow model spends much of its time outside the matrix products when it runs
layer by layer from Python (SmolLM2: 30 layers of 576, ~15 torch calls each). ``FusedDecoder`` hands
the embedded new tokens, the rotary angles, every weight and the KV cache to the compiled step
(csrc/decode_cpu.cpp), which runs all layers and the LM head without returning to Python: the
residual stream and every intermediate stay fp32, the products stream each weight once (fp32, bf16
or int8 with per-row scales, widened to fp32 in registers), k/v are written into the cache in the
model's dtype at each row's own length. No weight is copied for ``"fp"``; ``"int8"`` quantizes each
weight once per channel (``int8.quantize_per_channel``, cached while the weight is unchanged).

Used by ``generate``'s decode steps on CPU when ``usable`` finds the model eligible: plain bias-free
``nn.Linear`` layers of plain tensors (no unmerged LoRA, no shards), fp32 or bf16 weights, and the
extension built. Any CPU: the kernels take the ISA path ``cpu_features.cpu_isa()`` names (AVX-512, AVX2 +
FMA, or portable C++). Up to ``FUSED_MAX_ROWS`` rows (and always with int8) the step uses its own
products; for more rows it calls oneDNN's products on the packed copies that ``cpu_packed_linears``
holds (compute-bound there), or leaves the step to the torch path when nothing is packed; bf16 weights
that oneDNN cannot pack on this CPU (no AVX-512) stay on the step's own products at every batch size,
since torch's bf16 products there are emulated. ``PREFLEXOR_FUSED_DECODE=0`` turns it off (the layer-by-layer torch path), ``1`` makes an
ineligible model an error instead of a silent fallback, ``auto`` is the default.
Tests: ``python -m pytest tests/test_fused_decode.py -q``.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from ..llm import ops
from ..llm.cpu_features import cpu_isa, onednn_bf16_packing
from .cpu_pack import cached_derived
from .int8 import DECODE_WEIGHTS, quantize_per_channel
from .kv_cache import KVCache
from ..infra import env

FUSED_MAX_ROWS = 2   # measured: from 3 rows on oneDNN's packed products win (SmolLM2, bf16 and fp32)
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _mode() -> str:
    return env.fused_decode_mode()


def cpu_supported() -> bool:
    """Whether the compiled step exists (every CPU runs it, on the ISA path cpu_features.cpu_isa() names)."""
    return ops._HAVE_EXT and hasattr(torch.ops.preflexor, "decode_step")


def ineligible_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot take the fused CPU step, or None when it can."""
    if not cpu_supported():
        return "the compiled extension is not built (pip install --no-build-isolation -e .)"
    if getattr(model, "device", None) is None or model.device.type != "cpu":
        return "the model is not on CPU"
    if model.dtype not in (torch.float32, torch.bfloat16):
        return f"the model's dtype is {model.dtype} (fp32 or bf16 needed)"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "output_weight") or not hasattr(model, "rotary"):
        return "the model is not a preflexor Llama"
    blocker = getattr(model, "fused_decode_blocker", None)
    if blocker is not None and (why := blocker()) is not None:      # a family option the step lacks
        return why
    for i, layer in enumerate(layers):
        for name in _LINEARS:
            m = layer.get_submodule(name)
            if type(m) is not nn.Linear or m.bias is not None:
                return f"layer {i} {name} is not a plain bias-free nn.Linear (e.g. an unmerged adapter)"
            if m.weight.dtype != model.dtype:
                return f"layer {i} {name} is {m.weight.dtype}, the model {model.dtype}"
            if type(m.weight.data) is not torch.Tensor:
                return f"layer {i} {name} holds a {type(m.weight.data).__name__}, not a plain tensor (e.g. a shard)"
    return None


class FusedDecoder:
    """``decode_one_token`` for one model as one compiled call per step (CPU).

    ``packed``: whether oneDNN-packed copies of the weights may be used (``cpu_packed_linears`` made
    them, or may make them): for "fp" steps of more than FUSED_MAX_ROWS rows the step then calls
    oneDNN's products (compute-bound there) instead of its own bandwidth-bound ones."""

    def __init__(self, model: nn.Module, decode_weights: str = "fp", packed: bool = False):
        reason = ineligible_reason(model)
        if reason is not None:
            raise ValueError(f"FusedDecoder: {reason}")
        if decode_weights not in DECODE_WEIGHTS:
            raise ValueError(f"FusedDecoder: decode_weights={decode_weights!r}; use one of {DECODE_WEIGHTS}")
        cfg = model.config
        self.model, self.decode_weights, self.packed = model, decode_weights, packed
        self.required = _mode() == "1"
        # bf16 weights that oneDNN cannot pack here: the step's own products at every batch size (read once,
        # not per step: takes() runs every decode step)
        self.unpackable_bf16 = model.dtype == torch.bfloat16 and not onednn_bf16_packing()
        # the avx2 path's register tiles beat oneDNN's AVX2 products from 5 rows on (SmolLM2 fp32, 16 rows,
        # 1 thread, every library capped at AVX2: 140 vs 128 tok/s); on avx512 oneDNN's win, and the
        # generic path has no tiles
        self.own_tiles = cpu_isa() == "avx2"
        self._packed_mats: list[torch.Tensor] | None = None
        self.n_heads, self.n_kv, self.eps = cfg.num_attention_heads, cfg.num_key_value_heads, float(cfg.rms_norm_eps)
        norms: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []          # the parameters themselves: cached_derived keys on them
        for layer in model.model.layers:
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            weights += [layer.get_submodule(n).weight for n in _LINEARS]
        norms.append(model.model.norm.weight)
        # fp32 once per generate call (the step computes in fp32; a no-op for an fp32 model)
        self.norms = [w.detach().float().contiguous() for w in norms]
        weights.append(model.output_weight)
        if decode_weights == "int8":
            pairs = [cached_derived([w], quantize_per_channel, "int8-row") for w in weights]
            self.mats = [q for q, _ in pairs]
            self.scales = [s for _, s in pairs]
        else:
            self.mats, self.scales = [w.detach().contiguous() for w in weights], []

    def __call__(self, cache: KVCache, last_tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) at each row's position; returns next-token logits (B, V) fp32."""
        if cache.static or cache.k.dtype != self.model.dtype:
            raise ValueError("FusedDecoder: needs a dynamic KV cache in the model's dtype")
        x = self.model.model.embed_tokens(last_tokens)                                   # (B, H)
        cos, sin = self.model.rotary(cache.lengths[:, None], torch.float32)             # (B, 1, D)
        mats, scales = self.mats, self.scales
        if self._use_packed(cache.batch_size):
            mats, scales = self._packed(), []
        logits = torch.ops.preflexor.decode_step(
            x, cache.lengths, cos[:, 0].contiguous(), sin[:, 0].contiguous(), self.norms, mats, scales,
            cache.k, cache.v, self.n_heads, self.n_kv, self.eps)
        cache.advance(1)
        return logits

    def takes(self, batch_size: int) -> bool:
        """Whether to run a step of ``batch_size`` rows here (else the torch path): always for int8,
        with packed weights, with PREFLEXOR_FUSED_DECODE=1, on the avx2 path (its own register tiles), or for
        bf16 weights that oneDNN cannot pack here; up to FUSED_MAX_ROWS rows otherwise."""
        return (self.decode_weights == "int8" or self.packed or batch_size <= FUSED_MAX_ROWS or self.required
                or self.unpackable_bf16 or self.own_tiles)

    def _use_packed(self, batch_size: int) -> bool:
        return self.packed and self.decode_weights == "fp" and batch_size > FUSED_MAX_ROWS and not self.own_tiles

    def _packed(self) -> list[torch.Tensor]:
        """Per layer q/k/v, o, gate/up, down, then the head, reordered for oneDNN: the same cached
        copies ``cpu_packed_linears`` computes with (one copy of the weights, not two)."""
        if self._packed_mats is None:
            reorder = torch.ops.mkldnn._reorder_linear_weight
            groups = []
            for layer in self.model.model.layers:
                a, f = layer.self_attn, layer.mlp
                groups += [[a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], [a.o_proj.weight],
                           [f.gate_proj.weight, f.up_proj.weight], [f.down_proj.weight]]
            groups.append([self.model.output_weight])
            self._packed_mats = [cached_derived(g, reorder, "mkldnn") for g in groups]
        return self._packed_mats


def usable(model: nn.Module) -> bool:
    """Whether ``generate`` should decode ``model`` with the fused step (PREFLEXOR_FUSED_DECODE and
    eligibility; with ``1`` an ineligible model raises instead)."""
    mode = _mode()
    if mode == "0":
        return False
    reason = ineligible_reason(model)
    if reason is not None and mode == "1":
        raise ValueError(f"PREFLEXOR_FUSED_DECODE=1 but the fused CPU decode step cannot run: {reason}")
    return reason is None
