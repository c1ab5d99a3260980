"""KV-cached, batched text generation for ``Llama``: the sampler used by datagen and inference.

    from preflexor_core.sampler import generate, SamplingParams
    outs = generate(model, tok, ["Why is nacre tough?"],
                    SamplingParams(max_new_tokens=128, temperature=0.7, top_p=0.9, n=4, seed=0,
                                   stop=["\\n\\n"], prepend_response="<|thinking|>"))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason          # prompt-major, sample-minor

Pieces (small functions, all run under ``torch.inference_mode()``):

- ``KVCache``: an ``nn.Module`` holding preallocated key/value buffers
  ``(num_layers, B, Hkv, max_len, D)`` plus per-row ``lengths``. ``update`` (called by every
  attention layer) writes the new keys/values at each row's own position and returns views up to
  the longest row; ``advance`` / ``select`` / ``expand`` move and compact rows.
- ``prefill``: right-padded batch of prompts of different lengths -> logits at each row's last real
  token; padding is hidden by an explicit mask and later overwritten by decode writes.
- ``decode_one_token``: one token per row -> next-token logits (B, V).
- ``sample``: temperature / top-k / top-p sampling with per-row seeds (``ops.sample`` when the
  compiled op exists, else the sort-based torch function ``sample_torch`` here).
- ``generate``: prompts or chats -> ``Completion`` list, with n samples per prompt sharing one
  prefill, stop tokens and stop strings, repetition penalty, streaming, and batch compaction when
  rows finish. On CUDA the decode step is replayed from a CUDA graph (``use_cuda_graph``).
- ``cpu_packed_linears``: on CPU, during ``generate``, the plain ``nn.Linear`` layers and the LM
  head run through oneDNN on weights reordered into its blocked layout (``torch.ops.mkldnn``, the
  kernels behind torch.compile's CPU weight freezing) instead of ``F.linear`` (MKL). Same precision
  as the model (fp32 or bf16), only the summation order differs (README, CPU benchmarks: the `small`
  preset's fp32 decode went from 1.05x / 1.08x to 2.0x / 2.2x transformers' at batch 1 / 16). The
  packed copies are kept while their weights are unchanged (a version-counter check repacks after
  an optimizer step), so they cost one extra copy of those weights; ``PREFLEXOR_CPU_PACK=0`` turns
  packing off, ``auto`` (default) packs up to ``CPU_PACK_MAX_BYTES`` of weights.

Choices worth knowing:

- ``prepend_response`` text is forced at the start of every response: its tokens are appended to the
  prompt context (so the model continues after it) AND returned at the start of ``Completion.text``
  and ``Completion.token_ids`` (``Completion.num_forced_tokens`` says how many ids are forced).
  ``max_new_tokens`` counts only model-generated tokens; ``logprobs`` covers only those tokens.
- ``logprobs`` are log-probabilities of the chosen tokens under the unmodified model distribution
  (log-softmax of the raw logits, before repetition penalty, temperature and top-k/top-p).
- A stop token ends a row and is not part of the output. A stop string ends a row; the text is cut
  just before it. ``token_ids`` are cut to the shortest prefix whose decoded text covers the kept
  text: equal to it when the stop string starts on a token boundary; otherwise the last kept token
  also produces the first characters of the stop string.
- Seeds: every (prompt, sample, step) gets its own 64-bit key mixed from ``SamplingParams.seed`` (or
  one draw from torch's global RNG when ``seed`` is None); ``seeds_for_rows`` turns keys into the
  per-row seeds of ``sample`` so that a row's draw does not depend on its batch index. Results
  therefore do not depend on batch composition, compaction or ``max_batch_size``.

References: the incremental detokenisation (prefix/read offsets) follows the approach of HF
text-generation-inference / vLLM; repetition penalty follows CTRL (Keskar et al. 2019) with HF's
semantics; nucleus sampling is Holtzman et al. 2019. Tests: ``python -m pytest tests/test_sampler.py``;
benchmarks: ``python -m pytest tests/benchmarks/test_bench_sampler.py --benchmark-only``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

__all__ = ["KVCache", "SamplingParams", "Completion", "prefill", "decode_one_token", "sample",
           "sample_torch", "generate", "CUDAGraphDecoder", "row_key", "seeds_for_rows",
           "static_decode_step"]

logger = logging.getLogger("preflexor.sampler")

StreamCallback = Callable[[int, int, str], None]
_MASK64, _splitmix64 = ops._MASK64, ops._splitmix64     # the hash behind ops.sample's uniforms


# ----------------------------------------------------------------------------- KV cache
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

    reorder = select

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


# ----------------------------------------------------------------------------- prefill / decode
def _prefill_mask(old: list[int], plens: list[int], T: int, device) -> torch.Tensor | None:
    """Bool (B, 1, T, S) mask for a right-padded chunk of T new tokens written after ``old`` positions.

    Query t of row b sits at position old[b] + t and may see keys s <= old[b] + t that are either
    old content or real new tokens (s < old[b] + plens[b]); padding queries see their own slot only.
    """
    S = max(old) + T
    if min(old) == max(old) == 0 and min(plens) == max(plens):
        return None                                     # plain causal attention, T == S
    o = torch.tensor(old, device=device)[:, None, None]                 # (B, 1, 1)
    p = torch.tensor(plens, device=device)[:, None, None]
    s = torch.arange(S, device=device)[None, None, :]                    # (1, 1, S)
    q = o + torch.arange(T, device=device)[None, :, None]                # (B, T, 1) absolute positions
    allowed = (s <= q) & ((s < o + p) | (s == q))
    return allowed[:, None]                                              # (B, 1, T, S)


# ----------------------------------------------------------------------------- CPU linear packing
CPU_PACK_MAX_BYTES = 4 << 30    # "auto" packs only when the packed copies stay below this
PACK_MIN_NUMEL = 1 << 18        # weights this large always use the packed product ...
PACK_MIN_ROWS = 8               # ... smaller ones from this many rows (tokens) on


def _pack_mode() -> str:
    mode = os.environ.get("PREFLEXOR_CPU_PACK", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"PREFLEXOR_CPU_PACK={mode!r}: use auto, 0 (off) or 1 (always on CPU)")
    return mode


# id(weight) -> (its version counter, data pointer, packed copy): reused across generate calls while
# the weight is unchanged (an optimizer step or a load bumps the version and forces a repack); an
# entry goes away with its weight.
_PACKED: dict[int, tuple[int, int, torch.Tensor]] = {}


def _packed_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if weight.is_inference():    # e.g. a LoRA head's merged weight, made afresh per call: no version counter
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    else:
        key = (weight._version, weight.data_ptr())
        hit = _PACKED.get(id(weight))
        if hit is not None and hit[:2] == key:
            packed = hit[2]
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            if hit is None:
                weakref.finalize(weight, _PACKED.pop, id(weight), None)
            _PACKED[id(weight)] = (*key, packed)
    b = None if bias is None else bias.detach()
    numel, k = weight.numel(), weight.shape[1]

    def forward(x: torch.Tensor) -> torch.Tensor:
        # oneDNN costs ~10 us a call: for a few rows through a small matrix (the tiny preset's
        # decode) F.linear is faster; from ~256k weight elements or 8 rows, the packed product wins.
        if numel >= PACK_MIN_NUMEL or x.numel() // k >= PACK_MIN_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return F.linear(x, weight, bias)
    return forward


@contextlib.contextmanager
def cpu_packed_linears(model: nn.Module):
    """Within the block, the model's plain ``nn.Linear`` layers and its LM head (``project_logits``)
    compute with oneDNN on weights reordered at entry (or reused from an earlier entry while a weight
    is unchanged). The packed weights are a snapshot: use it only where the weights do not change
    inside the block (inference). A no-op off CPU, for dtypes other than fp32 /
    bf16, without oneDNN, with ``PREFLEXOR_CPU_PACK=0``, or (``auto``) when the copies would exceed
    ``CPU_PACK_MAX_BYTES``. Yields whether it packed."""
    mode = _pack_mode()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    head = getattr(model, "output_weight", None) if hasattr(model, "project_logits") else None
    params = [m.weight for m in linears] + ([head] if head is not None else [])
    usable = (mode != "0" and bool(params) and torch.backends.mkldnn.is_available()
              and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16) for p in params)
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    if usable and mode == "auto":
        usable = sum(p.numel() * p.element_size() for p in params) <= CPU_PACK_MAX_BYTES
    if not usable:
        yield False
        return
    patched: list[tuple[nn.Module, str]] = []      # instance attributes shadowing the class methods
    try:
        for m in linears:
            m.forward = _packed_linear(m.weight, m.bias)
            patched.append((m, "forward"))
        if head is not None:
            model.project_logits = _packed_linear(head, None)
            patched.append((model, "project_logits"))
        yield True
    finally:
        for m, name in patched:
            m.__dict__.pop(name, None)


def prefill(model: nn.Module, cache: KVCache, prompt_ids_list: Sequence[Sequence[int]]) -> torch.Tensor:
    """Run prompts of different lengths (one per cache row) through ``model``, filling ``cache``.

    Returns the logits (B, V) at each row's last real token; afterwards ``cache.lengths`` grew by
    each prompt's length (padded slots beyond it are overwritten by later decode writes).
    """
    B = len(prompt_ids_list)
    if B != cache.batch_size:
        raise ValueError(f"prefill: {B} prompts for a cache with batch size {cache.batch_size}")
    plens = [len(p) for p in prompt_ids_list]
    if min(plens) == 0:
        raise ValueError(f"prefill: prompt {plens.index(0)} is empty; every row needs at least one token")
    T = max(plens)
    old = cache.host_lengths
    if max(old) + T > cache.max_len:
        raise ValueError(f"prefill: {T} prompt tokens after {max(old)} cached positions exceed the cache's "
                         f"max_len={cache.max_len}; allocate a larger cache")
    device = cache.k.device
    ids = torch.zeros((B, T), dtype=torch.long)
    for b, p in enumerate(prompt_ids_list):
        ids[b, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    ids = ids.to(device, non_blocking=True)
    pos = cache.lengths[:, None] + torch.arange(T, device=device)[None, :]             # (B, T)
    mask = _prefill_mask(old, plens, T, device)
    hidden = model(ids, position_ids=pos, kv_cache=cache, attn_mask=mask, return_hidden=True)   # (B, T, H)
    last = hidden[torch.arange(B, device=device), torch.tensor(plens, device=device) - 1]       # (B, H)
    cache.set_lengths([o + p for o, p in zip(old, plens)])
    return model.project_logits(last)                                                            # (B, V)


def decode_one_token(model: nn.Module, cache: KVCache, last_tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (B,) at each row's position; returns next-token logits (B, V)."""
    if last_tokens.dim() != 1 or last_tokens.shape[0] != cache.batch_size:
        raise ValueError(f"decode_one_token: last_tokens must be (B,) with B={cache.batch_size}; "
                         f"got shape {tuple(last_tokens.shape)}")
    mask = cache.decode_mask(always=last_tokens.device.type != "cpu")
    logits = model(last_tokens[:, None], position_ids=cache.lengths[:, None], kv_cache=cache, attn_mask=mask)
    cache.advance(1)
    return logits[:, -1]                                                                          # (B, V)


def static_decode_step(model: nn.Module, cache: KVCache, tokens: torch.Tensor, mask: torch.Tensor,
                       arange: torch.Tensor) -> torch.Tensor:
    """The body captured by ``CUDAGraphDecoder``: device-side only (no host reads), fixed shapes.

    tokens (B,), mask (B, 1, 1, max_len) and arange (max_len,) are static buffers; the mask is
    refreshed in place from ``cache.lengths``, which this step advances on the device (the host
    mirror is the caller's job). Runs eagerly on any device, which is how it is tested on CPU.
    """
    cache._write_index = None
    mask.copy_((arange[None, :] <= cache.lengths[:, None])[:, None, None, :])
    logits = model(tokens[:, None], position_ids=cache.lengths[:, None], kv_cache=cache, attn_mask=mask)
    cache.lengths.add_(1)
    return logits[:, -1]                                                                          # (B, V)


class CUDAGraphDecoder:
    """``decode_one_token`` captured in a CUDA graph for a fixed batch size and a static cache.

    The cache must be ``static`` (full-length keys/values, fixed shapes). Inputs and the mask are
    static buffers refreshed in place; the captured step also advances ``cache.lengths``.
    """

    def __init__(self, model: nn.Module, cache: KVCache, warmup: int = 2):
        if not cache.static:
            raise ValueError("CUDAGraphDecoder needs a KVCache built with static=True")
        if cache.k.device.type != "cuda":
            raise ValueError(f"CUDAGraphDecoder needs a CUDA cache; got {cache.k.device}")
        self.model, self.cache = model, cache
        dev = cache.k.device
        B = cache.batch_size
        self.tokens = torch.zeros(B, dtype=torch.long, device=dev)
        self.mask = torch.zeros((B, 1, 1, cache.max_len), dtype=torch.bool, device=dev)
        self._arange = torch.arange(cache.max_len, device=dev)
        saved = cache.lengths.clone()
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):             # warm-up writes land at slots the next real step rewrites
            for _ in range(warmup):
                self._step()
                cache.lengths.copy_(saved)
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step()
        cache.lengths.copy_(saved)
        cache._write_index = None

    def _step(self) -> torch.Tensor:
        return static_decode_step(self.model, self.cache, self.tokens, self.mask, self._arange)

    def __call__(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(last_tokens)
        self.graph.replay()
        cache = self.cache
        cache._host_lengths = [x + 1 for x in cache._host_lengths]
        cache._write_index = cache._span_cache = None
        return self.out


# ----------------------------------------------------------------------------- sampling
def _unxorshift(y: int, shift: int) -> int:
    x = y
    for _ in range(64 // shift + 1):
        x = y ^ (x >> shift)
    return x


def _unsplitmix64(z: int) -> int:
    """Inverse of ``_splitmix64`` (every step of the finaliser is a bijection on 64-bit ints)."""
    z = _unxorshift(z, 31)
    z = _unxorshift((z * pow(0x94D049BB133111EB, -1, 1 << 64)) & _MASK64, 27)
    z = _unxorshift((z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & _MASK64, 30)
    return (z - 0x9E3779B97F4A7C15) & _MASK64


def row_key(seed: int, prompt_index: int, sample_index: int, step: int) -> int:
    """A 64-bit key for one (prompt, sample, step), independent of batch layout."""
    h = _splitmix64(seed & _MASK64)
    for part in (prompt_index, sample_index, step):
        h = _splitmix64(h ^ (part & _MASK64))
    return h


def seeds_for_rows(keys: Sequence[int], device: Any = None) -> torch.Tensor:
    """int64 seeds such that the sampler's uniform for batch row b depends only on ``keys[b]``.

    ``sample`` (``ops.sample`` and ``sample_torch``) draws row b's uniform from
    splitmix64(splitmix64(seed_b) ^ b); passing seed_b = splitmix64^-1(key_b ^ b) makes that
    splitmix64(key_b), so a row's draw does not change when compaction moves it to another index.
    """
    out = []
    for b, k in enumerate(keys):
        v = _unsplitmix64((k ^ b) & _MASK64)
        out.append(v - (1 << 64) if v >= 1 << 63 else v)
    return torch.tensor(out, dtype=torch.long, device=device)


def _uniforms(seeds: torch.Tensor) -> torch.Tensor:
    """Row b's uniform in [0, 1): 53 bits of splitmix64(splitmix64(seed_b) ^ b) (the ``ops.sample`` keying)."""
    return torch.tensor([(_splitmix64(_splitmix64(int(s) & _MASK64) ^ b) >> 11) * 2.0 ** -53
                         for b, s in enumerate(seeds.tolist())], dtype=torch.float64)


def sample_torch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 seeds: torch.Tensor) -> torch.Tensor:
    """Sort-based sampling: logits (B, V), per-row temperature/top_k/top_p/seeds (B,) -> ids (B,).

    temperature 0 = argmax; top_k 0 = off; top_p in (0, 1]. Row b draws one uniform keyed by
    (seeds[b], b), like ``ops.sample``, and inverts the CDF of its filtered distribution (in
    descending-probability order). Used when ``ops`` has no ``sample``.
    """
    B, V = logits.shape
    logits = logits.float()
    greedy = logits.argmax(-1)
    temp = temperature.to(logits.device, torch.float32)
    hot = temp > 0
    if not bool(hot.any()):
        return greedy
    scaled = logits / torch.where(hot, temp, torch.ones_like(temp))[:, None]
    u = _uniforms(seeds).to(logits.device)
    tk = top_k.to(logits.device, torch.long)
    tp = top_p.to(logits.device, torch.float32)
    if bool((tp < 1).any()) or bool((tk > 0).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)                  # (B, V)
        probs = sorted_logits.softmax(-1)
        rank = torch.arange(V, device=logits.device)[None, :]
        keep = (rank < torch.where(tk > 0, tk, torch.full_like(tk, V))[:, None])
        before = probs.cumsum(-1) - probs                                            # mass strictly before
        keep &= (before < tp[:, None]) | (rank == 0)
        probs = probs * keep
        cdf = probs.double().cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=V - 1)
        # a zero-probability slot can never be selected by a strict ">" search except at the end
        drawn = order.gather(1, pick).squeeze(1)
    else:
        cdf = scaled.softmax(-1).double().cumsum(-1)
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=V - 1).squeeze(1)
    return torch.where(hot, drawn, greedy)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor) -> torch.Tensor:
    """Dispatch: the compiled ``ops.sample`` when the package provides it, else ``sample_torch``."""
    fn = getattr(ops, "sample", None)
    if fn is not None:
        return fn(logits, temperature, top_k, top_p, seeds)
    return sample_torch(logits, temperature, top_k, top_p, seeds)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF semantics: for tokens already seen (prompt or output), logit / penalty if > 0 else * penalty."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


# ----------------------------------------------------------------------------- parameters / results
@dataclass
class SamplingParams:
    """How to sample. See the module docstring for ``prepend_response``, ``logprobs`` and trimming."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    n: int = 1
    stop_token_ids: list[int] | None = None        # None -> tokenizer.stop_token_ids; [] -> never stop on a token
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    prepend_response: str = ""
    return_logprobs: bool = False
    truncate_prompt_left: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise ValueError(f"SamplingParams: {msg}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be an int >= 1 (samples per prompt), got {self.n!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            bad(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            bad(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.stop_token_ids is not None:
            if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
                bad(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.prepend_response, str):
            bad(f"prepend_response must be a str, got {type(self.prepend_response).__name__}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]                 # generated ids only (forced prepend_response ids first)
    finish_reason: str                   # "stop" | "length"
    logprobs: list[float] | None = None  # one per model-generated token (after the forced ones)
    prompt_index: int = 0
    sample_index: int = 0
    num_forced_tokens: int = 0           # leading ids of token_ids that came from prepend_response


# ----------------------------------------------------------------------------- inputs
def _prompt_texts(tokenizer, prompts_or_chats) -> list[str]:
    def is_chat(x) -> bool:
        return isinstance(x, (list, tuple)) and all(isinstance(m, dict) for m in x) and len(x) > 0

    if isinstance(prompts_or_chats, str) or is_chat(prompts_or_chats):
        items = [prompts_or_chats]
    elif isinstance(prompts_or_chats, (list, tuple)):
        items = list(prompts_or_chats)
    else:
        raise TypeError(f"generate: prompts must be a str, a chat (list of {{'role', 'content'}} dicts) or a "
                        f"list of those; got {type(prompts_or_chats).__name__}")
    texts = []
    for i, x in enumerate(items):
        if isinstance(x, str):
            texts.append(x)
        elif is_chat(x):
            texts.append(tokenizer.apply_chat_template(list(x), add_generation_prompt=True))
        else:
            raise TypeError(f"generate: prompts[{i}] must be a str or a non-empty list of {{'role', 'content'}} "
                            f"dicts; got {type(x).__name__}: {x!r:.80}")
    return texts


def _contexts(tokenizer, texts: list[str], forced: list[int], params: SamplingParams, max_pos: int,
              vocab: int) -> list[list[int]]:
    out = []
    budget = max_pos - params.max_new_tokens
    for i, t in enumerate(texts):
        ids = tokenizer.encode(t)
        if not ids:
            raise ValueError(f"generate: prompt {i} is empty (encodes to no tokens); pass at least one token")
        ctx = ids + forced
        if len(ctx) > budget:
            if not params.truncate_prompt_left:
                raise ValueError(
                    f"generate: prompt {i} has {len(ctx)} tokens (incl. {len(forced)} of prepend_response); with "
                    f"max_new_tokens={params.max_new_tokens} that exceeds the model's max_position_embeddings="
                    f"{max_pos}; shorten it, lower max_new_tokens, or set truncate_prompt_left=True")
            if budget < len(forced) + 1:
                raise ValueError(
                    f"generate: max_new_tokens={params.max_new_tokens} leaves {max(budget, 0)} of "
                    f"max_position_embeddings={max_pos} for prompt {i}, which needs at least "
                    f"{len(forced) + 1} tokens (prepend_response + one prompt token); lower max_new_tokens")
            ctx = ctx[len(ctx) - budget:]
        bad = [x for x in ctx if x >= vocab]
        if bad:
            raise ValueError(f"generate: prompt {i} has token id {bad[0]} >= the model's vocab_size={vocab}; "
                             f"the tokenizer and the model do not match (resize the embeddings?)")
        out.append(ctx)
    return out


# ----------------------------------------------------------------------------- per-row text state
class _RowText:
    """Incremental detokenisation of one row (prefix/read offsets) plus stop-string search."""

    def __init__(self, tokenizer, ids: list[int], forced_text: str, stops: list[str]):
        self.tok = tokenizer
        self.ids = ids                       # shared list: the row's generated ids (forced first)
        self.text = forced_text              # stable decoded text so far
        self.prefix_offset = 0
        self.read_offset = len(ids)
        self.prefix_text = forced_text
        self.stops = stops
        self.max_stop = max((len(s) for s in stops), default=0)
        self.searched = len(forced_text)     # stop strings must end after the forced text
        self.forced_len = len(forced_text)
        self.emitted = 0

    def push(self) -> int | None:
        """Account for newly appended ids; returns the char index of a stop string, else None."""
        new_text = self.tok.decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(self.prefix_text) or new_text.endswith("\ufffd"):
            return None                      # incomplete multi-byte character: wait for more tokens
        self.text += new_text[len(self.prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        if not self.stops:
            return None
        start = max(self.forced_len, self.searched - self.max_stop + 1)
        hits = [p for p in (self.text.find(s, start) for s in self.stops) if p >= 0]
        self.searched = len(self.text)
        return min(hits) if hits else None

    def streamable(self) -> str:
        """Text safe to stream now: hold back what could still become a stop string."""
        upto = len(self.text) - (self.max_stop - 1 if self.stops else 0)
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta


def _trim_to_text(tokenizer, ids: list[int], keep_chars: int, floor: int) -> list[int]:
    """Shortest prefix ids[:k] (k >= floor) whose decoded text is at least ``keep_chars`` long."""
    k = len(ids)
    while k - 1 >= floor and len(tokenizer.decode(ids[:k - 1])) >= keep_chars:
        k -= 1
    return ids[:k]


# ----------------------------------------------------------------------------- generate
def generate(model: nn.Module, tokenizer, prompts_or_chats, params: SamplingParams | None = None,
             stream: StreamCallback | None = None, max_batch_size: int | None = None,
             use_cuda_graph: bool = True) -> list[Completion]:
    """Sample ``params.n`` completions for each prompt; returns them prompt-major, sample-minor.

    ``prompts_or_chats``: a str (raw prompt, encoded as-is), a chat (list of {"role", "content"}
    dicts, rendered with the chat template and the assistant header), or a list of those.
    ``stream(prompt_index, sample_index, text_delta)`` receives text as it is produced; the deltas
    of a row concatenate to its final ``text``. ``max_batch_size`` caps the rows (prompt x sample)
    decoded together (None = all). ``use_cuda_graph``: replay the decode step from a CUDA graph
    when the model is on CUDA.
    """
    params = params if params is not None else SamplingParams()
    params.validate()
    if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
        raise ValueError(f"generate: max_batch_size must be an int >= 1 or None, got {max_batch_size!r}")
    texts = _prompt_texts(tokenizer, prompts_or_chats)
    if not texts:
        return []
    cfg = model.config
    forced = tokenizer.encode(params.prepend_response) if params.prepend_response else []
    contexts = _contexts(tokenizer, texts, forced, params, cfg.max_position_embeddings, cfg.vocab_size)
    stop_ids = set(tokenizer.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
    base_seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item())
    rows = [(p, s) for p in range(len(texts)) for s in range(params.n)]
    chunk = max_batch_size or len(rows)
    results: list[Completion] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), cpu_packed_linears(model):
            for start in range(0, len(rows), chunk):
                results += _generate_rows(model, tokenizer, contexts, rows[start:start + chunk], forced, params,
                                          stop_ids, base_seed, stream, use_cuda_graph)
    finally:
        model.train(was_training)
    return results


def _generate_rows(model, tokenizer, contexts, rows, forced, params: SamplingParams, stop_ids: set[int],
                   base_seed: int, stream, use_cuda_graph: bool) -> list[Completion]:
    device = model.device
    prompts = sorted({p for p, _ in rows})
    slot = {p: i for i, p in enumerate(prompts)}
    ctx = [contexts[p] for p in prompts]
    use_graph = use_cuda_graph and device.type == "cuda"
    cache = KVCache.for_model(model, len(prompts), max(map(len, ctx)) + params.max_new_tokens, static=False)
    logits = prefill(model, cache, ctx)                                           # (P, V)
    src = [slot[p] for p, _ in rows]                                              # share each prefill among samples
    cache.select(src)
    logits = logits[torch.tensor(src, device=device)]
    if use_graph:
        cache.static = True

    B = len(rows)
    forced_text = tokenizer.decode(forced) if forced else ""
    ids = [list(forced) for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    need_text = bool(params.stop) or stream is not None
    rtext = [_RowText(tokenizer, ids[i], forced_text, params.stop) for i in range(B)] if need_text else None
    done: list[Completion | None] = [None] * B
    alive = list(range(B))                       # batch position -> row index
    temperature = torch.full((B,), float(params.temperature), device=device)
    top_k = torch.full((B,), params.top_k, dtype=torch.long, device=device)
    top_p = torch.full((B,), float(params.top_p), device=device)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros((B, model.config.vocab_size), dtype=torch.bool, device=device)
        for i, (p, _) in enumerate(rows):
            seen[i, torch.tensor(contexts[p], device=device)] = True
    graph: CUDAGraphDecoder | None = None
    live = [True] * B                            # batch positions still generating (graph mode keeps dead ones)

    def finish(i: int, reason: str, stop_at: int | None = None) -> None:
        r = alive[i]
        out_ids, text = ids[r], None
        if stop_at is not None:
            text = rtext[r].text[:stop_at]
            out_ids = _trim_to_text(tokenizer, out_ids, stop_at, len(forced))
        if text is None:
            text = tokenizer.decode(out_ids)
        if stream is not None:
            tail = text[rtext[r].emitted:]
            if tail:
                stream(rows[r][0], rows[r][1], tail)
        lp = lps[r][:len(out_ids) - len(forced)] if params.return_logprobs else None
        done[r] = Completion(text=text, token_ids=list(out_ids), finish_reason=reason, logprobs=lp,
                             prompt_index=rows[r][0], sample_index=rows[r][1], num_forced_tokens=len(forced))
        live[i] = False

    for step in range(params.max_new_tokens):
        x = logits.float()
        if seen is not None:
            x = apply_repetition_penalty(x, seen, float(params.repetition_penalty))
        if params.temperature == 0:
            nxt = x.argmax(-1)
        else:
            seeds = seeds_for_rows([row_key(base_seed, rows[r][0], rows[r][1], step) for r in alive], device)
            nxt = sample(x, temperature, top_k, top_p, seeds)
        if params.return_logprobs:
            chosen = torch.log_softmax(logits.float(), -1).gather(1, nxt[:, None])[:, 0].tolist()
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        toks = nxt.tolist()
        last = step == params.max_new_tokens - 1
        for i, r in enumerate(alive):
            if not live[i]:
                continue
            t = toks[i]
            if t in stop_ids:
                finish(i, "stop")
                continue
            ids[r].append(t)
            if params.return_logprobs:
                lps[r].append(chosen[i])
            if rtext is not None:
                hit = rtext[r].push()
                if hit is not None:
                    finish(i, "stop", hit)
                    continue
                if stream is not None:
                    delta = rtext[r].streamable()
                    if delta:
                        stream(rows[r][0], rows[r][1], delta)
            if last:
                finish(i, "length")
        n_live = sum(live)
        if n_live == 0:
            break
        if n_live < len(alive) and (not use_graph or n_live <= len(alive) // 2):
            keep = [i for i in range(len(alive)) if live[i]]
            cache.select(keep)
            kidx = torch.tensor(keep, device=device)
            alive = [alive[i] for i in keep]
            live = [True] * len(alive)
            nxt, temperature, top_k, top_p = nxt[kidx], temperature[kidx], top_k[kidx], top_p[kidx]
            if seen is not None:
                seen = seen[kidx]
            graph = None
        if use_graph:
            if graph is None:
                try:
                    graph = CUDAGraphDecoder(model, cache)
                except Exception as e:  # pragma: no cover - depends on the CUDA stack
                    warnings.warn(f"CUDA graph capture of the decode step failed ({e}); decoding eagerly")
                    use_graph = False
                    cache.static = False
            if graph is not None:
                logits = graph(nxt)
                continue
        logits = decode_one_token(model, cache, nxt)
    return [c for c in done if c is not None]
