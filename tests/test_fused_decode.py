"""The fused CPU decode step (csrc/decode_cpu.cpp, preflexor_core/sampler/fused_decode.py): the
small-M product against torch for fp32 / bf16 / int8 weights, one whole decode step against the
layer-by-layer torch step (fp32, bf16, int8 against its dequantized model, ragged rows, GQA, odd
sizes, the oneDNN-packed products), generate with and without it, and its errors; each on every CPU
ISA path at or below this machine's (cpu_features.available_isas()).

    python -m pytest tests/test_fused_decode.py -q
"""
import pytest
import torch

from preflexor_core import Llama, ModelConfig
from preflexor_core.llm import cpu_features
from preflexor_core.llm.cpu_features import onednn_bf16_packing
from preflexor_core.sampler import (KVCache, SamplingParams, cpu_packed_linears, decode_one_token, generate,
                                    prefill, quantize_per_channel)
from preflexor_core.sampler import fused_decode
from preflexor_core.sampler.int8 import dequantize

pytestmark = pytest.mark.usefixtures("every_isa")    # each test on every ISA path of this CPU
P = torch.ops.preflexor


@pytest.fixture(autouse=True)
def _fused_auto(monkeypatch):
    monkeypatch.setenv("PREFLEXOR_FUSED_DECODE", "auto")


def _odd_config(**kw) -> ModelConfig:
    """Sizes that are not multiples of the 16-lane vectors anywhere (hidden 72, head_dim 12, I 100)."""
    base = dict(vocab_size=301, hidden_size=72, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, head_dim=12, max_position_embeddings=256, rms_norm_eps=1e-5,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def odd():
    torch.manual_seed(0)
    m = Llama(_odd_config()).eval()
    with torch.no_grad():                       # norm weights away from 1 so that they matter
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight") or n == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("N,K", [(1, 1), (7, 5), (33, 37), (64, 576), (19, 130)])
def test_decode_matmul_matches_torch_for_fp32_bf16_int8(M, N, K):
    torch.manual_seed(M * 1000 + N + K)
    x, w = torch.randn(M, K), torch.randn(N, K)
    tol = 1e-5 * (K ** 0.5) * 4
    got = P.decode_matmul(x, w, torch.empty(0))
    assert got.dtype == torch.float32 and got.shape == (M, N)
    torch.testing.assert_close(got, x @ w.T, atol=tol, rtol=1e-5)
    wb = w.bfloat16()                                  # bf16 weights widened exactly; fp32 x
    torch.testing.assert_close(P.decode_matmul(x, wb, torch.empty(0)), x @ wb.float().T, atol=tol, rtol=1e-5)
    q, s = quantize_per_channel(w)
    torch.testing.assert_close(P.decode_matmul(x, q, s), x @ dequantize(q, s).T, atol=tol, rtol=1e-5)
    torch.testing.assert_close(P.decode_matmul(x.bfloat16(), w, torch.empty(0)), x.bfloat16().float() @ w.T,
                               atol=tol, rtol=1e-5)


def test_decode_matmul_rejects_bad_input():
    with pytest.raises(RuntimeError, match=r"need x \(M, K\) and w \(N, K\)"):
        P.decode_matmul(torch.randn(2, 5), torch.randn(3, 4), torch.empty(0))
    with pytest.raises(RuntimeError, match="needs a contiguous fp32 scale of shape"):
        P.decode_matmul(torch.randn(2, 4), torch.ones(3, 4, dtype=torch.int8), torch.empty(0))
    with pytest.raises(RuntimeError, match="only for int8 weights"):
        P.decode_matmul(torch.randn(2, 4), torch.randn(3, 4), torch.ones(3))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or int8"):
        P.decode_matmul(torch.randn(2, 4), torch.randn(3, 4).double(), torch.empty(0))


def _ragged_cache(model, prompts, max_len=64):
    cache = KVCache.for_model(model, len(prompts), max_len)
    prefill(model, cache, prompts)
    return cache


def _clone(cache: KVCache) -> KVCache:
    c = KVCache(cache.k.shape[0], cache.batch_size, cache.k.shape[2], cache.max_len, cache.k.shape[4],
                dtype=cache.k.dtype)
    c.k.copy_(cache.k)
    c.v.copy_(cache.v)
    c.set_lengths(cache.host_lengths)
    return c


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]


def _steps(step, model, cache, n=4):
    """n greedy decode steps from a cache; returns the logits of every step (n, B, V) in fp32."""
    tok = torch.tensor([40, 41, 42][:cache.batch_size])
    out = []
    for _ in range(n):
        logits = step(model, cache, tok).float()
        out.append(logits)
        tok = logits.argmax(-1)
    return torch.stack(out)


def test_fused_step_equals_the_torch_step_in_fp32_with_ragged_rows(odd):
    with torch.inference_mode():
        cache = _ragged_cache(odd, PROMPTS)
        ref_cache, fused = _clone(cache), fused_decode.FusedDecoder(odd, "fp")
        ref = _steps(decode_one_token, odd, ref_cache)
        got = _steps(lambda m, c, t: fused(c, t), odd, cache)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    assert cache.host_lengths == ref_cache.host_lengths == [len(p) + 4 for p in PROMPTS]
    for b, p in enumerate(PROMPTS):               # the new k/v landed at each row's own positions
        S = len(p) + 4
        torch.testing.assert_close(cache.k[:, b, :, :S], ref_cache.k[:, b, :, :S], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[:, b, :, :S], ref_cache.v[:, b, :, :S], atol=1e-5, rtol=1e-5)


def test_fused_step_with_llama3_rope_untied_head_and_mha():
    torch.manual_seed(3)
    cfg = _odd_config(num_key_value_heads=6, tie_word_embeddings=False, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    m = Llama(cfg).eval()
    with torch.inference_mode():
        cache = _ragged_cache(m, PROMPTS[:2])
        ref = _steps(decode_one_token, m, _clone(cache))
        fused = fused_decode.FusedDecoder(m, "fp")
        got = _steps(lambda mm, c, t: fused(c, t), m, cache)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_fused_step_bf16_is_the_fp32_math_on_bf16_weights(odd):
    """bf16 weights and cache; the step's own math is fp32, so it sits closer to an fp32 model with the
    same (bf16-rounded) weights than the layer-by-layer bf16 step does."""
    bf = Llama(odd.config).to(torch.bfloat16).eval()
    bf.load_state_dict(odd.state_dict())
    f32 = Llama(odd.config).eval()
    f32.load_state_dict({k: v.float() for k, v in bf.state_dict().items()})
    with torch.inference_mode():
        cache = _ragged_cache(bf, PROMPTS)
        fused = fused_decode.FusedDecoder(bf, "fp")
        tok = torch.tensor([40, 41, 42])
        got = fused(_clone(cache), tok)
        torch_bf16 = decode_one_token(bf, _clone(cache), tok).float()
        c32 = KVCache.for_model(f32, 3, 64)
        c32.k.copy_(cache.k.float()); c32.v.copy_(cache.v.float()); c32.set_lengths(cache.host_lengths)
        want = decode_one_token(f32, c32, tok)
    scale = want.abs().max()
    err_fused = float((got - want).abs().max() / scale)
    err_torch = float((torch_bf16 - want).abs().max() / scale)
    assert err_fused <= 2 ** -7, err_fused            # the k/v of the new token are rounded to bf16
    assert err_fused <= err_torch, (err_fused, err_torch)


def test_fused_int8_step_equals_the_dequantized_model(odd):
    """int8: exactly the fp32 step of a model whose linears and head are the dequantized int8 weights."""
    deq = Llama(odd.config).eval()
    deq.load_state_dict({k: dequantize(*quantize_per_channel(v)) if k.endswith("_proj.weight") else v
                         for k, v in odd.state_dict().items()})
    head = dequantize(*quantize_per_channel(odd.model.embed_tokens.weight))    # the tied head, int8;
    deq.project_logits = lambda h: torch.nn.functional.linear(h, head)         # the lookup stays fp32
    with torch.inference_mode():
        cache = _ragged_cache(odd, PROMPTS)
        fused = fused_decode.FusedDecoder(odd, "int8")
        assert all(t.dtype == torch.int8 for t in fused.mats) and len(fused.scales) == len(fused.mats)
        got = _steps(lambda m, c, t: fused(c, t), odd, _clone(cache))
        ref = _steps(decode_one_token, deq, _clone(cache))
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_fused_step_with_onednn_packed_products(odd, dtype, tol):
    """More than FUSED_MAX_ROWS rows with packing on: the step calls oneDNN on the packed copies that
    cpu_packed_linears made (no second copy) and gives the fp32 step's result on those weights."""
    m = Llama(odd.config).to(dtype).eval()
    m.load_state_dict(odd.state_dict())
    prompts = PROMPTS + [[30, 31, 32, 33]] * 2
    if dtype == torch.bfloat16 and not onednn_bf16_packing():
        # oneDNN cannot pack bf16 on this path (no AVX-512): nothing is packed, and the bf16 step keeps
        # its own products at every batch size instead of torch's emulated bf16 products
        with torch.inference_mode(), cpu_packed_linears(m) as packed:
            assert not packed
            fused = fused_decode.FusedDecoder(m, "fp", packed=packed)
            assert fused.takes(len(prompts)) and not fused._use_packed(len(prompts))
        return
    with torch.inference_mode(), cpu_packed_linears(m) as packed:
        assert packed
        cache = _ragged_cache(m, prompts)
        fused = fused_decode.FusedDecoder(m, "fp", packed=True)
        assert fused.takes(len(prompts))
        # the avx2 path keeps its own register tiles (faster there than oneDNN's AVX2 products); the oneDNN
        # route is tested on every path
        assert fused._use_packed(len(prompts)) == (cpu_features.cpu_isa() != "avx2")
        fused.own_tiles = False
        assert fused._use_packed(len(prompts))
        got = fused(_clone(cache), torch.tensor([40, 41, 42, 43, 44]))
        assert all(t.layout == torch._mkldnn for t in fused._packed())
        raw = fused_decode.FusedDecoder(m, "fp")         # the step's own products, same math
        want = raw(_clone(cache), torch.tensor([40, 41, 42, 43, 44]))
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)


def test_generate_with_and_without_the_fused_step(odd, id_tokenizer, monkeypatch):
    prompts = [" ".join(map(str, p)) for p in PROMPTS]
    p = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[])
    calls = []
    real = fused_decode.FusedDecoder.__call__
    monkeypatch.setattr(fused_decode.FusedDecoder, "__call__", lambda self, c, t: calls.append(c.batch_size) or real(self, c, t))
    monkeypatch.setenv("PREFLEXOR_FUSED_DECODE", "0")
    off = [c.token_ids for c in generate(odd, id_tokenizer, prompts, p)]
    assert calls == []
    monkeypatch.setenv("PREFLEXOR_FUSED_DECODE", "auto")
    on = [c.token_ids for c in generate(odd, id_tokenizer, prompts[:2], p)]
    assert len(calls) == 9                                # 10 tokens: prefill gives the first
    assert on == off[:2]
    calls.clear()
    sampled = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, n=2, seed=5, stop_token_ids=[])
    monkeypatch.setenv("PREFLEXOR_FUSED_DECODE", "0")
    s_off = [c.token_ids for c in generate(odd, id_tokenizer, prompts[:1], sampled)]
    monkeypatch.setenv("PREFLEXOR_FUSED_DECODE", "1")
    s_on = [c.token_ids for c in generate(odd, id_tokenizer, prompts[:1], sampled)]
    assert calls and s_on == s_off                        # same draws: only the logits' path changed


def test_generate_int8_decodes_with_the_fused_step_and_prefills_at_full_precision(odd, id_tokenizer, monkeypatch):
    fresh = Llama(odd.config).eval()           # weights no earlier test has quantized
    fresh.load_state_dict(odd.state_dict())
    odd = fresh
    seen = []
    real = fused_decode.FusedDecoder.__init__

    def spy(self, model, decode_weights="fp", packed=False):
        seen.append(decode_weights)
        real(self, model, decode_weights, packed)
    monkeypatch.setattr(fused_decode.FusedDecoder, "__init__", spy)
    from preflexor_core.sampler import int8 as int8_mod

    def no_int8_prefill(*a):
        raise AssertionError("the prefill ran through int8_linears")
    monkeypatch.setattr(int8_mod, "_int8_forward", no_int8_prefill)
    quantized = []
    real_q = fused_decode.quantize_per_channel
    monkeypatch.setattr(fused_decode, "quantize_per_channel", lambda w: quantized.append(w.shape) or real_q(w))
    before = {k: v.clone() for k, v in odd.state_dict().items()}
    p = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    prompts = [" ".join(map(str, q)) for q in PROMPTS]
    out = generate(odd, id_tokenizer, prompts, p, decode_weights="int8")
    assert seen == ["int8"] and all(len(c.token_ids) == 6 for c in out)
    assert all(torch.equal(v, odd.state_dict()[k]) for k, v in before.items())
    assert len(quantized) == 7 * odd.config.num_hidden_layers + 1
    again = generate(odd, id_tokenizer, prompts, p, decode_weights="int8")
    assert len(quantized) == 7 * odd.config.num_hidden_layers + 1          # reused: weights unchanged
    assert [c.token_ids for c in again] == [c.token_ids for c in out]
    with torch.no_grad():
        odd.model.layers[0].mlp.down_proj.weight.mul_(1.0)                  # an in-place update: redone once
    generate(odd, id_tokenizer, prompts, p, decode_weights="int8")
    assert len(quantized) == 7 * odd.config.num_hidden_layers + 2


def test_ineligible_models_fall_back_or_raise(odd, id_tokenizer, monkeypatch):
    lora_like = Llama(odd.config).eval()
    lora_like.load_state_dict(odd.state_dict())

    class Wrapped(torch.nn.Linear):
        pass
    old = lora_like.model.layers[1].mlp.up_proj
    new = Wrapped(old.in_features, old.out_features, bias=False)
    new.weight = old.weight
    lora_like.model.layers[1].mlp.up_proj = new
    reason = fused_decode.ineligible_reason(lora_like)
    assert "layer 1 mlp.up_proj is not a plain bias-free nn.Linear" in reason
    assert fused_decode.ineligible_reason(odd.double()) is not None
    odd.float()

    class Shard(torch.Tensor):
        pass
    sharded = Llama(odd.config).eval()
    sharded.model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(
        sharded.model.layers[0].self_attn.q_proj.weight.detach().as_subclass(Shard))
    assert "layer 0 self_attn.q_proj holds a Shard, not a plain tensor" in fused_decode.ineligible_reason(sharded)
    p = SamplingParams(max_new_tokens=3, temperature=0.0, stop_token_ids=[])
    assert len(generate(lora_like, id_tokenizer, ["5 6 7"], p)[0].token_ids) == 3     # torch path
    monkeypatch.setenv("PREFLEXOR_FUSED_DECODE", "1")
    with pytest.raises(ValueError, match="PREFLEXOR_FUSED_DECODE=1 but the fused CPU decode step cannot run"):
        generate(lora_like, id_tokenizer, ["5 6 7"], p)
    monkeypatch.setenv("PREFLEXOR_FUSED_DECODE", "maybe")
    with pytest.raises(ValueError, match="PREFLEXOR_FUSED_DECODE=.* is not one of auto, 0, 1"):
        generate(odd, id_tokenizer, ["5 6 7"], p)


def test_decode_step_rejects_a_full_cache_and_mismatched_weights(odd):
    with torch.inference_mode():
        fused = fused_decode.FusedDecoder(odd, "fp")
        cache = KVCache.for_model(odd, 1, 8)
        prefill(odd, cache, [[3, 4, 5, 6, 7, 8, 9, 10]])
        with pytest.raises(RuntimeError, match="has no free slot for the new token"):
            fused(cache, torch.tensor([3]))
        cache = _ragged_cache(odd, PROMPTS[:1])
        fused.mats = fused.mats[:-1]
        with pytest.raises(RuntimeError, match=r"need 15 weights \(or 9 oneDNN-packed ones\), got 14"):
            fused(cache, torch.tensor([3]))
        fused.mats = [w.t().contiguous() if i == 4 else w for i, w in enumerate(fused_decode.FusedDecoder(odd).mats)]
        with pytest.raises(RuntimeError, match="the weights of layer 0 do not match hidden 72"):
            fused(cache, torch.tensor([3]))
