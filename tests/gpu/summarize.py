"""Summarise a ``make gpu-check`` run: print a short table, write ``gpu_check.json``.

Inputs (all optional; a missing file is reported as missing, not an error):
  --steps        tab-separated lines "name rc seconds limit" written by gpu_check.sh
  --build-log    the extension build log (its tail goes into the JSON when the build failed)
  --tests        junit XML of ``pytest tests/gpu``
  --bench-tests  junit XML of the benchmark run (benchmarks can fail their own asserts)
  --bench        pytest-benchmark JSON (``--benchmark-json``)

    python tests/gpu/summarize.py --out tests/benchmarks/results/latest --tests .../gpu-tests.xml ...

The JSON also records the card (``torch.cuda.get_device_name``), driver, torch / CUDA / triton
versions, whether the compiled extension loaded (and for which devices), the git commit and the
date (UTC). Exit status: 0 when every step finished with rc 0, at least one GPU test passed and
none failed, and the benchmark JSON exists; else 1.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# extra_info keys shown in the table first (in this order); other numeric keys follow, up to MAX_EXTRA.
PREFERRED = ("impl", "variant", "tflops", "achieved_tflops", "mfu", "tokens_per_s", "decode_tok_s",
             "prefill_tok_s", "achieved_GBps", "weight_bandwidth_gb_s", "speedup", "memory_ratio", "ratio",
             "step_s", "step_ms", "peak_extra_mib", "peak_allocated_gib", "peak_extra_gib")
SKIP = {"flops", "device", "flops_formula", "peak_bf16_flops"}
MAX_EXTRA = 6


# ----------------------------------------------------------------------------- parsing
def parse_junit(path: str | os.PathLike | None) -> dict:
    """Counts of a junit XML file: tests, passed, failed, errors, skipped, time_s, and the ids of the
    failed / errored tests. ``{"status": "missing"}`` when the file does not exist."""
    if not path or not Path(path).is_file():
        return {"status": "missing", "file": str(path) if path else None}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"status": "unreadable", "file": str(path), "error": str(e)}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    out = {"status": "ok", "file": str(path), "tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
           "time_s": 0.0, "failures": [], "skips": []}
    for suite in suites:
        out["time_s"] += float(suite.get("time", 0) or 0)
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
            out["tests"] += 1
            if case.find("failure") is not None:
                out["failed"] += 1
                out["failures"].append(name)
            elif case.find("error") is not None:
                out["errors"] += 1
                out["failures"].append(name)
            elif case.find("skipped") is not None:
                out["skipped"] += 1
                msg = case.find("skipped").get("message", "")
                out["skips"].append(f"{name}: {msg}"[:200])
            else:
                out["passed"] += 1
    out["time_s"] = round(out["time_s"], 2)
    return out


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def pick_extra(extra: dict) -> dict:
    """The extra_info items worth a table column: preferred keys first, then other numbers."""
    picked = {k: extra[k] for k in PREFERRED if k in extra and extra[k] is not None}
    for k, v in extra.items():
        if len(picked) >= MAX_EXTRA:
            break
        if k not in picked and k not in SKIP and _numeric(v):
            picked[k] = v
    return dict(list(picked.items())[:MAX_EXTRA])


def parse_bench(path: str | os.PathLike | None) -> dict:
    """pytest-benchmark JSON -> {"status", "machine", "benchmarks": [{name, group, mean_s, min_s,
    stddev_s, rounds, extra_info}]}."""
    if not path or not Path(path).is_file():
        return {"status": "missing", "file": str(path) if path else None, "benchmarks": []}
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        return {"status": "unreadable", "file": str(path), "error": str(e), "benchmarks": []}
    rows = []
    for b in data.get("benchmarks", []):
        st = b.get("stats") or {}
        rows.append({"name": b.get("name") or b.get("fullname"), "group": b.get("group"),
                     "mean_s": st.get("mean"), "min_s": st.get("min"), "stddev_s": st.get("stddev"),
                     "rounds": st.get("rounds"), "extra_info": b.get("extra_info") or {}})
    return {"status": "ok", "file": str(path), "datetime": data.get("datetime"),
            "machine": (data.get("machine_info") or {}).get("node"), "benchmarks": rows}


def parse_train_smoke(path: str | os.PathLike | None) -> dict:
    """The smoke test's record (tokens/s, peak memory, MFU per step), or why it is missing."""
    if not path or not Path(path).exists():
        return {"status": "missing"}
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        return {"status": "failed", "error": f"unreadable {path}: {e}"}


def parse_steps(path: str | os.PathLike | None) -> dict:
    """gpu_check.sh's steps file -> {name: {rc, seconds, limit_s, timed_out}}."""
    steps = {}
    if not path or not Path(path).is_file():
        return steps
    for line in Path(path).read_text().splitlines():
        parts = line.split("\t")
        if len(parts) != 4:
            continue
        name, rc, secs, limit = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
        steps[name] = {"rc": rc, "seconds": secs, "limit_s": limit, "timed_out": rc in (124, 137)}
    return steps


def log_tail(path: str | os.PathLike | None, lines: int = 30) -> list[str]:
    if not path or not Path(path).is_file():
        return []
    return Path(path).read_text(errors="replace").splitlines()[-lines:]


# ----------------------------------------------------------------------------- environment
def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def collect_env() -> dict:
    """Card, driver, versions, extension status, git commit, date. Imports torch (call on the GPU host)."""
    env: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "python": sys.version.split()[0], "git_commit": _run(["git", "rev-parse", "HEAD"])}
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if smi:
        parts = [p.strip() for p in smi.splitlines()[0].split(",")]
        env["driver"] = parts[1] if len(parts) > 1 else None
        env["nvidia_smi"] = smi.splitlines()
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["card"] = torch.cuda.get_device_name(0)
            env["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
            env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
            env["device_count"] = torch.cuda.device_count()
    except Exception as e:   # report, never fail the summary
        env["torch_error"] = repr(e)
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = None
        env["triton_error"] = repr(e)
    try:
        from preflexor_core.llm import ops
        env["extension_loaded"] = bool(ops._HAVE_EXT)
        env["extension_devices"] = sorted(ops._EXT_DEVICES)
    except Exception as e:
        env["extension_loaded"] = False
        env["extension_error"] = repr(e)
    return env


# ----------------------------------------------------------------------------- summary
def summarize(steps: dict, tests: dict, bench_tests: dict, bench: dict, env: dict,
              build_log_tail: list[str] | None = None, elapsed_s: int | None = None) -> dict:
    build = dict(steps.get("build", {"rc": None}))
    if build.get("rc") not in (0, None) and build_log_tail:
        build["log_tail"] = build_log_tail
    failed_steps = [n for n, s in steps.items() if s["rc"] != 0]
    bad_tests = sum(t.get("failed", 0) + t.get("errors", 0) for t in (tests, bench_tests))
    warnings = []
    if tests.get("status") == "ok" and tests.get("passed", 0) == 0:
        warnings.append("no test in tests/gpu passed (all skipped?)")
    if "extension_devices" in env and "cuda" not in env["extension_devices"]:
        warnings.append("the compiled extension has no CUDA kernels: the csrc CUDA tests and benchmarks skipped")
    ok = (not failed_steps and bad_tests == 0 and tests.get("status") == "ok" and tests.get("passed", 0) > 0
          and bench.get("status") == "ok" and "build" in steps)
    return {"ok": ok, "elapsed_s": elapsed_s, **{k: env.get(k) for k in ("card", "date")}, "env": env,
            "warnings": warnings, "build": build, "steps": steps, "failed_steps": failed_steps, "tests": tests,
            "benchmark_tests": bench_tests, "benchmarks": bench}


def _fmt_num(v) -> str:
    if isinstance(v, bool) or not _numeric(v):
        return str(v)
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.3g}"
    return f"{v:.4g}"


def _fmt_time(s) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.3f} ms"
    return f"{s:.3f} s"


def format_table(summary: dict) -> str:
    env = summary.get("env", {})
    lines = [f"gpu-check {'OK' if summary['ok'] else 'FAILED'}: {env.get('card', '?')} | driver {env.get('driver')} "
             f"| torch {env.get('torch')} (CUDA {env.get('torch_cuda')}) | triton {env.get('triton')} "
             f"| {env.get('date')}"]
    b = summary["build"]
    lines.append(f"build: rc {b.get('rc')} in {b.get('seconds', '-')} s; extension loaded: "
                 f"{env.get('extension_loaded')} {env.get('extension_devices', '')}")
    for label, t in (("tests/gpu", summary["tests"]), ("benchmarks", summary["benchmark_tests"])):
        if t.get("status") != "ok":
            lines.append(f"{label}: junit {t.get('status')}")
            continue
        lines.append(f"{label}: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped ({t['time_s']} s)")
        lines += [f"  FAILED {n}" for n in t["failures"]]
    for name in summary["failed_steps"]:
        s = summary["steps"][name]
        lines.append(f"step {name}: rc {s['rc']}{' (timed out)' if s['timed_out'] else ''} after {s['seconds']} s")
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    rows = summary["benchmarks"].get("benchmarks", [])
    if summary["benchmarks"].get("status") != "ok":
        lines.append(f"benchmarks: json {summary['benchmarks'].get('status')}")
    elif rows:
        width = min(max(len(r["name"]) for r in rows), 70)
        lines.append(f"{'benchmark':<{width}}  {'mean':>11}  extra_info")
        for r in rows:
            extra = ", ".join(f"{k}={_fmt_num(v)}" for k, v in pick_extra(r["extra_info"]).items())
            lines.append(f"{r['name'][:width]:<{width}}  {_fmt_time(r['mean_s']):>11}  {extra}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Summarise a make gpu-check run (table + gpu_check.json).")
    ap.add_argument("--out", required=True, help="directory for gpu_check.json")
    ap.add_argument("--steps", help="gpu_check.sh steps file (name, rc, seconds, limit; tab-separated)")
    ap.add_argument("--build-log", help="extension build log")
    ap.add_argument("--tests", help="junit XML of pytest tests/gpu")
    ap.add_argument("--bench-tests", help="junit XML of the benchmark run")
    ap.add_argument("--bench", help="pytest-benchmark JSON")
    ap.add_argument("--train-smoke", help="train_smoke.json of tests/gpu/smoke_train.py")
    ap.add_argument("--elapsed", type=int, help="seconds the whole check took")
    ap.add_argument("--no-env", action="store_true", help="do not import torch / query the GPU (for tests)")
    args = ap.parse_args(argv)
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")} if args.no_env else collect_env()
    summary = summarize(parse_steps(args.steps), parse_junit(args.tests), parse_junit(args.bench_tests),
                        parse_bench(args.bench), env, log_tail(args.build_log), args.elapsed)
    summary["train_smoke"] = parse_train_smoke(args.train_smoke)
    if summary["train_smoke"].get("status") == "failed":
        summary["ok"] = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    print(format_table(summary))
    print(f"-> {out / 'gpu_check.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
