"""Model families: each one's transformers ``config.json`` <-> ``ModelConfig`` and its fixed options.

One model (model.py) serves Llama, Mistral, Qwen2/2.5, Qwen3 and Gemma 3 (text); a family is a name
(``model_type``), its transformers class, its llama.cpp GGUF architecture and the values it fixes for
the model's named options (docs/families.md says what each option does and why it exists). Options a
family leaves free (Qwen3's attention bias, Gemma 3's window and rope bases ...) come from its config.

    kwargs = hf_to_kwargs(ModelConfig, json.load(open("config.json")))    # what ModelConfig.from_hf_dict uses
    to_hf(cfg)                                                            # the family's own config.json dict

Tests: ``python -m pytest -q tests/test_families.py tests/test_config.py``
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .config_fields import ConfigError, _bad, _show, _validate_rope_scaling


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str             # transformers class name in config.json "architectures"
    gguf_arch: str                # llama.cpp general.architecture
    fixed: dict = field(default_factory=dict)    # option -> the only value this family allows
    free: tuple = ()              # non-Llama options the family's config may set


_LLAMA_OPTIONS = dict(qkv_bias=False, qk_norm=False, norm_offset=0.0, embed_scale=False, sandwich_norm=False,
                      hidden_act="silu", sliding_window=None, rope_local_theta=None, query_pre_attn_scalar=None,
                      final_logit_softcapping=None, attention_bias=False,
                      mlp_bias=False)
_WINDOW = ("sliding_window", "layer_types")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", "llama", free=("attention_bias", "mlp_bias")),
    Family("mistral", "MistralForCausalLM", "llama", free=_WINDOW),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", fixed=dict(qkv_bias=True), free=_WINDOW),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", fixed=dict(qk_norm=True), free=("attention_bias",) + _WINDOW),
    Family("gemma3_text", "Gemma3ForCausalLM", "gemma3",
           fixed=dict(qk_norm=True, norm_offset=1.0, embed_scale=True, sandwich_norm=True,
                      hidden_act="gelu_pytorch_tanh"),
           free=("attention_bias", "rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping")
           + _WINDOW),
)}
BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type is {model_type!r}, expected one of {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def family_kwargs(model_type: str) -> dict[str, Any]:
    """The fixed options of a family, to build a ``ModelConfig`` of it (``ModelConfig.for_family``)."""
    return dict(model_type=model_type, **family(model_type).fixed)


def check_family(cfg) -> None:
    """Every option of ``cfg`` is one its family allows (fixed value, or free)."""
    fam = family(cfg.model_type)
    for name, llama_value in _LLAMA_OPTIONS.items():
        value = getattr(cfg, name)
        if name in fam.fixed:
            if value != fam.fixed[name]:
                raise ConfigError(f"{name} is {value!r} but the {fam.model_type} family needs {fam.fixed[name]!r}; "
                                  f"build it with ModelConfig.for_family({fam.model_type!r}, ...)")
        elif name not in fam.free and value != llama_value:
            raise ConfigError(f"{name}={value!r} is not an option of the {fam.model_type} family "
                              f"({fam.architecture} has no such setting); leave it at {llama_value!r}")


# ----------------------------------------------------------------------------- config.json -> kwargs
def _rope(kwargs: dict, rp: Any, name: str) -> None:
    """theta + scaling of one rope_parameters dict into kwargs (rope_theta / rope_scaling)."""
    if not isinstance(rp, Mapping):
        raise _bad(name, rp, 'an object like {"rope_theta": 500000.0, "rope_type": "default"}')
    rp = dict(rp)
    if "rope_theta" in rp:
        kwargs["rope_theta"] = rp.pop("rope_theta")
    kwargs["rope_scaling"] = _validate_rope_scaling(rp, name=name)


def hf_to_kwargs(cls, d: Any) -> dict[str, Any]:
    """ModelConfig kwargs from a transformers config dict of any supported family."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"the top level is {_show(d)}, expected an object of LlamaConfig fields "
                          '({"model_type": "llama", "hidden_size": ..., ...})')
    archs = d.get("architectures") or None
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise _bad("architectures", archs, 'a list of class names like ["LlamaForCausalLM"]')
    mtype = d.get("model_type", "llama" if archs is None else None)
    fam = FAMILIES.get(mtype) if isinstance(mtype, str) else None
    if fam is None or (archs is not None and fam.architecture not in archs):
        hint = (" (a Gemma 3 multimodal checkpoint: only the text models, Gemma3ForCausalLM, load)"
                if mtype == "gemma3" else "")
        raise ConfigError(f"unsupported architecture model_type={mtype!r} architectures={archs}{hint}; supported: "
                          + ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values()))
    names = {f.name for f in dataclasses.fields(cls)} - set(_LLAMA_OPTIONS) - {"model_type", "layer_types"}
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs.update(family_kwargs(mtype))
    if kwargs.get("torch_dtype", "") is None:
        del kwargs["torch_dtype"]           # null: the default
    if "torch_dtype" not in kwargs and isinstance(d.get("dtype"), str):
        kwargs["torch_dtype"] = d["dtype"]
    for name in fam.free:
        if name in d and name in ("attention_bias", "mlp_bias", "query_pre_attn_scalar",
                                  "final_logit_softcapping", "layer_types"):
            kwargs[name] = d[name]
    rp = d.get("rope_parameters")          # newer transformers: theta + scaling in one dict
    if mtype == "llama":
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"pretraining_tp={d['pretraining_tp']} is not supported (use 1)")
        if "hidden_act" in d:
            kwargs["hidden_act"] = d["hidden_act"]
    elif mtype == "mistral":
        kwargs["sliding_window"] = d.get("sliding_window")
    elif mtype in ("qwen2", "qwen3"):
        if d.get("use_sliding_window"):
            kwargs["sliding_window"] = d.get("sliding_window", 4096)
            if d.get("layer_types") is None:
                first = d.get("max_window_layers", 28)
                kwargs["layer_types"] = ["sliding_attention" if i >= first else "full_attention"
                                         for i in range(d.get("num_hidden_layers", 32))]
        else:
            kwargs.pop("layer_types", None)
    else:                                  # gemma3_text
        _gemma3_kwargs(d, kwargs, rp)
        rp = None
    if mtype != "llama" and d.get("hidden_act", "silu") != "silu":
        raise _bad("hidden_act", d["hidden_act"], f"'silu' (the {mtype} family's MLP)")
    if rp is not None:
        _rope(kwargs, rp, "rope_parameters")
    return kwargs


def _gemma3_kwargs(d: Mapping, kwargs: dict, rp: Any) -> None:
    act = d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise _bad("hidden_activation", act, "'gelu_pytorch_tanh' (Gemma 3's tanh-approximated GeGLU)")
    if d.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention is true (an embedding model); only causal Gemma 3 "
                          "language models load")
    kwargs.setdefault("tie_word_embeddings", True)     # Gemma3TextConfig's defaults where a key is absent
    kwargs.setdefault("rms_norm_eps", 1e-6)
    for key, default in (("bos_token_id", 2), ("eos_token_id", 1), ("pad_token_id", 0)):
        kwargs.setdefault(key, d.get(key, default))
    kwargs["sliding_window"] = d.get("sliding_window", 4096)
    if d.get("layer_types") is None:
        pattern = d.get("sliding_window_pattern", 6)
        kwargs["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                 for i in range(d.get("num_hidden_layers", 26))]
    kwargs.setdefault("query_pre_attn_scalar", 256)
    if isinstance(rp, Mapping) and ("full_attention" in rp or "sliding_attention" in rp):
        _rope(kwargs, rp.get("full_attention") or {"rope_theta": 1e6}, "rope_parameters.full_attention")
        local: dict[str, Any] = {}
        _rope(local, rp.get("sliding_attention") or {"rope_theta": 1e4}, "rope_parameters.sliding_attention")
        if local.get("rope_scaling") is not None:
            raise ConfigError("rope_parameters.sliding_attention has scaling; only default rope is supported "
                              "on sliding layers")
        kwargs["rope_local_theta"] = local.get("rope_theta", 1e4)
    else:
        kwargs["rope_theta"] = d.get("rope_theta", 1e6)
        kwargs["rope_local_theta"] = d.get("rope_local_base_freq", 1e4)
        if rp is not None:
            _rope(kwargs, rp, "rope_parameters")


# ----------------------------------------------------------------------------- ModelConfig -> config.json
_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
           "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype")


def to_hf(cfg) -> dict[str, Any]:
    """The config.json dict transformers reads as ``cfg``'s family."""
    fam = family(cfg.model_type)
    d = {k: getattr(cfg, k) for k in _COMMON}
    d.update(architectures=[fam.architecture], model_type=fam.model_type, attention_dropout=0.0, use_cache=True)
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    if fam.model_type == "gemma3_text":
        full = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}
        d.update(hidden_activation=cfg.hidden_act, attention_bias=cfg.attention_bias, sliding_window=cfg.sliding_window,
                 layer_types=cfg.layer_kinds, query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
                 final_logit_softcapping=cfg.final_logit_softcapping,
                 rope_parameters={"full_attention": full, "sliding_attention": {
                     "rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}})
        return d
    d.update(hidden_act=cfg.hidden_act, rope_theta=cfg.rope_theta)
    if scaling:
        d["rope_scaling"] = scaling
    if fam.model_type == "llama":
        d.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    elif fam.model_type == "mistral":
        d["sliding_window"] = cfg.sliding_window
    else:                                              # qwen2 / qwen3
        if fam.model_type == "qwen3":
            d["attention_bias"] = cfg.attention_bias
        sliding = cfg.has_sliding_layers
        kinds = cfg.layer_kinds
        d.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window, layer_types=kinds,
                 max_window_layers=next((i for i, t in enumerate(kinds) if t == "sliding_attention"),
                                        cfg.num_hidden_layers))
    return d


def _int_if_whole(x: float | None):
    """transformers' Gemma3TextConfig types query_pre_attn_scalar as an int."""
    return int(x) if x is not None and float(x).is_integer() else x


def embed_scale(cfg) -> float | None:
    """The embedding multiplier (Gemma: sqrt(hidden_size)), or None."""
    return math.sqrt(cfg.hidden_size) if cfg.embed_scale else None
