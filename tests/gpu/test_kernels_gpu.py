"""CUDA checks of the Triton kernels in bf16 at realistic sizes (seq 2k-8k, D 128, V 128256).

Run on a CUDA machine: ``python -m pytest tests/gpu/test_kernels_gpu.py -q`` (part of ``make gpu-check``).

Errors are measured as ||got - want|| / ||want|| against fp32 references (torch SDPA with GQA, or
the fp32 torch references). bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per value);
FlashAttention-2 also rounds P and dS to bf16 before their matmuls, so relative errors of a few 1e-3
are expected; the bound 2e-2 catches any masking / indexing bug (those give O(1) errors).
"""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

REL = 2e-2


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("PREFLEXOR_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _qkvdo(B, Hq, Hkv, T, S, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16)   # noqa: E731
    return (mk(B, Hq, T, D).requires_grad_(), mk(B, Hkv, S, D).requires_grad_(), mk(B, Hkv, S, D).requires_grad_(),
            mk(B, Hq, T, D))


def _fwd_bwd(fn, q, k, v, do):
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _assert_all_close(got, want, names=("o", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = _rel(a, b)
        assert err < REL, f"{name}: relative error {err:.2e} >= {REL}"


@pytest.mark.parametrize("B,Hq,Hkv,T,D,causal", [
    (2, 32, 8, 2048, 128, True),
    (1, 8, 2, 8192, 128, True),
    (2, 16, 16, 2048, 128, False),
    (1, 8, 8, 4096, 64, True),
    (1, 4, 1, 2047, 256, True),
])
def test_attention_matches_sdpa(B, Hq, Hkv, T, D, causal):
    from preflexor_core.kernels import flash_attention
    q, k, v, do = _qkvdo(B, Hq, Hkv, T, T, D)
    got = _fwd_bwd(lambda a, b, c: flash_attention(a, b, c, causal=causal), q, k, v, do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=True),
                    q32, k32, v32, do.float())
    _assert_all_close(got, want)
    assert got[0].dtype == torch.bfloat16


@pytest.mark.parametrize("T", [1, 4])
def test_attention_decode(T):
    from preflexor_core.kernels import flash_attention
    from preflexor_core.kernels.reference import attention_reference
    q, k, v, _ = _qkvdo(4, 32, 8, T, 8192, 128)
    with torch.no_grad():                  # T new tokens at the end of 8192 cached keys
        got = flash_attention(q, k, v, causal=True)
        want = attention_reference(q.float(), k.float(), v.float(), True, None)
    assert _rel(got, want) < REL


def test_attention_varlen():
    from preflexor_core.kernels import flash_attention_varlen
    lens = [3000, 1, 2048, 3143]
    cu = torch.tensor([0, 3000, 3001, 5049, 8192], dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16)   # noqa: E731
    q, k, v, do = mk(8192, 16, 128).requires_grad_(), mk(8192, 4, 128).requires_grad_(), \
        mk(8192, 4, 128).requires_grad_(), mk(8192, 16, 128)
    got = _fwd_bwd(lambda a, b, c: flash_attention_varlen(a, b, c, cu, max(lens), causal=True), q, k, v, do)

    def per_sequence(a, b, c):
        outs = []
        for s, e in zip(cu.tolist(), cu.tolist()[1:]):
            x = [t[s:e].transpose(0, 1)[None] for t in (a, b, c)]
            outs.append(F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        return torch.cat(outs)

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    _assert_all_close(got, _fwd_bwd(per_sequence, q32, k32, v32, do.float()))


def test_model_attend_uses_kernel_on_cuda():
    from preflexor_core.llm.model import _attend
    q, k, v, _ = _qkvdo(2, 8, 2, 1024, 1024, 64)
    with torch.no_grad():
        got = _attend(q, k, v, None, True)
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    assert _rel(got, want) < REL


def test_linear_logprobs_bf16_llama3_vocab():
    from preflexor_core.kernels import linear_logprobs
    from preflexor_core.kernels.reference import linear_logprobs_chunked
    N, H, V = 4096, 2048, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N, H, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    labels[::7] = -100
    grad_out = torch.randn(N, device="cuda", generator=g)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp = linear_logprobs(hidden, weight, labels)
    gh, gw = torch.autograd.grad(lp, (hidden, weight), grad_out)
    torch.cuda.synchronize()
    fused_extra = torch.cuda.max_memory_allocated() - base

    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    want = linear_logprobs_chunked(h32, w32, labels, chunk_rows=512)
    wgh, wgw = torch.autograd.grad(want, (h32, w32), grad_out)
    keep = labels != -100
    assert torch.all(lp[~keep] == 0)
    # logits accumulate in fp32 from exact bf16 inputs: only summation order differs
    torch.testing.assert_close(lp, want, atol=2e-3, rtol=1e-4)
    assert _rel(gh, wgh) < REL and _rel(gw, wgw) < REL
    del want, wgh, wgw, h32, w32
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    naive = torch.log_softmax(hidden.float() @ weight.float().T, -1).gather(1, labels.clamp_min(0)[:, None])[:, 0]
    torch.autograd.grad(naive, (hidden, weight), grad_out * keep)
    torch.cuda.synchronize()
    naive_extra = torch.cuda.max_memory_allocated() - base
    # the fused path holds the grads (fp32 [V, H] accumulator + bf16 result) and one [chunk, V] bf16
    # buffer; the naive one several [N, V] fp32 tensors (2 GiB each here)
    assert fused_extra < 0.5 * naive_extra, (f"fused path peaked {fused_extra / 2**30:.2f} GiB, naive "
                                             f"{naive_extra / 2**30:.2f} GiB")


@pytest.mark.parametrize("setting,bound", [("highest", 1e-5), ("high", 5e-3)])
def test_fp32_dots_follow_torch_matmul_precision(setting, bound):
    """fp32 inputs: "highest" computes IEEE fp32 dots (errors ~1e-7 relative to float64), "high" TF32
    (10-bit mantissa operands, ~1e-3); the CPU interpreter cannot show TF32, the GPU must."""
    from preflexor_core.kernels import flash_attention, linear_logprobs
    from preflexor_core.kernels.reference import attention_reference, linear_logprobs_chunked
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 4, 512, 64, device="cuda", generator=g) for _ in range(3))
        hidden = torch.randn(512, 576, device="cuda", generator=g)
        weight = torch.randn(4096, 576, device="cuda", generator=g) * 0.05
        labels = torch.randint(0, 4096, (512,), device="cuda", generator=g)
        with torch.no_grad():
            o = flash_attention(q, k, v, causal=True)
            lp = linear_logprobs(hidden, weight, labels)
    finally:
        torch.set_float32_matmul_precision(before)
    o64 = attention_reference(q.double(), k.double(), v.double(), True, None)
    lp64 = linear_logprobs_chunked(hidden.double(), weight.double(), labels)
    assert _rel(o.double(), o64) < bound and _rel(lp.double(), lp64) < bound
