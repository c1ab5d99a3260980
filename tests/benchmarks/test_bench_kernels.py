"""Benchmarks for the fused kernels (pytest-benchmark).

Run: ``make bench`` (= ``python -m pytest tests/benchmarks --benchmark-only``), or just this file:
``python -m pytest tests/benchmarks/test_bench_kernels.py --benchmark-only -q``.

- Attention (CUDA only): Triton flash attention vs torch SDPA, forward / backward / forward+backward,
  bf16, with TFLOP/s in ``extra_info`` (forward FLOPs 4*B*Hq*T*S*D, halved when causal; backward
  2.5x forward). On CPU these skip: the Triton interpreter's timings mean nothing.
- Log-probs: time of the chunked / fused path vs ``log_softmax(hidden @ weight.T).gather`` and its
  peak memory. On CPU the peak is measured in a fresh subprocess per variant (peak RSS over one
  forward+backward, minus the RSS just before it); the chunked path must use <= 0.25x the naive
  path's extra memory at N=4096, H=512, V=32000. On CUDA: ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from preflexor_core.kernels.reference import linear_logprobs_chunked

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="attention benchmarks need CUDA: Triton interpreter timings on "
                                                 "CPU are meaningless")


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _record_tflops(benchmark, flops: float) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.mean > 0:
        benchmark.extra_info["tflops"] = round(flops / stats.stats.mean / 1e12, 2)
    benchmark.extra_info["flops"] = flops


# ----------------------------------------------------------------------------- attention (CUDA)
ATTN_SHAPES = [  # (B, Hq, Hkv, T, D, causal)
    (4, 32, 8, 2048, 128, True),
    (1, 32, 8, 8192, 128, True),
    (4, 32, 8, 2048, 128, False),
    (4, 16, 16, 2048, 64, True),
]


def _attn_impl(name):
    import torch.nn.functional as F

    from preflexor_core.kernels.attention import flash_attention as triton_flash

    if name == "triton":
        return lambda q, k, v, causal: triton_flash(q, k, v, causal, None, None, None, None, None)
    return lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "sdpa"])
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("B,Hq,Hkv,T,D,causal", ATTN_SHAPES)
def test_bench_attention(benchmark, impl, mode, B, Hq, Hkv, T, D, causal):
    fn = _attn_impl(impl)
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    fwd_flops = 4.0 * B * Hq * T * T * D * (0.5 if causal else 1.0)
    benchmark.group = f"attention {mode} B{B} Hq{Hq} Hkv{Hkv} T{T} D{D} {'causal' if causal else 'full'}"
    benchmark.extra_info.update(impl=impl, mode=mode, device=torch.cuda.get_device_name())

    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v, causal)
            _sync()
        flops = fwd_flops
    elif mode == "bwd":
        out = fn(q, k, v, causal)

        def run():
            torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
            _sync()
        flops = 2.5 * fwd_flops
    else:
        def run():
            torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)
            _sync()
        flops = 3.5 * fwd_flops
    run()                                   # compile / autotune outside the timing
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    _record_tflops(benchmark, flops)


# ----------------------------------------------------------------------------- log-probs
def _naive_logprobs(hidden, weight, labels):
    logp = torch.log_softmax(hidden.float() @ weight.float().T, dim=-1)
    keep = labels != -100
    picked = logp.gather(1, torch.where(keep, labels, 0)[:, None])[:, 0]
    return torch.where(keep, picked, torch.zeros_like(picked))


def _logprob_impl(name):
    if name == "naive":
        return _naive_logprobs
    if CUDA:
        from preflexor_core.kernels import linear_logprobs
        return linear_logprobs
    return linear_logprobs_chunked


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_bench_logprobs_time(benchmark, impl):
    """fwd+bwd time; CPU: N=1024, H=512, V=32000 fp32 (2-core friendly); CUDA: N=8192, H=3072, V=128256 bf16."""
    if CUDA:
        N, H, V, dtype, dev = 8192, 3072, 128256, torch.bfloat16, "cuda"
    else:
        N, H, V, dtype, dev = 1024, 512, 32000, torch.float32, "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(N, H, device=dev, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device=dev, dtype=dtype, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,), device=dev, generator=g)
    fn = _logprob_impl(impl)
    benchmark.group = f"logprobs fwd+bwd N{N} H{H} V{V} {dtype} {dev}"
    benchmark.extra_info.update(impl="fused triton" if (impl == "chunked" and CUDA) else impl)

    def run():
        lp = fn(hidden, weight, labels)
        torch.autograd.grad(lp.sum(), (hidden, weight))
        _sync()

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    benchmark.pedantic(run, rounds=3 if CUDA else 2, iterations=1, warmup_rounds=1 if CUDA else 0)
    _record_tflops(benchmark, 2.0 * N * V * H * (3 if impl == "naive" else 4))


_MEM_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    impl, N, H, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    from preflexor_core.kernels.reference import linear_logprobs_chunked
    def naive(hidden, weight, labels):
        logp = torch.log_softmax(hidden @ weight.T, dim=-1)
        return logp.gather(1, labels[:, None])[:, 0]
    fn = linear_logprobs_chunked if impl == "chunked" else naive
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    try:                               # reset the peak-RSS mark so setup does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = rss_kib()
    lp = fn(hidden, weight, labels)
    lp.sum().backward()
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    peak = hwm if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"impl": impl, "base_kib": base, "peak_kib": peak, "extra_kib": peak - base,
                      "hwm_reset": reset}))
""")


def _peak_extra_mib(impl: str, N: int, H: int, V: int) -> dict:
    env = dict(os.environ, BENCH_THREADS=os.environ.get("BENCH_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, impl, str(N), str(H), str(V)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read from /proc (Linux only)")
def test_bench_logprobs_cpu_peak_memory(benchmark):
    """Peak extra RSS of one fwd+bwd at N=4096, H=512, V=32000 fp32, one fresh process per variant."""
    N, H, V = 4096, 512, 32000
    results = {}

    def measure():
        results["chunked"] = _peak_extra_mib("chunked", N, H, V)
        results["naive"] = _peak_extra_mib("naive", N, H, V)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    chunked, naive = results["chunked"]["extra_kib"], results["naive"]["extra_kib"]
    ratio = chunked / naive
    benchmark.group = "logprobs peak memory (CPU, subprocess per variant)"
    benchmark.extra_info.update(N=N, H=H, V=V, chunked_extra_mib=round(chunked / 1024, 1),
                                naive_extra_mib=round(naive / 1024, 1), ratio=round(ratio, 3),
                                logits_mib=round(N * V * 4 / 2**20, 1))
    print(f"\nlogprobs peak extra RSS: chunked {chunked / 1024:.0f} MiB, naive {naive / 1024:.0f} MiB, "
          f"ratio {ratio:.3f}")
    assert ratio <= 0.25, f"chunked path peak memory is {ratio:.2f}x the naive path (target <= 0.25x)"
