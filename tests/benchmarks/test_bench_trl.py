"""Training step vs TRL: one ORPO and one EXO step of ours against TRL's ORPOTrainer / DPOTrainer.

    python -m pytest tests/benchmarks/test_bench_trl.py --benchmark-only -s
    PREFLEXOR_BENCH_TRL_QUICK=1 python -m pytest tests/benchmarks/test_bench_trl.py --benchmark-only -s

The work, the settings and what is compared are described in ``trl_step.py``. Each side runs in its
own subprocess; this module asserts that both sides trained on the same batches (hashes of the token
ids and scored positions per step), that the EXO losses agree, and that TRL's ORPO losses agree with
our ORPO step computed with TRL's NLL definition (prompt tokens included). Our product ORPO loss
(completion-only NLL) is reported next to TRL's, not compared. bf16 autocast runs on every CPU (emulated
where it is not native; the JSON records ``native_cpu_bf16``). The full run writes
``results/trl-step-2026-12-07-<cpu>.json``; quick mode (``PREFLEXOR_BENCH_TRL_QUICK=1``) writes into its
run folder. Needs the bench dependencies (``pip install -r requirements-bench.txt``: TRL).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_step import REPO, default_run_dir, settings

from preflexor_core.llm.cpu_features import cpu_isa, cpu_model, native_cpu_bf16

HERE = Path(__file__).resolve().parent
DATE = "2026-12-07"
QUICK = os.environ.get("PREFLEXOR_BENCH_TRL_QUICK", "") not in ("", "0")
LOSS_ATOL = {"fp32": 1e-3, "bf16": 5e-2}      # per step, absolute (step 1: same weights, same batch)
FIRST_STEP_ATOL = {"fp32": 1e-4, "bf16": 2e-2}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                reason="TRL is not installed (bench-only dependency: "
                                       "pip install -r requirements-bench.txt)")


def _native_bf16() -> bool:
    """``native_cpu_bf16`` of the hardware: the CPU suite's conftest pins PREFLEXOR_CPU_BF16=0 for its own
    numbers, which must not decide whether this benchmark's bf16 runs happen."""
    saved = os.environ.pop("PREFLEXOR_CPU_BF16", None)
    try:
        return native_cpu_bf16()
    finally:
        if saved is not None:
            os.environ["PREFLEXOR_CPU_BF16"] = saved


def _threads() -> int:
    return int(os.environ.get("PREFLEXOR_BENCH_THREADS", torch.get_num_threads()))


def _cpu_slug() -> str:
    name = cpu_model().lower()
    name = re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*", " ", name)
    words = [w for w in re.split(r"[^a-z0-9]+", name) if w][:3]
    return "-".join(words + [f"{os.cpu_count()}core"])


def _worker(*args: str) -> dict:
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TQDM_DISABLE="1", HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(HERE / "trl_step.py"), "--threads", str(_threads())] + (["--quick"] if QUICK else [])
    proc = subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _side_summary(r: dict) -> dict:
    return {"median_step_s": round(r["median_step_s"], 3), "step_times_s": [round(t, 3) for t in r["step_times"]],
            "losses": r["losses"], "peak_rss_mib": round(r["peak_rss_kib"] / 1024, 1),
            "loadavg_1min": r["loadavg_1min"], "wall_s": round(r["wall_s"], 1), "layout": r.get("layout"),
            "tokens_per_step": r.get("tokens")}


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def _compare(objective: str, dtype: str) -> dict:
    ours = _worker("--side", "ours", "--objective", objective, "--dtype", dtype)
    trl = _worker("--side", "trl", "--objective", objective, "--dtype", dtype)
    padded = _worker("--side", "ours", "--objective", objective, "--dtype", dtype, "--layout", "padded")
    assert ours["digests"] == trl["digests"] == padded["digests"], "the sides trained on different batches"
    out = {"objective": objective, "dtype": dtype, "ours": _side_summary(ours), "trl": _side_summary(trl),
           "ours_padded": _side_summary(padded),
           "speed_ratio_trl_over_ours": round(trl["median_step_s"] / ours["median_step_s"], 3),
           "speed_ratio_trl_over_ours_padded": round(trl["median_step_s"] / padded["median_step_s"], 3),
           "peak_rss_ratio_ours_over_trl": round(ours["peak_rss_kib"] / trl["peak_rss_kib"], 3),
           "tokens_per_step": ours["tokens"][:len(ours["losses"])],
           "trl_native_tokenisation": trl["trl_native_tokenisation"]}
    if objective == "exo":
        ref = ours
        out["loss_agreement"] = {"compared": "ours vs TRL (same math)"}
    else:
        ref = _worker("--side", "ours", "--objective", "orpo", "--dtype", dtype, "--orpo-nll", "full") \
            if dtype == "fp32" else None
        out["loss_agreement"] = {"compared": "ours with TRL's NLL (prompt + completion) vs TRL",
                                 "note": "our product ORPO NLL counts the completion only; TRL's counts the "
                                         "prompt too, so those losses differ by design"}
        if ref is not None:
            out["ours_trl_nll"] = _side_summary(ref)
            assert ref["digests"] == trl["digests"]
    if ref is not None:
        first, worst = abs(ref["losses"][0] - trl["losses"][0]), _max_diff(ref["losses"], trl["losses"])
        out["loss_agreement"].update(step1_abs_diff=first, max_abs_diff=worst,
                                     max_abs_diff_after_step1=_max_diff(ref["losses"][1:], trl["losses"][1:]))
        assert first <= FIRST_STEP_ATOL[dtype], out["loss_agreement"]
        assert worst <= LOSS_ATOL[dtype], out["loss_agreement"]
    else:
        out["loss_agreement"]["skipped"] = "the TRL-NLL variant of ours runs in fp32 only"
    return out


_results: dict[str, dict] = {}


@pytest.fixture(scope="module")
def prepared():
    return _worker("--prepare")


def _write(prepared: dict) -> Path:
    s = settings(QUICK)
    res = {"date": DATE, "cpu_model": cpu_model(), "cpu_slug": _cpu_slug(), "isa_path": cpu_isa(),
           "native_cpu_bf16": _native_bf16(), "torch": torch.__version__, "torch_threads": _threads(),
           "trl": importlib.metadata.version("trl"), "transformers": importlib.metadata.version("transformers"),
           "mode": s.name, "prepare": prepared, "runs": _results,
           "speed_ratio": "TRL median step time / ours (> 1: ours faster)",
           "peak_rss_ratio": "ours peak RSS / TRL peak RSS (< 1: ours smaller)"}
    path = (default_run_dir(s) / f"trl-step-{DATE}-{_cpu_slug()}.json" if QUICK
            else HERE / "results" / f"trl-step-{DATE}-{_cpu_slug()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():          # a run of some of the cases (-k) keeps the others' results
        old = json.loads(path.read_text())
        if old.get("mode") == s.name:
            res["runs"] = {**old.get("runs", {}), **_results}
    path.write_text(json.dumps(res, indent=1) + "\n")
    return path


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("objective", ["orpo", "exo"])
def test_bench_trl_step(benchmark, prepared, objective, dtype):
    assert prepared["logits_max_abs_diff"] < 1e-3, prepared
    res = {}
    benchmark.pedantic(lambda: res.update(_compare(objective, dtype)), rounds=1, iterations=1)
    benchmark.group = "training step vs TRL (CPU, subprocess per side)"
    # bf16 runs on every CPU (emulated where it is not native); the JSON records native_cpu_bf16
    benchmark.extra_info.update(objective=objective, dtype=dtype, native_cpu_bf16=_native_bf16(),
                                ours_step_s=res["ours"]["median_step_s"],
                                trl_step_s=res["trl"]["median_step_s"], speed_ratio=res["speed_ratio_trl_over_ours"],
                                peak_rss_ratio=res["peak_rss_ratio_ours_over_trl"])
    _results[f"{objective}-{dtype}"] = res
    path = _write(prepared)
    print(f"\n[{objective} {dtype}] ours {res['ours']['median_step_s']:.2f} s/step, TRL "
          f"{res['trl']['median_step_s']:.2f} s/step (TRL/ours {res['speed_ratio_trl_over_ours']:.2f}); peak RSS "
          f"ours {res['ours']['peak_rss_mib']} MiB, TRL {res['trl']['peak_rss_mib']} MiB; "
          f"losses {json.dumps(res['loss_agreement'])} -> {os.path.relpath(path, REPO)}")
