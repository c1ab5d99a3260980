"""CPU tests of ``make gpu-check``'s pieces: the summariser (tests/gpu/summarize.py) on a synthetic
pytest-benchmark JSON + junit XML, and gpu_check.sh's refusal to run without CUDA."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "gpu" / "gpu_check.sh"


def _load_summarize():
    spec = importlib.util.spec_from_file_location("gpu_check_summarize", REPO / "tests" / "gpu" / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _load_summarize()

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="12.5">
  <testcase classname="tests.gpu.test_ops_gpu" name="test_rms_norm_cuda_fp32[shape0]" time="0.1"/>
  <testcase classname="tests.gpu.test_ops_gpu" name="test_rope_cuda" time="0.2"/>
  <testcase classname="tests.gpu.test_kernels_gpu" name="test_attention_varlen" time="3.0">
    <failure message="AssertionError: rel err 0.5">trace</failure></testcase>
  <testcase classname="tests.gpu.test_sampler_gpu" name="test_graph_decode" time="0.0">
    <error message="fixture failed">trace</error></testcase>
  <testcase classname="tests.gpu.test_ops_gpu" name="test_sample_cuda" time="0.0">
    <skipped type="pytest.skip" message="preflexor_core._C is not built">skip</skipped></testcase>
</testsuite></testsuites>
"""

JUNIT_ALL_PASS = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="2" time="1.0">
  <testcase classname="a" name="t1" time="0.5"/><testcase classname="a" name="t2" time="0.5"/>
</testsuite></testsuites>
"""


def _bench_json() -> dict:
    def b(name, group, mean, extra):
        return {"name": name, "fullname": f"tests/benchmarks/x.py::{name}", "group": group,
                "stats": {"mean": mean, "min": mean * 0.9, "stddev": mean * 0.05, "rounds": 3},
                "extra_info": extra}
    return {"machine_info": {"node": "gpu-host"}, "datetime": "2026-01-01T00:00:00",
            "benchmarks": [
                b("test_bench_attention[triton-fwd]", "attention fwd", 0.00123,
                  {"impl": "triton", "mode": "fwd", "device": "NVIDIA H100 80GB HBM3", "flops": 1.1e12,
                   "tflops": 412.3}),
                b("test_bench_orpo_step_gpu_llama32_3b_lora", "orpo step", 1.5,
                  {"tokens_per_s": 10240.5, "mfu": 0.4123, "peak_allocated_gib": 31.2, "flops_formula": "4N...",
                   "achieved_tflops": 407.7, "step_s": 1.5}),
                b("test_rms_norm_fwd_cuda_csrc", "rms", 2.5e-5, {"achieved_GBps": 2890.1, "speedup": 1.7}),
            ]}


def test_parse_junit_counts_and_names(tmp_path):
    p = tmp_path / "t.xml"
    p.write_text(JUNIT)
    r = S.parse_junit(p)
    assert (r["tests"], r["passed"], r["failed"], r["errors"], r["skipped"]) == (5, 2, 1, 1, 1)
    assert r["time_s"] == 12.5
    assert r["failures"] == ["tests.gpu.test_kernels_gpu::test_attention_varlen",
                             "tests.gpu.test_sampler_gpu::test_graph_decode"]
    assert "not built" in r["skips"][0]


def test_parse_missing_and_broken_files(tmp_path):
    assert S.parse_junit(tmp_path / "nope.xml")["status"] == "missing"
    bad = tmp_path / "bad.xml"
    bad.write_text("<testsuite><testcase")
    assert S.parse_junit(bad)["status"] == "unreadable"
    assert S.parse_bench(tmp_path / "nope.json") == {"status": "missing", "file": str(tmp_path / "nope.json"),
                                                     "benchmarks": []}


def test_parse_bench_and_pick_extra(tmp_path):
    p = tmp_path / "bench.json"
    p.write_text(json.dumps(_bench_json()))
    r = S.parse_bench(p)
    assert r["status"] == "ok" and r["machine"] == "gpu-host" and len(r["benchmarks"]) == 3
    attn = r["benchmarks"][0]
    assert attn["mean_s"] == pytest.approx(0.00123) and attn["rounds"] == 3
    picked = S.pick_extra(attn["extra_info"])
    assert picked == {"impl": "triton", "tflops": 412.3}      # device / raw flops / strings not asked for are left out
    orpo = S.pick_extra(r["benchmarks"][1]["extra_info"])
    assert list(orpo)[:3] == ["achieved_tflops", "mfu", "tokens_per_s"]   # PREFERRED order
    assert "flops_formula" not in orpo


def test_parse_steps(tmp_path):
    p = tmp_path / "steps.tsv"
    p.write_text("build\t0\t95\t180\ntests\t124\t100\t100\nmalformed line\n")
    steps = S.parse_steps(p)
    assert steps == {"build": {"rc": 0, "seconds": 95, "limit_s": 180, "timed_out": False},
                     "tests": {"rc": 124, "seconds": 100, "limit_s": 100, "timed_out": True}}


def test_summarize_and_table():
    env = {"card": "NVIDIA H100 80GB HBM3", "driver": "550.54", "torch": "2.13.0", "torch_cuda": "12.8",
           "triton": "3.9.0", "date": "2026-01-01T00:00:00+00:00", "extension_loaded": True,
           "extension_devices": ["cpu", "cuda"]}
    bench = {"status": "ok", "benchmarks": [dict(name=b["name"], group=b["group"], mean_s=b["stats"]["mean"],
                                                 min_s=None, stddev_s=None, rounds=3, extra_info=b["extra_info"])
                                            for b in _bench_json()["benchmarks"]]}
    passing = {"status": "ok", "tests": 2, "passed": 2, "failed": 0, "errors": 0, "skipped": 0, "time_s": 1.0,
               "failures": [], "skips": []}
    steps = {n: {"rc": 0, "seconds": 10, "limit_s": 100, "timed_out": False} for n in ("build", "tests", "benchmarks")}
    good = S.summarize(steps, passing, passing, bench, env, elapsed_s=300)
    assert good["ok"] and good["card"] == "NVIDIA H100 80GB HBM3" and good["failed_steps"] == []
    table = S.format_table(good)
    assert table.splitlines()[0].startswith("gpu-check OK: NVIDIA H100 80GB HBM3 | driver 550.54")
    assert "tests/gpu: 2 passed, 0 failed" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("test_bench_orpo_step_gpu_llama32_3b_lora"))
    assert "1.500 s" in line and "tokens_per_s=1.024e+04" in line and "mfu=0.4123" in line
    assert "1.230 ms" in next(ln for ln in table.splitlines() if ln.startswith("test_bench_attention"))
    assert "25.0 us" in table and "achieved_GBps=2890" in table

    steps["tests"] = {"rc": 124, "seconds": 100, "limit_s": 100, "timed_out": True}
    steps["build"] = {"rc": 1, "seconds": 5, "limit_s": 180, "timed_out": False}
    bad = S.summarize(steps, passing, passing, bench, env, build_log_tail=["error: nvcc failed"])
    assert not bad["ok"] and bad["failed_steps"] == ["build", "tests"]
    assert bad["build"]["log_tail"] == ["error: nvcc failed"]
    assert "step tests: rc 124 (timed out) after 100 s" in S.format_table(bad)

    steps = {n: {"rc": 0, "seconds": 10, "limit_s": 100, "timed_out": False} for n in ("build", "tests", "benchmarks")}
    skipped = dict(passing, passed=0, skipped=2)
    cpu_ext = dict(env, extension_devices=["cpu"])
    hollow = S.summarize(steps, skipped, passing, bench, cpu_ext)
    assert not hollow["ok"] and len(hollow["warnings"]) == 2     # nothing passed; no CUDA kernels built
    assert "warning: the compiled extension has no CUDA kernels" in S.format_table(hollow)


def test_main_writes_json_and_exit_status(tmp_path, capsys):
    (tmp_path / "t.xml").write_text(JUNIT)
    (tmp_path / "ok.xml").write_text(JUNIT_ALL_PASS)
    (tmp_path / "bench.json").write_text(json.dumps(_bench_json()))
    (tmp_path / "steps.tsv").write_text("build\t0\t60\t180\ntests\t1\t30\t150\nbenchmarks\t0\t100\t200\n")
    out = tmp_path / "out"
    args = ["--out", str(out), "--steps", str(tmp_path / "steps.tsv"), "--tests", str(tmp_path / "t.xml"),
            "--bench-tests", str(tmp_path / "ok.xml"), "--bench", str(tmp_path / "bench.json"), "--elapsed", "200",
            "--no-env"]
    assert S.main(args) == 1                                   # a failed and an errored test
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["ok"] is False and data["elapsed_s"] == 200 and data["date"]
    assert data["tests"]["failed"] == 1 and data["benchmark_tests"]["passed"] == 2
    assert [b["name"] for b in data["benchmarks"]["benchmarks"]][1] == "test_bench_orpo_step_gpu_llama32_3b_lora"
    printed = capsys.readouterr().out
    assert "FAILED tests.gpu.test_kernels_gpu::test_attention_varlen" in printed

    (tmp_path / "steps.tsv").write_text("build\t0\t60\t180\ntests\t0\t30\t150\nbenchmarks\t0\t100\t200\n")
    args[args.index("--tests") + 1] = str(tmp_path / "ok.xml")
    assert S.main(args) == 0
    assert json.loads((out / "gpu_check.json").read_text())["ok"] is True
    args[args.index("--bench") + 1] = str(tmp_path / "missing.json")
    assert S.main(args) == 1                                   # no benchmark JSON: not a pass


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal; this machine has CUDA")
def test_gpu_check_exits_2_without_cuda(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu-check needs CUDA" in proc.stderr
    assert not (tmp_path / "out" / "build.log").exists()       # nothing was built
