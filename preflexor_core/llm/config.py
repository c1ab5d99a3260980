"""Model configuration: a kw_only dataclass mirroring HF ``LlamaConfig``, plus a family's named options.

``ModelConfig.from_hf_dict`` / ``to_hf_dict`` round-trip a transformers ``config.json`` of every
supported family (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3 text; the per-family translation lives in
families.py, the options are listed in docs/families.md); ``ModelConfig.for_family("qwen3", ...)``
builds one with the family's fixed options set; ``ModelConfig.preset(name)`` returns a named preset (exact names only: "tiny",
"small", "llama-3.2-3b"). Every field is validated when a config is built (kwargs, HF dict or file):
types, ranges, head divisibility, rope scaling shape; a bad one raises ``ConfigError`` naming the
file, the field, the value and what is allowed.

    >>> cfg = ModelConfig.preset("llama-3.2-3b"); cfg.num_key_value_heads, cfg.head_dim
    (8, 128)

Tests: ``python -m pytest -q tests/test_config.py tests/test_model.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from .config_fields import ConfigError, _bad, _int, _real, _validate_rope_scaling
from .families import check_family, family_kwargs, hf_to_kwargs, to_hf

LAYER_TYPES = ("full_attention", "sliding_attention")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")   # SwiGLU (Llama, Qwen, Mistral); tanh-GELU GeGLU (Gemma)

# Token ids of the special tokens that ``Tokenizer.train_bpe`` places first in its vocabulary.
# The tiny and small presets use these ids; real checkpoints bring their own in config.json.
TRAINED_BOS_ID = 0   # <|begin_of_text|>
TRAINED_EOS_ID = 1   # <|end_of_text|>
TRAINED_EOT_ID = 4   # <|eot_id|>


class UnknownPresetError(ConfigError, KeyError):
    """``ModelConfig.preset`` got a name that is not a preset (a KeyError too, for older callers)."""

    __str__ = Exception.__str__       # KeyError would quote the message


TORCH_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass(kw_only=True)
class ModelConfig:
    """Decoder hyper-parameters (same names and meaning as HF ``LlamaConfig``) plus a family's named options."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None     # None -> num_attention_heads (MHA)
    head_dim: int | None = None                # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None           # None or {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # -- a family's differences from Llama (docs/families.md); the defaults are Llama's ------------
    model_type: str = "llama"                  # llama | mistral | qwen2 | qwen3 | gemma3_text
    qkv_bias: bool = False                     # Qwen2: bias on q/k/v only (attention_bias: on o too)
    qk_norm: bool = False                      # Qwen3, Gemma 3: RMSNorm over each head of q and k before rope
    norm_offset: float = 0.0                   # Gemma: every RMSNorm scales by (norm_offset + weight)
    embed_scale: bool = False                  # Gemma: embeddings times sqrt(hidden_size), in their dtype
    sandwich_norm: bool = False                # Gemma 3: norms after attention and before/after the MLP
    sliding_window: int | None = None          # keys older than this many positions are hidden (sliding layers)
    layer_types: list[str] | None = None       # per layer "full_attention" | "sliding_attention"; None: uniform
    rope_local_theta: float | None = None      # rope base of sliding layers (Gemma 3); None: rope_theta
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (None: head_dim)
    final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c)

    def __post_init__(self) -> None:
        self._validate_fields()
        self._validate_family()
        # Derived fields, computed once.
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    def _validate_fields(self) -> None:
        """Types and ranges of every field, one ``ConfigError`` naming the field, its value and what is allowed."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            setattr(self, name, _int(name, getattr(self, name), 1))
        for name in ("num_key_value_heads", "head_dim"):
            setattr(self, name, _int(name, getattr(self, name), 1, optional=True))
        self.rms_norm_eps = _real("rms_norm_eps", self.rms_norm_eps, 0.0, strict=True)
        self.rope_theta = _real("rope_theta", self.rope_theta, 0.0, strict=True)
        self.initializer_range = _real("initializer_range", self.initializer_range, 0.0, strict=False)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "true or false")
        if self.hidden_act not in HIDDEN_ACTS:
            raise _bad("hidden_act", self.hidden_act, f"one of {list(HIDDEN_ACTS)}")
        for name in ("qkv_bias", "qk_norm", "embed_scale", "sandwich_norm"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "true or false")
        self.norm_offset = _real("norm_offset", self.norm_offset, 0.0, strict=False)
        self.sliding_window = _int("sliding_window", self.sliding_window, 1, optional=True)
        for name in ("rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping"):
            if getattr(self, name) is not None:
                setattr(self, name, _real(name, getattr(self, name), 0.0, strict=True))
        self.bos_token_id = _int("bos_token_id", self.bos_token_id, 0, optional=True)
        self.pad_token_id = _int("pad_token_id", self.pad_token_id, None, optional=True)
        eos = self.eos_token_id
        if isinstance(eos, (list, tuple)):
            self.eos_token_id = [_int(f"eos_token_id[{i}]", e, 0) for i, e in enumerate(eos)]
        else:
            self.eos_token_id = _int("eos_token_id", eos, 0, optional=True)
        if not isinstance(self.torch_dtype, str) or self.torch_dtype.removeprefix("torch.") not in TORCH_DTYPES:
            raise _bad("torch_dtype", self.torch_dtype, f"one of {list(TORCH_DTYPES)}")
        self.rope_scaling = _validate_rope_scaling(self.rope_scaling)

    def _validate_family(self) -> None:
        """model_type is a known family whose fixed options this config has; layer_types fits."""
        check_family(self)
        n = self.num_hidden_layers
        if self.layer_types is not None:
            if (not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) != n
                    or any(t not in LAYER_TYPES for t in self.layer_types)):
                raise _bad("layer_types", self.layer_types, f"a list of {n} entries, each one of {list(LAYER_TYPES)}")
            self.layer_types = list(self.layer_types)
            if self.layer_types == self._uniform_layer_types():
                self.layer_types = None            # the default: kept implicit, so equal configs compare equal
        if "sliding_attention" in self.layer_kinds and self.sliding_window is None:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is null; "
                              "set sliding_window (a number of positions)")

    # ----------------------------------------------------------------- derived
    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def _uniform_layer_types(self) -> list[str]:
        """The layer types when none are given: Mistral's window covers every layer; no window, all global."""
        return ["sliding_attention" if self.sliding_window else "full_attention"] * self.num_hidden_layers

    @property
    def layer_kinds(self) -> list[str]:
        """Every layer's type ("full_attention" | "sliding_attention"): ``layer_types`` or the uniform default."""
        return list(self.layer_types) if self.layer_types is not None else self._uniform_layer_types()

    def is_sliding(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` attends only to the last ``sliding_window`` positions."""
        return self.layer_kinds[layer_idx] == "sliding_attention"

    @property
    def has_sliding_layers(self) -> bool:
        return self.sliding_window is not None and "sliding_attention" in self.layer_kinds

    def family_options(self) -> list[str]:
        """Names of the non-Llama options this config turns on (empty for a plain Llama)."""
        on = [name for name in ("qkv_bias", "qk_norm", "embed_scale", "sandwich_norm") if getattr(self, name)]
        on += [name for name in ("rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping")
               if getattr(self, name) is not None]
        if self.norm_offset:
            on.append("norm_offset")
        if self.hidden_act != "silu":
            on.append("hidden_act")
        if self.has_sliding_layers:
            on.append("sliding_window")
        return on

    # ------------------------------------------------------------- HF round trip
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Build from a transformers config dict of a supported family; ``source`` names the file in errors.

        Every field is validated (type, range, head divisibility, rope scaling shape); a bad one raises
        ``ConfigError("<source>: <field> is <value>, expected <allowed>")``. Unknown keys are ignored.
        """
        try:
            return cls(**cls._hf_kwargs(d))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def _hf_kwargs(cls, d: Any) -> dict[str, Any]:
        return hf_to_kwargs(cls, d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The family's own config.json dict (model_type, architectures and its option names)."""
        return to_hf(self)

    @classmethod
    def for_family(cls, model_type: str, **kwargs: Any) -> "ModelConfig":
        """A config of family ``model_type`` (llama, mistral, qwen2, qwen3, gemma3_text) with its fixed
        options set, e.g. ``ModelConfig.for_family("qwen3", hidden_size=64, ...)`` has ``qk_norm=True``."""
        return cls(**{**family_kwargs(model_type), **kwargs})

    @classmethod
    def from_json_file(cls, path: str) -> "ModelConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: config.json not found; a Llama checkpoint directory needs one")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a config.json is a JSON file") from None
        return cls.from_hf_dict(d, source=path)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """A named preset, looked up by exact name."""
        if name not in PRESETS:
            raise UnknownPresetError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls(**PRESETS[name])


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict[str, Any]] = {
    # Trains on 2 CPU cores in minutes; vocabulary from Tokenizer.train_bpe(vocab_size=4096).
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=1024, tie_word_embeddings=True,
                 bos_token_id=TRAINED_BOS_ID, eos_token_id=[TRAINED_EOS_ID, TRAINED_EOT_ID],
                 pad_token_id=TRAINED_EOS_ID),
    # ~41M parameters.
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=TRAINED_BOS_ID, eos_token_id=[TRAINED_EOS_ID, TRAINED_EOT_ID],
                  pad_token_id=TRAINED_EOS_ID),
    # The exact Llama-3.2-3B(-Instruct) shape: 3,212,749,824 parameters.
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE), max_position_embeddings=131072,
                         tie_word_embeddings=True, bos_token_id=128000,
                         eos_token_id=[128001, 128008, 128009], pad_token_id=None, torch_dtype="bfloat16"),
}
