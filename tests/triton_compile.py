"""Compile every Triton kernel of the project for NVIDIA targets with no GPU present.

Triton's active driver is replaced by a fake CUDA driver that reports a chosen target
(``GPUTarget("cuda", 90, 32)`` for an H100) and its shared memory per block; every
``kernel[grid](...)`` inside the project's own launchers becomes a compile-only
``kernel.run(..., warmup=True)``. The launchers get meta tensors (no memory, no data), so they
choose their tile configurations exactly as they would on that GPU, and Triton compiles each
launch down to a cubin with the ``ptxas`` shipped in its wheel. ``TRITON_INTERPRET`` must be unset:
run this file as its own process (``tests/test_triton_compile.py`` does).

Per launch it records: the grid (checked against CUDA's launch limits), the shared memory
(checked against the target's limit), registers and spill bytes from the ptxas log (checked
against ``SPILL_BOUND``), and whether every ``tl.dot`` runs on tensor cores (mma on sm_8x,
wgmma on sm_90; IEEE fp32 dots have no tensor-core form and must be FMA dots instead).

    python tests/triton_compile.py --set quick --json out.json     # the CI set (sm_80 and sm_90)
    python tests/triton_compile.py --set full                      # make compile-check (sm_80/86/89/90)

Results are cached on disk per (case, target), keyed by a hash of the kernel sources, this file
and the Triton version (``PREFLEXOR_COMPILE_CACHE``, default ``~/.cache/preflexor/triton-compile``;
``--no-cache`` ignores it). Exit status 1 when any launch fails a check.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KB = 1024
# Shared memory per block (opt-in maximum) and SM count of one card of each target.
TARGETS = {80: (163 * KB, 108), 86: (99 * KB, 84), 89: (99 * KB, 128), 90: (227 * KB, 132)}
# Spill stores a kernel may have (bytes). Zero: every configuration the launchers choose must fit
# in registers; a spill is a performance bug to fix in the configuration tables.
SPILL_BOUND = 0
GRID_X_MAX, GRID_YZ_MAX = 2**31 - 1, 65535
VOCABS = {"llama3": (128256, 3072), "smollm2": (49152, 576)}


def _attention_cases(full: bool) -> list[tuple[dict, tuple[int, ...]]]:
    base = dict(op="attention", dtype="bfloat16", d=128, hq=8, hkv=2, t=384, causal=True, varlen=False,
                precision="highest")
    fp32 = dict(base, dtype="float32", d=64, hq=4, hkv=4, varlen=True)
    if not full:        # every kernel on sm_80 and sm_90; IEEE and TF32 fp32 on one target each
        return [(base, (80, 90)), (fp32, (90,)), (dict(fp32, precision="high"), (80,))]
    every = (80, 86, 89, 90)
    cases = []
    for dtype in ("float16", "bfloat16", "float32"):
        for d in (64, 128, 256):
            for prec in (("highest", "high") if dtype == "float32" else ("highest",)):
                cases.append((dict(base, dtype=dtype, d=d, precision=prec), every))
    cases += [(c, every) for c in (
        dict(base, causal=False), dict(base, hkv=8), dict(base, hq=24, hkv=8), dict(base, varlen=True),
        dict(base, hq=24, hkv=8, d=128, t=1, s=4096),                             # decode step
        dict(base, hq=24, hkv=8, d=128, t=1024, s=1024))]                         # Llama-3.2-3B
    return cases


def _logprobs_cases(full: bool) -> list[tuple[dict, tuple[int, ...]]]:
    base = dict(op="logprobs", dtype="bfloat16", n=1000, v=32000, h=576, precision="highest")
    if not full:
        return [(base, (80, 90)), (dict(base, dtype="float32"), (90,)),
                (dict(base, dtype="float32", precision="high"), (80,))]
    cases = []
    for name, (v, h) in VOCABS.items():
        for dtype in ("float16", "bfloat16", "float32"):
            for prec in (("highest", "high") if dtype == "float32" else ("highest",)):
                n = 3072 if name == "llama3" else 576
                cases.append((dict(base, dtype=dtype, n=n, v=v, h=h, precision=prec), (80, 86, 89, 90)))
    return cases


def cases(which: str) -> list[tuple[dict, int]]:
    full = which == "full"
    return [(c, cap) for c, caps in _attention_cases(full) + _logprobs_cases(full) for cap in caps]


def case_id(case: dict, cap: int) -> str:
    return f"sm_{cap}:" + ",".join(f"{k}={v}" for k, v in sorted(case.items()))


def source_hash() -> str:
    """Hash of what a launch record depends on: the Triton version, the kernel package and the code
    here that makes the records (the checks run again on every read, so they may change freely)."""
    import inspect
    import triton
    h = hashlib.sha256(triton.__version__.encode())
    for p in sorted((ROOT / "preflexor_core" / "kernels").glob("*.py")):
        h.update(p.name.encode() + p.read_bytes())
    for fn in (_install_fake_driver, _ptxas_info, _dots, _capture_launches, _run_case):
        h.update(inspect.getsource(fn).encode())
    h.update(repr(TARGETS).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- fake target
def _install_fake_driver(cap: int):
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver

    max_shared, sms = TARGETS[cap]

    class _Utils:
        @staticmethod
        def get_device_properties(index):
            return {"max_shared_mem": max_shared, "multiprocessor_count": sms, "max_num_regs": 65536,
                    "warpSize": 32}

    class FakeCudaDriver(DriverBase):
        """Reports one CUDA card of compute capability ``cap``; launches nothing."""
        utils = _Utils()

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", cap, 32)

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_benchmarker(self):
            raise RuntimeError("the fake CUDA driver compiles only")

        def get_current_device(self):
            return cap          # one Triton kernel cache per target

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(FakeCudaDriver())


def _ptxas_info(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    if not regs:
        return {}
    return {"regs": int(regs[-1]), "spill_stores": int(stores[-1]) if stores else 0,
            "spill_loads": int(loads[-1]) if loads else 0}


def _dots(ttgir: str) -> tuple[int, int]:
    """(dots, dots on tensor cores) in the TTGIR: a tensor-core dot has an NVIDIA mma result layout."""
    lines = [ln for ln in ttgir.splitlines() if re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", ln)]
    return len(lines), sum(1 for ln in lines if re.search(r"#mma\d*>|nvidia_mma", ln.split(" -> ")[-1]))


def _capture_launches(records: list):
    import triton
    from triton import knobs
    from triton.runtime.jit import JITFunction

    knobs.nvidia.dump_ptxas_log = True

    def getitem(self, grid):
        def launch(*args, **kwargs):
            rec = {"kernel": self.fn.__name__, "grid": [int(g) for g in grid]}
            rec.update({k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")})
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            except Exception as e:                                   # noqa: BLE001 - reported per launch
                rec["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
                records.append(rec)
                return None
            info = _ptxas_info(buf.getvalue())
            if info:
                kernel._preflexor_ptxas = info
            rec.update(getattr(kernel, "_preflexor_ptxas", {}))
            rec["shared"] = int(kernel.metadata.shared)
            rec["dots"], rec["tensor_core_dots"] = _dots(kernel.asm["ttgir"])
            records.append(rec)
            return kernel
        return launch

    JITFunction.__getitem__ = getitem
    return triton


def _run_case(case: dict, cap: int) -> list[dict]:
    import torch
    torch.set_float32_matmul_precision(case["precision"])
    from preflexor_core.kernels import attention, logprobs

    records: list[dict] = []
    _capture_launches(records)
    _install_fake_driver(cap)
    dt = getattr(torch, case["dtype"])
    meta = dict(device="meta", dtype=dt)
    if case["op"] == "attention":
        hq, hkv, t, d = case["hq"], case["hkv"], case["t"], case["d"]
        s = case.get("s", t)
        if case["varlen"]:
            q, k = torch.empty(2 * t, hq, d, **meta), torch.empty(2 * t, hkv, d, **meta)
            cu, mx = torch.empty(3, dtype=torch.int32, device="meta"), t
        else:
            q, k = torch.empty(2, hq, t, d, **meta), torch.empty(2, hkv, s, d, **meta)
            cu, mx = None, None
        o, lse = attention.flash_attention_forward(q, k, k, case["causal"], d ** -0.5, cu, mx)
        attention.flash_attention_backward(o, q, k, k, o, lse, case["causal"], d ** -0.5, cu, mx)
    else:
        n, v, h = case["n"], case["v"], case["h"]
        hid, w = torch.empty(n, h, **meta), torch.empty(v, h, **meta)
        labels = torch.empty(n, dtype=torch.long, device="meta")
        logp, lse = logprobs.linear_logprobs_forward(hid, w, labels, -100)
        logprobs.linear_logprobs_backward(torch.empty(n, device="meta"), hid, w, labels, lse, -100, True, True)
    return records


def check(rec: dict, cap: int, precision: str, dtype: str) -> list[str]:
    """What is wrong with one launch record (empty when it passes)."""
    if "error" in rec:
        return [f"compile error: {rec['error']}"]
    bad = []
    limit = TARGETS[cap][0]
    if rec["shared"] > limit:
        bad.append(f"shared memory {rec['shared']} B > sm_{cap}'s {limit} B per block")
    if "regs" not in rec:
        bad.append("no ptxas register report")
    elif rec["spill_stores"] > SPILL_BOUND:
        bad.append(f"{rec['spill_stores']} B of spill stores > bound {SPILL_BOUND} B ({rec['regs']} registers)")
    x, *yz = rec["grid"] + [1] * (3 - len(rec["grid"]))
    if not (1 <= x <= GRID_X_MAX and all(1 <= g <= GRID_YZ_MAX for g in yz)):
        bad.append(f"grid {rec['grid']} outside CUDA's launch limits (x < 2^31, y/z <= 65535)")
    ieee = dtype == "float32" and precision == "highest"
    want = 0 if ieee else rec["dots"]
    if rec["tensor_core_dots"] != want:
        bad.append(f"{rec['tensor_core_dots']} of {rec['dots']} dots on tensor cores, expected {want}"
                   + (" (IEEE fp32 has no tensor-core form)" if ieee else ""))
    return bad


def _worker(job: tuple[dict, int]) -> tuple[str, list[dict], float]:
    case, cap = job
    # One Triton cache per worker process: a kernel that another worker already compiled would be
    # read from a shared cache without running ptxas, and its register report would be missing.
    os.environ["TRITON_CACHE_DIR"] = os.path.join(os.environ["PREFLEXOR_COMPILE_TMP"], str(os.getpid()))
    t0 = time.perf_counter()
    try:
        recs = _run_case(case, cap)
    except Exception as e:                                          # noqa: BLE001 - a launcher failed
        recs = [{"kernel": "<launcher>", "error": f"{type(e).__name__}: {e}"}]
    return case_id(case, cap), recs, time.perf_counter() - t0


def run(which: str, jobs: int, use_cache: bool) -> dict:
    import triton
    cache_dir = Path(os.environ.get("PREFLEXOR_COMPILE_CACHE", Path.home() / ".cache/preflexor/triton-compile"))
    cache_file = cache_dir / f"{source_hash()}.json"
    cached = json.loads(cache_file.read_text()) if use_cache and cache_file.exists() else {}
    todo = [(c, cap) for c, cap in cases(which) if case_id(c, cap) not in cached]
    t0 = time.perf_counter()

    def save():
        if use_cache:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            ok = {k: v for k, v in cached.items() if not any("error" in r for r in v["records"])}
            tmp.write_text(json.dumps(ok))                          # failures compile again next time
            tmp.replace(cache_file)

    if todo:
        with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(todo)))) as pool:
            for i, (cid, recs, secs) in enumerate(pool.map(_worker, todo)):
                cached[cid] = {"records": recs, "seconds": round(secs, 2)}
                if i % 8 == 7:
                    save()                                          # an interrupted run keeps its work
    save()
    results = []
    for c, cap in cases(which):
        entry = cached[case_id(c, cap)]
        for rec in entry["records"]:
            rec = dict(rec, case=case_id(c, cap), target=cap,
                       problems=check(rec, cap, c["precision"], c["dtype"]))
            results.append(rec)
    return {"triton": triton.__version__, "set": which, "compiled": len(todo), "cached": len(cases(which)) - len(todo),
            "seconds": round(time.perf_counter() - t0, 1), "launches": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=("quick", "full"), default="quick")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write every launch record here")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every launch, not only failures")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("triton_compile: TRITON_INTERPRET=1 turns every kernel into Python; unset it", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tdir:
        os.environ["PREFLEXOR_COMPILE_TMP"] = tdir                  # fresh caches: ptxas runs and reports
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        sys.path.insert(0, str(ROOT))
        report = run(args.set, args.jobs, not args.no_cache)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    failed = [r for r in report["launches"] if r["problems"]]
    for r in report["launches"]:
        if r["problems"] or args.verbose:
            blocks = {k: v for k, v in r.items() if k.startswith("BLOCK_") or k in ("num_warps", "num_stages")}
            print(f"{'FAIL' if r['problems'] else 'ok  '} {r['case']} {r['kernel']} grid={r.get('grid')} {blocks} "
                  f"shared={r.get('shared')} regs={r.get('regs')} spill={r.get('spill_stores')} "
                  f"dots={r.get('tensor_core_dots')}/{r.get('dots')} {'; '.join(r['problems'])}")
    print(f"triton {report['triton']}: {len(report['launches'])} launches, {len(failed)} failing "
          f"({report['compiled']} cases compiled, {report['cached']} cached, {report['seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
