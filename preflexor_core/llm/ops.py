"""Wrappers over the compiled ``preflexor_core._C`` ops (csrc/) with torch reference fallbacks.

    rms_norm(x, weight, eps)                      -> y              RMSNorm, fp32 math, HF Llama semantics
    rope(q, k, cos, sin)                          -> (q_rot, k_rot)  rotary embedding, rotate_half convention
    sample(logits, temperature, top_k, top_p, seeds) -> token ids [B] int64
    swiglu(gate, up)                              -> silu(gate) * up (memory-lean backward; torch only)
    decode_attention(q, k, v, mask)               -> one-query-per-row GQA attention (torch only)

Each torch reference (``*_reference``) defines its op's semantics; fake kernels and autograd
formulas are registered with ``torch.library``. Dispatch: the compiled op when ``_C`` has a kernel
for the device, else the reference (one warning); ``PREFLEXOR_KERNELS=reference|csrc`` forces a
path. Values (ranges, NaN) are checked on CPU or with ``PREFLEXOR_DEBUG=1`` (a GPU read stalls
every call); shapes, dtypes, devices always. Build: ``pip install --no-build-isolation -e .``.
Tests: ``python -m pytest tests/test_ops.py -q``; on CUDA ``tests/gpu/test_ops_gpu.py``.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

from .cpu_features import cpu_isa
from ..kernels._checks import check_values
from ..infra import env

log = logging.getLogger(__name__)

try:  # the compiled extension is optional
    from .. import _C  # noqa: F401  (importing registers torch.ops.preflexor.*)
    _HAVE_EXT = True
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _HAVE_EXT = False
    _IMPORT_ERROR = exc

_WARNED_FALLBACK = False


# ----------------------------------------------------------------------------- references
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


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform_for(seed: int, row: int) -> float:
    """The uniform in [0, 1) that ``sample`` uses for ``row`` with ``seed`` (53 bits of splitmix64)."""
    h = _splitmix64(_splitmix64(seed & _MASK64) ^ (row & _MASK64))
    return (h >> 11) * 2.0 ** -53


def sample_reference(logits, temperature, top_k, top_p, seeds) -> torch.Tensor:
    """Sort-based torch sampling with the semantics of ``sample`` (see its docstring)."""
    logits, temperature, top_k, top_p, seeds = _check_sample_args(logits, temperature, top_k, top_p, seeds)
    B, V = logits.shape
    dev = logits.device
    z = logits.float() / torch.where(temperature == 0, torch.ones_like(temperature), temperature)[:, None]
    zs, order = torch.sort(z, dim=-1, descending=True, stable=True)     # ties: lower token id first
    greedy = (temperature == 0) | ~torch.isfinite(zs[:, 0])             # T = 0, or logits / T overflowed
    zs = torch.where(greedy[:, None], torch.zeros_like(zs), zs)
    pos = torch.arange(V, device=dev)
    k = torch.where((top_k <= 0) | (top_k >= V), torch.full_like(top_k, V), top_k)
    e = torch.exp(zs - zs[:, :1])
    ed = torch.where(pos[None, :] < k[:, None], e, torch.zeros_like(e)).double()
    cum = torch.cumsum(ed, dim=-1)
    p = top_p.double()[:, None]
    n = (cum < p * cum[:, -1:]).sum(-1) + 1                              # smallest prefix reaching p
    n = torch.where(top_p >= 1, k, torch.minimum(n, k))
    w_sorted = torch.where(pos[None, :] < n[:, None], ed, torch.zeros_like(ed))
    w = torch.zeros_like(w_sorted).scatter_(1, order, w_sorted)          # back to token-id order
    cdf = torch.cumsum(w, dim=-1)
    u = torch.tensor([uniform_for(int(s), b) for b, s in enumerate(seeds.tolist())],
                     dtype=torch.float64, device=dev)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    last_positive = (V - 1) - torch.argmax((w.flip(-1) > 0).to(torch.int8), dim=-1)
    tok = torch.where(tok >= V, last_positive, tok)
    return torch.where(greedy, logits.argmax(-1), tok)


# ----------------------------------------------------------------------------- dispatch
def _kernel_devices() -> frozenset[str]:
    """Device types the compiled ops have kernels for (probed once; CUDA only in a CUDA build)."""
    if not _HAVE_EXT:
        return frozenset()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")) if has("preflexor::sample", key))


_EXT_DEVICES = _kernel_devices()
if _HAVE_EXT:
    log.info("preflexor ops: compiled csrc kernels available for %s", sorted(_EXT_DEVICES))
    cpu_isa()      # applies PREFLEXOR_CPU_ISA before any kernel runs, and logs the CPU path once


def _use_ext(op: str, device: torch.device) -> bool:
    """True when the compiled ``op`` should run for tensors on ``device`` (reads PREFLEXOR_KERNELS per call)."""
    global _WARNED_FALLBACK
    mode = env.kernels_mode()
    if mode == "reference":
        return False
    if not _HAVE_EXT:
        if mode == "csrc":
            raise RuntimeError(f"PREFLEXOR_KERNELS=csrc but preflexor_core._C failed to import ({_IMPORT_ERROR}); "
                               "build it with `pip install --no-build-isolation -e .`")
        if not _WARNED_FALLBACK:
            _WARNED_FALLBACK = True
            warnings.warn(f"preflexor_core._C is not available ({_IMPORT_ERROR}); rms_norm / rope / sample use the "
                          "torch reference implementations. Build it with `pip install --no-build-isolation -e .`.",
                          RuntimeWarning, stacklevel=3)
        return False
    if device.type not in _EXT_DEVICES:
        if mode == "csrc":
            raise RuntimeError(f"PREFLEXOR_KERNELS=csrc but preflexor_core._C has no {device.type} kernel for {op}")
        return False
    return True


# ----------------------------------------------------------------------------- rms_norm
def _check_rms(x: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least one dimension, got a scalar")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{name}: weight must have shape ({x.shape[-1]},) to match the last dim of x "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"{name}: x is on {x.device} but weight is on {weight.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama RMSNorm: ``weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)``; differentiable."""
    _check_rms(x, weight, "rms_norm")
    if x.dtype != weight.dtype or x.shape[-1] == 0 or not _use_ext("rms_norm_forward", x.device):
        return rms_norm_reference(x, weight, eps)
    return torch.ops.preflexor.rms_norm_forward(x, weight, float(eps))[0]


# ----------------------------------------------------------------------------- rope
def _check_rope(q, k, cos, sin, name: str) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{name}: q and k must be 4-D (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, T and D")
    if D % 2:
        raise ValueError(f"{name}: head dim must be even, got {D}")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (T, D):
        raise ValueError(f"{name}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be (B or 1, T, D) "
                         f"= ({B}, {T}, {D})")
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError(f"{name}: q, k, cos, sin must be on one device, got {q.device}, {k.device}, "
                         f"{cos.device}, {sin.device}")


def _rope_ext_ok(q, k, cos, sin) -> bool:
    return (q.dtype == k.dtype == cos.dtype == sin.dtype and not cos.requires_grad and not sin.requires_grad
            and _use_ext("rope", q.device))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding ``x * cos + rotate_half(x) * sin`` on q (B,Hq,T,D), k (B,Hkv,T,D); differentiable in q, k.
    Returns q and k in their own dtypes: under autocast, bf16 q/k with fp32 cos/sin are rotated in fp32
    and cast back, so they keep matching v for attention."""
    _check_rope(q, k, cos, sin, "rope")
    if not _rope_ext_ok(q, k, cos, sin):
        q_rot, k_rot = rope_reference(q, k, cos, sin)
        return q_rot.to(q.dtype), k_rot.to(k.dtype)
    return torch.ops.preflexor.rope(q, k, cos, sin)


# ----------------------------------------------------------------------------- sampling
def _row_param(v, B: int, dev: torch.device, dtype: torch.dtype, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, device=dev)
    if dtype == torch.int64 and t.is_floating_point():
        raise ValueError(f"sample: {name} must be integers, got dtype {t.dtype}")
    t = t.to(device=dev, dtype=dtype)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"sample: {name} must be a scalar or have shape ({B},) (one per logits row), got {tuple(t.shape)}")
    return t.contiguous()


def _check_sample_args(logits, temperature, top_k, top_p, seeds):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"sample: logits must be a floating [B, V] tensor, got "
                         f"{getattr(logits, 'shape', type(logits))} {getattr(logits, 'dtype', '')}")
    B, V = logits.shape
    if V == 0:
        raise ValueError("sample: logits has an empty vocabulary dimension")
    dev = logits.device
    temperature = _row_param(temperature, B, dev, torch.float32, "temperature")
    top_k = _row_param(top_k, B, dev, torch.int64, "top_k")
    top_p = _row_param(top_p, B, dev, torch.float32, "top_p")
    seeds = _row_param(seeds, B, dev, torch.int64, "seeds")
    if B == 0 or not check_values(dev):
        return logits, temperature, top_k, top_p, seeds
    if not bool((temperature >= 0).all()):                       # also catches NaN
        raise ValueError(f"sample: temperature must be >= 0 (0 = greedy), got {temperature.tolist()}")
    if bool((top_k < 0).any()):
        raise ValueError(f"sample: top_k must be >= 0 (0 = disabled), got {top_k.tolist()}")
    if not bool(((top_p > 0) & (top_p <= 1)).all()):
        raise ValueError(f"sample: top_p must be in (0, 1] (1 = disabled), got {top_p.tolist()}")
    row_max = logits.max(-1).values                               # NaN propagates through max
    if bool(row_max.isnan().any()):
        rows = row_max.isnan().nonzero().flatten().tolist()
        raise ValueError(f"sample: logits contain NaN in rows {rows}")
    if bool((row_max == float("inf")).any()):
        raise ValueError("sample: logits contain +inf; mask with -inf or large finite values instead")
    if bool((row_max == float("-inf")).any()):
        raise ValueError("sample: a logits row is entirely -inf; no token can be drawn")
    return logits, temperature, top_k, top_p, seeds


def sample(logits: torch.Tensor, temperature, top_k, top_p, seeds) -> torch.Tensor:
    """Draw one token id per row of ``logits`` [B, V]; parameters are scalars or [B] tensors.

    temperature 0 = argmax, top_k 0 = off, top_p 1 = off; deterministic for given seeds.
    Semantics (both paths): temperature 0 is argmax (first maximal id). Otherwise
    z = logits.float() / temperature; top-k (k > 0) keeps the k largest z; top-p keeps, within the
    top-k set renormalised, the smallest prefix in descending order whose cumulative probability
    reaches p (at least one token); the token is drawn by inverse CDF over the kept tokens in
    token-id order with u = splitmix64-based uniform keyed by (seed, row index). Rows where
    logits / temperature overflows fp32 take the argmax (the temperature -> 0 limit). Ties
    (exactly equal z) rank by token id, lower id first (a stable descending sort). Callers that
    decode step by step must change the seeds each step, otherwise every step draws the same u.
    """
    logits, temperature, top_k, top_p, seeds = _check_sample_args(logits, temperature, top_k, top_p, seeds)
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if not _use_ext("sample", logits.device):
        return sample_reference(logits, temperature, top_k, top_p, seeds)
    return torch.ops.preflexor.sample(logits, temperature, top_k, top_p, seeds)


# ----------------------------------------------------------------------------- torch.library registrations
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the saved rstd: fp64 for fp64 inputs, fp32 otherwise (as in csrc/rmsnorm_cpu.cpp)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _register() -> None:
    lib = "preflexor::"

    @torch.library.register_fake(lib + "rms_norm_forward")
    def _(x, weight, eps):
        rows = x.numel() // x.shape[-1]
        return x.new_empty(x.shape), x.new_empty((rows,), dtype=_acc_dtype(x))

    @torch.library.register_fake(lib + "rms_norm_backward")
    def _(grad_y, x, weight, rstd):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    def _like_out(t):                      # mirrors the C++ output allocation
        t = t if t.stride(-1) == 1 else t.contiguous()
        out = torch.empty_like(t)
        return out if out.stride(-1) == 1 else t.new_empty(t.shape)

    @torch.library.register_fake(lib + "rope")
    def _(q, k, cos, sin):
        return _like_out(q), _like_out(k)

    @torch.library.register_fake(lib + "rope_backward")
    def _(grad_q, grad_k, cos, sin):
        return _like_out(grad_q), _like_out(grad_k)

    @torch.library.register_fake(lib + "sample")
    def _(logits, temperature, top_k, top_p, seeds):
        return logits.new_empty((logits.shape[0],), dtype=torch.int64)

    # ---- autograd
    def rms_setup(ctx, inputs, output):
        x, weight, _ = inputs
        _, rstd = output
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)

    def rms_backward(ctx, grad_y, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        if grad_y is None:
            return None, None, None
        gx, gw = torch.ops.preflexor.rms_norm_backward(grad_y, x, weight, rstd)
        return gx, gw, None

    torch.library.register_autograd(lib + "rms_norm_forward", rms_backward, setup_context=rms_setup)

    def rope_setup(ctx, inputs, output):
        q, k, cos, sin = inputs
        ctx.save_for_backward(cos, sin)
        ctx.q_meta = (q.shape, q.dtype, q.device)
        ctx.k_meta = (k.shape, k.dtype, k.device)

    def rope_backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        if grad_q is None:
            grad_q = torch.zeros(ctx.q_meta[0], dtype=ctx.q_meta[1], device=ctx.q_meta[2])
        if grad_k is None:
            grad_k = torch.zeros(ctx.k_meta[0], dtype=ctx.k_meta[1], device=ctx.k_meta[2])
        gq, gk = torch.ops.preflexor.rope_backward(grad_q, grad_k, cos, sin)
        return gq, gk, None, None

    torch.library.register_autograd(lib + "rope", rope_backward, setup_context=rope_setup)


if _HAVE_EXT:
    _register()


# ----------------------------------------------------------------------------- SwiGLU
class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up that saves only its two inputs for the backward (eager autograd also keeps
    silu(gate), one more (tokens, intermediate) tensor per layer). Backward, with s = sigmoid(g):
    d/dg = dy * up * s * (1 + g * (1 - s)),  d/dup = dy * g * s."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        g = gate.float()
        s = torch.sigmoid(g)
        dyf = dy.float()
        d_gate = (dyf * up.float() * s * (1 + g * (1 - s))).to(gate.dtype) if ctx.needs_input_grad[0] else None
        d_up = (dyf * g * s).to(up.dtype) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per row: q (B, Hq, 1, D), k/v (B, Hkv, S, D), mask (B, 1, 1, S) bool
    or None -> (B, Hq, 1, D). Query heads are grouped per kv head (no repeat of k/v) and the softmax
    runs in fp32; on CPU in bf16 it replaces SDPA's decode path, which is slower there."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if T != 1 or Hq % Hkv or k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"decode_attention: need q (B, Hq, 1, D) and k = v (B, Hkv, S, D) with Hq % Hkv == 0; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    scores = torch.matmul(q.reshape(B, Hkv, Hq // Hkv, D), k.transpose(-1, -2)).float()   # (B, Hkv, G, S)
    scores.mul_(D ** -0.5)
    if mask is not None:
        scores.masked_fill_(~mask.reshape(B, 1, 1, S), float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(p, v).reshape(B, Hq, 1, D)                                          # (B, Hq, 1, D)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Llama's MLP activation) with a memory-lean backward."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up
