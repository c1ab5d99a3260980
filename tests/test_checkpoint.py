"""Checkpoints: HF round trips both directions (single file and shards), atomic writes, specific errors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from preflexor_core import Llama, ModelConfig
from preflexor_core.llm.checkpoint import CheckpointError, parse_size
from preflexor_core.llm.config_fields import ConfigError

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}


def cfg(**kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shard", ["5GB", 40_000])
def test_we_save_hf_loads(tmp_path, tied, shard):
    torch.manual_seed(0)
    model = Llama(cfg(tie_word_embeddings=tied, rope_scaling=ROPE)).eval()
    model.save_pretrained(str(tmp_path / "ckpt"), max_shard_size=shard)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    if shard == "5GB":
        assert "model.safetensors" in files
    else:
        assert "model.safetensors.index.json" in files
        assert len([f for f in files if f.startswith("model-000")]) > 1
    assert "generation_config.json" in files and "config.json" in files
    keys = set()
    for f in files:
        if f.endswith(".safetensors"):
            keys |= set(load_file(str(tmp_path / "ckpt" / f)))
    assert ("lm_head.weight" in keys) == (not tied)
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32).eval()
    x = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shard", ["5GB", "40KB"])
def test_hf_saves_we_load(tmp_path, tied, shard):
    torch.manual_seed(1)
    c = cfg(tie_word_embeddings=tied, num_key_value_heads=1, head_dim=32)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**c.to_hf_dict())).eval()
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size=shard)
    model = Llama.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings == tied and model.config.head_dim == 32
    x = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 1e-4


def test_load_casts_dtype_and_keeps_values(tmp_path):
    torch.manual_seed(2)
    model = Llama(cfg())
    model.save_pretrained(str(tmp_path / "c"))
    m16 = Llama.from_pretrained(str(tmp_path / "c"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert not any(p.device.type == "meta" for p in m16.parameters())
    for (k, a), (_, b) in zip(model.state_dict().items(), m16.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), k
    assert m16.model.embed_tokens.weight.requires_grad


def test_save_is_atomic_and_keeps_other_files(tmp_path):
    torch.manual_seed(3)
    d = tmp_path / "ckpt"
    Llama(cfg()).save_pretrained(str(d), max_shard_size=40_000)
    (d / "tokenizer.json").write_text("{}")
    model = Llama(cfg())
    model.save_pretrained(str(d))                      # now a single file: old shards must be gone
    files = sorted(os.listdir(d))
    assert "tokenizer.json" in files
    assert not any(f.startswith("model-000") for f in files) and "model.safetensors.index.json" not in files
    assert not [f for f in os.listdir(tmp_path) if f != "ckpt"]     # no temp dirs left behind
    again = Llama.from_pretrained(str(d))
    assert torch.equal(again.model.norm.weight, model.model.norm.weight)


def test_save_failure_leaves_old_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    Llama(cfg()).save_pretrained(str(d))
    before = sorted(os.listdir(d))
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        Llama(cfg()).save_pretrained(str(d))
    assert sorted(os.listdir(d)) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    from preflexor_core.infra.io import atomic_dir
    d = tmp_path / "out"
    with atomic_dir(d) as tmp:
        open(os.path.join(tmp, "a.txt"), "w").write("1")
    with atomic_dir(d) as tmp:                          # no carry-over: a.txt goes, b.txt comes
        open(os.path.join(tmp, "b.txt"), "w").write("2")
    assert sorted(os.listdir(d)) == ["b.txt"]
    with pytest.raises(RuntimeError, match="half"):
        with atomic_dir(d, carry_over=True) as tmp:
            open(os.path.join(tmp, "c.txt"), "w").write("3")
            raise RuntimeError("half written")
    assert sorted(os.listdir(d)) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    with atomic_dir(d, carry_over=True) as tmp:         # carry-over keeps b.txt next to c.txt
        open(os.path.join(tmp, "c.txt"), "w").write("3")
    assert sorted(os.listdir(d)) == ["b.txt", "c.txt"]


# ------------------------------------------------------------------ errors
@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(4)
    d = tmp_path / "ckpt"
    Llama(cfg(tie_word_embeddings=False)).save_pretrained(str(d))
    return d


def test_missing_config(saved):
    os.remove(saved / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(str(saved))


def test_missing_weights(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights found"):
        Llama.from_pretrained(str(saved))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        Llama.from_pretrained(str(tmp_path / "nope"))


def test_wrong_shape(saved):
    sd = load_file(str(saved / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(sd, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(95, 64\), expected \(96, 64\)"):
        Llama.from_pretrained(str(saved))


def test_unexpected_key(saved):
    sd = load_file(str(saved / "model.safetensors"))
    sd["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(sd, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected key 'model\.layers\.0\.extra\.weight'"):
        Llama.from_pretrained(str(saved))


def test_missing_key(saved):
    sd = load_file(str(saved / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing keys.*lm_head.weight"):
        Llama.from_pretrained(str(saved))


def test_unsupported_architecture(saved):
    c = json.loads((saved / "config.json").read_text())
    c["model_type"], c["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (saved / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported architecture"):
        Llama.from_pretrained(str(saved))


def test_unsupported_rope_type(saved):
    c = json.loads((saved / "config.json").read_text())
    c["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (saved / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match=r"config\.json: rope_scaling type 'dynamic' is not supported"):
        Llama.from_pretrained(str(saved))


def test_truncated_safetensors(saved):
    p = saved / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        Llama.from_pretrained(str(saved))


def test_missing_shard(tmp_path):
    d = tmp_path / "c"
    Llama(cfg()).save_pretrained(str(d), max_shard_size=40_000)
    shards = sorted(f for f in os.listdir(d) if f.startswith("model-000"))
    os.remove(d / shards[1])
    with pytest.raises(CheckpointError, match=r"index\.json: lists shard 'model-00002"):
        Llama.from_pretrained(str(d))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigs")
