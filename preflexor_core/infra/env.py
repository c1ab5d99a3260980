"""Every environment variable the project reads, each read here and nowhere else.

| variable | values | what it does |
|---|---|---|
| ``PREFLEXOR_KERNELS`` | auto, reference, triton, csrc | forces one kernel path (``kernels``, ``llm.ops``, ``llm.attention``) |
| ``PREFLEXOR_CPU_ISA`` | auto, avx512, avx2, generic | caps the ISA path of the compiled CPU kernels (``llm.cpu_features``) |
| ``PREFLEXOR_CPU_BF16`` | auto, 0, 1 | whether training autocasts to bf16 on this CPU |
| ``PREFLEXOR_FUSED_DECODE`` | auto, 0, 1 | the fused CPU decode step: chosen per model, off, or required |
| ``PREFLEXOR_CPU_PACK`` | auto, 0, 1 | packed (oneDNN) CPU weights for decode |
| ``PREFLEXOR_DEBUG`` | unset/0/false/no = off | tracebacks on CLI errors; argument checks of the compiled ops on CUDA |
| ``TRITON_INTERPRET`` | 1 = on | Triton's own: kernels run in its interpreter (CPU tests) |
| ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` | integers | set by torchrun |

A value outside its list is an error that names the variable and its values. Values are read at
each call, so a test or a user may change them in-process. API keys are read by name
(``secret``): the name comes from the user's flags, never a default file.

Tests: ``python -m pytest -q tests/test_house.py -k env``.
"""
from __future__ import annotations

import os

KERNELS, CPU_ISA, CPU_BF16 = "PREFLEXOR_KERNELS", "PREFLEXOR_CPU_ISA", "PREFLEXOR_CPU_BF16"
FUSED_DECODE, CPU_PACK, DEBUG = "PREFLEXOR_FUSED_DECODE", "PREFLEXOR_CPU_PACK", "PREFLEXOR_DEBUG"
TRITON_INTERPRET = "TRITON_INTERPRET"

KERNEL_MODES = ("auto", "reference", "triton", "csrc")
ISA_REQUESTS = ("auto", "avx512", "avx2", "generic")
SWITCHES = ("auto", "0", "1")


class EnvError(ValueError):
    """An environment variable holds a value outside its list."""


def _choice(name: str, allowed: tuple[str, ...], default: str = "auto") -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in allowed:
        raise EnvError(f"{name}={value!r} is not one of {', '.join(allowed)}; unset it or pick one of those")
    return value


def kernels_mode() -> str:
    """``PREFLEXOR_KERNELS``: "auto" (unset), "reference", "triton" or "csrc"."""
    return _choice(KERNELS, KERNEL_MODES)


def cpu_isa_request() -> str:
    """``PREFLEXOR_CPU_ISA``: "auto" (unset) or the highest ISA path to use."""
    return _choice(CPU_ISA, ISA_REQUESTS)


def cpu_bf16_mode() -> str:
    """``PREFLEXOR_CPU_BF16``: "auto" (unset), "0" or "1"."""
    return _choice(CPU_BF16, SWITCHES)


def fused_decode_mode() -> str:
    """``PREFLEXOR_FUSED_DECODE``: "auto" (unset), "0" (off) or "1" (required)."""
    return _choice(FUSED_DECODE, SWITCHES)


def cpu_pack_mode() -> str:
    """``PREFLEXOR_CPU_PACK``: "auto" (unset), "0" (off) or "1" (always on CPU)."""
    return _choice(CPU_PACK, SWITCHES)


def debug() -> bool:
    """``PREFLEXOR_DEBUG`` is set to something other than 0 / false / no."""
    return os.environ.get(DEBUG, "").strip().lower() not in ("", "0", "false", "no")


def triton_interpret() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run in Triton's interpreter."""
    return os.environ.get(TRITON_INTERPRET, "0").strip() == "1"


def torchrun_ranks() -> tuple[int, int, int]:
    """``(WORLD_SIZE, RANK, LOCAL_RANK)`` as torchrun sets them; ``(1, 0, 0)`` outside torchrun."""
    try:
        return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise EnvError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers (as torchrun sets them): {e}") from None


def secret(name: str | None) -> str | None:
    """The value of the variable ``name`` (an API key the user named), or None when unset or unnamed."""
    return os.environ.get(name) if name else None
