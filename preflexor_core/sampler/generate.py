"""Batched, KV-cached generation: prompts or chats -> ``Completion`` list.

``generate`` samples ``n`` completions per prompt (one shared prefill), with stop tokens and stop
strings, repetition penalty, streaming, and batch compaction as rows finish; on CUDA the decode step
is replayed from a CUDA graph. It is built from small steps: ``prefill`` (right-padded prompts ->
last-token logits), ``_pick_tokens``, ``_Outputs.push`` (per-row bookkeeping), ``_Batch.compact``
and ``_DecodeStep`` (``decode_one_token`` eager or graphed), all under ``torch.inference_mode()``.
References: nucleus sampling, Holtzman et al. 2019; repetition penalty, CTRL (Keskar et al. 2019).
Tests: ``python -m pytest tests/test_sampler.py -q``;
benchmarks: ``python -m pytest tests/benchmarks/test_bench_sampler.py --benchmark-only``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from . import prompts
from .cuda_graph import CUDAGraphDecoder
from .detokenize import RowText, trim_to_text
from . import fused_decode
from .int8 import DECODE_WEIGHTS, decode_weights_context
from .kv_cache import KVCache
from .params import Completion, SamplingParams
from .sampling import apply_repetition_penalty, row_key, sample, seeds_for_rows

StreamCallback = Callable[[int, int, str], None]


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


# ----------------------------------------------------------------------------- generate
def generate(model: nn.Module, tokenizer, prompts_or_chats, params: SamplingParams | None = None,
             stream: StreamCallback | None = None, max_batch_size: int | None = None,
             use_cuda_graph: bool = True, decode_weights: str = "fp") -> list[Completion]:
    """Sample ``params.n`` completions for each prompt; returns them prompt-major, sample-minor.

    ``prompts_or_chats``: a str (raw prompt, encoded as-is), a chat (list of {"role", "content"}
    dicts, rendered with the chat template and the assistant header), or a list of those.
    ``stream(prompt_index, sample_index, text_delta)`` receives text as it is produced; the deltas
    of a row concatenate to its final ``text``. ``max_batch_size`` caps the rows (prompt x sample)
    decoded together (None = all). ``use_cuda_graph``: replay the decode step from a CUDA graph
    when the model is on CUDA. ``decode_weights``: ``"fp"`` computes in the model's precision
    (oneDNN-packed on CPU), ``"int8"`` from weight-only int8 copies with per-channel scales (the
    model's weights are not changed). On CPU the decode steps run as one compiled call each
    (``fused_decode``; with int8 the prompt's prefill stays at full precision), else layer by layer
    (``int8.int8_linears`` for int8).
    """
    params = params if params is not None else SamplingParams()
    params.validate()
    if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
        raise ValueError(f"generate: max_batch_size must be an int >= 1 or None, got {max_batch_size!r}")
    if decode_weights not in DECODE_WEIGHTS:
        raise ValueError(f"generate: decode_weights={decode_weights!r}; use one of {DECODE_WEIGHTS}")
    texts = prompts.prompt_texts(tokenizer, prompts_or_chats)
    if not texts:
        return []
    cfg = model.config
    forced = tokenizer.encode(params.prepend_response) if params.prepend_response else []
    contexts = prompts.contexts(tokenizer, texts, forced, params, cfg.max_position_embeddings, cfg.vocab_size)
    stop_ids = set(tokenizer.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
    base_seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item())
    rows = [(p, s) for p in range(len(texts)) for s in range(params.n)]
    chunk = max_batch_size or len(rows)
    results: list[Completion] = []
    was_training = model.training
    model.eval()
    try:
        # On CPU the decode steps may run as one compiled call (fused_decode); with int8 it reads int8
        # copies of the weights itself, and the prompt's prefill (compute-bound) keeps full precision.
        fused_ok = model.device.type == "cpu" and fused_decode.usable(model)
        with torch.inference_mode(), decode_weights_context(model, "fp" if fused_ok else decode_weights) as packed:
            fused = fused_decode.FusedDecoder(model, decode_weights, packed=packed is True) if fused_ok else None
            for start in range(0, len(rows), chunk):
                outputs = _Outputs(tokenizer, rows[start:start + chunk], forced, params, stop_ids, stream)
                results += _generate_rows(model, contexts, outputs, params, base_seed, use_cuda_graph, fused)
    finally:
        model.train(was_training)
    return results


def _generate_rows(model: nn.Module, contexts: list[list[int]], out: "_Outputs", params: SamplingParams,
                   base_seed: int, use_cuda_graph: bool, fused=None) -> list[Completion]:
    """Decode one chunk of (prompt, sample) rows to completion."""
    use_graph = use_cuda_graph and model.device.type == "cuda"
    cache, logits = _shared_prefill(model, contexts, out.rows, params.max_new_tokens)
    cache.static = use_graph
    batch = _Batch.start(model, contexts, out.rows, params)
    decode = _DecodeStep(model, cache, use_graph, fused)
    for step in range(params.max_new_tokens):
        nxt, chosen = _pick_tokens(logits, batch, params, base_seed, out.rows, step)
        last = step == params.max_new_tokens - 1
        for i, (r, t) in enumerate(zip(batch.alive, nxt.tolist())):
            if batch.live[i] and out.push(r, t, None if chosen is None else chosen[i], last):
                batch.live[i] = False
        n_live = sum(batch.live)
        if n_live == 0:
            break
        # Compact when rows finished; a graph is re-captured per batch size, so only at half occupancy.
        if n_live < len(batch.alive) and (not decode.use_graph or n_live <= len(batch.alive) // 2):
            keep = [i for i, alive in enumerate(batch.live) if alive]
            nxt = batch.compact(keep, nxt)
            decode.select(keep)
        logits = decode(nxt)
    return out.completions()


def _shared_prefill(model: nn.Module, contexts: list[list[int]], rows: list[tuple[int, int]],
                    max_new_tokens: int) -> tuple[KVCache, torch.Tensor]:
    """Prefill each distinct prompt once, then repeat its cache row for each of its samples."""
    prompts = sorted({p for p, _ in rows})
    slot = {p: i for i, p in enumerate(prompts)}
    ctx = [contexts[p] for p in prompts]
    cache = KVCache.for_model(model, len(prompts), max(map(len, ctx)) + max_new_tokens)
    logits = prefill(model, cache, ctx)                                                   # (P, V)
    src = [slot[p] for p, _ in rows]
    cache.select(src)
    return cache, logits[torch.tensor(src, device=logits.device)]                         # (B, V)


@dataclass
class _Batch:
    """Device-side per-row state of the rows still in the batch (batch position i -> row alive[i])."""

    alive: list[int]
    live: list[bool]                     # still generating (graph mode keeps finished rows a while)
    temperature: torch.Tensor            # (B,)
    top_k: torch.Tensor                  # (B,)
    top_p: torch.Tensor                  # (B,)
    seen: torch.Tensor | None            # (B, V) bool, tokens seen so far (repetition penalty only)

    @classmethod
    def start(cls, model: nn.Module, contexts: list[list[int]], rows: list[tuple[int, int]],
              params: SamplingParams) -> "_Batch":
        B, dev = len(rows), model.device
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros((B, model.config.vocab_size), dtype=torch.bool, device=dev)
            for i, (p, _) in enumerate(rows):
                seen[i, torch.tensor(contexts[p], device=dev)] = True
        return cls(alive=list(range(B)), live=[True] * B,
                   temperature=torch.full((B,), float(params.temperature), device=dev),
                   top_k=torch.full((B,), params.top_k, dtype=torch.long, device=dev),
                   top_p=torch.full((B,), float(params.top_p), device=dev), seen=seen)

    def compact(self, keep: list[int], nxt: torch.Tensor) -> torch.Tensor:
        """Keep batch positions ``keep``; returns ``nxt`` restricted to them."""
        idx = torch.tensor(keep, device=nxt.device)
        self.alive = [self.alive[i] for i in keep]
        self.live = [True] * len(keep)
        self.temperature, self.top_k, self.top_p = self.temperature[idx], self.top_k[idx], self.top_p[idx]
        if self.seen is not None:
            self.seen = self.seen[idx]
        return nxt[idx]


def _pick_tokens(logits: torch.Tensor, batch: _Batch, params: SamplingParams, base_seed: int,
                 rows: list[tuple[int, int]], step: int) -> tuple[torch.Tensor, list[float] | None]:
    """Next token per batch row (B,) and, with ``return_logprobs``, its log-prob under the raw logits."""
    x = logits.float()
    if batch.seen is not None:
        x = apply_repetition_penalty(x, batch.seen, float(params.repetition_penalty))
    if params.temperature == 0:
        nxt = x.argmax(-1)
    else:
        seeds = seeds_for_rows([row_key(base_seed, *rows[r], step) for r in batch.alive], x.device)
        nxt = sample(x, batch.temperature, batch.top_k, batch.top_p, seeds)
    chosen = None
    if params.return_logprobs:
        chosen = torch.log_softmax(logits.float(), -1).gather(1, nxt[:, None])[:, 0].tolist()
    if batch.seen is not None:
        batch.seen.scatter_(1, nxt[:, None], True)
    return nxt, chosen


class _DecodeStep:
    """``decode_one_token``, its CUDA-graph replay (captured lazily per batch size), or on CPU the
    fused compiled step (``fused_decode.FusedDecoder``) for the batch sizes it takes."""

    def __init__(self, model: nn.Module, cache: KVCache, use_graph: bool, fused=None):
        self.model, self.cache, self.use_graph, self.fused = model, cache, use_graph, fused
        self.graph: CUDAGraphDecoder | None = None

    def select(self, keep: list[int]) -> None:
        self.cache.select(keep)
        self.graph = None

    def __call__(self, nxt: torch.Tensor) -> torch.Tensor:
        if self.use_graph and self.graph is None:
            try:
                self.graph = CUDAGraphDecoder(self.model, self.cache)
            except Exception as e:  # pragma: no cover - depends on the CUDA stack
                warnings.warn(f"CUDA graph capture of the decode step failed ({e}); decoding eagerly")
                self.use_graph = self.cache.static = False
        if self.graph is not None:
            return self.graph(nxt)
        if self.fused is not None and self.fused.takes(self.cache.batch_size):
            return self.fused(self.cache, nxt)
        return decode_one_token(self.model, self.cache, nxt)


class _Outputs:
    """Host-side results of one chunk of rows: ids, log-probs, text state, finished completions."""

    def __init__(self, tokenizer, rows: list[tuple[int, int]], forced: list[int], params: SamplingParams,
                 stop_ids: set[int], stream: StreamCallback | None):
        self.tok, self.rows, self.forced, self.stop_ids, self.stream = tokenizer, rows, forced, stop_ids, stream
        self.keep_logprobs = params.return_logprobs
        B = len(rows)
        forced_text = tokenizer.decode(forced) if forced else ""
        self.ids = [list(forced) for _ in range(B)]
        self.lps: list[list[float]] = [[] for _ in range(B)]
        need_text = bool(params.stop) or stream is not None
        self.text = [RowText(tokenizer, self.ids[r], forced_text, params.stop) for r in range(B)] if need_text else None
        self.done: list[Completion | None] = [None] * B

    def push(self, r: int, token: int, logprob: float | None, last: bool) -> bool:
        """Append ``token`` to row ``r``; True when the row finished (stop token, stop string, length)."""
        if token in self.stop_ids:
            return self.finish(r, "stop")
        self.ids[r].append(token)
        if logprob is not None:
            self.lps[r].append(logprob)
        if self.text is not None:
            hit = self.text[r].push()
            if hit is not None:
                return self.finish(r, "stop", hit)
            if self.stream is not None:
                delta = self.text[r].streamable()
                if delta:
                    self.stream(*self.rows[r], delta)
        return self.finish(r, "length") if last else False

    def finish(self, r: int, reason: str, stop_at: int | None = None) -> bool:
        ids = self.ids[r]
        if stop_at is not None:
            text = self.text[r].text[:stop_at]
            ids = trim_to_text(self.tok, ids, stop_at, len(self.forced))
        else:
            text = self.tok.decode(ids)
        if self.stream is not None:
            tail = text[self.text[r].emitted:]
            if tail:
                self.stream(*self.rows[r], tail)
        n_forced = len(self.forced)
        p, s = self.rows[r]
        self.done[r] = Completion(text=text, token_ids=list(ids), finish_reason=reason,
                                  logprobs=self.lps[r][:len(ids) - n_forced] if self.keep_logprobs else None,
                                  prompt_index=p, sample_index=s, num_forced_tokens=n_forced)
        return True

    def completions(self) -> list[Completion]:
        return [c for c in self.done if c is not None]
