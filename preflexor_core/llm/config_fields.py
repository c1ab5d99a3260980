"""ConfigError and the field checks that config.py (ModelConfig) and families.py (config.json of each
family) share: one error form, "<field> is <value>, expected <allowed>", and the rope scaling shape.
A leaf below both, so that the config can build on the families without either importing the other.

Tests: ``python -m pytest -q tests/test_config.py tests/test_families.py``.
"""
from __future__ import annotations

import json
import math
import numbers
from typing import Any, Mapping

from ..infra.errors import PreflexorError

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class ConfigError(PreflexorError, ValueError):
    """A config.json, a config field or a preset name that this package cannot honour."""


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_ROPE_EXAMPLE = '{"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, ...}'


def _show(value: Any) -> str:
    """A value as it reads in config.json (null, [..], "text"), cut to 60 characters."""
    try:
        text = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{name} is {_show(value)}, expected {expected}")


def _int(name: str, value: Any, minimum: int | None, *, optional: bool = False) -> int | None:
    what = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or null" if optional else "")
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _bad(name, value, what)
    if minimum is not None and value < minimum:
        raise _bad(name, value, what)
    return int(value)


def _real(name: str, value: Any, minimum: float, *, strict: bool) -> float:
    what = f"a number {'>' if strict else '>='} {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _bad(name, value, what)
    if value < minimum or (strict and value == minimum):
        raise _bad(name, value, what)
    return float(value)


def _validate_rope_scaling(rs: Any, *, name: str = "rope_scaling") -> dict | None:
    """Check the dict's shape; return it normalised ("type" -> "rope_type"), or None for default RoPE."""
    if rs is None:
        return None
    if not isinstance(rs, Mapping):
        raise _bad(name, rs, f"an object like {_ROPE_EXAMPLE} or null")
    rs = dict(rs)
    rtype = rs.get("rope_type", rs.get("type", "default"))
    if not isinstance(rtype, str) or rtype not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{name} type {rtype!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    rs["rope_type"] = rtype
    rs.pop("type", None)
    if rtype == "default":
        return None
    if rtype == "linear":
        return {"rope_type": "linear", "factor": _real(f"{name}.factor", rs.get("factor"), 0.0, strict=True)}
    for key in _LLAMA3_KEYS:
        if key not in rs:
            raise ConfigError(f"{name} of type 'llama3' is missing key {key!r}; it needs {list(_LLAMA3_KEYS)}")
    rs["factor"] = _real(f"{name}.factor", rs["factor"], 0.0, strict=True)
    rs["low_freq_factor"] = _real(f"{name}.low_freq_factor", rs["low_freq_factor"], 0.0, strict=True)
    rs["high_freq_factor"] = _real(f"{name}.high_freq_factor", rs["high_freq_factor"],
                                   rs["low_freq_factor"], strict=True)
    rs["original_max_position_embeddings"] = _int(f"{name}.original_max_position_embeddings",
                                                  rs["original_max_position_embeddings"], 1)
    return rs
