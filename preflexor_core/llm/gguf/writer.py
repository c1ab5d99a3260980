"""Write ``Llama`` + ``Tokenizer`` as a llama.cpp GGUF file of the model family's architecture.

Llama and Mistral are written as ``llama``, Qwen2 as ``qwen2``, Qwen3 as ``qwen3``, Gemma 3 as ``gemma3``
(families.py). Metadata and tensor names are the ones llama.cpp's loader reads for it (general.*, <arch>.*,
tokenizer.ggml.* with tokens / token_type / merges / pre / bos / eos / padding ids, and
tokenizer.chat_template; a sentencepiece-style vocabulary as tokenizer.ggml.model "llama" with scores).
q/k rows are put in llama.cpp's order (layout.py); norms and biases stay
F32, 2-D weights use the requested type (F16 when a row does not fill whole blocks, as llama.cpp's
converter does). Special added tokens (thinking tokens included) are CONTROL tokens; a Llama-3
rope_scaling is written as llama.cpp's ``rope_freqs.weight``, a linear one as rope.scaling.type/factor.
Sliding windows: ``<arch>.attention.sliding_window``; for gemma3 also the per-layer pattern
(``attention.sliding_window_pattern``, true = sliding), the local rope base (``rope.freq_base_swa``) and,
when query_pre_attn_scalar differs from head_dim, ``attention.scale``. llama.cpp fixes some of these for
gemma3 itself (docs/families.md); this package's reader honours every one. Gemma norm weights are
stored as 1 + w, as llama.cpp's converter does.

    write_gguf(model, tok, "out.gguf", dtype="q8_0")
Tests: .venv/bin/python -m pytest -q tests/test_gguf.py tests/test_convert.py
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ...infra.io import atomic_file
from ...tokenization.gguf_file import GGUFError
from ...tokenization.gguf_vocab import (TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED,
                                        pre_tokenizer_name)
from ..families import family
from ..rope import rope_inv_freq
from . import layout

# dtype name -> (tensor type name, llama.cpp general.file_type name)
DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
          "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1")}


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges "a b") of a byte-level BPE ``Tokenizer``."""
    tk = tokenizer._tk
    spec = json.loads(tk.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise GGUFError(f"tokenizer model {spec.get('model', {}).get('type')!r} cannot be written to GGUF; "
                         f"only byte-level BPE tokenizers are supported")
    by_id = {i: t for t, i in tk.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= vocab_size:
        raise GGUFError(f"the tokenizer has token id {max(by_id)} but the model has only {vocab_size} embedding "
                         f"rows; resize the model's embeddings to the tokenizer first")
    added = tk.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(TOKEN_NORMAL if i not in added else TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if spec["model"].get("byte_fallback"):     # sentencepiece-style: <0xXX> pieces are byte tokens
        types = [TOKEN_BYTE if ty == TOKEN_NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">")
                 else ty for t, ty in zip(tokens, types)]
    return tokens, types, merges


def _is_sentencepiece(tokenizer) -> tuple[bool, bool]:
    """(whether ``tokenizer`` is a sentencepiece-style BPE: byte fallback, spaces as U+2581; whether it
    prepends a U+2581)."""
    spec = json.loads(tokenizer._tk.to_str())
    if not spec.get("model", {}).get("byte_fallback"):
        return False, False
    norm = spec.get("normalizer") or {}
    parts = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    return True, any(p.get("type") == "Prepend" for p in parts)


def gguf_arch(cfg) -> str:
    """llama.cpp's architecture name of ``cfg``'s family."""
    return family(cfg.model_type).gguf_arch


def _family_metadata(w, cfg) -> None:
    """The keys of a family's options (sliding windows, Gemma 3's rope base / scale / pattern, final softcap)."""
    import gguf  # gguf: optional, only writing a .gguf file needs it
    arch = gguf_arch(cfg)
    if cfg.has_sliding_layers:
        if arch not in ("llama", "gemma3"):
            raise GGUFError(f"{cfg.model_type} with sliding-window layers cannot be written to GGUF: llama.cpp's "
                            f"{arch} has no sliding-window keys")
        w.add_sliding_window(int(cfg.sliding_window))
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if arch != "gemma3":
        return
    w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_kinds])
    w.add_rope_freq_base_swa(float(cfg.rope_local_theta or cfg.rope_theta))
    if cfg.query_pre_attn_scalar is not None and cfg.query_pre_attn_scalar != cfg.head_dim:
        w.add_attention_scale(float(cfg.query_pre_attn_scalar) ** -0.5)
    if cfg.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def _post_processor_adds(tokenizer, token_id) -> bool:
    """Whether the tokenizer.json post-processor puts ``token_id`` first (a BOS it adds)."""
    spec = json.loads(tokenizer._tk.to_str()).get("post_processor") or {}
    procs = spec.get("processors", [spec]) if spec.get("type") == "Sequence" else [spec]
    for p in procs:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0].get("SpecialToken", {}).get("id")
            ids = (p.get("special_tokens", {}).get(first) or {}).get("ids", [])
            return token_id is not None and ids == [token_id]
    return False


def write_metadata(w, cfg, tokenizer, chat_template: str | None, name: str = "model") -> None:
    """All key/value metadata of the family's GGUF (model hyper-parameters + tokenizer) onto GGUFWriter ``w``."""
    import gguf  # gguf: optional, only writing a .gguf file needs it
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads or cfg.model_type != "llama":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    _family_metadata(w, cfg)
    w.add_vocab_size(cfg.vocab_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = vocabulary(tokenizer, cfg.vocab_size)
    spm, prefix = _is_sentencepiece(tokenizer)
    if spm:     # llama.cpp's SPM merges by score: -id keeps the vocabulary's order (as sentencepiece files have)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_token_types(types)
        w.add_add_space_prefix(prefix)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer_name(tokenizer._tk))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    for key, ident in (("bos", tokenizer.bos_token_id if tokenizer.bos_token_id is not None else cfg.bos_token_id),
                       ("eos", tokenizer.eos_token_id if tokenizer.eos_token_id is not None
                        else (cfg.eos_token_ids or [None])[0]),
                       ("pad", tokenizer._id(tokenizer.pad_token))):
        if ident is not None:
            getattr(w, f"add_{key}_token_id")(int(ident))
    add_bos = getattr(tokenizer, "add_bos_token", None)
    if add_bos is None and spm:          # a sentencepiece tokenizer.json says it through its post-processor
        add_bos = _post_processor_adds(tokenizer, tokenizer.bos_token_id)
    w.add_add_bos_token(bool(add_bos))
    if chat_template:
        w.add_chat_template(chat_template)


def _encode(w32: np.ndarray, qname: str):
    """fp32 array -> (array to store, GGML type) with the fallbacks llama.cpp's converter uses."""
    import gguf  # gguf: optional, only writing a .gguf file needs it
    qtype = gguf.GGMLQuantizationType[qname]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w32.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return w32, gguf.GGMLQuantizationType.F32
    if w32.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return w32.astype(np.float16), qtype
    return gguf.quants.quantize(w32, qtype), qtype


def llama_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array in llama.cpp layout) for every tensor of ``model`` (+ rope_freqs)."""
    cfg = model.config
    arch = gguf_arch(cfg)
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if t.device.type == "meta":
            raise GGUFError(f"cannot write {name!r}: it is on the meta device (load the weights first)")
        t = t.detach().to("cpu", torch.float32)
        heads = layout.rotary_heads(name, cfg.num_attention_heads, cfg.num_key_value_heads, arch)
        if heads is not None:
            t = layout.to_gguf_rows(t, heads)
        t = t + layout.norm_shift(name, arch) if layout.norm_shift(name, arch) else t
        out.append((layout.gguf_name(name, arch), t.contiguous().numpy()))
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "llama3":
        divisors = rope_inv_freq(cfg.replace(rope_scaling=None)) / rope_inv_freq(cfg)
        out.append((layout.ROPE_FREQS, divisors.numpy().astype(np.float32)))
    return out


def write_gguf(model, tokenizer, path: str, dtype: str = "f16", chat_template: str | None = None,
               name: str = "model") -> None:
    """Write ``model`` and ``tokenizer`` to ``path`` (temp file, then rename). dtype: see ``DTYPES``.

    chat_template: None takes ``tokenizer.chat_template`` when the tokenizer has one.
    """
    import gguf  # gguf: optional, only writing a .gguf file needs it
    if dtype not in DTYPES:
        raise GGUFError(f"dtype={dtype!r} is not supported for GGUF output; choose one of {sorted(DTYPES)}")
    qname, ftype = DTYPES[dtype]
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
    path = os.fspath(path)
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, gguf_arch(model.config))
        try:
            write_metadata(w, model.config, tokenizer, chat_template, name=name)
            w.add_file_type(int(gguf.LlamaFileType[ftype]))
            for gname, arr in llama_tensors(model):
                data, qtype = _encode(arr, qname)
                w.add_tensor(gname, data, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()

