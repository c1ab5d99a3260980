"""LoRA layers: low-rank updates of a linear layer and of an embedding, and trainable token rows.

Low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685): a frozen linear W gets a trainable update, y = W x + b + (alpha / r) * B A x,
with A (r, in) initialised kaiming-uniform(a=sqrt(5)) and B (out, r) zeros, so training starts
from the base model. Embeddings get A (r, V) zeros and B (H, r) normal(0, 1) (the delta is
B A transposed), matching PEFT's initialisation and tensor layout.

Trainable token rows (PEFT's ``trainable_token_indices``): a few rows of a frozen (V, H) table are
replaced by full trainable values (``token_adapter.trainable_tokens_delta``, (k, H), the row values
themselves, not differences), e.g. the rows of newly added thinking tokens.

Tests: ``python -m pytest -q tests/test_lora.py``
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LoRALinear", "LoRAEmbedding", "TokenRowsEmbedding", "TokenRowsLinear", "LORA_TYPES"]


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adapters train in fp32 even on a half-precision base (their updates are small)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _LowRankDelta(nn.Module):
    """Merge / unmerge of a low-rank update: ``weight += delta_weight()`` once, and back."""

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


class LoRALinear(_LowRankDelta):
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


class LoRAEmbedding(_LowRankDelta):
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


class _TokenAdapter(nn.Module):
    """Holds the trainable rows: ``trainable_tokens_delta`` (k, H) = the new values of rows
    ``token_indices`` (PEFT's tensor name), the base rows they replace, and an id -> slot map."""

    def __init__(self, weight: torch.Tensor, token_indices: tuple[int, ...]):
        super().__init__()
        V = weight.shape[0]
        bad = [i for i in token_indices if not 0 <= i < V]
        if bad or len(set(token_indices)) != len(token_indices):
            raise ValueError(f"trainable token indices {list(token_indices)} must be distinct ids of this "
                             f"{V}-row table; bad: {bad or 'duplicates'} (was the vocabulary resized first?)")
        idx = torch.tensor(token_indices, dtype=torch.long, device=weight.device)
        slot = torch.full((V,), -1, dtype=torch.long, device=weight.device)
        slot[idx] = torch.arange(len(token_indices), device=weight.device)
        self.register_buffer("token_indices", idx, persistent=False)
        self.register_buffer("slot", slot, persistent=False)
        rows = weight.detach()[idx]
        self.register_buffer("trainable_tokens_original", rows.clone(), persistent=False)
        self.trainable_tokens_delta = nn.Parameter(rows.to(_adapter_dtype(weight.dtype)).clone())

    def replaced(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with the trainable rows written in (a new tensor, differentiable in the rows)."""
        return weight.index_copy(0, self.token_indices, self.trainable_tokens_delta.to(weight.dtype))


class _TokenRows(nn.Module):
    """Base for a frozen (V, H) table (kept as ``weight``) with some rows trainable."""

    def __init__(self, weight: nn.Parameter, token_indices: tuple[int, ...]):
        super().__init__()
        self.weight = weight
        self.weight.requires_grad_(False)
        self.token_adapter = _TokenAdapter(weight, tuple(token_indices))
        self.merged = False
        self.disabled = False

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self.token_adapter.token_indices.tolist())

    def effective_weight(self) -> torch.Tensor:
        """The (V, H) table this module applies (rows replaced unless merged or disabled)."""
        if self.merged or self.disabled:
            return self.weight
        return self.token_adapter.replaced(self.weight)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            a = self.token_adapter
            self.weight.index_copy_(0, a.token_indices, a.trainable_tokens_delta.to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            a = self.token_adapter
            self.weight.index_copy_(0, a.token_indices, a.trainable_tokens_original)
            self.merged = False


class TokenRowsEmbedding(_TokenRows):
    """An ``nn.Embedding`` whose rows ``token_indices`` are trainable; the lookup reads those rows
    from the adapter (no copy of the whole table), so a tied head sees them via ``effective_weight``."""

    def __init__(self, base: nn.Embedding, token_indices: tuple[int, ...]):
        super().__init__(base.weight, token_indices)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(ids, self.weight, self.padding_idx)                            # (..., H)
        if self.merged or self.disabled:
            return y
        a = self.token_adapter
        slot = a.slot[ids]                                                             # (...,) -1 = base row
        rows = a.trainable_tokens_delta.to(y.dtype)[slot.clamp(min=0)]                 # (..., H)
        return torch.where((slot >= 0).unsqueeze(-1), rows, y)

    def to_embedding(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        emb.weight = self.weight
        return emb

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, trainable rows={list(self.token_ids)}, merged={self.merged}"


class TokenRowsLinear(_TokenRows):
    """An untied bias-free LM head (``nn.Linear``, weight (V, H)) with trainable output rows."""

    def __init__(self, base: nn.Linear, token_indices: tuple[int, ...]):
        if base.bias is not None:
            raise ValueError("TokenRowsLinear: the LM head has a bias; trainable token rows support bias-free heads only")
        super().__init__(base.weight, token_indices)
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        lin.weight = self.weight
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, trainable rows={list(self.token_ids)}, merged={self.merged}"


LORA_TYPES = (LoRALinear, LoRAEmbedding, TokenRowsEmbedding, TokenRowsLinear)
