"""Benchmarks of the compiled csrc ops against the torch paths they replace (pytest-benchmark).

CPU: rms_norm forward and forward+backward vs torch eager at [4096, 3072] fp32; sample vs the
sort-based torch reference (top-p 0.9) at V=128256 with B=1 and B=32.
GPU (skipped without CUDA): the same on the device, with the achieved rms_norm bandwidth.

Each `*_csrc` benchmark also times its torch baseline in the same process and stores both medians
and the speedup in extra_info; the `*_torch` benchmarks give the baseline its own row in the table.

    python -m pytest tests/benchmarks/test_bench_ops.py --benchmark-only
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from preflexor_core.llm import ops

needs_ext = pytest.mark.skipif(not ops._HAVE_EXT, reason="preflexor_core._C is not built (pip install -e .)")
needs_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops._HAVE_EXT and "cuda" in ops._EXT_DEVICES),
    reason="needs a CUDA device and preflexor_core._C built with CUDA kernels")

ROWS, HIDDEN, VOCAB = 4096, 3072, 128256


@pytest.fixture(autouse=True)
def _csrc_path(monkeypatch):
    monkeypatch.delenv("PREFLEXOR_KERNELS", raising=False)


def _median_ms(fn, reps: int, sync=None) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _record(benchmark, baseline_ms: float, name: str):
    ours_ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update({f"{name}_median_ms": round(baseline_ms, 4), "csrc_median_ms": round(ours_ms, 4),
                                 "speedup": round(baseline_ms / ours_ms, 2)})
    print(f"\n{benchmark.name}: csrc {ours_ms:.3f} ms, {name} {baseline_ms:.3f} ms, speedup {baseline_ms / ours_ms:.2f}x")


def _rms_inputs(device="cpu", requires_grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(ROWS, HIDDEN, generator=g, device=device).requires_grad_(requires_grad)
    w = torch.randn(HIDDEN, generator=g, device=device).requires_grad_(requires_grad)
    return x, w


def _fwd_bwd(fn, x, w, gy):
    def run():
        x.grad = w.grad = None
        fn(x, w, 1e-6).backward(gy)
    return run


# ----------------------------------------------------------------------------- CPU
@pytest.mark.benchmark(group="rms_norm fwd cpu [4096,3072] fp32")
def test_rms_norm_fwd_cpu_torch(benchmark):
    x, w = _rms_inputs()
    benchmark(ops.rms_norm_reference, x, w, 1e-6)


@needs_ext
@pytest.mark.benchmark(group="rms_norm fwd cpu [4096,3072] fp32")
def test_rms_norm_fwd_cpu_csrc(benchmark):
    x, w = _rms_inputs()
    with torch.no_grad():
        benchmark(ops.rms_norm, x, w, 1e-6)
        _record(benchmark, _median_ms(lambda: ops.rms_norm_reference(x, w, 1e-6), 15), "torch_eager")


@pytest.mark.benchmark(group="rms_norm fwd+bwd cpu [4096,3072] fp32")
def test_rms_norm_fwd_bwd_cpu_torch(benchmark):
    x, w = _rms_inputs(requires_grad=True)
    benchmark(_fwd_bwd(ops.rms_norm_reference, x, w, torch.randn(ROWS, HIDDEN)))


@needs_ext
@pytest.mark.benchmark(group="rms_norm fwd+bwd cpu [4096,3072] fp32")
def test_rms_norm_fwd_bwd_cpu_csrc(benchmark):
    x, w = _rms_inputs(requires_grad=True)
    gy = torch.randn(ROWS, HIDDEN)
    benchmark(_fwd_bwd(ops.rms_norm, x, w, gy))
    _record(benchmark, _median_ms(_fwd_bwd(ops.rms_norm_reference, x, w, gy), 10), "torch_eager")


def _sample_args(B, device="cpu"):
    g = torch.Generator(device=device).manual_seed(1)
    logits = torch.randn(B, VOCAB, generator=g, device=device) * 2
    return logits, 1.0, 0, 0.9, torch.arange(B, device=device)


@pytest.mark.parametrize("B", [1, 32])
def test_sample_cpu_sort_reference(benchmark, B):
    benchmark.group = f"sample cpu V={VOCAB} B={B} top_p=0.9"
    benchmark(ops.sample_reference, *_sample_args(B))


@needs_ext
@pytest.mark.parametrize("B", [1, 32])
def test_sample_cpu_csrc(benchmark, B):
    benchmark.group = f"sample cpu V={VOCAB} B={B} top_p=0.9"
    args = _sample_args(B)
    benchmark(ops.sample, *args)
    _record(benchmark, _median_ms(lambda: ops.sample_reference(*args), 10), "torch_sort_reference")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.benchmark(group="rms_norm fwd cuda [4096,3072] fp32")
def test_rms_norm_fwd_cuda_csrc(benchmark):
    x, w = _rms_inputs("cuda")
    sync = torch.cuda.synchronize

    def run():
        ops.rms_norm(x, w, 1e-6)
        sync()
    with torch.no_grad():
        benchmark(run)
        _record(benchmark, _median_ms(lambda: ops.rms_norm_reference(x, w, 1e-6), 50, sync), "torch_eager")
    moved = (2 * x.numel() + w.numel()) * x.element_size() + ROWS * 4      # read x, w; write y, rstd
    benchmark.extra_info["achieved_GBps"] = round(moved / benchmark.stats.stats.median / 1e9, 1)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.benchmark(group="rms_norm fwd+bwd cuda [4096,3072] fp32")
def test_rms_norm_fwd_bwd_cuda_csrc(benchmark):
    x, w = _rms_inputs("cuda", requires_grad=True)
    gy = torch.randn(ROWS, HIDDEN, device="cuda")
    ours, base = _fwd_bwd(ops.rms_norm, x, w, gy), _fwd_bwd(ops.rms_norm_reference, x, w, gy)
    sync = torch.cuda.synchronize
    benchmark(lambda: (ours(), sync()))
    _record(benchmark, _median_ms(base, 30, sync), "torch_eager")
    # forward: read x, w, write y, rstd; backward: read grad_y, x, w, rstd, write grad_x (+ small grad_w)
    moved = (5 * x.numel() + 2 * w.numel()) * x.element_size() + 2 * ROWS * 4
    benchmark.extra_info["achieved_GBps"] = round(moved / benchmark.stats.stats.median / 1e9, 1)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("B", [1, 32])
def test_sample_cuda_csrc(benchmark, B):
    benchmark.group = f"sample cuda V={VOCAB} B={B} top_p=0.9"
    args = _sample_args(B, "cuda")
    sync = torch.cuda.synchronize
    benchmark(lambda: (ops.sample(*args), sync()))
    _record(benchmark, _median_ms(lambda: ops.sample_reference(*args), 30, sync), "torch_sort_reference")
