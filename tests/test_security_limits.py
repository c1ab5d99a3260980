"""Model sizes and numeric flags are bounded before anything is allocated: a config.json or GGUF header
past the limits or this machine's memory is one clear error naming the size and the limit, fast."""
from __future__ import annotations

import json
import time

import pytest

from preflexor_core import Llama, ModelConfig
from preflexor_core.llm.limits import LIMITS, ModelSizeError, check_config_fits

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _hf_dir(tmp_path, **over):
    cfg = ModelConfig(**TINY)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**cfg.to_hf_dict(), **over}))
    return d


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 10**8), ("hidden_size", 2**40),
                                         ("vocab_size", 10**9), ("intermediate_size", 10**12),
                                         ("num_attention_heads", 10**6), ("max_position_embeddings", 10**12),
                                         ("num_hidden_layers", 1e8)])
def test_config_json_past_a_limit_is_refused_before_building(tmp_path, field, value):
    d = _hf_dir(tmp_path, **{field: value})
    t0 = time.monotonic()
    with pytest.raises(ModelSizeError) as e:
        Llama.from_pretrained(str(d))
    assert time.monotonic() - t0 < 2.0
    msg = str(e.value)
    assert f"{field}={int(value)}" in msg and str(LIMITS[field]) in msg and "\n" not in msg


def test_config_that_does_not_fit_memory_names_size_and_limit():
    big = dict(TINY, num_hidden_layers=1000, hidden_size=65536, intermediate_size=262144, vocab_size=262144,
               num_attention_heads=512, num_key_value_heads=512)
    with pytest.raises(ModelSizeError) as e:
        check_config_fits(big, source="x/config.json", available=64 << 30)
    assert "64.0 GiB" in str(e.value) and "TiB" in str(e.value) and "x/config.json" in str(e.value)
    assert check_config_fits(TINY, available=1 << 30) == check_config_fits(ModelConfig(**TINY), available=1 << 30)
    with pytest.raises(ModelSizeError):                # the tiny one does not fit in 1 KiB either
        check_config_fits(TINY, available=1024)


def test_estimate_is_close_to_the_real_count():
    cfg = ModelConfig(**TINY)
    est = check_config_fits(cfg, available=1 << 40) // 4
    n = Llama(cfg, device="meta").num_parameters()
    assert abs(est - n) <= 0.05 * n


def test_a_normal_checkpoint_still_loads(tmp_path):
    model = Llama(ModelConfig(**TINY))
    model.save_pretrained(str(tmp_path / "ok"))
    again = Llama.from_pretrained(str(tmp_path / "ok"))
    assert again.config.num_hidden_layers == 2


def _gguf(tmp_path, **over):
    gguf = pytest.importorskip("gguf", reason="the gguf package writes the test file")
    import numpy as np
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    meta = {"block_count": 2, "embedding_length": 32, "feed_forward_length": 64, "attention.head_count": 4,
            "attention.head_count_kv": 2, "context_length": 128, **over}
    for k, v in meta.items():
        w.add_uint32(f"llama.{k}", int(v))
    w.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("key,field", [("block_count", "num_hidden_layers"), ("embedding_length", "hidden_size"),
                                       ("feed_forward_length", "intermediate_size")])
def test_gguf_header_past_a_limit_is_refused_before_building(tmp_path, key, field):
    path = _gguf(tmp_path, **{key: 100_000_000})
    t0 = time.monotonic()
    with pytest.raises(ModelSizeError) as e:
        Llama.from_pretrained(str(path))
    assert time.monotonic() - t0 < 2.0
    assert f"{field}=100000000" in str(e.value) and str(LIMITS[field]) in str(e.value)


@pytest.mark.parametrize("flags", [{"batch_size": 10**9}, {"n_steps": 10**9}, {"k_samples": 10**9},
                                   {"thinking_max_new_tokens": 10**9}, {"sample_temperature": float("nan")},
                                   {"lora_alpha": float("inf")}, {"grpo_temperature": float("nan")},
                                   {"pairs_per_iteration": 10**12}, {"n_steps": 100_000, "batch_size": 4096},
                                   {"teacher_timeout": float("inf")}, {"max_reply_bytes": 1 << 40},
                                   {"grpo_prompts": 4096, "num_generations": 256}, {"seed": -1}])
def test_train_flags_are_bounded(flags):
    from preflexor_core.train.config import TrainConfig, TrainConfigError
    with pytest.raises(TrainConfigError) as e:
        TrainConfig.from_flat(**flags)
    assert "--" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv", [["--k-samples", "1000000000"], ["--batch-size", "1000000000"],
                                  ["--max-new-tokens", "1000000000"], ["--temperature", "nan"],
                                  ["--temperature", "inf"], ["--n", "1000000000000"], ["--teacher-timeout", "nan"],
                                  ["--max-reply-bytes", "0"], ["--concurrency", "100000"]])
def test_datagen_flags_are_bounded(tmp_path, argv, capsys):
    from preflexor_core.datagen.__main__ import main
    corpus = tmp_path / "c.txt"
    corpus.write_text("Nacre is tough.")
    with pytest.raises(SystemExit) as e:
        main(["--corpus", str(corpus), "--out", str(tmp_path / "p.jsonl"), *argv])
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--max-new-tokens", "1000000000"], ["--temperature", "nan"],
                                  ["--temperature", "inf"], ["--reflect-depth", "100000"], ["--seed", "-1"]])
def test_infer_flags_are_bounded_before_the_model_loads(argv, capsys, monkeypatch):
    import importlib.util
    import os
    from preflexor_core.llm import registry as models
    from preflexor_core.infra.errors import run_cli
    spec = importlib.util.spec_from_file_location(
        "infer_cli", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "infer.py"))
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(models, "load_model_and_tokenizer", no_load)
    assert run_cli(infer.main, ["--model", "tiny", "--question", "q", *argv]) == 2
    err = capsys.readouterr().err
    assert argv[0] in err and err.count("\n") == 1
