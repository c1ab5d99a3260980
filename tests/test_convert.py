"""python -m preflexor_core.convert: HF folder -> GGUF (checked with transformers' GGUF loader), GGUF -> HF -> GGUF.

The Q8_0 bound: one weight is rounded by at most 1/254 of its block's max |w| (half a step); over
the 2-layer test model's 15 quantized matmuls the errors add up like a random walk (sqrt(15) ~ 4),
so max |logit error| <= 4/254 of max |logit|.
Run: .venv/bin/python -m pytest -q tests/test_convert.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

gguf = pytest.importorskip("gguf")

from preflexor_core import Llama, ModelConfig, Tokenizer  # noqa: E402
from preflexor_core.llm.convert import ConvertError, main  # noqa: E402
from preflexor_core.thinking.tokens import THINKING_TOKENS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["Nacre is made of aragonite platelets and a protein matrix 2024.",
         "Spider silk is a protein fibre; beta-sheet crystals make it strong."] * 10
IDS = torch.tensor([[0, 5, 17, 40, 99, 120, 7, 250, 3, 64, 11, 200]])


@pytest.fixture
def hf_folder(tmp_path):
    tok = Tokenizer.train_bpe(TEXTS, vocab_size=300)     # thinking tokens are among its special tokens
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=4)
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    folder = str(tmp_path / "hf")
    model.save_pretrained(folder)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder, model, tok


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).float()


def test_hf_to_q8_gguf_loads_in_transformers_with_q8_error(hf_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder, model, tok = hf_folder
    out = str(tmp_path / "out" / "m.gguf")
    os.makedirs(os.path.dirname(out))
    assert main([folder, out, "--dtype", "q8_0"]) == 0
    r = gguf.GGUFReader(out)
    assert {t.tensor_type.name for t in r.tensors if len(t.shape) == 2} == {"Q8_0"}
    assert r.fields["general.architecture"].contents() == "llama"
    ref = _logits(model)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(out), gguf_file="m.gguf",
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        hf = theirs(IDS).logits
    ours = _logits(Llama.from_pretrained(out))
    rel = ((hf - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 4 / 254, f"transformers vs source: {rel:.2e}"
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-5)   # both loaders see the same dequantized weights


def test_thinking_tokens_are_control_tokens_and_template_travels(hf_folder, tmp_path):
    folder, _, tok = hf_folder
    out = str(tmp_path / "m.gguf")
    main([folder, out])
    r = gguf.GGUFReader(out)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    for t in THINKING_TOKENS:
        assert types[tokens.index(t)] == 3, t            # CONTROL
    assert types[tokens.index("a")] == 1                  # NORMAL
    assert r.fields["tokenizer.chat_template"].contents() == CHATML
    assert r.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert "blk.0.attn_q.weight" in {t.name for t in r.tensors} and "output.weight" in {t.name for t in r.tensors}
    t2 = Tokenizer.from_pretrained(out)
    s = "Nacre <|thinking|> is strong <|/thinking|> 2024"
    assert t2.encode(s) == tok.encode(s)


def test_gguf_to_hf_to_gguf_keeps_template_tokens_and_weights(hf_folder, tmp_path):
    folder, model, _ = hf_folder
    first, back, second = str(tmp_path / "a.gguf"), str(tmp_path / "hf2"), str(tmp_path / "b.gguf")
    main([folder, first, "--dtype", "f32"])
    main([first, back])
    with open(os.path.join(back, "tokenizer_config.json"), encoding="utf-8") as f:
        assert json.load(f)["chat_template"] == CHATML
    assert Tokenizer.from_pretrained(back).chat_template == CHATML
    torch.testing.assert_close(_logits(Llama.from_pretrained(back)), _logits(model), rtol=0, atol=1e-5)
    main([back, second, "--dtype", "f32"])
    a, b = gguf.GGUFReader(first), gguf.GGUFReader(second)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.chat_template", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "llama.block_count", "llama.attention.head_count_kv"):
        assert a.fields[key].contents() == b.fields[key].contents(), key
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.name == tb.name and (ta.data == tb.data).all(), ta.name


def test_cli_help_and_bad_input(hf_folder, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = lambda *a: subprocess.run([sys.executable, "-m", "preflexor_core.convert", *a], cwd=ROOT, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    h = run("--help")
    assert h.returncode == 0 and "SRC" in h.stdout and "q8_0" in h.stdout and ".gguf" in h.stdout
    missing = run(str(tmp_path / "nope"), str(tmp_path / "x.gguf"))
    assert missing.returncode == 2 and "nope: not found" in missing.stderr and "Traceback" not in missing.stderr
    folder, _, _ = hf_folder
    with pytest.raises(ConvertError, match="must be a .gguf file name"):
        main([folder, str(tmp_path / "out_dir")])
    with pytest.raises(ConvertError, match="cannot be written to GGUF"):
        main([folder, str(tmp_path / "x.gguf"), "--dtype", "q4_k"])
    g = str(tmp_path / "m.gguf")
    main([folder, g])
    with pytest.raises(ConvertError, match="is a GGUF block type"):
        main([g, str(tmp_path / "hf"), "--dtype", "q8_0"])
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + b"\0" * 64)
    bad = run(str(tmp_path / "bad.gguf"), str(tmp_path / "o"))
    assert bad.returncode == 2 and "wrong magic" in bad.stderr
