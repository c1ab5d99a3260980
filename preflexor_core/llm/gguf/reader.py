"""Read a llama.cpp GGUF file into ``Llama``: ModelConfig from metadata, dequantization.

The file is opened by ``tokenization/gguf_file.py`` (llama.cpp's ``gguf`` package); this module uses
the package's ``gguf.quants.dequantize`` for the block formats. Architectures: llama (Llama; Mistral when a
sliding window is set), qwen2, qwen3, gemma3 (the text model). Metadata keys follow llama.cpp's GGUF
spec under the architecture's prefix (``qwen3.embedding_length``, ``gemma3.attention.sliding_window`` ...);
what llama.cpp hard-codes for gemma3 is the default when its key is absent (every 6th layer global,
local rope base 10000, attention scale 1/sqrt(head_dim)). q/k rows are put back in HF order and Gemma's
norm shift is undone (layout.py); a missing ``output.weight`` means a tied head.

    model = Llama.from_pretrained("model.gguf")      # dispatches to load_gguf_model(path, Llama, ...)

Tests: .venv/bin/python -m pytest -q tests/test_gguf.py
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...tokenization.gguf_file import SUPPORTED_TYPES, GGUFError, open_gguf, read_metadata
from ..checkpoint import _resolve_dtype
from ..config import ModelConfig
from ..config_fields import ConfigError
from ..rope import rope_inv_freq
from . import layout


def _llama3_rope(freqs: np.ndarray, theta: float, head_dim: int, path: str) -> dict:
    """Recover Llama-3 rope_scaling from llama.cpp's ``rope_freqs`` divisors (standard Llama-3.x values)."""
    factor = float(freqs.max())
    for lo, hi, ctx in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 2048)):
        rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
              "original_max_position_embeddings": ctx}
        base = ModelConfig(hidden_size=head_dim, num_attention_heads=1, rope_theta=theta)
        want = rope_inv_freq(base) / rope_inv_freq(base.replace(rope_scaling=rs))
        if want.shape == freqs.shape and np.allclose(want.numpy(), freqs, rtol=1e-4):
            return rs
    raise GGUFError(f"{path}: rope_freqs.weight does not match Llama-3 rope scaling with low/high freq factors "
                    f"1/4; other per-frequency rope factors are not supported")


def _family_kwargs(arch: str, get, meta: dict, tensors: dict, n_layers: int, path: str) -> dict[str, Any]:
    """model_type and the family options of ``arch`` from its metadata."""
    if arch == "llama":
        window = get("attention.sliding_window", None)
        if window:                                    # Mistral: llama.cpp runs it as llama
            return dict(model_type="mistral", sliding_window=int(window))
        return dict(model_type="llama", attention_bias="blk.0.attn_q.bias" in tensors)
    if arch == "qwen2":
        return dict(model_type="qwen2")
    if arch == "qwen3":
        return dict(model_type="qwen3", attention_bias="blk.0.attn_q.bias" in tensors)
    pattern = get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise GGUFError(f"{path}: gemma3.attention.sliding_window_pattern has {len(pattern)} entries for "
                            f"{n_layers} layers")
        sliding = [bool(x) for x in pattern]
    else:                                             # llama.cpp's rule: the last of every `pattern` is global
        sliding = [(i % int(pattern)) < int(pattern) - 1 for i in range(n_layers)]
    kw: dict[str, Any] = dict(
        model_type="gemma3_text", sliding_window=int(get("attention.sliding_window", 4096)),
        layer_types=["sliding_attention" if x else "full_attention" for x in sliding],
        rope_local_theta=float(get("rope.freq_base_swa", 10000.0)),
        attention_bias="blk.0.attn_q.bias" in tensors)
    scale = get("attention.scale", None)
    heads = int(get("attention.head_count"))
    if scale:
        kw["query_pre_attn_scalar"] = round(float(scale) ** -2, 4)
    elif n_layers == 62:                              # llama.cpp: Gemma 3 27B scales by 1/sqrt(hidden / heads)
        kw["query_pre_attn_scalar"] = int(get("embedding_length")) // heads
    else:                                             # llama.cpp: 1/sqrt(head_dim) otherwise
        kw["query_pre_attn_scalar"] = int(get("attention.key_length", int(get("embedding_length")) // heads))
    if get("final_logit_softcapping", None):
        kw["final_logit_softcapping"] = float(get("final_logit_softcapping"))
    return kw


def config_from_gguf(meta: dict[str, Any], reader, path: str, dtype: torch.dtype) -> ModelConfig:
    """ModelConfig from ``<arch>.*`` / ``tokenizer.ggml.*`` metadata and the tensor list."""
    arch = meta.get("general.architecture")
    if arch not in layout.ARCHS:
        raise GGUFError(f"{path}: unsupported architecture general.architecture={arch!r}; supported: "
                        f"{', '.join(layout.ARCHS)} (Llama 2/3, Mistral, SmolLM2, Qwen2/2.5, Qwen3, Gemma 3 text)")

    def get(key: str, default: Any = ...):
        v = meta.get(f"{arch}.{key}", default)
        if v is ...:
            raise GGUFError(f"{path}: metadata key '{arch}.{key}' is missing; a {arch} GGUF needs it")
        return v

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no tensor 'token_embd.weight'; not a complete {arch} model file")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{path}: {arch}.rope.dimension_count={get('rope.dimension_count')} differs from the head "
                        f"size {head_dim}; partial rotary embeddings are not supported")
    theta = float(get("rope.freq_base", 10000.0))
    rope_scaling = None
    stype, sfactor = get("rope.scaling.type", "none"), get("rope.scaling.factor", None)
    if stype == "linear" and sfactor not in (None, 0.0, 1.0):
        rope_scaling = {"rope_type": "linear", "factor": float(sfactor)}
    elif stype not in ("none", None) or sfactor not in (None, 0.0, 1.0):
        raise GGUFError(f"{path}: rope scaling type {stype!r} (factor {sfactor}) is not supported; "
                        f"supported: none, linear, and Llama-3 scaling via rope_freqs.weight")
    if layout.ROPE_FREQS in tensors:
        rope_scaling = _llama3_rope(np.asarray(tensors[layout.ROPE_FREQS].data, np.float32), theta, head_dim, path)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(tensors["token_embd.weight"].shape[1])
    if tokens is not None and len(tokens) != vocab:
        raise GGUFError(f"{path}: {len(tokens)} tokens in tokenizer.ggml.tokens but token_embd.weight has "
                        f"{vocab} rows")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = [i for i in dict.fromkeys([eos, eot]) if i is not None]
    n_layers = int(get("block_count"))
    try:
        return ModelConfig.for_family(**_family_kwargs(arch, get, meta, tensors, n_layers, path),
            vocab_size=vocab, hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=n_layers, num_attention_heads=heads,
            num_key_value_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
            rope_scaling=rope_scaling, max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids) or None,
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            torch_dtype=str(dtype).replace("torch.", ""))
    except ConfigError as e:
        raise GGUFError(f"{path}: {e}") from None


def dequantize(t, path: str) -> torch.Tensor:
    """One GGUF tensor -> fp32 torch tensor in row-major (PyTorch) shape."""
    import gguf  # gguf: optional, only .gguf files need it
    if t.tensor_type.name not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {t.name!r} has quant type {t.tensor_type.name}, which is not supported; "
                        f"supported: {', '.join(SUPPORTED_TYPES)} (re-quantize with llama-quantize)")
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))


def read_metadata_arch(reader) -> str:
    """The file's ``general.architecture``."""
    return str(reader.fields["general.architecture"].contents())


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_gguf_model(path: str, model_cls, dtype: Any = None, device: Any = "cpu", reader=None):
    """Load a GGUF file of a supported architecture as ``model_cls`` (``Llama``); dtype None = bf16 on CUDA, fp32 otherwise.
    Users call ``Llama.from_pretrained(path)``, which passes its class (this package never imports the model)."""
    device = torch.device(device)
    dtype = _resolve_dtype(dtype) or _default_dtype(device)
    reader = reader if reader is not None else open_gguf(path)     # a caller may pass the one it opened
    cfg = config_from_gguf(read_metadata(reader), reader, path, dtype)
    arch = read_metadata_arch(reader)
    model = model_cls(cfg, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == layout.ROPE_FREQS:
            continue
        name = layout.hf_name(t.name, arch)
        if name is None or name not in expected:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} (not part of a {arch} model with this metadata)")
        w = dequantize(t, path)
        if tuple(w.shape) != expected[name]:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {tuple(w.shape)}, expected {expected[name]} "
                            f"from the {arch}.* metadata")
        heads = layout.rotary_heads(name, cfg.num_attention_heads, cfg.num_key_value_heads, arch)
        if heads is not None:
            w = layout.from_gguf_rows(w, heads)
        shift = layout.norm_shift(name, arch)
        if shift:
            w = w - shift
        state[name] = w.to(device=device, dtype=dtype).contiguous()
    missing = sorted(set(expected) - set(state))
    if missing:
        names = [layout.gguf_name(m, arch) for m in missing[:5]]
        raise GGUFError(f"{path}: missing tensors {', '.join(names)}"
                        + (f" ... ({len(missing)} in all)" if len(missing) > 5 else ""))
    model.load_state_dict(state, strict=True, assign=True)
    return model
