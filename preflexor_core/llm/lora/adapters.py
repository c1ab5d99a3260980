"""LoRA on a Llama model: configure, apply in place, disable, merge; the adapter's tensors.

    cfg = LoRAConfig(r=64, alpha=64, trainable_token_indices=model.new_token_ids)
    apply_lora(model, cfg)                  # in place; only adapter weights stay trainable
    with disable_adapters(model): ...       # = the frozen base (DPO reference); also model.disable_adapters()
    merge_lora(model)                       # fold into the base weights, plain nn.Linear / nn.Embedding again

Wrapped modules keep the base parameters' names (``q_proj.weight``) and add the adapter's
(``q_proj.lora_A.weight``, ``embed_tokens.lora_embedding_A``, ``embed_tokens.token_adapter.
trainable_tokens_delta``): ``model.state_dict()`` is a plain Llama one plus adapter keys, exactly
plain after ``merge_lora``. The head is read as a matrix (``Llama.output_weight``), through
``effective_weight()`` (no dropout); a tied head sees the embedding's token rows.

Tests: ``python -m pytest -q tests/test_lora.py``
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .layers import LORA_TYPES, LoRAEmbedding, LoRALinear, TokenRowsEmbedding, TokenRowsLinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKEN_MODULES = ("embed_tokens", "lm_head")
PEFT_PREFIX = "base_model.model."                 # PEFT's prefix of adapter tensor names on disk

__all__ = ["LoRAConfig", "apply_lora", "merge_lora", "disable_adapters", "lora_modules", "lora_state_dict",
           "count_trainable_parameters", "DEFAULT_TARGETS"]


@dataclass(kw_only=True)
class LoRAConfig:
    """``trainable_token_indices``: token ids whose rows train fully (PEFT's option of that name).
    A list means the embedding and, on an untied model without ``include_head``, the head rows too;
    a dict names the tables exactly: ``{"embed_tokens": [...], "lm_head": [...]}``."""
    r: int = 64
    alpha: float = 64
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)
    include_embeddings: bool = False
    include_head: bool = False
    trainable_token_indices: tuple[int, ...] | dict[str, tuple[int, ...]] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive int; got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1); got {self.dropout}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        tti = self.trainable_token_indices or ()
        if isinstance(tti, dict):
            unknown = sorted(set(tti) - set(TOKEN_MODULES))
            if unknown:
                raise ValueError(f"LoRAConfig.trainable_token_indices names {unknown}; only {list(TOKEN_MODULES)} "
                                 f"have token rows in a Llama model")
            self.trainable_token_indices = {k: tuple(int(i) for i in v) for k, v in tti.items() if v}
        else:
            self.trainable_token_indices = tuple(int(i) for i in tti)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: adapter module (LoRA or token rows)} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tied_head(model: nn.Module) -> bool:
    return getattr(model, "lm_head", None) is None or bool(getattr(getattr(model, "config", None),
                                                                    "tie_word_embeddings", False))


def token_row_targets(model: nn.Module, cfg: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """{"embed_tokens" | "lm_head": ids}: the tables ``apply_lora`` gives trainable rows (see LoRAConfig)."""
    tti = cfg.trainable_token_indices
    if not tti:
        return {}
    tied = tied_head(model)
    if isinstance(tti, tuple):
        out = {"embed_tokens": tti}
        if not tied and not cfg.include_head:
            out["lm_head"] = tti
        return out
    out = dict(tti)
    if tied and "lm_head" in out:
        head = out.pop("lm_head")
        if out.setdefault("embed_tokens", head) != head:
            raise ValueError(f"trainable_token_indices gives the tied head rows {list(head)} but the embedding rows "
                             f"{list(out['embed_tokens'])}; a tied model has one table: give the same ids")
    return out


def _check_new_rows_train(model: nn.Module, cfg: LoRAConfig, rows: dict[str, tuple[int, ...]]) -> None:
    """Refuse adapters that would leave rows added to the vocabulary (``model.new_token_ids``) frozen."""
    new = set(getattr(model, "new_token_ids", ()) or ())
    if not new:
        return
    frozen = []
    if not cfg.include_embeddings and not new <= set(rows.get("embed_tokens", ())):
        frozen.append("embedding")
    if not tied_head(model) and not cfg.include_head and not new <= set(rows.get("lm_head", ())):
        frozen.append("LM head")
    if frozen:
        raise ValueError(f"apply_lora: tokens {sorted(new)} were added to this model's vocabulary, but their "
                         f"{' and '.join(frozen)} rows would stay frozen at their initial values under this LoRA "
                         f"config, so the model could never learn to use them; pass "
                         f"LoRAConfig(trainable_token_indices=model.new_token_ids) (or train without LoRA)")


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap every ``nn.Linear`` whose attribute name is in ``cfg.target_modules`` (the token embedding
    when ``cfg.include_embeddings``, an untied head when ``cfg.include_head``, token rows for
    ``cfg.trainable_token_indices``) in place, freeze everything else, attach
    ``model.disable_adapters()``, and return the model. ``count_trainable_parameters(model)`` then
    gives the adapter size (also stored as ``model.lora_trainable_parameters``)."""
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters; call merge_lora(model) first "
                         "or load new weights with load_adapter")
    head = getattr(model, "lm_head", None) if cfg.include_head else None
    if cfg.include_head and not isinstance(head, nn.Linear):
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
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if (cfg.include_embeddings or cfg.trainable_token_indices) and not isinstance(emb, nn.Embedding):
        raise ValueError("apply_lora: include_embeddings / trainable_token_indices need a model.embed_tokens "
                         "nn.Embedding; this model has none")
    if cfg.include_embeddings and tied_head(model):
        raise ValueError("apply_lora: include_embeddings=True on a model with tied word embeddings would make "
                         "the merged LM head differ from the unmerged one; untie the head or set "
                         "include_embeddings=False (use trainable_token_indices for new tokens)")
    rows = token_row_targets(model, cfg)
    if cfg.include_embeddings and "embed_tokens" in rows:
        raise ValueError("apply_lora: include_embeddings=True and trainable embedding rows on the same table are "
                         "not supported (PEFT refuses it too); give the rows as {'lm_head': [...]} or drop "
                         "include_embeddings")
    if cfg.include_head and "lm_head" in rows:
        raise ValueError("apply_lora: include_head=True and trainable lm_head rows on the same table are not "
                         "supported (PEFT refuses it too); the head adapter already updates every row")
    _check_new_rows_train(model, cfg, rows)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in targets:
        _set_submodule(model, name, LoRALinear(lin, cfg.r, cfg.alpha, cfg.dropout))
    if cfg.include_embeddings:
        model.model.embed_tokens = LoRAEmbedding(emb, cfg.r, cfg.alpha)
    elif "embed_tokens" in rows:
        model.model.embed_tokens = TokenRowsEmbedding(emb, rows["embed_tokens"])
    if head is not None:
        # The head is read as a weight matrix (Llama.output_weight -> effective_weight()), so input
        # dropout cannot apply to it: its adapter is built without dropout.
        model.lm_head = LoRALinear(head, cfg.r, cfg.alpha, 0.0)
    elif "lm_head" in rows:
        model.lm_head = TokenRowsLinear(model.lm_head, rows["lm_head"])
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
    """Fold every adapter (token rows included) into its base weight and put plain nn.Linear /
    nn.Embedding back, so ``model.state_dict()`` is a plain Llama state dict. All parameters become
    trainable again (the state of a freshly built Llama). Returns the model."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("merge_lora: the model has no LoRA adapters")
    for name, m in mods.items():
        if m.disabled:
            raise ValueError(f"merge_lora: adapter {name} is disabled (inside disable_adapters?); merge outside that block")
        m.merge()
        plain = m.to_linear() if isinstance(m, (LoRALinear, TokenRowsLinear)) else m.to_embedding()
        _set_submodule(model, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    for attr in ("disable_adapters", "lora_trainable_parameters", "new_token_ids"):
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
        elif isinstance(m, LoRAEmbedding):
            items = {"lora_embedding_A": m.lora_embedding_A, "lora_embedding_B": m.lora_embedding_B}
        else:
            items = {"token_adapter.trainable_tokens_delta": m.token_adapter.trainable_tokens_delta}
        for suffix, t in items.items():
            key = f"{name}.{suffix}"
            out[(PEFT_PREFIX + key) if peft_names else key] = t.detach()
    return out


def config_from_model(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig that ``apply_lora`` would need to rebuild ``model``'s adapters."""
    mods = lora_modules(model)
    lora = [m for m in mods.values() if isinstance(m, (LoRALinear, LoRAEmbedding))]
    if not lora:
        raise ValueError("the model has no LoRA adapters")
    targets = tuple(sorted({n.rpartition(".")[2] for n, m in mods.items()
                            if isinstance(m, LoRALinear) and n != "lm_head"}))
    drop = next((m.lora_dropout.p for m in lora if isinstance(m, LoRALinear)
                 and isinstance(m.lora_dropout, nn.Dropout)), 0.0)
    rows = {n.rpartition(".")[2]: m.token_ids for n, m in mods.items()
            if isinstance(m, (TokenRowsEmbedding, TokenRowsLinear))}
    return LoRAConfig(r=lora[0].r, alpha=lora[0].alpha, dropout=drop, target_modules=targets,
                      include_embeddings=any(isinstance(m, LoRAEmbedding) for m in mods.values()),
                      include_head=isinstance(mods.get("lm_head"), LoRALinear), trainable_token_indices=rows)
