"""Llama model: parity with transformers' LlamaForCausalLM, padding, presets, meta construction."""
import pytest
import torch

from preflexor_core import Llama, ModelConfig
from preflexor_core.llm.config import PRESETS
from preflexor_core.llm.config_fields import ConfigError

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def small_cfg(**kw):
    base = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


def hf_twin(model: Llama):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_dict())).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}          # tied: HF shares it with the embedding
    hf.tie_weights()
    return hf


CASES = [
    dict(num_attention_heads=4, num_key_value_heads=4),                        # MHA (ratio 1)
    dict(num_attention_heads=4, num_key_value_heads=2),                        # GQA 2
    dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16),           # GQA 4, head_dim != hidden/heads
    dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),                       # llama3 frequency scaling
    dict(tie_word_embeddings=True),
    dict(tie_word_embeddings=False, head_dim=24, rope_scaling=LLAMA3_ROPE),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}" for k in kw))
def test_logits_match_transformers(kw):
    torch.manual_seed(0)
    model = Llama(small_cfg(**kw)).eval()
    hf = hf_twin(model)
    x = torch.randint(0, 101, (3, 77))           # 77 > original_max_position_embeddings: exercises scaling
    with torch.no_grad():
        ours, ref = model(x), hf(x).logits
    assert ours.shape == (3, 77, 101)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_hidden_states_match_transformers():
    torch.manual_seed(1)
    model = Llama(small_cfg()).eval()
    hf = hf_twin(model)
    x = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        ours = model(x, return_hidden=True)
        ref = hf.model(x).last_hidden_state
    assert ours.shape == (2, 19, 64)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_right_padded_rows_equal_unpadded_runs():
    torch.manual_seed(2)
    model = Llama(small_cfg()).eval()
    lens = [13, 5, 9]
    rows = [torch.randint(0, 101, (n,)) for n in lens]
    T = max(lens)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(r[None])
            assert (batched[i, :len(r)] - alone[0]).abs().max().item() <= 1e-5
        assert torch.isfinite(batched).all()


def test_left_padded_rows_with_positions_equal_unpadded_runs():
    torch.manual_seed(3)
    model = Llama(small_cfg()).eval()
    a, b = torch.randint(0, 101, (10,)), torch.randint(0, 101, (4,))
    ids = torch.stack([a, torch.cat([torch.zeros(6, dtype=torch.long), b])])
    mask = torch.tensor([[1] * 10, [0] * 6 + [1] * 4])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos)
        assert torch.isfinite(out).all()
        assert (out[1, 6:] - model(b[None])[0]).abs().max().item() <= 1e-5


def test_padding_matches_transformers_with_mask():
    torch.manual_seed(4)
    model = Llama(small_cfg()).eval()
    hf = hf_twin(model)
    ids = torch.randint(0, 101, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask).logits
    assert (ours[0] - ref[0]).abs().max() <= 1e-4
    assert (ours[1, :7] - ref[1, :7]).abs().max() <= 1e-4


def test_3b_preset_parameter_count_on_meta():
    cfg = ModelConfig.preset("llama-3.2-3b")
    model = Llama(cfg, device="meta")
    assert model.num_parameters() == 3_212_749_824
    assert all(p.device.type == "meta" for p in model.parameters())


def test_presets_are_exact_names_and_sizes():
    assert set(PRESETS) >= {"tiny", "small", "llama-3.2-3b"}
    with pytest.raises(KeyError, match="unknown preset 'Tiny'"):
        ModelConfig.preset("Tiny")


def llama_params(V, H, I, L, Hq, Hkv, D, tied):
    """Parameter count of a bias-free Llama, written out: embedding, per layer q/k/v/o + gate/up/down +
    two RMSNorm weights, the final norm, and an untied LM head."""
    attn = H * Hq * D + 2 * H * Hkv * D + Hq * D * H
    layer = attn + 3 * H * I + 2 * H
    return V * H + L * layer + H + (0 if tied else V * H)


@pytest.mark.parametrize("name, shape, expected", [
    ("small", dict(V=32000, H=512, I=1536, L=8, Hq=8, Hkv=4, D=64, tied=True), 41_558_528),
    ("tiny", dict(V=4096, H=128, I=384, L=4, Hq=4, Hkv=2, D=32, tied=True), 1_311_872),
])
def test_preset_parameter_counts_are_exact(name, shape, expected):
    assert llama_params(**shape) == expected
    assert Llama(ModelConfig.preset(name), device="meta").num_parameters() == expected


def test_config_hf_round_trip():
    cfg = ModelConfig.preset("llama-3.2-3b")
    d = cfg.to_hf_dict()
    assert d["architectures"] == ["LlamaForCausalLM"] and d["rope_scaling"]["rope_type"] == "llama3"
    assert ModelConfig.from_hf_dict(d) == cfg
    hf = transformers.LlamaConfig(**d)
    back = ModelConfig.from_hf_dict(hf.to_dict())
    count = lambda c: Llama(c, device="meta").num_parameters()          # noqa: E731
    assert count(back) == count(cfg) and back.rope_scaling == cfg.rope_scaling


def test_config_errors_are_specific():
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelConfig.from_hf_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, source="x/config.json")
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn' is not supported"):
        ModelConfig.from_hf_dict({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
                                  "hidden_size": 64, "num_attention_heads": 4})
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="missing key 'low_freq_factor'"):
        ModelConfig(hidden_size=64, num_attention_heads=4, rope_scaling={"rope_type": "llama3", "factor": 8.0})


def test_llama_init_statistics():
    torch.manual_seed(0)
    model = Llama(small_cfg(hidden_size=128, intermediate_size=256))
    w = model.model.layers[0].self_attn.q_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones(128))


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(5)
    model = Llama(small_cfg())
    x = torch.randint(0, 101, (2, 16))
    model(x).float().logsumexp(-1).mean().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model.train()
    model(x).float().logsumexp(-1).mean().backward()
    for a, p in zip(g1, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)
