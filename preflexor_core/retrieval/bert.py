"""A BERT encoder (no pooler) written in torch: the body of the sentence embedders in embedding.py.

Word + position + token-type embeddings with LayerNorm, then post-LN blocks of masked multi-head
self-attention and an erf-GELU MLP; token ids + a padding mask -> last hidden states. Parameter names
are this module's own (q/k/v fused); ``embedding.load_bert_weights`` maps Hugging Face ``BertModel``
weights onto them. Reference: Devlin et al. 2019 (BERT, arXiv 1810.04805).

Tests: ``python -m pytest -q tests/test_retrieval.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_pos: int, n_types: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(n_types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, ids: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] \
            + self.token_type_embeddings(type_ids)
        return self.LayerNorm(x)  # (B, T, H)


class _Layer(nn.Module):
    """Post-LN transformer block: x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, hidden: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)  # fused query/key/value projection
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.inter = nn.Linear(hidden, inter)
        self.out = nn.Linear(inter, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, heads, T, D); bias: (B, 1, 1, T), 0 for real tokens, -inf-ish for padding
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, T, D)
        a = a.transpose(1, 2).reshape(b, t, h)
        x = self.attn_norm(x + self.attn_out(a))
        return self.out_norm(x + self.out(F.gelu(self.inter(x))))  # erf GELU


class BertEncoder(nn.Module):
    """BERT body (no pooler): token ids -> last hidden states."""

    def __init__(self, cfg: dict):
        super().__init__()
        eps = float(cfg.get("layer_norm_eps", 1e-12))
        hidden = int(cfg["hidden_size"])
        self.embeddings = _Embeddings(int(cfg["vocab_size"]), hidden,
                                      int(cfg.get("max_position_embeddings", 512)),
                                      int(cfg.get("type_vocab_size", 2)), eps)
        self.layers = nn.ModuleList(
            _Layer(hidden, int(cfg["num_attention_heads"]), int(cfg["intermediate_size"]), eps)
            for _ in range(int(cfg["num_hidden_layers"])))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids, torch.zeros_like(ids))
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~mask, torch.finfo(x.dtype).min)[:, None, None, :]  # (B,1,1,T)
        for layer in self.layers:
            x = layer(x, bias)
        return x  # (B, T, H)
