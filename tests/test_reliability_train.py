"""Training refuses bad input before work and never reports success for nothing: numeric ranges of
every option, --resume checks (changed flags, nothing to resume, damaged files), artefact provenance
in the run dir, no DONE for a stage without a step, one log row per step after a resume."""
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest

from preflexor_core.retrieval.chunking import CorpusError
from preflexor_core.train import Trainer, TrainConfig
from preflexor_core.train.config import SECTIONS, TrainConfigError, flag
from preflexor_core.train.provenance import BUILT_FROM, ArtefactMismatchError
from preflexor_core.train.resume import DamagedCheckpointError, ResumeError
from preflexor_core.train.stage import StageError, StageRun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("Spider silk is a protein fibre whose beta-sheet nanocrystals give it strength. Nacre is a "
        "brick-and-mortar composite of aragonite tablets and a thin organic matrix. Bone is a hierarchical "
        "composite of collagen fibrils and hydroxyapatite mineral. ") * 6


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.md"
    p.write_text(TEXT)
    return str(p)


def cfg0(corpus, out, **kw):
    base = dict(stage="0", model="tiny", corpus=corpus, out=str(out), sft_steps=4, sft_seq_len=32, sft_batch_size=2,
                tokenizer_vocab_size=300, progress=False, seed=3, embedder="hashing")
    return TrainConfig.from_flat(**{**base, **kw})


def step_rows(out, stage=0):
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return [r for r in rows if r.get("stage") == stage and "loss" in r]


# -- 1. every numeric option has a range, and a value outside it is refused naming the flag -------------
def _numeric_fields():
    for kls in SECTIONS.values():
        for f in dataclasses.fields(kls):
            if "int" in str(f.type) or "float" in str(f.type):
                yield f


def _outside(f):
    """Values outside the field's range: below the lower bound, above the upper one, NaN for floats."""
    m, is_int = f.metadata, "int" in str(f.type)
    step = 1 if is_int else 0.5
    bad = []
    if "ge" in m:
        bad.append(m["ge"] - step)
    if "gt" in m:
        bad.append(m["gt"])
    if "le" in m:
        bad.append(m["le"] + step)
    if "lt" in m:
        bad.append(m["lt"])
    if not is_int:
        bad.append(math.nan)
    return bad


def test_every_numeric_option_has_a_range_and_out_of_range_values_are_refused():
    fields = list(_numeric_fields())
    assert len(fields) >= 30
    for f in fields:
        assert any(k in f.metadata for k in ("ge", "gt", "le", "lt")), f"{f.name} has no allowed range"
        for bad in _outside(f):
            with pytest.raises(TrainConfigError) as e:
                TrainConfig.from_flat(**{f.name: bad})
            msg = str(e.value)
            assert flag(f.name) in msg and f"{f.name}={bad!r}" in msg and "must be" in msg, msg
            assert "\n" not in msg
        if f.default is not None:                          # the default itself is inside the range
            TrainConfig.from_flat(**{f.name: f.default})
    for name, bad in (("n_steps", 2.5), ("batch_size", True), ("sft_lr", "1e-3")):
        with pytest.raises(TrainConfigError, match=flag(name)):
            TrainConfig.from_flat(**{name: bad})


def test_cross_field_ranges_and_the_cli_line():
    with pytest.raises(TrainConfigError, match="max_prompt_length=128 must be < max_length=100"):
        TrainConfig.from_flat(max_length=100)
    with pytest.raises(TrainConfigError, match="--label-smoothing"):
        TrainConfig.from_flat(dpo_loss_type="exo_pair", label_smoothing=0.0)
    TrainConfig.from_flat(dpo_loss_type="sigmoid", label_smoothing=0.0)
    for args, name in ((["--max-steps", "0"], "--max-steps"), (["--max-prompt-length", "-1"], "--max-prompt-length"),
                       (["--number-nodes-to-get", "0"], "--number-nodes-to-get")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True)
        assert r.returncode == 2 and name in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "done" not in r.stdout


# -- 2. --resume: changed flags, nothing to resume ----------------------------------------------------
def test_resume_refuses_flags_that_change_training_and_notes_safe_ones(corpus, tmp_path, caplog):
    out = tmp_path / "run"
    Trainer(cfg0(corpus, out, max_steps=2, save_every=1)).run()
    assert (out / "checkpoints" / "stage0" / "run_config.json").exists()
    with pytest.raises(ResumeError) as e:
        Trainer(cfg0(corpus, out, resume=True, sft_lr=1e-2, sft_batch_size=1)).run()
    assert "--sft-lr" in str(e.value) and "--sft-batch-size" in str(e.value) and "--max-steps" not in str(e.value)
    assert len(step_rows(out)) == 2                        # refused before any work
    with caplog.at_level(logging.INFO, logger="preflexor.train"):
        Trainer(cfg0(corpus, out, resume=True, dpo_beta=0.3)).run()   # a stage-2 flag; max_steps, save_every
    assert (out / "stage0" / "DONE").exists()
    assert "--max-steps 2 -> None" in caplog.text and "--dpo-beta" not in caplog.text
    assert [r["global_step"] for r in step_rows(out)] == [1, 2, 3, 4]


def test_resume_with_nothing_to_resume_is_an_error_unless_auto(corpus, tmp_path):
    with pytest.raises(ResumeError, match="nothing to resume.*--resume=auto"):
        Trainer(cfg0(corpus, tmp_path / "typo", resume=True)).run()
    assert not (tmp_path / "typo" / "tokenizer").exists()
    Trainer(cfg0(corpus, tmp_path / "auto", resume="auto")).run()
    assert (tmp_path / "auto" / "stage0" / "DONE").exists() and len(step_rows(tmp_path / "auto")) == 4
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "0", "--model", "tiny", "--resume",
                        "--corpus", corpus, "--out", str(tmp_path / "typo2")], capture_output=True, text=True)
    assert r.returncode == 2 and "nothing to resume" in r.stderr and "Traceback" not in r.stderr


# -- 3. artefacts record what they were built from ----------------------------------------------------
def test_provenance_rebuilds_or_refuses_on_another_corpus(corpus, tmp_path):
    other = tmp_path / "other.md"
    other.write_text(TEXT.replace("silk", "wool").replace("Bone", "Wood"))
    out = tmp_path / "run"
    t = Trainer(cfg0(corpus, out))
    t.retriever()
    rec = json.loads((out / "retriever" / BUILT_FROM).read_text())
    assert rec["corpus"]["files"][0][0] == "corpus.md" and rec["settings"] == {"embedder": "hashing"}
    Trainer(cfg0(str(other), out)).retriever()             # nothing made from it yet: rebuilt
    rec2 = json.loads((out / "retriever" / BUILT_FROM).read_text())
    assert rec2["corpus"]["sha256"] != rec["corpus"]["sha256"]
    assert any("wool" in line for line in open(out / "retriever" / "chunks.jsonl"))
    (out / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ArtefactMismatchError, match="retriever.*corpus.*pairs.jsonl"):
        Trainer(cfg0(corpus, out)).retriever()
    # the tokenizer: stage 0 trained with it, so another corpus is refused; the same corpus reuses it
    Trainer(cfg0(corpus, tmp_path / "r2")).run()
    with pytest.raises(ArtefactMismatchError, match="tokenizer.*stage0"):
        Trainer(cfg0(str(other), tmp_path / "r2")).run()
    with pytest.raises(ArtefactMismatchError, match="vocab_size 300 -> 320"):
        Trainer(cfg0(corpus, tmp_path / "r2", tokenizer_vocab_size=320)).run()


def test_an_empty_corpus_leaves_no_tokenizer_and_a_leftover_one_is_rebuilt(corpus, tmp_path):
    empty = tmp_path / "empty.md"
    empty.write_text("   \n")
    out = tmp_path / "run"
    with pytest.raises(CorpusError, match="no text"):
        Trainer(cfg0(str(empty), out)).run()
    assert not (out / "tokenizer").exists()
    from preflexor_core import Tokenizer                  # what an earlier version left: 265 tokens, no record
    Tokenizer.train_bpe([""], vocab_size=300).save_pretrained(str(out / "tokenizer"))
    assert Tokenizer.from_pretrained(str(out / "tokenizer")).vocab_size < 300
    Trainer(cfg0(corpus, out)).run()
    assert Tokenizer.from_pretrained(str(out / "tokenizer")).vocab_size == 300
    assert (out / "tokenizer" / BUILT_FROM).exists() and (out / "stage0" / "DONE").exists()


# -- 4. no DONE for a stage that trained nothing ---------------------------------------------------------
def test_a_stage_without_a_step_fails_and_writes_no_done(corpus, tmp_path, monkeypatch):
    short = tmp_path / "short.md"
    short.write_text("Silk is strong. " * 3)
    with pytest.raises(ValueError, match="fewer than one block"):
        Trainer(cfg0(str(short), tmp_path / "a", sft_seq_len=512)).run()
    assert not (tmp_path / "a" / "stage0").exists()
    monkeypatch.setattr(StageRun, "train_lm", lambda self: None)       # a loop that ends without a step
    with pytest.raises(StageError, match="stage 0 trained no optimizer step"):
        Trainer(cfg0(corpus, tmp_path / "b")).run()
    assert not (tmp_path / "b" / "stage0" / "DONE").exists()


# -- 5. damaged checkpoint files ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trainer_state.pt", "model.safetensors"])
def test_a_damaged_checkpoint_names_the_file_and_the_kept_previous_one(corpus, tmp_path, name):
    Trainer(cfg0(corpus, tmp_path / "ref")).run()
    out = tmp_path / "run"
    Trainer(cfg0(corpus, out, max_steps=3, save_every=2)).run()          # checkpoints at steps 2 and 3
    ckpt = out / "checkpoints" / "stage0"
    prev = out / "checkpoints" / "stage0.prev"
    assert json.loads((prev / "run_config.json").read_text())["position"]["global_step"] == 2
    path = ckpt / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DamagedCheckpointError) as e:
        Trainer(cfg0(corpus, out, resume=True)).run()
    msg = str(e.value)
    assert str(path) in msg and "damaged" in msg and str(prev) in msg and "global step 2" in msg, msg
    shutil.rmtree(ckpt)                                    # do what the message says
    os.rename(prev, ckpt)
    Trainer(cfg0(corpus, out, resume=True)).run()
    assert [r["loss"] for r in step_rows(out)] == [r["loss"] for r in step_rows(tmp_path / "ref")]


def test_cli_reports_a_damaged_checkpoint_in_one_line(corpus, tmp_path):
    out = tmp_path / "run"
    Trainer(cfg0(corpus, out, max_steps=1)).run()
    (out / "checkpoints" / "stage0" / "trainer_state.pt").write_bytes(b"PK\x03\x04garbage")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "0", "--model", "tiny", "--resume",
                        "--corpus", corpus, "--out", str(out), "--sft-steps", "4", "--sft-seq-len", "32", "--sft-batch-size", "2",
                        "--tokenizer-vocab-size", "300", "--no-progress", "--seed", "3", "--embedder", "hashing"],
                       capture_output=True, text=True)
    err = [line for line in r.stderr.splitlines() if "error" in line]
    assert r.returncode == 2 and len(err) == 1 and "trainer_state.pt is damaged" in err[0], r.stderr
    assert "Traceback" not in r.stderr


# -- 6. one log row per step ----------------------------------------------------------------------------
def test_log_keeps_one_row_per_step_after_a_resume_and_a_rerun(corpus, tmp_path):
    out = tmp_path / "run"
    Trainer(cfg0(corpus, out, max_steps=3, save_every=2)).run()          # checkpoint at step 2, rows 1..3
    assert [r["global_step"] for r in step_rows(out)] == [1, 2, 3]
    with open(out / "log.jsonl", "a") as f:
        f.write('{"stage": 0, "global_st')                              # torn by a crash
    Trainer(cfg0(corpus, out, resume=True)).run()
    assert [r["global_step"] for r in step_rows(out)] == [1, 2, 3, 4]
    Trainer(cfg0(corpus, tmp_path / "ref")).run()
    assert [r["loss"] for r in step_rows(out)] == [r["loss"] for r in step_rows(tmp_path / "ref")]
    shutil.rmtree(out / "stage0")
    Trainer(cfg0(corpus, out)).run()                                      # a rerun without --resume
    assert [r["global_step"] for r in step_rows(out)] == [1, 2, 3, 4]
    from preflexor_core.train.plots import plot_training_log
    plot_training_log(str(out / "log.jsonl"), str(tmp_path / "plots"))
