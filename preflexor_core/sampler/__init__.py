"""KV-cached, batched text generation for ``Llama``: the sampler used by datagen and inference.

    from preflexor_core.sampler import generate, SamplingParams
    outs = generate(model, tok, ["Why is nacre tough?"],
                    SamplingParams(max_new_tokens=128, temperature=0.7, top_p=0.9, n=4, seed=0,
                                   stop=["\\n\\n"], prepend_response="<|thinking|>"))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason          # prompt-major, sample-minor

Rooms: ``kv_cache`` (KVCache), ``params`` (SamplingParams, Completion), ``generate`` (prefill,
decode_one_token, generate), ``sampling`` (seeds, repetition penalty; the draw is ``ops.sample``),
``detokenize`` (incremental text, stop strings), ``prompts``, ``cpu_pack`` (oneDNN weight packing
on CPU, fused q/k/v and gate/up), ``int8`` (weight-only int8 decoding: ``generate(...,
decode_weights="int8")``), ``fused_decode`` (the CPU decode step as one compiled call: all layers,
the head, fp32 / bf16 / int8 weights), ``cuda_graph`` (the decode step as a CUDA graph).
Tests: ``python -m pytest tests/test_sampler.py -q``.
"""
from .cpu_pack import cpu_packed_linears
from .cuda_graph import CUDAGraphDecoder, static_decode_step
from .fused_decode import FusedDecoder
from .generate import decode_one_token, generate, prefill
from .int8 import int8_linears, quantize_per_channel
from .kv_cache import KVCache
from .params import Completion, SamplingParams
from .sampling import apply_repetition_penalty, row_key, sample, seeds_for_rows

__all__ = ["KVCache", "SamplingParams", "Completion", "prefill", "decode_one_token", "sample", "generate",
           "CUDAGraphDecoder", "static_decode_step", "row_key", "seeds_for_rows", "apply_repetition_penalty",
           "cpu_packed_linears", "int8_linears", "quantize_per_channel", "FusedDecoder"]
