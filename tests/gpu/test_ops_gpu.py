"""CUDA kernels of preflexor_core._C (rms_norm, rope, sample) against the torch references.

Runs only on a machine with CUDA and an extension built with CUDA sources:
    python -m pytest -q tests/gpu/test_ops_gpu.py
"""
from __future__ import annotations

import pytest
import torch

from preflexor_core.llm import ops

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops._HAVE_EXT and "cuda" in ops._EXT_DEVICES),
    reason="needs a CUDA device and preflexor_core._C built with CUDA kernels")

DEV = "cuda"
BF16_ULP = 2.0 ** -8


@pytest.fixture(autouse=True)
def _csrc_path(monkeypatch):
    monkeypatch.setenv("PREFLEXOR_KERNELS", "csrc")


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grad_out)
    return [o.detach() for o in outs], [t.grad for t in inputs]


def _assert_no_worse(got, ref, exact, what):
    """bf16: kernel (fp32 math, one rounding) no worse than the torch bf16 path + one bf16 ulp."""
    scale = exact.abs().max().item() + 1e-12
    err_got = (got.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    assert err_got <= err_ref + BF16_ULP * scale, f"{what}: kernel error {err_got} vs reference error {err_ref}"


@pytest.mark.parametrize("shape", [(1, 17), (7, 96), (33, 3072), (4096, 3072), (3, 5, 4097)])
def test_rms_norm_cuda_fp32(shape):
    torch.manual_seed(0)
    x, w, gy = torch.randn(shape, device=DEV) * 3, torch.randn(shape[-1], device=DEV), torch.randn(shape, device=DEV)
    (y,), (gx, gw) = _grads(lambda a, b: ops.rms_norm(a, b, 1e-6), [x, w], [gy])
    (yr,), (gxr, gwr) = _grads(lambda a, b: ops.rms_norm_reference(a, b, 1e-6), [x, w], [gy])
    # fp32 with different reduction orders (block tree vs torch): relative ~1e-6
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gxr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, gwr, rtol=1e-4, atol=1e-3)   # sums over up to 4096 rows


@pytest.mark.parametrize("shape", [(7, 96), (33, 3072)])
def test_rms_norm_cuda_bf16(shape):
    torch.manual_seed(1)
    x = (torch.randn(shape, device=DEV) * 2).bfloat16()
    w = (torch.rand(shape[-1], device=DEV) + 0.5).bfloat16()
    gy = torch.randn(shape, device=DEV).bfloat16()
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ops.rms_norm_reference(x, w, 1e-6), rtol=2 * BF16_ULP, atol=0)
    (_,), (gx, gw) = _grads(lambda a, b: ops.rms_norm(a, b, 1e-6), [x, w], [gy])
    (_,), (gxr, gwr) = _grads(lambda a, b: ops.rms_norm_reference(a, b, 1e-6), [x, w], [gy])
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    (wd * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6))).backward(gy.double())
    _assert_no_worse(gx, gxr, xd.grad, "grad_x")
    _assert_no_worse(gw, gwr, wd.grad, "grad_weight")


def test_rms_norm_cuda_gradcheck():
    x = torch.randn(5, 17, device=DEV, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, device=DEV, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-6), (x, w))


def _cos_sin(B, T, D, dtype=torch.float32):
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64, device=DEV) / D)
    freqs = torch.arange(T, dtype=torch.float64, device=DEV)[None, :, None].expand(B, T, 1) * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("B,Hq,Hkv,T,D", [(1, 4, 2, 1, 8), (2, 3, 1, 7, 18), (2, 32, 8, 257, 128)])
def test_rope_cuda(B, Hq, Hkv, T, D):
    torch.manual_seed(2)
    q = torch.randn(B, T, Hq, D, device=DEV).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, device=DEV).transpose(1, 2)
    cos, sin = _cos_sin(B, T, D)
    gq, gk = torch.randn(B, Hq, T, D, device=DEV), torch.randn(B, Hkv, T, D, device=DEV)
    (qo, ko), (dq, dk) = _grads(lambda a, b: ops.rope(a, b, cos, sin), [q, k], [gq, gk])
    (qr, kr), (dqr, dkr) = _grads(lambda a, b: ops.rope_reference(a, b, cos, sin), [q, k], [gq, gk])
    # nvcc may contract a*b + c into an FMA: a few fp32 ulp
    for got, ref in ((qo, qr), (ko, kr), (dq, dqr), (dk, dkr)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_rope_cuda_gradcheck_arbitrary_cos_sin():
    q = torch.randn(1, 2, 3, 6, device=DEV, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 6, device=DEV, dtype=torch.float64, requires_grad=True)
    c, s = torch.randn(1, 3, 6, device=DEV, dtype=torch.float64), torch.randn(1, 3, 6, device=DEV, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ops.rope(a, b, c, s), (q, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_cuda_matches_cpu_and_reference(dtype):
    """Same RNG and selection rule on both devices: token ids agree with the CPU kernel and the
    reference (up to fp rounding at a CDF or top-p boundary; allow 1 in 500 rows)."""
    g = torch.Generator().manual_seed(3)
    B, V = 512, 32000
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    temperature = torch.rand(B, generator=g) * 1.5 + 0.05
    temperature[::17] = 0.0
    top_k = torch.randint(0, 60, (B,), generator=g)
    top_k[::3] = 0
    top_p = torch.rand(B, generator=g) * 0.95 + 0.05
    top_p[::5] = 1.0
    seeds = torch.randint(-2**62, 2**62, (B,), generator=g)
    cpu = ops.sample(logits, temperature, top_k, top_p, seeds)
    gpu = ops.sample(logits.to(DEV), temperature.to(DEV), top_k.to(DEV), top_p.to(DEV), seeds.to(DEV))
    ref = ops.sample_reference(logits.to(DEV), temperature.to(DEV), top_k.to(DEV), top_p.to(DEV), seeds.to(DEV))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.int64
    assert (gpu.cpu() != cpu).sum().item() <= 1
    assert (gpu != ref).sum().item() <= 1
    greedy = temperature == 0
    assert torch.equal(gpu.cpu()[greedy], logits.float().argmax(-1)[greedy])


def test_sample_cuda_support_and_ties():
    N = 2000
    row = torch.randn(200) * 2
    logits = row.expand(N, 200).contiguous().to(DEV)
    draws = ops.sample(logits, 0.8, 20, 0.7, torch.arange(N, device=DEV)).cpu()
    z = row / 0.8
    zs, order = torch.sort(z, descending=True, stable=True)
    p = torch.softmax(zs[:20].double(), 0)
    n = int((torch.cumsum(p, 0) < 0.7).sum()) + 1
    assert set(draws.tolist()) <= set(order[:n].tolist())
    flat = torch.zeros(N, 10, device=DEV)
    assert set(ops.sample(flat, 1.0, 3, 1.0, torch.arange(N, device=DEV)).tolist()) == {0, 1, 2}
    assert set(ops.sample(flat, 1.0, 0, 0.25, torch.arange(N, device=DEV)).tolist()) == {0, 1, 2}
