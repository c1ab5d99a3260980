"""Sampler on CUDA: the CUDA-graph decode step equals eager decoding; generate agrees with and without graphs.

    python -m pytest tests/gpu/test_sampler_gpu.py
"""
import pytest
import torch

from preflexor_core import Llama, ModelConfig
from preflexor_core.sampler import (CUDAGraphDecoder, KVCache, SamplingParams, decode_one_token, generate,
                                    prefill)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


class IdTokenizer:
    stop_token_ids = [1]

    def encode(self, text):
        return [int(x) for x in text.split()]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2)
    return Llama(cfg, device="cuda").eval()


def test_graph_decode_equals_eager_decode(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    with torch.inference_mode():
        eager = KVCache.for_model(model, 3, 32)
        graphed = KVCache.for_model(model, 3, 32)
        le = prefill(model, eager, prompts)
        lg = prefill(model, graphed, prompts)
        torch.testing.assert_close(le, lg)
        graphed.static = True
        dec = CUDAGraphDecoder(model, graphed)
        assert graphed.lengths.tolist() == [7, 2, 4]               # capture left the state untouched
        tok = le.argmax(-1)
        for _ in range(10):
            le = decode_one_token(model, eager, tok)
            lg = dec(tok).clone()
            torch.testing.assert_close(lg, le, atol=2e-4, rtol=1e-4)
            assert graphed.lengths.tolist() == eager.lengths.tolist() == graphed.host_lengths
            tok = le.argmax(-1)


def test_generate_with_and_without_graph_agree(model):
    tok = IdTokenizer()
    prompts = ["5 6 7 8 9 10", "12 13", "14 15 16 17 18 19 20 21 22"]
    for params in (SamplingParams(max_new_tokens=24, temperature=0.0, n=2),
                   SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, n=3, seed=11)):
        a = generate(model, tok, prompts, params, use_cuda_graph=True)
        b = generate(model, tok, prompts, params, use_cuda_graph=False)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        assert [c.finish_reason for c in a] == [c.finish_reason for c in b]


def test_cuda_matches_cpu_greedy(model):
    tok = IdTokenizer()
    cpu = Llama(model.config).eval()
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    params = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=[])
    prompts = ["5 6 7 8 9 10", "12 13"]
    assert ([c.token_ids for c in generate(model, tok, prompts, params)]
            == [c.token_ids for c in generate(cpu, tok, prompts, params)])
