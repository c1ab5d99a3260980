"""Tests for preflexor_core.llm.lora: wrapping, merge / unmerge, disable, PEFT-format save / load.

Run: python -m pytest -q tests/test_lora.py
"""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn as nn

from preflexor_core import Llama, ModelConfig
from preflexor_core.llm.lora import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LoRAConfig, LoRAEmbedding,
                                     LoRALinear, apply_lora, count_trainable_parameters, disable_adapters,
                                     load_adapter, lora_modules, lora_state_dict, merge_lora, save_adapter)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_model(seed: int = 0, tie: bool = False) -> Llama:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return Llama(cfg)


def randomize_lora(model: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * scale)


def ids(seed: int = 2, shape=(2, 10)) -> torch.Tensor:
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(seed))


def test_apply_lora_wraps_targets_freezes_base_and_counts():
    model = tiny_model()
    plain_keys = set(model.state_dict())
    cfg = LoRAConfig(r=8, alpha=16)
    assert apply_lora(model, cfg) is model
    mods = lora_modules(model)
    assert len(mods) == 2 * len(TARGETS)
    assert all(isinstance(m, LoRALinear) for m in mods.values())
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    h, i, kv = 64, 128, 2 * 16
    per_layer = 8 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    assert count_trainable_parameters(model) == model.lora_trainable_parameters == 2 * per_layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # base names are preserved; only adapter keys are added
    keys = set(model.state_dict())
    assert plain_keys <= keys
    assert all(".lora_" in k for k in keys - plain_keys)
    a = model.model.layers[0].self_attn.q_proj
    assert (a.lora_B.weight == 0).all()
    bound = 1 / math.sqrt(h)                           # kaiming_uniform(a=sqrt(5)) on fan_in = in_features
    assert a.lora_A.weight.abs().max() <= bound and a.lora_A.weight.std() > bound / 4
    assert math.isclose(a.scaling, 2.0)


def test_fresh_adapter_is_identity_and_training_moves_only_adapters():
    model = tiny_model()
    x = ids()
    with torch.no_grad():
        base = model(x)
    apply_lora(model, LoRAConfig(r=4, alpha=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        torch.testing.assert_close(model(x), base)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, 50), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(m.lora_B.weight, torch.zeros_like(m.lora_B.weight)) for m in lora_modules(model).values())


def test_merge_unmerge_disable_match_forward():
    model = tiny_model()
    x = ids()
    with torch.no_grad():
        base = model(x)
    apply_lora(model, LoRAConfig(r=8, alpha=16))
    randomize_lora(model)
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - base).abs().max() > 1e-3                    # the adapter does something
        with model.disable_adapters():
            torch.testing.assert_close(model(x), base)
        torch.testing.assert_close(model(x), adapted)
        for m in lora_modules(model).values():
            m.merge()
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
        with disable_adapters(model):                                 # takes merged adapters out too
            torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-5)
        assert all(m.merged for m in lora_modules(model).values())
        for m in lora_modules(model).values():
            m.unmerge()
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_merge_lora_restores_plain_llama_state_dict():
    model = tiny_model()
    x = ids()
    plain = {k: v.shape for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=8, alpha=8))
    randomize_lora(model)
    with torch.no_grad():
        adapted = model(x)
    merge_lora(model)
    assert not lora_modules(model)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert {k: v.shape for k, v in model.state_dict().items()} == plain
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "disable_adapters")
    fresh = tiny_model(seed=9)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip_and_peft_layout(tmp_path):
    model = tiny_model()
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.05, target_modules=("q_proj", "v_proj"))
    apply_lora(model, cfg)
    randomize_lora(model)
    model.eval()                                                       # dropout off for the comparison
    x = ids()
    out_dir = tmp_path / "adapter"
    save_adapter(model, out_dir, cfg, base_model_name_or_path="meta-llama/Llama-3.2-3B-Instruct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]   # no temp dirs left behind
    assert {p.name for p in out_dir.iterdir()} == {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME}

    from safetensors import safe_open
    with safe_open(str(out_dir / ADAPTER_WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    expected = {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
                for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB"}
    assert keys == expected
    conf = json.loads((out_dir / ADAPTER_CONFIG_NAME).read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
    assert (conf["r"], conf["lora_alpha"], conf["lora_dropout"]) == (4, 8, 0.05)
    assert conf["target_modules"] == ["q_proj", "v_proj"] and conf["bias"] == "none"
    assert conf["fan_in_fan_out"] is False and conf["inference_mode"] is True
    assert conf["base_model_name_or_path"] == "meta-llama/Llama-3.2-3B-Instruct"

    other = tiny_model()                                               # same base weights, no adapters yet
    load_adapter(other, out_dir)
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))
    for k, v in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(other)[k], v)

    # overwriting an existing adapter directory is atomic-by-rename and leaves no leftovers
    randomize_lora(model, seed=5)
    save_adapter(model, out_dir, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    load_adapter(other, out_dir)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))


def test_load_adapter_mismatch_is_reported(tmp_path):
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, alpha=4, target_modules=("q_proj",)))
    save_adapter(model, tmp_path / "a")
    other = tiny_model()
    apply_lora(other, LoRAConfig(r=4, alpha=4, target_modules=("q_proj", "k_proj")))
    with pytest.raises(ValueError, match="missing .*k_proj"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_model(), tmp_path / "nowhere")


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_lora(tiny_model(), LoRAConfig(target_modules=("qkv",)))
    with pytest.raises(ValueError, match="include_head=True needs an untied"):
        apply_lora(tiny_model(tie=True), LoRAConfig(include_head=True))
    with pytest.raises(ValueError, match="tied"):
        apply_lora(tiny_model(tie=True), LoRAConfig(include_embeddings=True))
    with pytest.raises(ValueError, match="r must be"):
        LoRAConfig(r=0)
    m = tiny_model()
    apply_lora(m, LoRAConfig(r=2, alpha=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(m, LoRAConfig(r=2, alpha=2))


def test_embedding_lora_merge_disable_and_save(tmp_path):
    model = tiny_model()
    x = ids()
    with torch.no_grad():
        base = model(x)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=("q_proj",), include_embeddings=True)
    apply_lora(model, cfg)
    emb = model.model.embed_tokens
    assert isinstance(emb, LoRAEmbedding) and emb.lora_embedding_A.shape == (4, 50)
    assert emb.lora_embedding_B.shape == (64, 4) and emb.lora_embedding_B.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(x), base)                    # A starts at zero
    randomize_lora(model)
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - base).abs().max() > 1e-3
        with model.disable_adapters():
            torch.testing.assert_close(model(x), base)
    save_adapter(model, tmp_path / "a", cfg)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / ADAPTER_WEIGHTS_NAME), "pt") as f:
        assert {"base_model.model.model.embed_tokens.lora_embedding_A",
                "base_model.model.model.embed_tokens.lora_embedding_B"} <= set(f.keys())
    assert "embed_tokens" in json.loads((tmp_path / "a" / ADAPTER_CONFIG_NAME).read_text())["target_modules"]
    other = tiny_model()
    load_adapter(other, tmp_path / "a")
    merge_lora(model)
    assert type(model.model.embed_tokens) is nn.Embedding
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other(x), adapted, rtol=1e-5, atol=1e-5)


def test_bf16_base_keeps_fp32_adapters():
    lin = nn.Linear(16, 8, dtype=torch.bfloat16)
    m = LoRALinear(lin, r=4, alpha=4)
    assert m.weight is lin.weight and m.lora_A.weight.dtype == torch.float32
    y = m(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed (optional cross-check)")
def test_adapter_loads_in_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    import peft

    model = tiny_model()
    cfg = LoRAConfig(r=4, alpha=8)
    apply_lora(model, cfg)
    randomize_lora(model)
    base = tiny_model()
    base.save_pretrained(str(tmp_path / "base"))
    save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, model(x), rtol=1e-4, atol=1e-4)


def test_head_lora_trains_merges_and_round_trips(tmp_path):
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=("q_proj",), include_head=True))
    assert isinstance(model.lm_head, LoRALinear) and model.lm_head.lora_B.weight.requires_grad
    randomize_lora(model)
    x = torch.randint(0, 50, (2, 9))
    base_w = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        out = model(x)
        hidden = model(x, return_hidden=True)
    # the head update is applied both in forward and through output_weight (used by the log-prob kernel)
    assert torch.allclose(out, hidden @ model.output_weight.detach().T, atol=1e-5)
    assert not torch.allclose(model.output_weight.detach(), base_w)
    with disable_adapters(model), torch.no_grad():
        assert torch.allclose(model.output_weight, base_w)
    model(x).sum().backward()
    assert model.lm_head.lora_A.weight.grad is not None and model.lm_head.weight.grad is None
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "lm_head" in cfg["target_modules"]
    from safetensors.torch import load_file
    assert "base_model.model.lm_head.lora_A.weight" in load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    other = tiny_model()                                               # same base, fresh: reload the head adapter
    load_adapter(other, tmp_path / "a")
    assert isinstance(other.lm_head, LoRALinear)
    assert torch.equal(other.lm_head.lora_B.weight, model.lm_head.lora_B.weight)
    with torch.no_grad():
        torch.testing.assert_close(other(x), out)
    merged = merge_lora(model)
    with torch.no_grad():
        assert torch.allclose(merged(x), out, atol=1e-5)
    assert set(merged.state_dict()) == set(tiny_model().state_dict())


def resized_model(seed: int = 0, tie: bool = False, extra: int = 4) -> Llama:
    from preflexor_core.llm.vocab import resize_token_embeddings
    model = tiny_model(seed, tie)
    resize_token_embeddings(model, 50 + extra)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_lora_on_a_resized_vocabulary_saves_loads_and_merges(tmp_path, tie):
    model = resized_model(tie=tie)
    rows = (50, 51, 52, 53)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "down_proj"), trainable_token_indices=rows)
    apply_lora(model, cfg)
    randomize_lora(model)
    x = torch.tensor([[1, 50, 7, 53, 2, 51, 52]])
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 7, 54)
        with model.disable_adapters():
            base = model(x)
    assert (out - base).abs().max() > 1e-3
    save_adapter(model, tmp_path / "a")
    conf = json.loads((tmp_path / "a" / ADAPTER_CONFIG_NAME).read_text())
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS_NAME))
    emb_key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    head_key = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"
    assert tensors[emb_key].shape == (4, 64)
    if tie:                                      # PEFT's list form: the tied head follows the embedding rows
        assert conf["trainable_token_indices"] == list(rows) and head_key not in tensors
    else:
        assert conf["trainable_token_indices"] == {"embed_tokens": list(rows), "lm_head": list(rows)}
        assert tensors[head_key].shape == (4, 64)
    other = resized_model(tie=tie)
    load_adapter(other, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(other(x), out)
    with pytest.raises(ValueError, match="50-row table"):            # the same adapter on the old vocabulary
        load_adapter(tiny_model(tie=tie), tmp_path / "a")
    merge_lora(model)
    assert set(model.state_dict()) == set(resized_model(tie=tie).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key,value", [("use_rslora", True), ("use_dora", True), ("rank_pattern", {"q_proj": 8}),
                                       ("alpha_pattern", {"q_proj": 32}), ("bias", "all"),
                                       ("modules_to_save", ["lm_head"]), ("layers_to_transform", [0])])
def test_unsupported_peft_options_are_refused(tmp_path, key, value):
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=("q_proj",)))
    save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / ADAPTER_CONFIG_NAME
    conf = json.loads(f.read_text())
    load_adapter(tiny_model(), tmp_path / "a")                       # as saved: loads
    conf[key] = value
    f.write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=f"sets {key}=.*does not support"):
        load_adapter(tiny_model(), tmp_path / "a")


def test_token_row_configs_that_peft_refuses_are_refused():
    with pytest.raises(ValueError, match="include_head=True and trainable lm_head rows"):
        apply_lora(tiny_model(), LoRAConfig(r=2, include_head=True, trainable_token_indices={"lm_head": [3]}))
    with pytest.raises(ValueError, match="include_embeddings=True and trainable embedding rows"):
        apply_lora(tiny_model(), LoRAConfig(r=2, include_embeddings=True, trainable_token_indices=[3]))
    with pytest.raises(ValueError, match="only .*embed_tokens"):
        LoRAConfig(trainable_token_indices={"q_proj": [1]})
    with pytest.raises(ValueError, match="distinct ids of this 50-row"):
        apply_lora(tiny_model(), LoRAConfig(r=2, trainable_token_indices=[3, 99]))


def _peft_setup(tmp_path, tie: bool):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = resized_model(seed=3, tie=tie)
    base.save_pretrained(str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    return transformers, peft, base, hf


@pytest.mark.parametrize("tie", [True, False])
def test_our_token_row_adapter_loads_in_peft(tmp_path, tie):
    transformers, peft, base, hf = _peft_setup(tmp_path, tie)
    model = resized_model(seed=3, tie=tie)
    model.new_token_ids = (50, 51, 52, 53)
    cfg = LoRAConfig(r=4, alpha=8, include_head=not tie, trainable_token_indices=model.new_token_ids)
    apply_lora(model, cfg)
    randomize_lora(model, scale=0.2)
    save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path=str(tmp_path / "base"))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    x = torch.tensor([[1, 50, 7, 53, 2, 51, 52, 9]])
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(pm(x).logits, ours, rtol=1e-4, atol=1e-4)
        merged = pm.merge_and_unload()(x).logits                     # PEFT's merge == ours
        torch.testing.assert_close(merge_lora(model)(x), merged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_peft_made_adapter_with_token_rows_loads_in_ours(tmp_path, tie):
    transformers, peft, base, hf = _peft_setup(tmp_path, tie)
    targets = ["q_proj", "v_proj", "gate_proj"] + ([] if tie else ["lm_head"])
    pc = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, trainable_token_indices=[50, 52, 53])
    pm = peft.get_peft_model(hf, pc)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:                                       # lora_A/B and the token rows
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = Llama.from_pretrained(str(tmp_path / "base"))
    load_adapter(ours, tmp_path / "peft")
    assert set(ours.model.embed_tokens.token_ids) == {50, 52, 53}
    assert isinstance(ours.lm_head, LoRALinear) != tie
    x = torch.tensor([[1, 50, 7, 53, 2, 51, 52, 9]])
    with torch.no_grad():
        expect = pm(x).logits
        assert (expect - base(x)).abs().max() > 1e-2                  # the adapter does something
        torch.testing.assert_close(ours(x), expect, rtol=1e-4, atol=1e-4)
