"""The KV cache of the sampler: preallocated key/value buffers per layer and per-row lengths.

Rows of a batch may hold different lengths; ``update`` (called by every attention layer) writes at
each row's own position, ``advance`` / ``select`` / ``expand`` move, reorder and repeat rows, and
``decode_mask`` says which cached keys a new token may see, ``sliding_window_mask`` narrows a mask to the
last ``sliding_window`` slots for sliding-window layers (Mistral, Gemma 3): the buffers keep every
position, a window is a mask, at prefill and at decode.
Tests: ``python -m pytest tests/test_sampler.py -q``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..llm import attention


class KVCache(nn.Module):
    """Preallocated per-layer key/value buffers ``(num_layers, B, Hkv, max_len, D)`` and per-row lengths.

    Row ``b`` holds ``lengths[b]`` valid positions. ``update(layer, k, v)`` writes ``k, v``
    (B, Hkv, T, D) at positions ``lengths[b] .. lengths[b] + T - 1`` of each row and returns the
    keys/values up to ``max(lengths) + T`` (all ``max_len`` slots when ``static``, as CUDA graphs
    need fixed shapes); ``advance(T)`` then moves every row forward once all layers are done.
    Slots past a row's length hold stale (finite) values: attention masks must use ``lengths``.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Any = None, static: bool = False):
        super().__init__()
        if min(num_layers, batch_size, num_kv_heads, max_len, head_dim) <= 0:
            raise ValueError(f"KVCache sizes must be positive; got num_layers={num_layers}, batch_size={batch_size}, "
                             f"num_kv_heads={num_kv_heads}, max_len={max_len}, head_dim={head_dim}")
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        # zeros, not empty: masked slots are multiplied by 0 in attention, and 0 * NaN would be NaN.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lengths", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)
        self._host_lengths = [0] * batch_size      # mirror of ``lengths``: shapes without a device sync
        self.max_len = max_len
        self.static = static
        self._write_index: torch.Tensor | None = None   # per-step scatter index, shared by all layers
        self._span_cache: tuple[int, int] | None = None

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int, static: bool = False) -> "KVCache":
        cfg = model.config
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim,
                   dtype=model.dtype, device=model.device, static=static)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def host_lengths(self) -> list[int]:
        return list(self._host_lengths)

    def max_length(self) -> int:
        return max(self._host_lengths) if self._host_lengths else 0

    # -- writes -------------------------------------------------------------
    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hkv, T, D) at each row's position; return keys/values (B, Hkv, S, D)."""
        B, H, T, D = k.shape
        kb, vb = self.k[layer_idx], self.v[layer_idx]                     # (B, Hkv, max_len, D)
        if B != kb.shape[0] or H != kb.shape[1] or D != kb.shape[3]:
            raise ValueError(f"KVCache.update: got k of shape {tuple(k.shape)} for a cache of "
                             f"(B, Hkv, max_len, D) = {tuple(kb.shape)}")
        if self.static:
            self._scatter(kb, vb, k, v)
            return kb, vb
        lo, hi = self._span()
        if hi + T > self.max_len:
            raise RuntimeError(f"KVCache is full: writing {T} position(s) after length {hi} exceeds "
                               f"max_len={self.max_len}; allocate a larger cache")
        if lo == hi:                                                       # all rows aligned: a slice copy
            kb[:, :, lo:lo + T].copy_(k)
            vb[:, :, lo:lo + T].copy_(v)
        else:
            self._scatter(kb, vb, k, v)
        return kb[:, :, :hi + T], vb[:, :, :hi + T]

    def _span(self) -> tuple[int, int]:
        """(min, max) of the host lengths, computed once per step rather than once per layer."""
        if self._span_cache is None:
            self._span_cache = (min(self._host_lengths), max(self._host_lengths))
        return self._span_cache

    def _scatter(self, kb, vb, k, v) -> None:
        B, H, T, D = k.shape
        idx = self._write_index
        if idx is None or idx.shape != (B, H, T, D):
            pos = self.lengths[:, None] + torch.arange(T, device=k.device)            # (B, T)
            idx = self._write_index = pos[:, None, :, None].expand(B, H, T, D)
        kb.scatter_(2, idx, k)
        vb.scatter_(2, idx, v)

    def advance(self, n: int = 1) -> None:
        """Move every row forward by ``n`` positions (after all layers wrote them)."""
        self.lengths.add_(n)
        self._host_lengths = [x + n for x in self._host_lengths]
        self._write_index = self._span_cache = None

    def set_lengths(self, lengths: Sequence[int]) -> None:
        if len(lengths) != self.batch_size:
            raise ValueError(f"set_lengths: got {len(lengths)} lengths for a batch of {self.batch_size}")
        if max(lengths) > self.max_len or min(lengths) < 0:
            raise ValueError(f"set_lengths: lengths {list(lengths)} must lie in [0, max_len={self.max_len}]")
        self._host_lengths = [int(x) for x in lengths]
        self.lengths.copy_(torch.tensor(self._host_lengths, dtype=torch.long), non_blocking=True)
        self._write_index = self._span_cache = None

    # -- row management -----------------------------------------------------
    def select(self, rows: Sequence[int] | torch.Tensor) -> "KVCache":
        """Keep (and reorder / repeat) rows: the new row i is the old row ``rows[i]``. In place; returns self."""
        rows_list = rows.tolist() if isinstance(rows, torch.Tensor) else [int(r) for r in rows]
        if not rows_list:
            raise ValueError("KVCache.select: need at least one row")
        B = self.batch_size
        if min(rows_list) < 0 or max(rows_list) >= B:
            raise IndexError(f"KVCache.select: rows {rows_list} out of range for batch size {B}")
        if rows_list == list(range(B)):
            return self
        idx = torch.tensor(rows_list, dtype=torch.long, device=self.k.device)
        used = self.max_len if self.static else self.max_length()
        k = torch.zeros((self.k.shape[0], len(rows_list), *self.k.shape[2:]), dtype=self.k.dtype, device=self.k.device)
        v = torch.zeros_like(k)
        k[:, :, :, :used] = self.k[:, :, :, :used].index_select(1, idx)
        v[:, :, :, :used] = self.v[:, :, :, :used].index_select(1, idx)
        self.k, self.v = k, v
        self.lengths = self.lengths.index_select(0, idx)
        self._host_lengths = [self._host_lengths[r] for r in rows_list]
        self._write_index = self._span_cache = None
        return self

    def expand(self, n: int) -> "KVCache":
        """Repeat every row ``n`` times (row-major: r0, r0, ..., r1, r1, ...), e.g. n samples of one prefill."""
        if n < 1:
            raise ValueError(f"KVCache.expand: n must be >= 1, got {n}")
        return self.select([r for r in range(self.batch_size) for _ in range(n)])

    # -- masks --------------------------------------------------------------
    def decode_mask(self, always: bool = False) -> torch.Tensor | None:
        """Bool (B, 1, 1, S) mask for one new token per row: key s visible when s <= lengths[b].

        None when every row has the same length (plain attention over all S keys is then exact),
        unless ``always``.
        """
        lo, hi = self._span()
        if not always and lo == hi and not self.static:
            return None
        S = self.max_len if self.static else hi + 1
        s = torch.arange(S, device=self.lengths.device)
        return (s[None, :] <= self.lengths[:, None])[:, None, None, :]

    def sliding_window_mask(self, mask: torch.Tensor | None, T: int, window: int) -> torch.Tensor:
        """Bool (B, 1, T, S) mask for T new queries per row (row b's at slots lengths[b] .. lengths[b] + T - 1,
        before ``advance``): key slot s visible when slot - window < s <= slot, and ``mask`` allows it
        (None: every earlier slot). S matches what ``update`` returns."""
        S = self.max_len if self.static else self._span()[1] + T
        slots = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)      # (B, T)
        return attention.sliding_window_mask(mask, T, window, self.lengths.device, query_slots=slots, S=S)
