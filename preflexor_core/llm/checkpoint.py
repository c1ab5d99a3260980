"""HF-compatible checkpoints of every supported family (config.json of the family, see families.py): safetensors load/save and sharding (transformers' layout:
config.json, generation_config.json, model.safetensors or shards + model.safetensors.index.json).

Loading builds the model on the meta device and fills it one tensor at a time (weights are never
held twice). Saving is atomic (``io.atomic_dir``); files of the old directory that a save does not
produce (tokenizer.json, ...) are carried over. This module knows no model class: ``Llama``
passes itself in (``Llama.from_pretrained`` / ``save_pretrained`` are the entry points).

    model = load_pretrained("ckpt", Llama, dtype=torch.bfloat16, device="cuda")
    save_pretrained(model, "out", max_shard_size="2GB")

Tests: ``python -m pytest -q tests/test_checkpoint.py``
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable

import torch
import torch.nn as nn
import safetensors.torch        # the module, not its functions: a test replaces save_file to fail a write

from .config import ModelConfig
from .limits import check_config_fits
from ..infra.io import atomic_dir, fsync_write

log = logging.getLogger("preflexor.checkpoint")

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_WEIGHT_FILE = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json)$")


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded; the message names the file and key."""


# ----------------------------------------------------------------------------- helpers
def parse_size(size: int | str) -> int:
    """"5GB" -> 5e9 bytes (decimal, as transformers), "2GiB" -> 2*2**30, ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", size, flags=re.I)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected an int of bytes or a string like '5GB' / '500MiB'")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = " KMGT".index(unit or " ")
    return int(num * (1024 if binary else 1000) ** power)


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        if name == "auto":
            return None
        d = getattr(torch, name, None)
        if isinstance(d, torch.dtype):
            return d
    raise ValueError(f"dtype={dtype!r} is not a torch dtype (e.g. torch.bfloat16, 'float32')")


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, SAFE_INDEX)
    single = os.path.join(path, SAFE_SINGLE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from None
        files = sorted(set(weight_map.values()))
        for fn in files:
            if not os.path.isfile(os.path.join(path, fn)):
                raise CheckpointError(f"{index}: lists shard {fn!r}, which is missing from {path}")
        return [os.path.join(path, fn) for fn in files]
    if os.path.isfile(single):
        return [single]
    if any(fn.endswith(".bin") for fn in os.listdir(path)):
        raise CheckpointError(f"{path}: only PyTorch .bin weights found; convert them to .safetensors "
                              f"(e.g. save once with transformers' save_pretrained(safe_serialization=True))")
    raise CheckpointError(f"{path}: no weights found (expected {SAFE_SINGLE} or {SAFE_INDEX} with shards)")


def _open_safetensors(fn: str):
    try:
        return safetensors.safe_open(fn, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        raise CheckpointError(f"{fn}: cannot read safetensors file ({e}); it may be truncated or corrupt") from None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = mod._parameters.get(leaf)
    mod._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)


# ----------------------------------------------------------------------------- load
def _raw_json(path: str) -> dict:
    """``path`` as a JSON object, {} when unreadable (``ModelConfig.from_json_file`` then says why)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def load_pretrained(path: str, model_cls: Callable[..., nn.Module], dtype: Any = None, device: Any = "cpu"):
    """Load an HF directory of a supported family into ``model_cls(config, device="meta")`` (normally ``Llama``).

    dtype: None keeps each tensor's stored dtype; otherwise every tensor is cast to it.
    device: where parameters end up; tensors are moved one at a time.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    check_config_fits(_raw_json(os.path.join(path, "config.json")), source=os.path.join(path, "config.json"),
                      dtype=dtype, device=device)                    # before the config or model is built
    cfg = ModelConfig.from_json_file(os.path.join(path, "config.json"))
    dtype = _resolve_dtype(dtype)
    device = torch.device(device)
    files = _weight_files(path)

    model = model_cls(cfg, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    seen: set[str] = set()
    for fn in files:
        with _open_safetensors(fn) as f:
            for key in f.keys():
                if _IGNORED_KEYS.search(key):
                    continue
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    log.info("%s: ignoring lm_head.weight (config ties it to the embedding)", fn)
                    continue
                if key not in expected:
                    raise CheckpointError(f"{fn}: unexpected key {key!r} (not a parameter of a {cfg.model_type} model with this config.json)")
                if key in seen:
                    raise CheckpointError(f"{fn}: key {key!r} appears in more than one shard")
                try:
                    t = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{fn}: cannot read tensor {key!r} ({e}); the file may be truncated") from None
                if tuple(t.shape) != expected[key]:
                    raise CheckpointError(f"{fn}: tensor {key!r} has shape {tuple(t.shape)}, expected {expected[key]} "
                                          f"from config.json")
                _set_tensor(model, key, t.to(device=device, dtype=dtype or t.dtype))
                seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing keys in the weight files: {shown}")
    return model


# ----------------------------------------------------------------------------- save
def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def save_pretrained(model, path: str, max_shard_size: int | str = "5GB", dtype: Any = None) -> None:
    """Write ``model`` as an HF directory of its family (atomic: temp dir, then rename)."""
    cfg: ModelConfig = model.config
    dtype = _resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    state = {}
    for k, v in model.state_dict().items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        if v.device.type == "meta":
            raise ValueError(f"cannot save {k!r}: it is on the meta device (load or initialise weights first)")
        state[k] = v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous()
    out_dtype = dtype or next(iter(state.values())).dtype
    # Old weight files must not survive next to the new ones (a shard count change would mix them).
    with atomic_dir(path, carry_over=True, keep=lambda name: not _WEIGHT_FILE.match(name)) as tmp:
        shards = _shard(state, max_bytes)
        if len(shards) == 1:
            safetensors.torch.save_file(shards[0], os.path.join(tmp, SAFE_SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            total = sum(t.numel() * t.element_size() for t in state.values())
            for i, shard in enumerate(shards, 1):
                fn = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                safetensors.torch.save_file(shard, os.path.join(tmp, fn), metadata={"format": "pt"})
                weight_map.update({k: fn for k in shard})
            fsync_write(os.path.join(tmp, SAFE_INDEX),
                        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        hf = cfg.to_hf_dict()
        hf["torch_dtype"] = str(out_dtype).replace("torch.", "")
        fsync_write(os.path.join(tmp, "config.json"), json.dumps(hf, indent=2, sort_keys=True) + "\n")
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
               "temperature": 0.6, "top_p": 0.9}
        if cfg.pad_token_id is not None:
            gen["pad_token_id"] = cfg.pad_token_id
        fsync_write(os.path.join(tmp, "generation_config.json"), json.dumps(gen, indent=2) + "\n")
