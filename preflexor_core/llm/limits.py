"""Model sizes bounded before anything is allocated: a config.json or GGUF header must fit this machine.

``check_config_fits(cfg, source=...)`` takes a ``ModelConfig``, a raw ``config.json`` dict (HF names) or
the sizes read from a GGUF header (``gguf_sizes``), and refuses, with one ``ModelSizeError`` line that
names the field, the size asked and the limit:

- a dimension past a hard limit far above any real model (``LIMITS``: layers, hidden size, vocabulary,
  heads, ...), so that a typo or a hostile file cannot make the loader build 10^8 layers or overflow;
- parameters whose bytes (at the load dtype) exceed the memory this machine has available
  (``MemAvailable``, plus free GPU memory when loading onto CUDA) or ``MAX_MODEL_BYTES``.

The loaders call it before the model is built (``checkpoint.load_pretrained``, ``gguf.load_gguf_model``).
Tests: ``python -m pytest -q tests/test_security_limits.py``.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch

from ..infra.errors import PreflexorError
from ..tokenization.gguf_file import open_gguf, read_metadata

__all__ = ["ModelSizeError", "LIMITS", "MAX_MODEL_BYTES", "available_memory_bytes", "check_config_fits",
           "gguf_sizes", "check_gguf_fits"]

# Far above every released model (Llama 3.1 405B: 126 layers, hidden 16384, ff 53248; Gemma 3: vocab 262144).
LIMITS = {"num_hidden_layers": 1024, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
          "vocab_size": 1 << 22, "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12,
          "head_dim": 1 << 12, "max_position_embeddings": 1 << 24}
MAX_MODEL_BYTES = 1 << 42            # 4 TiB: no machine this project runs on holds more
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


class ModelSizeError(PreflexorError, ValueError):
    """A model config or GGUF header asks for more than this machine can hold (or a size past the limits)."""


def available_memory_bytes(device: Any = None) -> int:
    """Memory a model may take: ``MemAvailable`` (else physical pages), plus free GPU memory on CUDA."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = MAX_MODEL_BYTES
    if device is not None and str(device).startswith("cuda"):
        try:
            dev = torch.device(device)
            free, _ = torch.cuda.mem_get_info(dev.index if dev.index is not None else 0)
            avail += int(free)
        except Exception:           # no CUDA here: the device check reports that on its own
            pass
    return avail


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def _sizes(cfg) -> dict[str, Any]:
    if isinstance(cfg, Mapping):
        d = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else cfg
        return {**{k: d.get(k) for k in LIMITS}, "tie_word_embeddings": d.get("tie_word_embeddings", False),
                "torch_dtype": d.get("torch_dtype") or d.get("dtype")}
    return {**{k: getattr(cfg, k, None) for k in LIMITS},
            "tie_word_embeddings": getattr(cfg, "tie_word_embeddings", False),
            "torch_dtype": getattr(cfg, "torch_dtype", None)}


def _as_int(source: str, name: str, value) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ModelSizeError(f"{source}: {name}={value!r} is not a finite number")
        value = int(value)
    return value if isinstance(value, int) else None      # other types: the config's own checks report them


def check_config_fits(cfg, *, source: str = "config", dtype: Any = None, device: Any = None,
                      available: int | None = None) -> int:
    """Refuse a model that cannot be held (see the module docstring); returns its estimated bytes.

    ``dtype``: the dtype the loader will use (None: the config's ``torch_dtype``, else float32);
    ``available``: bytes to compare with (default: ``available_memory_bytes(device)``)."""
    s = _sizes(cfg)
    n: dict[str, int | None] = {}
    for name, limit in LIMITS.items():
        v = n[name] = _as_int(source, name, s[name])
        if v is not None and v > limit:
            raise ModelSizeError(f"{source}: {name}={v} is over the limit of {limit}; this is not a model this "
                                 f"project can load (a corrupt or hostile file?)")
    h, layers, vocab = n["hidden_size"], n["num_hidden_layers"], n["vocab_size"]
    if not (h and layers and vocab):
        return 0
    ff = n["intermediate_size"] or 4 * h
    heads = n["num_attention_heads"] or 1
    head_dim = n["head_dim"] or max(1, h // heads)
    kv = n["num_key_value_heads"] or heads
    q, k = heads * head_dim, kv * head_dim
    per_layer = 2 * h * q + 2 * h * k + 3 * h * ff + 4 * h
    params = vocab * h * (1 if s["tie_word_embeddings"] else 2) + layers * per_layer + h
    name = str(dtype if dtype is not None else (s["torch_dtype"] or "float32")).replace("torch.", "")
    nbytes = params * _DTYPE_BYTES.get(name, 4)
    limit = min(MAX_MODEL_BYTES, available if available is not None else available_memory_bytes(device))
    if nbytes > limit:
        raise ModelSizeError(
            f"{source}: the model needs about {_human(nbytes)} for {params:,} parameters in {name} "
            f"({layers} layers, hidden {h}, vocabulary {vocab}), over the {_human(limit)} this machine has "
            f"available; use a smaller model, a smaller dtype or a machine with more memory")
    return nbytes


def gguf_sizes(meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple] | None = None) -> dict[str, Any]:
    """The ``config.json`` sizes of a GGUF header (``general.architecture``'s keys)."""
    arch = meta.get("general.architecture")
    get = lambda key: meta.get(f"{arch}.{key}")                                      # noqa: E731
    shapes = tensor_shapes or {}
    emb = shapes.get("token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    # GGUF shapes are in ggml order: token_embd.weight is (hidden, vocab)
    vocab = int(emb[-1]) if emb else (len(tokens) if isinstance(tokens, (list, tuple)) else None)
    return {"num_hidden_layers": get("block_count"), "hidden_size": get("embedding_length"),
            "intermediate_size": get("feed_forward_length"), "num_attention_heads": get("attention.head_count"),
            "num_key_value_heads": get("attention.head_count_kv"), "head_dim": get("attention.key_length"),
            "max_position_embeddings": get("context_length"), "vocab_size": vocab,
            "tie_word_embeddings": "output.weight" not in shapes if shapes else False}


def check_gguf_fits(path: str, *, dtype: Any = None, device: Any = None, reader=None) -> int:
    """``check_config_fits`` on the header of the GGUF file ``path`` (no tensor is read); ``reader``: the
    file already opened with ``open_gguf``."""
    reader = reader if reader is not None else open_gguf(path)
    meta = read_metadata(reader)
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    sizes = {k: v if not isinstance(v, (list, tuple)) else None for k, v in gguf_sizes(meta, shapes).items()}
    if dtype is None:
        dtype = "bfloat16" if device is not None and str(device).startswith("cuda") else "float32"
    return check_config_fits(sizes, source=path, dtype=dtype, device=device)
