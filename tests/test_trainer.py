"""Trainer: stage 0 runs and resumes bit-identically; outputs load in transformers; CLI errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from preflexor_core.trainer import TrainConfig, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORPUS = """# Materials

Spider silk is a protein fibre whose beta-sheet nanocrystals give it strength while amorphous regions give it extensibility. Because the crystals are small, they fail gracefully under shear.

Nacre is a brick-and-mortar composite of aragonite tablets and a thin organic matrix. Tablet sliding dissipates energy, which makes nacre far tougher than pure aragonite.

Bone is a hierarchical composite of collagen fibrils and hydroxyapatite mineral. Its toughness comes from mechanisms at many length scales, from fibril sliding to crack deflection at osteons.

Wood cell walls contain cellulose microfibrils wound at an angle around the cell axis. A small microfibril angle gives a stiff wood, a large angle gives a compliant one.

A key design principle of biological materials is hierarchy: the same few building blocks are arranged differently at each length scale to reach properties that no single level could achieve.
"""


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.md"
    p.write_text(CORPUS * 3)
    return str(p)


def stage0_cfg(corpus, out, **kw):
    base = dict(stage="0", model="tiny", corpus=corpus, out=str(out), sft_steps=6, sft_seq_len=32, sft_batch_size=2,
                tokenizer_vocab_size=320, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def losses(out, stage=0):
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    return [r["loss"] for r in rows if r.get("stage") == stage and "loss" in r]


def test_stage0_trains_and_exports_hf_checkpoint(corpus, tmp_path):
    Trainer(stage0_cfg(corpus, tmp_path / "run", sft_steps=12)).run()
    out = tmp_path / "run"
    ls = losses(out)
    assert len(ls) == 12 and all(map(lambda x: x == x, ls))
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3            # it learns
    st = out / "stage0"
    assert (st / "config.json").exists() and (st / "tokenizer.json").exists() and (st / "DONE").exists()
    assert (out / "plots" / "stage0.png").exists()
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    from preflexor_core import Llama
    ours = Llama.from_pretrained(str(st)).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(st)).eval()
    x = torch.randint(0, ours.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-4


def test_stage0_resume_is_bit_identical(corpus, tmp_path):
    Trainer(stage0_cfg(corpus, tmp_path / "a")).run()
    Trainer(stage0_cfg(corpus, tmp_path / "b", max_steps=3, save_every=1)).run()
    assert not (tmp_path / "b" / "stage0" / "DONE").exists()
    assert len(losses(tmp_path / "b")) == 3
    Trainer(stage0_cfg(corpus, tmp_path / "b", resume=True)).run()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")         # bit-identical floats
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "a" / "stage0" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "stage0" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_cli_help_and_errors(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--stage" in r.stdout and "--lora-r" in r.stdout and "--resume" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "0", "--corpus",
                        str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "--corpus" in r.stderr and "missing" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "5"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dpo-loss-type", "kto"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "dpo_loss_type" in r.stderr


def test_config_validation():
    with pytest.raises(ValueError, match="n_steps=0 must be >= 1"):
        TrainConfig(n_steps=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    assert TrainConfig(model="some/dir", lora_r=64).lr_for("1") == 5e-5
    assert TrainConfig(model="some/dir").lr_for("1") == 5e-6
    assert TrainConfig(model="some/dir").lr_for("2") == 1e-6
    c = TrainConfig()
    assert (c.orpo_beta, c.dpo_beta, c.dpo_loss_type, c.label_smoothing, c.mask_mode) == \
        (0.1, 0.5, "exo_pair", 5e-3, "answer_only")
