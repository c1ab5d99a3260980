"""Nothing is lost: user folders are never written without --force-out, a run dir and a pairs file have one
writer (the second is refused naming the first's pid; a dead holder blocks nothing), duplicate pair ids are
refused, an earlier evaluation report is kept unless --overwrite, SIGTERM / SIGINT save a resumable
checkpoint and exit non-zero with one line, failed writes (ENOSPC, also from C++) are one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from preflexor_core.datagen.pairs_io import PairsFileError, PairWriter, read_pairs
from preflexor_core.infra.errors import WriteFailedError, run_cli, writing
from preflexor_core.infra.rundir import (MARKER, LockedError, NotOurFolderError, WriterLock, claim_dir,
                                         file_lock_path, run_lock_path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ("Spider silk is a protein fibre whose beta-sheet nanocrystals give it strength. Nacre is a brick-and-"
          "mortar composite of aragonite tablets and a thin organic matrix. Bone is a hierarchical composite of "
          "collagen fibrils and hydroxyapatite mineral.\n\n") * 6


def _user_folder(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "log.jsonl").write_text("my notes, not JSON\n")
    (d / "plots").mkdir()
    (d / "plots" / "training.png").write_bytes(b"my picture")
    return d


def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- --out folders ------------------------------------------------------------------------------------
def test_claim_dir_refuses_a_user_folder_unless_forced(tmp_path):
    d = _user_folder(tmp_path)
    before = _snapshot(d)
    with pytest.raises(NotOurFolderError) as e:
        claim_dir(d, "--out")
    assert "--force-out" in str(e.value) and "log.jsonl" in str(e.value)
    assert _snapshot(d) == before
    claim_dir(d, "--out", force=True)
    assert (d / MARKER).is_file()
    claim_dir(d, "--out")                       # marked: ours from now on
    claim_dir(tmp_path / "new" / "run", "--out")
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_dir(empty, "--out")
    assert (empty / MARKER).is_file()
    with pytest.raises(NotOurFolderError):
        claim_dir(d / "log.jsonl", "--out")      # a file
    legacy = tmp_path / "old-run"                 # a run of an earlier version: ours without a marker
    (legacy / "checkpoints" / "stage1").mkdir(parents=True)
    (legacy / "checkpoints" / "stage1" / "run_config.json").write_text("{}")
    (legacy / "log.jsonl").write_text("")
    claim_dir(legacy, "--out")
    assert (legacy / MARKER).is_file()


def test_train_refuses_a_user_folder_and_leaves_it_alone(tmp_path):
    from preflexor_core.train import TrainConfig, Trainer
    d = _user_folder(tmp_path)
    before = _snapshot(d)
    with pytest.raises(NotOurFolderError):
        Trainer(TrainConfig.from_flat(stage="0", model="tiny", out=str(d), progress=False))
    assert _snapshot(d) == before


def test_retriever_save_refuses_a_user_folder(tmp_path):
    from preflexor_core.retrieval import GraphRetriever
    from preflexor_core.retrieval.embedding import HashingEmbedder
    d = _user_folder(tmp_path)
    before = _snapshot(d)
    r = GraphRetriever.build([CORPUS], embedder=HashingEmbedder(32))
    with pytest.raises(NotOurFolderError):
        r.save(d)
    assert _snapshot(d) == before
    r.save(tmp_path / "ret")
    r.save(tmp_path / "ret")                     # an earlier retriever is replaced
    assert (tmp_path / "ret" / "meta.json").is_file()


def test_evaluation_keeps_an_earlier_report_unless_overwrite(tmp_path, capsys):
    from preflexor_core.evaluation.cli import check_no_report, main
    from preflexor_core.infra.io import OutputPathError
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.md").write_text("my earlier report")
    code = run_cli(main, ["--model", "tiny-does-not-exist", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    assert (out / "report.md").read_text() == "my earlier report"
    with pytest.raises(OutputPathError):
        check_no_report(str(out), overwrite=False)
    check_no_report(str(out), overwrite=True)
    check_no_report(str(tmp_path / "nothing-yet"), overwrite=False)


# -- one writer -----------------------------------------------------------------------------------------
def _holder(tmp_path, lock_path):
    """Another process holding ``lock_path`` as a writer does (flock + its pid; plain Python, so it starts
    fast), printing READY and sleeping."""
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{{os.getpid()}}\\n".encode())
        print("READY", flush=True)
        time.sleep(60)
        """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "READY"
    return p


def test_second_writer_of_a_run_dir_is_refused_naming_the_pid(tmp_path):
    run = tmp_path / "run"
    claim_dir(run)
    p = _holder(tmp_path, run_lock_path(run))
    try:
        with pytest.raises(LockedError) as e:
            WriterLock(run_lock_path(run)).acquire()
        assert f"pid {p.pid}" in str(e.value) and "\n" not in str(e.value)
        from preflexor_core.train import TrainConfig, Trainer
        with pytest.raises(LockedError):
            Trainer(TrainConfig.from_flat(stage="0", model="tiny", out=str(run), progress=False)).run()
    finally:
        p.kill()
        p.wait()
    with WriterLock(run_lock_path(run)):         # the holder died: its lock went with it
        with WriterLock(run_lock_path(run)):     # re-entrant in one process
            pass


def test_pairs_file_has_one_writer_and_readers_reject_duplicate_ids(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with PairWriter(path) as w:
        w.write({"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"})
    p = _holder(tmp_path, file_lock_path(path))
    try:
        with pytest.raises(LockedError) as e:
            PairWriter(path)
        assert f"pid {p.pid}" in str(e.value)
    finally:
        p.kill()
        p.wait()
    with PairWriter(path) as w:
        assert w.ids == {"a"}
        w.write({"id": "b", "prompt": "p", "chosen": "c", "rejected": "r"})
        with pytest.raises(Exception, match="longer than"):
            w.write({"id": "c", "prompt": "p", "chosen": "x" * (1 << 21), "rejected": "r"})
    with open(path, "a") as f:                     # what two unlocked writers left behind
        f.write(json.dumps({"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    with pytest.raises(PairsFileError) as e:
        read_pairs(path)
    assert "'a' appears again (first on line 1)" in str(e.value)


# -- failed writes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"),
                                 RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
                                 RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
                                 RuntimeError("basic_ios::clear: iostream error"),
                                 Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                           'message: "No space left on device" })')])
def test_failed_writes_become_one_line(tmp_path, exc):
    with pytest.raises(WriteFailedError) as e:
        with writing("the stage-1 checkpoint", tmp_path / "ck", "the previous checkpoint is intact"):
            raise exc
    msg = str(e.value)
    assert msg.startswith("could not write the stage-1 checkpoint to ") and "intact" in msg and "\n" not in msg

    def main(argv):
        raise exc
    assert run_cli(main, []) == 2                 # also where no ``writing`` wraps it


def test_other_errors_are_not_taken_for_write_failures():
    with pytest.raises(ValueError):
        with writing("x", "y"):
            raise ValueError("a bug")

    def main(argv):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError):
        run_cli(main, [])


def test_enospc_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from preflexor_core.train import TrainConfig, Trainer
    from preflexor_core.train import checkpointing
    corpus = tmp_path / "c.md"
    corpus.write_text(CORPUS)
    cfg = TrainConfig.from_flat(stage="0", model="tiny", corpus=str(corpus), out=str(tmp_path / "run"), sft_steps=4,
                                sft_seq_len=16, sft_batch_size=2, tokenizer_vocab_size=300, progress=False,
                                save_every=2, keep_previous=False)
    real, calls = checkpointing._write_main, []

    def failing(run, tmp, state):
        calls.append(run.pos["global_step"])
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64: iostream error")
        real(run, tmp, state)
    monkeypatch.setattr(checkpointing, "_write_main", failing)
    with pytest.raises(WriteFailedError) as e:
        Trainer(cfg).run()
    assert "stage-0 checkpoint" in str(e.value) and "is intact" in str(e.value)
    state = json.loads((tmp_path / "run" / "checkpoints" / "stage0" / "run_config.json").read_text())
    assert state["position"]["global_step"] == 2         # the previous checkpoint, whole


# -- signals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_at_the_next_step_and_resumes(tmp_path, monkeypatch, sig):
    from preflexor_core.train import TrainConfig, Trainer
    from preflexor_core.train import stage as stage_mod
    from preflexor_core.train.signals import TrainingInterrupted
    corpus = tmp_path / "c.md"
    corpus.write_text(CORPUS)
    kw = dict(stage="0", model="tiny", corpus=str(corpus), out=str(tmp_path / "run"), sft_steps=5, sft_seq_len=16,
              sft_batch_size=2, tokenizer_vocab_size=300, progress=False)
    real = stage_mod.StageRun.optimizer_step

    def step_then_signal(self, mbs):
        m = real(self, mbs)
        if self.pos["global_step"] == 1:         # during the second step
            os.kill(os.getpid(), sig)
        return m
    monkeypatch.setattr(stage_mod.StageRun, "optimizer_step", step_then_signal)
    old = signal.getsignal(sig)
    with pytest.raises(TrainingInterrupted) as e:
        Trainer(TrainConfig.from_flat(**kw)).run()
    assert signal.getsignal(sig) == old                  # handlers restored
    assert e.value.exit_code == 128 + sig and "--resume" in str(e.value) and "\n" not in str(e.value)
    ck = tmp_path / "run" / "checkpoints" / "stage0"
    assert json.loads((ck / "run_config.json").read_text())["position"]["global_step"] == 2
    assert not (tmp_path / "run" / "stage0" / "DONE").exists()
    monkeypatch.setattr(stage_mod.StageRun, "optimizer_step", real)
    Trainer(TrainConfig.from_flat(**kw, resume=True)).run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "stage0" / "DONE").exists()


def test_sigterm_to_train_py_exits_non_zero_with_one_line(tmp_path):
    corpus = tmp_path / "c.md"
    corpus.write_text(CORPUS)
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "0", "--model", "tiny",
                          "--corpus", str(corpus), "--out", str(out), "--sft-steps", "100000", "--sft-seq-len", "16",
                          "--sft-batch-size", "2", "--tokenizer-vocab-size", "300", "--no-progress"],
                         cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        log = out / "log.jsonl"
        if log.exists() and '"loss"' in log.read_text():
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "--resume" in lines[0]
    assert (out / "checkpoints" / "stage0" / "trainer_state.pt").exists()


def test_graph_eval_keeps_an_earlier_report_unless_overwrite(tmp_path, capsys):
    from preflexor_core.evaluation.graph_eval import main
    out = tmp_path / "ge"
    out.mkdir()
    (out / "table.md").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["--model", "a=b", "--retriever", str(tmp_path / "none"), "--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "table.md").read_text() == "mine"
    with pytest.raises(SystemExit):
        main(["--model", "a=b", "--retriever", "r", "--n", "1000000000", "--out", str(tmp_path / "x")])
