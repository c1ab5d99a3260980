"""The decoder of every supported family (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3 text), from scratch on torch.

RMSNorm, rotary embeddings (with Llama-3 / linear frequency scaling), grouped-query attention
(attention.py), SwiGLU or GeGLU MLP, tied or untied LM head. A family's differences are named options
of ``ModelConfig`` (q/k/v bias, q/k norm, norm offset, embedding scale, activation, sandwich norms,
sliding-window layers with their own rope base, attention scale, final softcapping; docs/families.md), never
a copy of the model. Parameter names follow transformers' ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` /
``Gemma3ForCausalLM`` (``model.layers.N.self_attn.q_proj.weight`` ...) so checkpoints load there.
``CausalLM`` is a family-neutral alias of ``Llama``.

    model = Llama(ModelConfig.preset("tiny"))
    logits = model(input_ids)                       # (B, T, V)
    hidden = model(input_ids, return_hidden=True)   # (B, T, H) final-normed hidden states

Attention runs through torch SDPA on CPU and through ``kernels.flash_attention`` on CUDA
(see ``_attend``). Reference: Touvron et al. 2023; Meta Llama 3 (2024).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import (Attention, Packed, RMSNorm, _attend, check_pieces, packed_causal_mask,  # noqa: F401
                        sliding_window_mask)
from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig
from . import ops
from .gguf import load_gguf_model
from .rope import rope_inv_freq
from .vocab import resize_token_embeddings as _resize_token_embeddings


# ----------------------------------------------------------------------------- rope
class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) of shape (B, T, D) for given positions; no parameters. ``local``: the
    frequencies of sliding-window layers (``rope_local_theta``)."""

    def __init__(self, cfg: ModelConfig, local: bool = False):
        super().__init__()
        self._inv_freq_cpu = rope_inv_freq(cfg, local=local)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dev = position_ids.device
        inv = self._cache.get(dev)
        if inv is None:
            inv = self._cache[dev] = self._inv_freq_cpu.to(dev)
        freqs = position_ids.float()[..., None] * inv                   # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                          # (B, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


# ----------------------------------------------------------------------------- blocks
class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=cfg.mlp_bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"      # Gemma's GeGLU; else Llama's SwiGLU

    def forward(self, x):
        gate, up = self.project_gate_up(x)
        if self.gelu:
            return self.down_proj(F.gelu(gate, approximate="tanh") * up)
        return self.down_proj(ops.swiglu(gate, up))

    def project_gate_up(self, x):
        """x (B, T, H) -> gate, up projections (the sampler swaps in one fused product)."""
        return self.gate_proj(x), self.up_proj(x)


class Block(nn.Module):
    """Pre-norm block. With ``sandwich_norm`` (Gemma 3) ``post_attention_layernorm`` normalises the
    attention output and two more norms surround the MLP; otherwise (Llama) it is the MLP's input norm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype, offset=cfg.norm_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer_idx, device, dtype)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, device, dtype)
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, cos, sin, mask, causal, kv_cache=None):
        if self.sandwich:
            h = self.self_attn(self.input_layernorm(x), cos, sin, mask, causal, kv_cache)
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, causal, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """HF's ``LlamaModel``: embeddings, blocks, final norm (named ``model.*`` in checkpoints)."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, i, device, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype, offset=cfg.norm_offset)


# ----------------------------------------------------------------------------- the model
def build_attention_mask(attention_mask: torch.Tensor | None, T: int, S: int, offset: int | torch.Tensor = 0,
                         device=None) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask: query t (absolute position offset + t) may see key s when
    s <= offset + t and key s is not padding. Each query may always see its own slot, so fully
    padded (left-pad) rows never produce NaN. Returns None when plain causal attention suffices."""
    if attention_mask is None and T == S:
        return None
    s = torch.arange(S, device=device)
    off = torch.as_tensor(offset, device=device).reshape(-1, 1, 1)      # (B|1, 1, 1)
    t_abs = off + torch.arange(T, device=device)[None, :, None]          # (B|1, T, 1)
    allowed = s[None, None, :] <= t_abs                                  # (B|1, T, S)
    if attention_mask is not None:
        key_ok = attention_mask.to(device=device, dtype=torch.bool)[:, None, :S]    # (B, 1, S)
        allowed = allowed & (key_ok | (s[None, None, :] == t_abs))
    return allowed[:, None]                                              # (B, 1, T, S)


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones followed by zeros (right padding, or none)."""
    m = attention_mask.to(torch.bool)
    return bool((m[:, 1:] <= m[:, :-1]).all())


class Llama(nn.Module):
    """Causal LM of any supported family (the config's ``model_type``). ``Llama(cfg, device="meta")``
    builds without allocating weights."""

    def __init__(self, cfg: ModelConfig, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg
        self.model = LlamaBackbone(cfg, device, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        self.rotary = RotaryEmbedding(cfg)
        # sliding layers with their own rope base (Gemma 3) get their own angles
        self.rotary_local = RotaryEmbedding(cfg, local=True) if cfg.rope_local_theta is not None else None
        self._embed_scale = math.sqrt(cfg.hidden_size) if cfg.embed_scale else None
        self.gradient_checkpointing = False
        if torch.device(device or "cpu").type != "meta":
            self.reset_parameters()

    # -- init ---------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Llama-style init: N(0, initializer_range) for linears and embeddings, ones for norms."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0 - m.offset)            # scale 1 (Gemma stores it as offset + weight)

    # -- helpers ------------------------------------------------------------
    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, H) LM-head weight (the embedding when tied; with adapters, the weight they apply:
        base + LoRA update, or trainable token rows written in)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        effective = getattr(head, "effective_weight", None)
        return effective() if effective is not None else head.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward ------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, return_hidden: bool = False,
                kv_cache=None, attn_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, pieces=None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or final hidden (B, T, H) with ``return_hidden``.

        attention_mask: (B, T) 1 for real tokens, 0 for padding (right or left).
        position_ids:   (B, T); defaults to 0..T-1 (correct for right padding).
        kv_cache / attn_mask: used by the sampler; attn_mask is an explicit (B, 1, T, S) bool mask.
        cu_seqlens:     (S + 1,) boundaries of sequences packed into one row (B = 1): each attends
                        causally within its own segment only (pass position_ids restarting per segment).
        pieces:         with ``cu_seqlens``, the row's attention pieces (``attention.Packed``): a piece's
                        queries may also see another range, e.g. a prompt shared by two answers.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq); got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)                                         # (B, T, H)
        if self._embed_scale is not None:                    # Gemma: sqrt(H), rounded to the embedding dtype
            x = x * torch.tensor(self._embed_scale, dtype=x.dtype, device=x.device)
        cos, sin = self.rotary(position_ids, x.dtype)                                  # (B, T, D)
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens needs all sequences packed into one row (batch 1); got batch {B}")
            cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
            mask = Packed(cu, int((cu[1:] - cu[:-1]).max()), None if pieces is None else check_pieces(pieces, T))
            if mask.shared and self.config.has_sliding_layers:
                raise ValueError("a shared-prefix packed row needs a model without sliding-window layers; "
                                 "pack its sequences without sharing")
        else:
            if pieces is not None:
                raise ValueError("pieces describe a packed row: pass cu_seqlens with them")
            if attn_mask is None and attention_mask is not None and _right_padded(attention_mask):
                # Padding only after each row's tokens: plain causal attention is exact for every real
                # position (pads come later), lets SDPA / flash attention skip the explicit mask, and
                # keeps no (B, H, T, T) attention matrix for the backward. Pad positions are ignored.
                attention_mask = None
            mask = attn_mask if attn_mask is not None else build_attention_mask(
                attention_mask, T, T, device=input_ids.device)
        per_kind = {False: (cos, sin, mask)}
        if self.config.has_sliding_layers:
            local_cs = self.rotary_local(position_ids, x.dtype) if self.rotary_local is not None else (cos, sin)
            per_kind[True] = (*local_cs, self._window_mask(mask, T, kv_cache, input_ids.device))
        for i, layer in enumerate(self.model.layers):
            cos_i, sin_i, mask_i = per_kind[self.config.is_sliding(i)]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos_i, sin_i, mask_i, True, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos_i, sin_i, mask_i, True, kv_cache)
        x = self.model.norm(x)                                                         # (B, T, H)
        if return_hidden:
            return x
        return self.project_logits(x)                                                 # (B, T, V)

    def _window_mask(self, mask, T: int, kv_cache, device) -> torch.Tensor:
        """The sliding layers' mask: ``mask`` limited to keys less than ``sliding_window`` slots behind each
        query. With a KV cache, row b's queries sit at slots lengths[b] .. lengths[b] + T - 1."""
        if kv_cache is None:
            return sliding_window_mask(mask, T, self.config.sliding_window, device)
        return kv_cache.sliding_window_mask(mask, T, self.config.sliding_window)

    def project_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., H) -> logits (..., V) through the LM head (softcapped if configured)."""
        logits = F.linear(hidden, self.output_weight)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def fused_decode_blocker(self) -> str | None:
        """Why the fused CPU decode step (which computes a plain Llama) cannot run this model, or None."""
        opts = self.config.family_options()
        if opts:
            return (f"the {self.config.model_type} model uses {', '.join(opts)}, which the fused decode step "
                    f"does not implement")
        return None

    # -- checkpoints (implemented in checkpoint.py) --------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device: Any = "cpu") -> "Llama":
        if str(path).endswith(".gguf"):
            return load_gguf_model(path, cls, dtype=dtype, device=device)
        return load_pretrained(path, cls, dtype=dtype, device=device)

    def save_pretrained(self, path: str, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> None:
        save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)

    def resize_token_embeddings(self, new_vocab_size: int) -> None:
        """Grow the embedding (and untied head); new rows = mean of the old rows."""
        _resize_token_embeddings(self, new_vocab_size)


CausalLM = Llama     # family-neutral name: the same class
