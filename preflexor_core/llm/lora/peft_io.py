"""LoRA adapters on disk in PEFT's layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

    save_adapter(model, "out/adapter", cfg)   # written to a temp dir, then renamed over the target
    load_adapter(model2, "out/adapter")       # applies LoRA first when the model has none

Tensor names get PEFT's ``base_model.model.`` prefix (``...q_proj.lora_A.weight``, embedding
``lora_embedding_A``, token rows ``model.embed_tokens.token_adapter.trainable_tokens_delta`` and
``lm_head.token_adapter.trainable_tokens_delta``); the config's ``trainable_token_indices`` is a
list on a tied model (PEFT ties the head to the embedding rows) and a dict per table otherwise.
PEFT options this implementation does not compute (rsLoRA, DoRA, rank/alpha patterns, biases,
modules_to_save, layer selections ...) are refused on load rather than silently mis-scaled.

Tests: ``python -m pytest -q tests/test_lora.py``
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ...infra.io import atomic_dir
from .adapters import (DEFAULT_TARGETS, PEFT_PREFIX, TOKEN_MODULES, LoRAConfig, tied_head, apply_lora, config_from_model,
                       lora_modules, lora_state_dict, token_row_targets)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"

__all__ = ["ADAPTER_WEIGHTS_NAME", "ADAPTER_CONFIG_NAME", "PEFT_PREFIX", "save_adapter", "load_adapter",
           "load_adapter_config"]

# PEFT options whose non-default values change the math or the wrapped modules: (key, is-default test, meaning).
_UNSUPPORTED = (
    ("use_rslora", lambda v: not v, "rank-stabilised scaling alpha/sqrt(r)"),
    ("use_dora", lambda v: not v, "DoRA weight decomposition"),
    ("rank_pattern", lambda v: not v, "per-module ranks"),
    ("alpha_pattern", lambda v: not v, "per-module alphas"),
    ("bias", lambda v: v in (None, "none"), "trained biases"),
    ("lora_bias", lambda v: not v, "a bias on lora_B"),
    ("modules_to_save", lambda v: not v, "fully trained extra modules"),
    ("layers_to_transform", lambda v: v is None or v == [], "adapters on selected layers only"),
    ("layers_pattern", lambda v: not v, "adapters on selected layers only"),
    ("exclude_modules", lambda v: not v, "excluded modules"),
    ("layer_replication", lambda v: not v, "replicated layers"),
    ("target_parameters", lambda v: not v, "adapters on raw parameters"),
    ("use_qalora", lambda v: not v, "QA-LoRA pooling"),
    ("alora_invocation_tokens", lambda v: not v, "activated LoRA"),
    ("use_bdlora", lambda v: not v, "block-diagonal LoRA"),
)


def _peft_config_dict(model: nn.Module, cfg: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    targets = (list(cfg.target_modules) + (["embed_tokens"] if cfg.include_embeddings else [])
               + (["lm_head"] if cfg.include_head else []))
    rows = token_row_targets(model, cfg)
    if not rows:
        tti = None
    elif tied_head(model):
        tti = list(rows["embed_tokens"])
    else:
        tti = {k: list(v) for k, v in rows.items()}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "rank_pattern": {},
        "alpha_pattern": {}, "trainable_token_indices": tti,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, cfg: LoRAConfig | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT layout) to ``path``.

    Written into a temporary sibling directory, then renamed over ``path`` (an existing adapter
    there is replaced only once the new one is complete). ``cfg`` defaults to what the model holds.
    Adapters are saved unmerged-equivalent (the A/B tensors and token rows), merged or not.
    """
    cfg = cfg or config_from_model(model)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model, peft_names=True).items()}
    if not tensors:
        raise ValueError("save_adapter: the model has no LoRA adapters to save")
    path = Path(path)
    with atomic_dir(path) as d:
        save_file(tensors, str(Path(d) / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (Path(d) / ADAPTER_CONFIG_NAME).write_text(
            json.dumps(_peft_config_dict(model, cfg, base_model_name_or_path), indent=2, sort_keys=True) + "\n")
    return path


def _token_indices(file: Path, tti) -> dict[str, tuple[int, ...]]:
    """PEFT's ``trainable_token_indices`` as {table: ids}: a list targets the input embedding."""
    if not tti:
        return {}
    if isinstance(tti, list):
        return {"embed_tokens": tuple(tti)}
    if not isinstance(tti, dict):
        raise ValueError(f"load_adapter: {file}: trainable_token_indices must be a list or a dict; got {tti!r}")
    out = {}
    for name, ids in tti.items():
        short = name.rpartition(".")[2]
        if short not in TOKEN_MODULES:
            raise ValueError(f"load_adapter: {file}: trainable_token_indices names {name!r}; a Llama model has "
                             f"token rows only in {list(TOKEN_MODULES)}")
        out[short] = tuple(ids)
    return out


def load_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """LoRAConfig from a PEFT ``adapter_config.json``; options this implementation lacks raise ValueError."""
    file = Path(path) / ADAPTER_CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"load_adapter: {file} not found; expected a PEFT adapter directory "
                                f"({ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME})")
    d = json.loads(file.read_text())
    if d.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: {file} has peft_type={d.get('peft_type')!r}; only 'LORA' is supported")
    if d.get("fan_in_fan_out"):
        raise ValueError(f"load_adapter: {file} sets fan_in_fan_out=true (GPT-2 Conv1D layout); Llama adapters use false")
    for key, is_default, meaning in _UNSUPPORTED:
        if not is_default(d.get(key)):
            raise ValueError(f"load_adapter: {file} sets {key}={d[key]!r} ({meaning}), which this LoRA "
                             f"implementation does not support; loading it would compute a different model. "
                             f"Merge the adapter with PEFT (merge_and_unload) and load the merged checkpoint instead")
    targets = d.get("target_modules") or list(DEFAULT_TARGETS)
    if targets == "all-linear":                  # PEFT: every linear layer except the output head
        targets = list(DEFAULT_TARGETS)
    if isinstance(targets, str):
        raise ValueError(f"load_adapter: {file} gives target_modules as a regex ({targets!r}); a list of names is needed")
    names = [t.rpartition(".")[2] for t in targets]
    return LoRAConfig(r=int(d["r"]), alpha=d.get("lora_alpha", d["r"]), dropout=d.get("lora_dropout", 0.0),
                      target_modules=tuple(t for t in names if t not in TOKEN_MODULES),
                      include_embeddings="embed_tokens" in names, include_head="lm_head" in names,
                      trainable_token_indices=_token_indices(file, d.get("trainable_token_indices")))


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model`` (applying LoRA first if it has none).

    Every adapter tensor in the file must match an adapter module of the model in name and shape,
    and every adapter module must be covered; otherwise ValueError names the offending keys.
    """
    cfg = load_adapter_config(path)
    wfile = Path(path) / ADAPTER_WEIGHTS_NAME
    if not wfile.is_file():
        raise FileNotFoundError(f"load_adapter: {wfile} not found")
    if not lora_modules(model):
        apply_lora(model, cfg)
    mods = lora_modules(model)
    if any(m.merged for m in mods.values()):
        raise ValueError("load_adapter: some adapters are merged into the base weights; unmerge them first")
    have = {n.rpartition(".")[2]: m.token_ids for n, m in mods.items() if hasattr(m, "token_ids")}
    if have != token_row_targets(model, cfg):
        raise ValueError(f"load_adapter: {path} trains token rows {token_row_targets(model, cfg)} but the model's "
                         f"adapters have {have}; load it into a model without adapters")
    loaded = load_file(str(wfile))
    own = lora_state_dict(model, peft_names=True)
    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    if missing or unexpected:
        raise ValueError(f"load_adapter: {wfile} does not match the model's adapters; missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''} (different target_modules or model?)")
    with torch.no_grad():
        for key, dst in own.items():
            src = loaded[key]
            if src.shape != dst.shape:
                raise ValueError(f"load_adapter: {key} has shape {tuple(src.shape)} in {wfile} but "
                                 f"{tuple(dst.shape)} in the model (different r, token rows or model size?)")
            dst.copy_(src)
    for m in mods.values():
        if hasattr(m, "scaling") and m.scaling != cfg.scaling:
            m.alpha, m.scaling = cfg.alpha, cfg.scaling
    return model
