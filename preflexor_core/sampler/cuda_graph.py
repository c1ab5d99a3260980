"""The decode step replayed from a CUDA graph (fixed batch size, static KV cache).

``static_decode_step`` is the captured body: device-side only (no host reads), fixed shapes, and
it runs eagerly on any device (which is how it is tested on CPU). ``CUDAGraphDecoder`` captures it
once per batch size and replays it per token. Reference: CUDA Graphs (``torch.cuda.graph``).
Tests: ``python -m pytest tests/test_sampler.py -q``; on CUDA ``tests/gpu/test_sampler_gpu.py``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .kv_cache import KVCache


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
