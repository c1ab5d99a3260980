"""What this CPU can do, detected once, and the ISA path of the compiled CPU kernels.

The compiled CPU kernels (csrc/: the fused decode step, its fp32 / bf16 / int8 weight-streaming products,
RMSNorm and RoPE) exist in three paths: ``avx512`` (AVX-512 F/BW/VL/DQ + FMA), ``avx2`` (AVX2 + FMA) and
``generic`` (portable C++, any CPU including aarch64). The extension detects the CPU's highest path;
``PREFLEXOR_CPU_ISA=avx512|avx2|generic`` lowers it (``auto``, the default, keeps it), so that a machine
can test every path at or below its own. The path in use is logged once.

Other CPU facts that decide a code path live here too: whether bf16 matrix products are native
(``native_cpu_bf16``: AVX512-BF16 or AMX, which decides bf16 autocast training) and whether oneDNN can
pack bf16 weights (``onednn_bf16_packing``), which needs AVX-512 (or AVX-NE-CONVERT) and raises otherwise.

    from preflexor_core.llm.cpu_features import cpu_isa, forced_isa
    cpu_isa()                    # "avx512" | "avx2" | "generic": the path the kernels take now
    with forced_isa("generic"):  # tests: run a block on a lower path
        ...

Tests: ``python -m pytest tests/test_cpu_features.py -q``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import platform

import torch

from ..infra import env

log = logging.getLogger(__name__)

ISA_LEVELS = ("generic", "avx2", "avx512")      # lowest to highest
ENV_ISA, ENV_BF16 = env.CPU_ISA, env.CPU_BF16
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")

try:  # the compiled extension is optional; without it only the flags are known
    from .. import _C  # noqa: F401  (registers torch.ops.preflexor.*)
    _EXT = hasattr(torch.ops.preflexor, "cpu_isa_native")
except ImportError:
    _EXT = False

_state: dict[str, str] = {}


class CpuIsaError(ValueError):
    """A PREFLEXOR_CPU_ISA value that is unknown or above what this CPU runs."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (``flags`` on x86, ``Features`` on ARM); empty
    when unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (for benchmark records), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() in ("model name", "Model", "cpu model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _isa_from_flags(flags: frozenset[str]) -> str:
    if all(f in flags for f in _AVX512_FLAGS) and "fma" in flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "generic"


def native_isa() -> str:
    """The highest path this CPU runs: the extension's own detection when it is built, else the flags."""
    if _EXT:
        return ISA_LEVELS[int(torch.ops.preflexor.cpu_isa_native())]
    return _isa_from_flags(cpu_flags())


def _requested() -> str:
    try:
        return env.cpu_isa_request()
    except env.EnvError as e:
        raise CpuIsaError(str(e)) from None


def _apply(level: str, reason: str) -> str:
    native = native_isa()
    if ISA_LEVELS.index(level) > ISA_LEVELS.index(native):
        raise CpuIsaError(f"{reason} asks for the {level} path, but this CPU ({cpu_model()}) runs at most "
                          f"{native}; use {native} or lower")
    if _EXT:
        torch.ops.preflexor.set_cpu_isa(ISA_LEVELS.index(level))
    _state["isa"] = level
    return level


def cpu_isa() -> str:
    """The ISA path the CPU kernels take: the native one, or the lower one PREFLEXOR_CPU_ISA names (read
    once, at the first call). Logs the choice once."""
    if "isa" not in _state:
        req = _requested()
        level = _apply(native_isa() if req == "auto" else req, f"{ENV_ISA}={req}")
        log.info("preflexor CPU kernels: %s path (CPU %s, highest path %s%s)", level, cpu_model(), native_isa(),
                 "" if req == "auto" else f", set by {ENV_ISA}")
    return _state["isa"]


def set_cpu_isa(level: str) -> str:
    """Switch the kernels to ``level`` (at most the native one) for the rest of the process; returns
    the previous level."""
    if level not in ISA_LEVELS:
        raise CpuIsaError(f"set_cpu_isa({level!r}): use one of {', '.join(ISA_LEVELS)}")
    previous = cpu_isa()
    _apply(level, f"set_cpu_isa({level!r})")
    return previous


@contextlib.contextmanager
def forced_isa(level: str):
    """Run the block with the CPU kernels on ``level`` (tests run every path at or below the native one)."""
    previous = set_cpu_isa(level)
    try:
        yield level
    finally:
        set_cpu_isa(previous)


def available_isas() -> tuple[str, ...]:
    """Every path this process may run, lowest first: up to the native path, or up to the one
    PREFLEXOR_CPU_ISA names (the test suite runs each, so the variable caps the whole suite)."""
    req = _requested()
    top = native_isa() if req == "auto" else min(req, native_isa(), key=ISA_LEVELS.index)
    return ISA_LEVELS[:ISA_LEVELS.index(top) + 1]


# What a process sets so that torch's own libraries (ATen's kernels, oneDNN, MKL) see no more than a path's
# ISA either: with these and PREFLEXOR_CPU_ISA, a faster CPU stands in for a slower one in the benchmarks
# (the variables are read when torch loads, so they go in the environment of a new process).
_LIBRARY_CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "generic": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def library_caps(level: str) -> dict[str, str]:
    """The environment that caps torch's libraries at ``level`` (none for the native path: nothing to cap)."""
    if level not in ISA_LEVELS:
        raise CpuIsaError(f"library_caps({level!r}): use one of {', '.join(ISA_LEVELS)}")
    return {} if level == native_isa() else dict(_LIBRARY_CAPS.get(level, {}))


def native_cpu_bf16() -> bool:
    """Whether bf16 matrix products are native here (AVX512-BF16 or AMX, on the avx512 path), which makes
    bf16 autocast training faster than fp32 (measured in docs/benchmarks.md). ``PREFLEXOR_CPU_BF16=0`` /
    ``=1`` overrides the detection (the test suite pins 0 so that its numbers do not depend on the CPU)."""
    mode = env.cpu_bf16_mode()
    if mode != "auto":
        return mode == "1"
    return cpu_isa() == "avx512" and any(flag in cpu_flags() for flag in _CPU_BF16_FLAGS)


def onednn_bf16_packing() -> bool:
    """Whether oneDNN can reorder (pack) bf16 weights here: it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT
    and raises otherwise. False on a lowered ISA path, so that a lowered run takes the path such a CPU
    would take."""
    if not torch.backends.mkldnn.is_available():
        return False
    isa = cpu_isa()
    if isa == "generic" or (isa == "avx2" and "avx_ne_convert" not in cpu_flags()):
        return False
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(checker()) if checker is not None else isa == "avx512"
    except RuntimeError:
        return False
