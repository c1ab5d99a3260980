"""LoRA adapters for the Llama model: wrap, merge / unmerge, disable, save / load in PEFT format.

Low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685): a frozen linear W gets a trainable update, y = W x + b + (alpha / r) * B A x,
with A (r, in) initialised kaiming-uniform(a=sqrt(5)) and B (out, r) zeros, so training starts
from the base model. Embeddings get A (r, V) zeros and B (H, r) normal(0, 1) (the delta is
B A transposed), matching PEFT's initialisation and tensor layout.

    cfg = LoRAConfig(r=64, alpha=64)
    apply_lora(model, cfg)                  # in place; only LoRA weights stay trainable
    with disable_adapters(model): ...       # = the frozen base (DPO reference); also model.disable_adapters()
    save_adapter(model, "out/adapter", cfg) # adapter_model.safetensors + adapter_config.json (PEFT)
    load_adapter(model2, "out/adapter")
    merge_lora(model)                       # fold into the base weights, plain nn.Linear again

Names: a wrapped module keeps the base parameters under their original names (``q_proj.weight``,
``q_proj.bias``) and adds ``q_proj.lora_A.weight`` / ``q_proj.lora_B.weight`` (embeddings:
``embed_tokens.lora_embedding_A`` / ``lora_embedding_B``), so ``model.state_dict()`` holds a plain
Llama state dict plus the adapter keys, and exactly a plain Llama state dict after ``merge_lora``.
On disk the adapter keys get PEFT's ``base_model.model.`` prefix.

The LM head is not adaptable: ``Llama.forward`` and ``losses.sequence_logps`` read
``model.output_weight`` directly, which a module wrapper cannot intercept, so
``include_head=True`` adapts an untied ``lm_head`` (no dropout on it; it is read as a matrix).

Tests: ``python -m pytest -q tests/test_lora.py``
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

__all__ = ["LoRAConfig", "LoRALinear", "LoRAEmbedding", "apply_lora", "merge_lora", "disable_adapters",
           "lora_modules", "lora_state_dict", "save_adapter", "load_adapter", "count_trainable_parameters"]


@dataclass(kw_only=True)
class LoRAConfig:
    r: int = 64
    alpha: float = 64
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)
    include_embeddings: bool = False
    include_head: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive int; got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1); got {self.dropout}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adapters train in fp32 even on a half-precision base (their updates are small)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class LoRALinear(nn.Module):
    """y = base(x) + (dropout(x) @ A.T @ B.T) * (alpha / r) around an existing ``nn.Linear``.

    The base ``weight`` / ``bias`` Parameters are taken over (same objects, frozen) and keep their
    names. ``merge()`` folds the update into ``weight``; ``unmerge()`` takes it out again.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=_adapter_dtype(base.weight.dtype))
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) update (alpha / r) * B @ A in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight this module applies: base + update unless merged or disabled
        (differentiable in the adapters; used where a layer is read as a matrix, e.g. the LM head)."""
        if self.merged or self.disabled:
            return self.weight
        return self.weight + self.delta_weight().to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        a = self.lora_A.weight
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        return y + (lora * self.scaling).to(y.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's (possibly merged) base Parameters."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


class LoRAEmbedding(nn.Module):
    """Embedding lookup plus (alpha / r) * (A.T[ids]) @ B.T around an existing ``nn.Embedding``.

    lora_embedding_A (r, V) starts at zeros and lora_embedding_B (H, r) normal(0, 1): the update to
    the (V, H) table is (B @ A).T * (alpha / r). Dropout is not applied to embeddings (token ids).
    """

    def __init__(self, base: nn.Embedding, r: int, alpha: float):
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.weight = base.weight
        self.weight.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=_adapter_dtype(base.weight.dtype))
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, self.num_embeddings, **kw))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, **kw))
        nn.init.normal_(self.lora_embedding_B)
        self.merged = False
        self.disabled = False

    def delta_weight(self) -> torch.Tensor:
        """(V, H) update."""
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(ids, self.weight, self.padding_idx)
        if self.merged or self.disabled:
            return y
        after_a = F.embedding(ids, self.lora_embedding_A.t(), self.padding_idx)        # (..., r)
        return y + ((after_a @ self.lora_embedding_B.t()) * self.scaling).to(y.dtype)

    def to_embedding(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        emb.weight = self.weight
        return emb

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


_LORA_TYPES = (LoRALinear, LoRAEmbedding)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: LoRA module} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _LORA_TYPES)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap every ``nn.Linear`` whose attribute name is in ``cfg.target_modules`` (and the token
    embedding when ``cfg.include_embeddings``) in place, freeze everything else, attach
    ``model.disable_adapters()``, and return the model. ``count_trainable_parameters(model)`` then
    gives the adapter size (also stored as ``model.lora_trainable_parameters``)."""
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters; call merge_lora(model) first "
                         "or load new weights with load_adapter")
    head = getattr(model, "lm_head", None) if cfg.include_head else None
    if cfg.include_head:
        if not isinstance(head, nn.Linear):
            raise ValueError("apply_lora: include_head=True needs an untied nn.Linear lm_head; this model ties its "
                             "head to the embedding (use include_embeddings on an untied model, or "
                             "include_head=False)")
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rpartition(".")[2] in cfg.target_modules
               and n.rpartition(".")[2] != "lm_head"]
    if not targets:
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"apply_lora: no nn.Linear matches target_modules={list(cfg.target_modules)}; "
                         f"linear layers in this model: {names}")
    emb = None
    if cfg.include_embeddings:
        backbone = getattr(model, "model", None)
        emb = getattr(backbone, "embed_tokens", None)
        if not isinstance(emb, nn.Embedding):
            raise ValueError("apply_lora: include_embeddings=True but the model has no model.embed_tokens nn.Embedding")
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            raise ValueError("apply_lora: include_embeddings=True on a model with tied word embeddings would make "
                             "the merged LM head differ from the unmerged one; untie the head or set "
                             "include_embeddings=False")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in targets:
        _set_submodule(model, name, LoRALinear(lin, cfg.r, cfg.alpha, cfg.dropout))
    if emb is not None:
        model.model.embed_tokens = LoRAEmbedding(emb, cfg.r, cfg.alpha)
    if head is not None:
        # The head is read as a weight matrix (Llama.output_weight -> effective_weight()), so input
        # dropout cannot apply to it: its adapter is built without dropout.
        model.lm_head = LoRALinear(head, cfg.r, cfg.alpha, 0.0)
    model.disable_adapters = functools.partial(disable_adapters, model)
    model.lora_trainable_parameters = count_trainable_parameters(model)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the model as its base (adapters off, merged adapters taken out) inside the block."""
    mods = list(lora_modules(model).values())
    if not mods:
        raise ValueError("disable_adapters: the model has no LoRA adapters (apply_lora or load_adapter first)")
    state = [(m, m.merged, m.disabled) for m in mods]
    try:
        for m in mods:
            m.unmerge()
            m.disabled = True
        yield model
    finally:
        for m, was_merged, was_disabled in state:
            m.disabled = was_disabled
            if was_merged:
                m.merge()


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear / nn.Embedding back, so
    ``model.state_dict()`` is a plain Llama state dict. All parameters become trainable again
    (the state of a freshly built Llama). Returns the model."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("merge_lora: the model has no LoRA adapters")
    for name, m in mods.items():
        if m.disabled:
            raise ValueError(f"merge_lora: adapter {name} is disabled (inside disable_adapters?); merge outside that block")
        m.merge()
        _set_submodule(model, name, m.to_linear() if isinstance(m, LoRALinear) else m.to_embedding())
    for p in model.parameters():
        p.requires_grad_(True)
    for attr in ("disable_adapters", "lora_trainable_parameters"):
        model.__dict__.pop(attr, None)
    return model


def lora_state_dict(model: nn.Module, peft_names: bool = False) -> dict[str, torch.Tensor]:
    """Adapter tensors only: ``{name: tensor}`` with the model's own names
    (``model.layers.0.self_attn.q_proj.lora_A.weight``) or, with ``peft_names``, PEFT's on-disk names
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)."""
    out = {}
    for name, m in lora_modules(model).items():
        if isinstance(m, LoRALinear):
            items = {"lora_A.weight": m.lora_A.weight, "lora_B.weight": m.lora_B.weight}
        else:
            items = {"lora_embedding_A": m.lora_embedding_A, "lora_embedding_B": m.lora_embedding_B}
        for suffix, t in items.items():
            key = f"{name}.{suffix}"
            out[(PEFT_PREFIX + key) if peft_names else key] = t.detach()
    return out


def _config_from_model(model: nn.Module) -> LoRAConfig:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(mods.values()))
    targets = tuple(sorted({n.rpartition(".")[2] for n, m in mods.items()
                            if isinstance(m, LoRALinear) and n != "lm_head"}))
    drop = next((m.lora_dropout.p for m in mods.values() if isinstance(m, LoRALinear)
                 and isinstance(m.lora_dropout, nn.Dropout)), 0.0)
    return LoRAConfig(r=first.r, alpha=first.alpha, dropout=drop, target_modules=targets,
                      include_embeddings=any(isinstance(m, LoRAEmbedding) for m in mods.values()),
                      include_head="lm_head" in mods)


def _peft_config_dict(cfg: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    targets = (list(cfg.target_modules) + (["embed_tokens"] if cfg.include_embeddings else [])
               + (["lm_head"] if cfg.include_head else []))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, cfg: LoRAConfig | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT layout) to ``path``.

    Written into a temporary sibling directory, then renamed over ``path`` (an existing adapter
    there is replaced only once the new one is complete). ``cfg`` defaults to what the model holds.
    Adapters are saved unmerged-equivalent (the A/B tensors), whether or not they are merged.
    """
    from safetensors.torch import save_file

    cfg = cfg or _config_from_model(model)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model, peft_names=True).items()}
    if not tensors:
        raise ValueError("save_adapter: the model has no LoRA adapters to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(
            json.dumps(_peft_config_dict(cfg, base_model_name_or_path), indent=2, sort_keys=True) + "\n")
        from .io import atomic_replace_dir
        atomic_replace_dir(str(tmp), str(path), carry_over=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """LoRAConfig from a PEFT ``adapter_config.json``."""
    file = Path(path) / ADAPTER_CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"load_adapter: {file} not found; expected a PEFT adapter directory "
                                f"({ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME})")
    d = json.loads(file.read_text())
    if d.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: {file} has peft_type={d.get('peft_type')!r}; only 'LORA' is supported")
    if d.get("fan_in_fan_out"):
        raise ValueError(f"load_adapter: {file} sets fan_in_fan_out=true (GPT-2 Conv1D layout); Llama adapters use false")
    targets = d.get("target_modules") or list(DEFAULT_TARGETS)
    if isinstance(targets, str):
        raise ValueError(f"load_adapter: {file} gives target_modules as a regex ({targets!r}); a list of names is needed")
    return LoRAConfig(r=int(d["r"]), alpha=d.get("lora_alpha", d["r"]), dropout=d.get("lora_dropout", 0.0),
                      target_modules=tuple(t for t in targets if t != "embed_tokens"),
                      include_embeddings="embed_tokens" in targets)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model`` (applying LoRA first if it has none).

    Every adapter tensor in the file must match a LoRA module of the model in name and shape, and
    every LoRA module must be covered; otherwise ValueError names the offending keys.
    """
    from safetensors.torch import load_file

    cfg = load_adapter_config(path)
    wfile = Path(path) / ADAPTER_WEIGHTS_NAME
    if not wfile.is_file():
        raise FileNotFoundError(f"load_adapter: {wfile} not found")
    if not lora_modules(model):
        apply_lora(model, cfg)
    mods = lora_modules(model)
    if any(m.merged for m in mods.values()):
        raise ValueError("load_adapter: some adapters are merged into the base weights; unmerge them first")
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
                                 f"{tuple(dst.shape)} in the model (different r or model size?)")
            dst.copy_(src)
    for m in mods.values():
        if m.scaling != cfg.scaling:
            m.alpha, m.scaling = cfg.alpha, cfg.scaling
    return model
