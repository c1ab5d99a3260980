"""Reliability of files, endpoints and CLIs: no silent success, no clobbered or lost data, one-line
errors from every CLI, crash leftovers repaired, modes that follow the umask.

Run: ``python -m pytest -q tests/test_reliability_io.py``
"""
import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

from preflexor_core.infra import io as pio
from preflexor_core.datagen import NotPairsFileError, PairsFileError, nothing_produced, read_pairs
from preflexor_core.infra.errors import run_cli
from preflexor_core.teachers import TeacherAuthError, TeacherUnavailableError, check_teacher_endpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ("Spider silk is a protein fibre whose beta-sheet nanocrystals give it strength. Nacre is a "
          "brick-and-mortar composite of aragonite tablets and a thin organic matrix. Bone is a hierarchical "
          "composite of collagen fibrils and hydroxyapatite mineral.\n\n") * 6


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.md"
    p.write_text(CORPUS)
    return str(p)


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                        # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture()
def fake_server():
    """An HTTP server on 127.0.0.1: GET answers with ``state['get']``, POST with ``state['post']``."""
    state = {"get": 200, "post": 400}

    class H(http.server.BaseHTTPRequestHandler):
        def _reply(self, code):
            body = json.dumps({"data": [{"id": "m"}]} if code == 200 else {"error": {"message": "nope"}}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._reply(state["get"])

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._reply(state["post"])

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield state
    srv.shutdown()


def cli(main, argv, capsys):
    code = run_cli(main, argv)
    return code, capsys.readouterr().err.strip()


# ============================================================ 1. no silent success

def test_refused_teacher_is_one_fast_clear_error():
    url = closed_port_url()
    t0 = time.perf_counter()
    with pytest.raises(TeacherUnavailableError) as e:
        check_teacher_endpoint(url, "m")
    assert time.perf_counter() - t0 < 5                        # not ~37 s of retries per request
    msg = str(e.value)
    assert url in msg and "unreachable" in msg and "--teacher extractive" in msg
    check_teacher_endpoint("extractive")                       # no network needed: passes


def test_live_teacher_passes_and_bad_key_is_named(fake_server):
    check_teacher_endpoint(fake_server["url"], "m")
    fake_server["get"] = 404                                   # any reply means the server is there
    check_teacher_endpoint(fake_server["url"], "m")
    fake_server["get"] = 401
    with pytest.raises(TeacherAuthError, match="OPENAI_API_KEY"):
        check_teacher_endpoint(fake_server["url"], "m")


def test_datagen_refused_teacher_fails_before_work(corpus, tmp_path, capsys):
    from preflexor_core.datagen.__main__ import main
    out = tmp_path / "pairs.jsonl"
    code, err = cli(main, ["--corpus", corpus, "--out", str(out), "--teacher", closed_port_url(),
                           "--teacher-model", "m", "--no-progress"], capsys)
    assert code == 2 and err.startswith("error: --teacher") and "unreachable" in err and "\n" not in err
    assert not out.exists()                                    # no empty file, no exit 0


def test_datagen_every_row_dropped_fails_with_the_dominant_cause(corpus, tmp_path, capsys, fake_server):
    from preflexor_core.datagen.__main__ import main
    out = tmp_path / "pairs.jsonl"                             # the server answers, but rejects every request
    code, err = cli(main, ["--corpus", corpus, "--out", str(out), "--teacher", fake_server["url"],
                           "--teacher-model", "m", "--n", "3", "--embedder", "hashing", "--no-progress"], capsys)
    assert code == 2 and "every row was dropped" in err and "teacher_error" in err and "--teacher" in err
    e = nothing_produced("x", {"teacher_error": 1, "not_wrong": 5}, {"unclosed_thinking_rejected": 2})
    assert "main cause, not_wrong (5 of 8)" in str(e) and "--wrong-threshold" in str(e)


def test_train_refused_teacher_fails_before_any_stage(corpus, tmp_path):
    from preflexor_core.train import TrainConfig, Trainer
    cfg = TrainConfig.from_flat(stage="1", model="tiny", corpus=corpus, out=str(tmp_path / "run"),
                                teacher=closed_port_url(), teacher_model="m", progress=False)
    with pytest.raises(TeacherUnavailableError, match="unreachable"):
        Trainer(cfg).run()
    assert not (tmp_path / "run" / "stage1").exists()


def test_stage_with_every_pair_dropped_fails_without_done(corpus, tmp_path):
    """A random tiny policy never closes its thinking in 4 tokens: with --on-unclosed drop every stage-2
    pair is dropped; the stage fails naming that cause and writes no DONE."""
    from preflexor_core.datagen import NothingProducedError
    from preflexor_core.train import TrainConfig, Trainer
    cfg = TrainConfig.from_flat(stage="2", model="tiny", corpus=corpus, out=str(tmp_path / "run"), embedder="hashing",
                                tokenizer_vocab_size=320, progress=False, iterations=1, pairs_per_iteration=2,
                                n_steps=1, batch_size=1, k_samples=1, thinking_max_new_tokens=4,
                                sample_max_new_tokens=4, max_length=256, max_prompt_length=96, on_unclosed="drop")
    with pytest.raises(NothingProducedError, match=r"stage 2 iteration 0: every row was dropped.*unclosed_thinking"):
        Trainer(cfg).run()
    assert not (tmp_path / "run" / "stage2" / "DONE").exists()


def test_infer_refused_critic_fails_before_the_model_loads():
    from preflexor_core.reasoning.session import InferConfig, InputError, check_inputs
    cfg = InferConfig(questions=["why?"], model="smollm2-135m-instruct", critic=closed_port_url(), reflect_depth=1)
    with pytest.raises(InputError, match="--critic: critic endpoint .* is unreachable"):
        check_inputs(cfg)


# ============================================================ 2. lost or clobbered data

@pytest.mark.parametrize("content", [b"my notes\n", b"my notes", b"\n{not json}\n", b'{"id": 1, "x": 2}\n'])
def test_datagen_never_modifies_a_file_that_is_not_ours(corpus, tmp_path, capsys, content):
    from preflexor_core.datagen.__main__ import main
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    with pytest.raises(NotPairsFileError, match="not a pairs file"):
        read_pairs(notes, repair=True)
    code, err = cli(main, ["--corpus", corpus, "--out", str(notes), "--n", "1", "--no-progress"], capsys)
    assert code == 2 and "not a pairs file" in err and str(notes) in err
    assert notes.read_bytes() == content


def _row(i, **kw):
    return {"id": f"0-{i}", "prompt": "p", "chosen": "c", "rejected": "r", **kw}


def test_only_a_last_line_without_newline_is_torn(tmp_path):
    p = tmp_path / "pairs.jsonl"
    good = "".join(json.dumps(_row(i)) + "\n" for i in range(2))
    p.write_text(good + '{"id": "0-2", "prom')                 # torn: repaired
    assert [r["id"] for r in read_pairs(p, repair=True)] == ["0-0", "0-1"] and p.read_text() == good
    p.write_text(good + "garbage, complete line\n")            # newline-terminated: an error, kept as is
    with pytest.raises(PairsFileError, match=r"pairs.jsonl:3: not a valid pair row"):
        read_pairs(p, repair=True)
    assert p.read_text().endswith("garbage, complete line\n")


def test_rows_are_validated_on_read_naming_file_line_and_id(tmp_path):
    p = tmp_path / "pairs.jsonl"
    rows = [_row(0), {k: v for k, v in _row(1).items() if k != "chosen"}, _row(2)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PairsFileError, match=r"pairs.jsonl:2 \(id '0-1'\):.*'chosen' missing"):
        read_pairs(p)
    from preflexor_core.evaluation.inputs import EvaluationInputError, load_pairs
    with pytest.raises(EvaluationInputError, match=r"pairs.jsonl:2 \(id '0-1'\): field 'chosen'"):
        load_pairs(str(p))


def test_output_paths_are_checked_before_the_work(tmp_path, capsys):
    from preflexor_core.evaluation.cli import main as eval_main
    from preflexor_core.reasoning.session import InferConfig, check_inputs
    d = tmp_path / "adir"
    d.mkdir()
    f = tmp_path / "afile"
    f.write_text("x")
    for bad, what in ((d, "existing directory"), (f / "t.json", "not a directory")):
        cfg = InferConfig(questions=["q"], model="smollm2-135m-instruct", reflect_depth=0, json=str(bad))
        with pytest.raises(pio.OutputPathError, match=f"--json .*{what}"):
            check_inputs(cfg)
    # evaluation --out: checked before the models are even looked at
    code, err = cli(eval_main, ["--model", str(tmp_path / "nomodel"), "--out", str(f)], capsys)
    assert code == 2 and "--out" in err and "existing file" in err
    pio.check_output_file(tmp_path / "new" / "deeper" / "t.json")      # creatable: fine, nothing made
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only dirs")
def test_read_only_dir_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(pio.OutputPathError, match="cannot create files"):
            pio.check_output_file(ro / "t.json", "--json")
    finally:
        ro.chmod(0o700)


def test_a_failed_final_write_goes_to_a_fallback_file(tmp_path, monkeypatch):
    from preflexor_core.evaluation import cli as ecli
    from preflexor_core.reasoning.session import InferConfig, _write_json
    target = tmp_path / "trace.json"
    cfg = InferConfig(questions=["q"], json=str(target))
    pio.check_output_file(target)
    target.mkdir()                              # the path turned into a directory after the check
    with pytest.raises(pio.OutputPathError, match="saved to") as e:
        _write_json(cfg, None, [], 1.5)
    saved = str(e.value).split("saved to ")[1].split(" instead")[0]
    assert json.loads(open(saved).read())["elapsed_s"] == 1.5
    os.unlink(saved)
    calls = []

    def fake_report(results, out, **kw):
        calls.append(out)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied")
        return {"report": os.path.join(out, "report.md")}
    monkeypatch.setattr(ecli, "write_report", fake_report)
    with pytest.raises(pio.OutputPathError, match=r"--out .*written to .*preflexor-eval-"):
        ecli._write([{"name": "m"}], str(tmp_path / "eval"), None, 1)
    assert calls[0] == str(tmp_path / "eval") and os.path.isdir(calls[1])
    os.rmdir(calls[1])


# ============================================================ 3. one-line errors from every CLI

def _train_main(argv):
    sys.path.insert(0, ROOT)
    import train
    return train.main(argv)


def _infer_main(argv):
    sys.path.insert(0, ROOT)
    import infer
    return infer.main(argv)


@pytest.mark.parametrize("name", ["train", "infer", "evaluation"])
def test_bad_device_is_one_line(name, capsys, tmp_path):
    from preflexor_core.evaluation.cli import main as eval_main
    main, extra = {"train": (_train_main, []), "infer": (_infer_main, ["--question", "q"]),
                   "evaluation": (eval_main, ["--model", "x", "--out", str(tmp_path / "o")])}[name]
    code, err = cli(main, [*extra, "--device", "bogus"], capsys)
    assert code == 2 and "--device 'bogus'" in err and len(err.splitlines()) == 1
    if not torch.cuda.is_available():
        code, err = cli(main, [*extra, "--device", "cuda"], capsys)
        assert code == 2 and "--device 'cuda'" in err and "--device cpu" in err and len(err.splitlines()) == 1


def test_binary_questions_file_is_named(tmp_path, capsys):
    from preflexor_core.evaluation.cli import main as eval_main
    binary = tmp_path / "q.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    code, err = cli(_infer_main, ["--questions", str(binary)], capsys)
    assert code == 2 and str(binary) in err and "not a text file" in err and len(err.splitlines()) == 1
    code, err = cli(eval_main, ["--model", "x", "--questions", str(binary), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and str(binary) in err and "not a text file" in err


def test_module_clis_run_through_run_cli(tmp_path, capsys):
    from preflexor_core.llm.convert import main as convert_main
    from preflexor_core.teachers.__main__ import main as teachers_main
    code, err = cli(convert_main, [str(tmp_path / "none"), str(tmp_path / "o.gguf")], capsys)
    assert code == 2 and err.startswith("error:") and "not found" in err
    code, err = cli(teachers_main, ["--corpus", str(tmp_path / "none")], capsys)
    assert code == 2 and "--corpus" in err and "no such file" in err


def test_debug_env_shows_the_traceback(tmp_path):
    env = {**os.environ, "PREFLEXOR_DEBUG": "1"}
    plain = subprocess.run([sys.executable, "-m", "preflexor_core.datagen", "--corpus", str(tmp_path),
                            "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    debug = subprocess.run([sys.executable, "-m", "preflexor_core.datagen", "--corpus", str(tmp_path),
                            "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert "existing directory" in plain.stderr and "Traceback" not in plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "OutputPathError" in debug.stderr


# ============================================================ 5. leftovers of a crash

CRASH_BETWEEN_RENAMES = r"""
import os, sys
import preflexor_core.infra.io as pio
final = sys.argv[1]
pio._exchange = lambda a, b: False            # the two-rename path
real = os.rename
def rename(a, b):
    real(a, b)
    if b.endswith(".old-%d" % os.getpid()):
        os._exit(9)                             # killed right after the first rename
os.rename = rename
with pio.atomic_dir(final, carry_over=True) as tmp:   # a complete replacement
    open(os.path.join(tmp, "v"), "w").write("new")
"""


def _crash_between_renames(final):
    r = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, str(final)], cwd=ROOT, capture_output=True)
    assert r.returncode == 9, r.stderr.decode()
    assert not final.exists() and any(".old-" in n for n in os.listdir(final.parent))   # the gap


def test_crash_between_the_renames_is_recovered(tmp_path):
    final = tmp_path / "ckpt"
    with pio.atomic_dir(final) as tmp:
        open(os.path.join(tmp, "v"), "w").write("old")
    _crash_between_renames(final)
    pio.recover_dir(final)
    assert (final / "v").read_text() == "new"                  # the complete replacement moved in
    assert os.listdir(tmp_path) == ["ckpt"]                    # no temp or old dir left
    # without its replacement the old dir comes back; temp dirs of dead processes go, live ones stay
    dead = [subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True).stdout.strip() for _ in range(2)]
    final.rename(tmp_path / f"ckpt.old-{dead[0]}")
    (tmp_path / f".ckpt.tmp-{dead[1]}-x").mkdir()
    (tmp_path / f".ckpt.tmp-{os.getppid()}-y").mkdir()
    pio.recover_dir(final)
    assert (final / "v").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", f".ckpt.tmp-{os.getppid()}-y"])


def test_atomic_replace_is_one_exchange_when_the_os_has_it(tmp_path, monkeypatch):
    if pio._renameat2 is None:
        pytest.skip("renameat2 is not available on this platform (the two-rename path is tested above)")
    final = tmp_path / "d"
    with pio.atomic_dir(final) as tmp:
        open(os.path.join(tmp, "v"), "w").write("1")
    monkeypatch.setattr(os, "rename", lambda *a: pytest.fail("a rename of an existing dir leaves a gap"))
    with pio.atomic_dir(final) as tmp:
        open(os.path.join(tmp, "v"), "w").write("2")
    assert (final / "v").read_text() == "2" and os.listdir(tmp_path) == ["d"]


def test_resume_in_the_gap_continues_from_the_checkpoint(corpus, tmp_path):
    from preflexor_core.train import TrainConfig, Trainer
    kw = dict(stage="0", model="tiny", corpus=corpus, out=str(tmp_path / "run"), sft_steps=4, sft_seq_len=32,
              sft_batch_size=2, tokenizer_vocab_size=320, progress=False, seed=3, save_every=1)
    Trainer(TrainConfig.from_flat(**kw, max_steps=2)).run()
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / ".stage0.tmp-999999999-zz").mkdir()              # a temp dir of a process that is gone
    _crash_between_renames(ckpts / "stage0")                  # a save killed between its renames
    Trainer(TrainConfig.from_flat(**kw, resume=True)).run()
    rows = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl") if '"loss"' in x]
    assert [r["global_step"] for r in rows] == [1, 2, 3, 4]    # resumed at step 2, not from 0
    assert (tmp_path / "run" / "stage0" / "DONE").exists()
    assert "stage0" in os.listdir(ckpts) and not [n for n in os.listdir(ckpts) if ".tmp-" in n or ".old-" in n]


# ============================================================ 6. modes follow the umask

@pytest.mark.parametrize("umask,fmode,dmode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_saved_dirs_and_files_follow_the_umask(tmp_path, umask, fmode, dmode):
    from preflexor_core import Llama, ModelConfig
    from preflexor_core.tokenization.tokenizer import Tokenizer
    old = os.umask(umask)
    try:
        out = tmp_path / "stage"
        Llama(ModelConfig.preset("tiny").replace(vocab_size=300)).save_pretrained(str(out))
        Tokenizer.train_bpe([CORPUS], vocab_size=300).save_pretrained(str(out))
        with pio.atomic_dir(tmp_path / "other") as tmp:
            fd, _ = __import__("tempfile").mkstemp(dir=tmp)     # mkstemp's 0600 is widened too
            os.close(fd)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(out) == dmode and mode(tmp_path / "other") == dmode
    files = [out / n for n in os.listdir(out)] + [tmp_path / "other" / n for n in os.listdir(tmp_path / "other")]
    assert {"model.safetensors", "tokenizer.json"} <= {f.name for f in files}
    assert {f.name: mode(f) for f in files} == {f.name: fmode for f in files}


@pytest.mark.parametrize("flag,value", [("--n", "0"), ("--number-nodes-to-get", "0"), ("--k-samples", "0"),
                                        ("--thinking-max-new-tokens", "-1"), ("--gen-batch-size", "0"),
                                        ("--concurrency", "0"), ("--sample-temperature", "-0.5"),
                                        ("--wrong-threshold", "1.5"), ("--teacher-max-items", "0")])
def test_datagen_numeric_flags_are_checked_before_any_work(tmp_path, capsys, flag, value):
    from preflexor_core.datagen.__main__ import main as datagen_main
    corpus = tmp_path / "c.md"
    corpus.write_text("Nacre is tough because its tablets slide and interlock under load.\n")
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(SystemExit) as e:
        datagen_main(["--corpus", str(corpus), "--out", str(out), "--embedder", "hashing", flag, value])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert f"({flag})" in err and f"={float(value) if '.' in value else value}" in err and "must be" in err
