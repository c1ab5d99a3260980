"""Tests of preflexor_core.llm.ops: the compiled csrc ops against their torch references (CPU).

Covers rms_norm, rope (forward and every gradient, odd shapes, fp32 / bf16),
torch.library registration (opcheck, torch.compile tracing), sampling (greedy, exact agreement with
the sort-based reference, a chi-square goodness-of-fit test, determinism, tie semantics, argument
errors) and the torch fallback path.

    python -m pytest -q tests/test_ops.py
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from preflexor_core.llm import ops

needs_ext = pytest.mark.skipif(not ops._HAVE_EXT, reason="preflexor_core._C is not built (pip install -e .)")

# bf16 has an 8-bit significand: one unit in the last place relative to the value is 2**-8.
BF16_ULP = 2.0 ** -8


@pytest.fixture
def ext_mode(monkeypatch, every_isa):
    """The default dispatch (the compiled op where built), on each CPU ISA path this machine runs."""
    monkeypatch.delenv("PREFLEXOR_KERNELS", raising=False)


def test_compiled_extension_imports():
    """The suite fails, not skips, when preflexor_core._C did not build or import: a broken build must not
    pass as a run of torch fallbacks. PREFLEXOR_ALLOW_NO_EXT=1 accepts a machine without a compiler."""
    if os.environ.get("PREFLEXOR_ALLOW_NO_EXT") == "1" and not ops._HAVE_EXT:
        pytest.skip(f"PREFLEXOR_ALLOW_NO_EXT=1 and preflexor_core._C is not available ({ops._IMPORT_ERROR})")
    assert ops._HAVE_EXT, f"preflexor_core._C failed to import: {ops._IMPORT_ERROR}"
    for op in ("rms_norm_forward", "rope", "sample", "decode_step", "cpu_isa_native"):
        assert hasattr(torch.ops.preflexor, op), op


def test_cpu_isa_levels_and_their_errors():
    """The extension runs every path up to the native one and refuses one above it."""
    from preflexor_core.llm import cpu_features
    native = cpu_features.native_isa()
    assert native == cpu_features.ISA_LEVELS[int(torch.ops.preflexor.cpu_isa_native())]
    for level in cpu_features.available_isas():
        with cpu_features.forced_isa(level):
            assert cpu_features.ISA_LEVELS[int(torch.ops.preflexor.cpu_isa_active())] == level
    assert cpu_features.cpu_isa() == cpu_features.ISA_LEVELS[int(torch.ops.preflexor.cpu_isa_active())]
    with pytest.raises(RuntimeError, match="must be 0"):
        torch.ops.preflexor.set_cpu_isa(3)
    if native != "avx512":
        with pytest.raises(cpu_features.CpuIsaError, match="runs at most"):
            cpu_features.set_cpu_isa("avx512")


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grad_out)
    return [o.detach() for o in outs], [t.grad for t in inputs]


def _assert_no_worse(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, what: str):
    """bf16: the kernel computes in fp32 and rounds once; the torch reference rounds after every op.
    So the kernel's error against an fp64 computation on the same bf16 inputs must not exceed the
    reference's error plus one bf16 ulp of the output scale."""
    scale = exact.abs().max().item() + 1e-12
    err_got = (got.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    assert err_got <= err_ref + BF16_ULP * scale, f"{what}: kernel error {err_got} vs reference error {err_ref}"


def _rms_exact(x, w, eps):
    """fp64 version of the reference math (the bf16 round trip of the normalised value removed)."""
    xd = x.double()
    return w.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps))


# ----------------------------------------------------------------------------- rms_norm
RMS_SHAPES = [(1, 17), (7, 96), (33, 3072), (7, 1), (2, 5, 96)]


@needs_ext
@pytest.mark.parametrize("shape", RMS_SHAPES)
def test_rms_norm_fp32_forward_and_grads(shape, ext_mode):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    w = torch.randn(shape[-1])
    gy = torch.randn(shape)
    (y,), (gx, gw) = _grads(lambda a, b: ops.rms_norm(a, b, 1e-6), [x, w], [gy])
    (yr,), (gxr, gwr) = _grads(lambda a, b: ops.rms_norm_reference(a, b, 1e-6), [x, w], [gy])
    # fp32 with a different reduction order for mean(x^2): a few ulp of fp32 (~1e-7 relative).
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gxr, rtol=1e-4, atol=1e-5)
    # grad_weight sums over rows; blocked fp32 sums vs torch's reduction: relative 1e-4 is ample.
    torch.testing.assert_close(gw, gwr, rtol=1e-4, atol=1e-4)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 17), (7, 96), (33, 3072)])
def test_rms_norm_bf16(shape, ext_mode):
    torch.manual_seed(1)
    x = (torch.randn(shape) * 2).bfloat16()
    w = (torch.rand(shape[-1]) + 0.5).bfloat16()
    gy = torch.randn(shape).bfloat16()
    (y,), (gx, gw) = _grads(lambda a, b: ops.rms_norm(a, b, 1e-6), [x, w], [gy])
    (yr,), (gxr, gwr) = _grads(lambda a, b: ops.rms_norm_reference(a, b, 1e-6), [x, w], [gy])
    assert y.dtype == gx.dtype == gw.dtype == torch.bfloat16
    # forward follows the reference's rounding steps exactly; a last-bit difference in rstd can move
    # one rounding by one bf16 ulp.
    torch.testing.assert_close(y, yr, rtol=2 * BF16_ULP, atol=0)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    _rms_exact(xd, wd, 1e-6).backward(gy.double())
    _assert_no_worse(gx, gxr, xd.grad, "grad_x")
    _assert_no_worse(gw, gwr, wd.grad, "grad_weight")


@needs_ext
def test_rms_norm_noncontiguous_input_and_gradcheck(ext_mode):
    torch.manual_seed(2)
    x = torch.randn(12, 10).t()                       # (10, 12), non-contiguous
    w = torch.randn(12)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), ops.rms_norm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    xd = torch.randn(7, 17, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-6), (xd, wd))


def test_rms_norm_errors():
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rms_norm(torch.randn(3, 8), torch.randn(7), 1e-6)


# ----------------------------------------------------------------------------- rope
def _cos_sin(B, T, D, dtype=torch.float32, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    pos = torch.arange(T, dtype=torch.float64)[None, :].expand(B, T) + torch.arange(B)[:, None] * 3
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


ROPE_SHAPES = [(1, 4, 2, 1, 8), (2, 3, 1, 7, 18), (2, 4, 2, 33, 64)]   # B, Hq, Hkv, T, D


def _qk(B, Hq, Hkv, T, D, dtype, transposed):
    if transposed:   # the model's layout: (B, T, H, D) viewed as (B, H, T, D)
        return (torch.randn(B, T, Hq, D).to(dtype).transpose(1, 2), torch.randn(B, T, Hkv, D).to(dtype).transpose(1, 2))
    return torch.randn(B, Hq, T, D).to(dtype), torch.randn(B, Hkv, T, D).to(dtype)


@needs_ext
@pytest.mark.parametrize("shape", ROPE_SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_rope_fp32_forward_and_grads(shape, transposed, ext_mode):
    torch.manual_seed(5)
    B, Hq, Hkv, T, D = shape
    q, k = _qk(B, Hq, Hkv, T, D, torch.float32, transposed)
    cos, sin = _cos_sin(B, T, D)
    gq, gk = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D)
    (qo, ko), (dq, dk) = _grads(lambda a, b: ops.rope(a, b, cos, sin), [q, k], [gq, gk])
    (qr, kr), (dqr, dkr) = _grads(lambda a, b: ops.rope_reference(a, b, cos, sin), [q, k], [gq, gk])
    # same two products and one add per element as the reference; only FMA contraction on some
    # targets could change the last bit
    for got, ref in ((qo, qr), (ko, kr), (dq, dqr), (dk, dkr)):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@needs_ext
def test_rope_bf16_broadcast_cos_and_gradcheck(ext_mode):
    torch.manual_seed(6)
    q, k = _qk(2, 4, 2, 9, 32, torch.bfloat16, True)
    cos, sin = _cos_sin(1, 9, 32, torch.bfloat16)            # batch-broadcast cos/sin
    gq, gk = torch.randn(2, 4, 9, 32).bfloat16(), torch.randn(2, 2, 9, 32).bfloat16()
    (qo, ko), (dq, dk) = _grads(lambda a, b: ops.rope(a, b, cos, sin), [q, k], [gq, gk])
    (qr, kr), (dqr, dkr) = _grads(lambda a, b: ops.rope_reference(a, b, cos, sin), [q, k], [gq, gk])
    qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
    qe, ke = ops.rope_reference(qd, kd, cos.double(), sin.double())
    torch.autograd.backward((qe, ke), (gq.double(), gk.double()))
    _assert_no_worse(qo, qr, qe.detach(), "q")
    _assert_no_worse(ko, kr, ke.detach(), "k")
    _assert_no_worse(dq, dqr, qd.grad, "grad_q")
    _assert_no_worse(dk, dkr, kd.grad, "grad_k")
    # arbitrary (non-HF) cos/sin: the backward is the exact adjoint of the rotation
    qg = torch.randn(1, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    kg = torch.randn(1, 1, 3, 6, dtype=torch.float64, requires_grad=True)
    c, s = torch.randn(1, 3, 6, dtype=torch.float64), torch.randn(1, 3, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ops.rope(a, b, c, s), (qg, kg))


def test_rope_errors():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = _cos_sin(1, 3, 8)
    with pytest.raises(ValueError, match="head dim must be even"):
        ops.rope(torch.randn(1, 2, 3, 7), torch.randn(1, 1, 3, 7), cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="cos"):
        ops.rope(q, k, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="agree on B, T and D"):
        ops.rope(q, torch.randn(1, 1, 4, 8), cos, sin)


# ----------------------------------------------------------------------------- torch.library
@needs_ext
def test_opcheck_custom_ops():
    torch.manual_seed(8)
    x = torch.randn(7, 17, requires_grad=True)
    w = torch.randn(17, requires_grad=True)
    q = torch.randn(2, 5, 3, 8).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 1, 5, 8, requires_grad=True)
    cos, sin = _cos_sin(1, 5, 8)
    P = torch.ops.preflexor
    cases = [
        (P.rms_norm_forward.default, (x, w, 1e-6)),
        (P.rms_norm_backward.default, (torch.randn(7, 17), x.detach(), w.detach(), torch.rand(7))),
        (P.rope.default, (q, k, cos, sin)),
        (P.rope_backward.default, (torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8), cos, sin)),
        (P.sample.default, (torch.randn(3, 50), torch.ones(3), torch.zeros(3, dtype=torch.long),
                            torch.full((3,), 0.9), torch.arange(3))),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@needs_ext
def test_torch_compile_traces_ops(ext_mode):
    torch.manual_seed(9)

    def f(x, w, q, k, cos, sin):
        y = ops.rms_norm(x, w, 1e-6)
        qo, ko = ops.rope(q, k, cos, sin)
        return (y * y).sum() + (qo * qo).sum() + ko.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    cos, sin = _cos_sin(2, 5, 8)
    args = [torch.randn(7, 17), torch.randn(17), torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8)]
    a1 = [t.clone().requires_grad_() for t in args]
    a2 = [t.clone().requires_grad_() for t in args]
    out_c, out_e = compiled(*a1, cos, sin), f(*a2, cos, sin)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for t1, t2 in zip(a1, a2):
        torch.testing.assert_close(t1.grad, t2.grad)


@needs_ext
def test_model_forward_backward_matches_reference_path(monkeypatch):
    from preflexor_core import Llama, ModelConfig
    torch.manual_seed(10)
    cfg = ModelConfig.preset("tiny")
    model = Llama(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        logits.float().pow(2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.delenv("PREFLEXOR_KERNELS", raising=False)
    lg_ext, g_ext = run()
    monkeypatch.setenv("PREFLEXOR_KERNELS", "reference")
    lg_ref, g_ref = run()
    assert (lg_ext - lg_ref).abs().max().item() <= 1e-4
    assert g_ext.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_ext[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- sampling
SAMPLE_PATHS = ["ext", "reference"]


def _sampler(path):
    if path == "ext":
        if not ops._HAVE_EXT:
            pytest.skip("preflexor_core._C is not built (pip install -e .)")
        return ops.sample
    return ops.sample_reference


def _kept_probs(logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """fp64 target distribution over the vocabulary (zeros outside the kept set), by full sort."""
    z = logits_row.double() / temperature
    zs, order = torch.sort(z, descending=True, stable=True)
    V = z.numel()
    k = V if top_k <= 0 or top_k >= V else top_k
    p = torch.softmax(zs[:k], 0)
    n = k if top_p >= 1 else min(k, int((torch.cumsum(p, 0) < top_p).sum()) + 1)
    out = torch.zeros(V, dtype=torch.float64)
    out[order[:n]] = p[:n] / p[:n].sum()
    return out


def _chi2_critical(df: int, alpha_z: float = 3.090232306167813) -> float:
    """Upper critical value of chi-square(df) at significance 1e-3 (z = Phi^-1(1 - 1e-3)),
    Wilson-Hilferty approximation (accurate to well under 1% for df >= 3)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + alpha_z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("path", SAMPLE_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_greedy_is_argmax(path, dtype):
    torch.manual_seed(11)
    logits = torch.randn(9, 1000).to(dtype)
    logits[3, 10] = logits[3, 500] = logits[3].max() + 1    # tie: the lower id wins
    got = _sampler(path)(logits, 0.0, 40, 0.5, torch.arange(9))
    assert torch.equal(got, logits.float().argmax(-1))
    assert got[3].item() == 10


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_matches_reference_exactly(dtype):
    """Same RNG and same selection rule: token ids agree (up to fp rounding at a CDF boundary,
    probability ~1e-7 per draw)."""
    g = torch.Generator().manual_seed(12)
    B, V = 256, 3001
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    temperature = torch.rand(B, generator=g) * 1.5 + 0.05
    temperature[::17] = 0.0
    top_k = torch.randint(0, 60, (B,), generator=g)
    top_k[::3] = 0
    top_p = torch.rand(B, generator=g) * 0.95 + 0.05
    top_p[::5] = 1.0
    seeds = torch.randint(-2**62, 2**62, (B,), generator=g)
    got = ops.sample(logits, temperature, top_k, top_p, seeds)
    ref = ops.sample_reference(logits, temperature, top_k, top_p, seeds)
    assert got.dtype == torch.int64 and got.shape == (B,)
    assert torch.equal(got, ref)


@needs_ext
def test_sample_matches_reference_large_vocab():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(8, 128256, generator=g) * 2
    args = (logits, 0.8, 0, torch.tensor([0.5, 0.9, 0.95, 0.99, 1.0, 0.3, 0.9, 0.7]), torch.arange(8) * 101)
    assert torch.equal(ops.sample(*args), ops.sample_reference(*args))


@pytest.mark.parametrize("path", SAMPLE_PATHS)
@pytest.mark.parametrize("top_k,top_p", [(20, 0.8), (0, 0.9), (7, 1.0), (0, 1.0)])
def test_sample_distribution_chi_square(path, top_k, top_p):
    """20k draws over V=50 vs the fp64 target distribution; chi-square test at significance 1e-3
    (categories with expected count < 5 pooled). Tokens outside the kept set must never appear."""
    torch.manual_seed(14)
    V, N, temperature = 50, 20000, 0.7
    row = torch.randn(V) * 1.5
    logits = row.expand(N, V).contiguous()
    draws = _sampler(path)(logits, temperature, top_k, top_p, torch.arange(N) + 1000 * top_k)
    probs = _kept_probs(row, temperature, top_k, top_p)
    counts = torch.bincount(draws, minlength=V).double()
    assert counts[probs == 0].sum().item() == 0, "a token outside the top-k / top-p set was drawn"
    expected = probs * N
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big & (probs > 0)].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    df = obs.numel() - 1
    assert df >= 2
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    assert chi2 < _chi2_critical(df), f"chi2={chi2:.1f} >= critical {_chi2_critical(df):.1f} (df={df})"


@pytest.mark.parametrize("path", SAMPLE_PATHS)
def test_sample_deterministic_per_seed(path):
    torch.manual_seed(15)
    logits = torch.randn(16, 500)
    f = _sampler(path)
    a = f(logits, 1.0, 0, 0.95, torch.arange(16))
    b = f(logits, 1.0, 0, 0.95, torch.arange(16))
    c = f(logits, 1.0, 0, 0.95, torch.arange(16) + 12345)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("path", SAMPLE_PATHS)
def test_sample_tie_semantics(path):
    """Exactly equal logits rank by token id, lower first, for both cuts."""
    f = _sampler(path)
    N = 400
    flat = torch.zeros(N, 10)
    got_k = f(flat, 1.0, 3, 1.0, torch.arange(N))
    assert set(got_k.tolist()) == {0, 1, 2}
    got_p = f(flat, 1.0, 0, 0.25, torch.arange(N))        # cumulative 0.1, 0.2, 0.3 -> three tokens
    assert set(got_p.tolist()) == {0, 1, 2}
    two_level = torch.tensor([[0.0, 5.0, 0.0, 5.0, 5.0, 0.0]]).expand(N, 6)
    got = f(two_level, 1.0, 2, 1.0, torch.arange(N))
    assert set(got.tolist()) == {1, 3}
    assert f(torch.tensor([[2.0, 2.0, 1.0]]), 1.0, 0, 1e-6, 0).item() == 0   # top_p tiny -> one token


@pytest.mark.parametrize("path", SAMPLE_PATHS)
def test_sample_argument_errors(path):
    f = _sampler(path)
    L = torch.randn(2, 10)
    with pytest.raises(ValueError, match="top_p must be in"):
        f(L, 1.0, 0, 0.0, 0)
    with pytest.raises(ValueError, match="top_p must be in"):
        f(L, 1.0, 0, 1.5, 0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        f(L, 1.0, -1, 0.9, 0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        f(L, torch.tensor([1.0, -0.5]), 0, 0.9, 0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        f(L, float("nan"), 0, 0.9, 0)
    bad = L.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN in rows \\[1\\]"):
        f(bad, 1.0, 0, 0.9, 0)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="\\+inf"):
        f(bad, 1.0, 0, 0.9, 0)
    with pytest.raises(ValueError, match="entirely -inf"):
        f(torch.full((1, 4), float("-inf")), 1.0, 0, 0.9, 0)
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        f(L, torch.ones(3), 0, 0.9, 0)
    with pytest.raises(ValueError, match="top_k must be integers"):
        f(L, 1.0, torch.tensor([1.5, 2.0]), 0.9, 0)
    with pytest.raises(ValueError, match="\\[B, V\\]"):
        f(torch.randn(10), 1.0, 0, 0.9, 0)


def test_sample_value_checks_only_on_cpu_or_debug(monkeypatch):
    """Reading argument values off a GPU forces a host sync per decode step, so ``sample`` checks
    values (ranges, NaN, inf) only on CPU or with PREFLEXOR_DEBUG=1. Meta tensors have no values:
    any value check raises on them, so passing proves that none ran; shapes are still checked."""
    meta = dict(device="meta")
    L, t, p = torch.empty(3, 50, **meta), torch.empty(3, **meta), torch.empty(3, **meta)
    k, s = torch.empty(3, dtype=torch.long, **meta), torch.empty(3, dtype=torch.long, **meta)
    monkeypatch.delenv("PREFLEXOR_DEBUG", raising=False)
    out = ops._check_sample_args(L, t, k, p, s)
    assert out[0] is L and out[1].device.type == "meta"
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ops._check_sample_args(L, torch.empty(2, **meta), k, p, s)
    monkeypatch.setenv("PREFLEXOR_DEBUG", "1")
    with pytest.raises((RuntimeError, NotImplementedError)):
        ops._check_sample_args(L, t, k, p, s)
    monkeypatch.delenv("PREFLEXOR_DEBUG")
    with pytest.raises(ValueError, match="temperature must be >= 0"):     # CPU: values always checked
        ops._check_sample_args(torch.randn(3, 50), -1.0, 0, 0.9, 0)


@pytest.mark.parametrize("path", SAMPLE_PATHS)
def test_sample_masked_logits_and_overflow(path):
    f = _sampler(path)
    L = torch.full((64, 20), float("-inf"))
    L[:, 7] = 1.0
    L[:, 11] = 1.5
    assert set(f(L, 1.0, 0, 1.0, torch.arange(64)).tolist()) <= {7, 11}
    # finite logits / tiny temperature overflow fp32: the temperature -> 0 limit (argmax)
    big = torch.tensor([[3e38, 1e38, -3e38]])
    assert f(big, 1e-3, 0, 1.0, 0).item() == 0


# ----------------------------------------------------------------------------- fallback
@needs_ext
def test_reference_env_forces_torch_path(monkeypatch):
    torch.manual_seed(16)
    x, w = torch.randn(7, 96), torch.randn(96)
    q, k = _qk(2, 4, 2, 5, 16, torch.float32, True)
    cos, sin = _cos_sin(2, 5, 16)
    L = torch.randn(8, 1000)
    monkeypatch.delenv("PREFLEXOR_KERNELS", raising=False)
    ext = (ops.rms_norm(x, w, 1e-6), ops.rope(q, k, cos, sin), ops.sample(L, 0.9, 50, 0.9, torch.arange(8)))
    calls = []
    monkeypatch.setattr(torch.ops.preflexor, "rms_norm_forward", lambda *a: calls.append(a))
    monkeypatch.setenv("PREFLEXOR_KERNELS", "reference")
    ref = (ops.rms_norm(x, w, 1e-6), ops.rope(q, k, cos, sin), ops.sample(L, 0.9, 50, 0.9, torch.arange(8)))
    assert not calls, "PREFLEXOR_KERNELS=reference still called the compiled op"
    torch.testing.assert_close(ext[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ext[1], ref[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(ext[2], ref[2])


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("PREFLEXOR_KERNELS", raising=False)
    monkeypatch.setattr(ops, "_HAVE_EXT", False)
    monkeypatch.setattr(ops, "_WARNED_FALLBACK", False)
    monkeypatch.setattr(ops, "_IMPORT_ERROR", ImportError("not built"))
    torch.manual_seed(17)
    x, w = torch.randn(3, 8), torch.randn(8)
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = _cos_sin(1, 3, 8)
    L = torch.randn(4, 100)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = ops.rms_norm(x, w, 1e-6)
        qo, ko = ops.rope(q, k, cos, sin)
        tok = ops.sample(L, 1.0, 10, 0.9, torch.arange(4))
        ops.rms_norm(x, w, 1e-6)
    fallback = [r for r in rec if "preflexor_core._C is not available" in str(r.message)]
    assert len(fallback) == 1
    assert torch.equal(y, ops.rms_norm_reference(x, w, 1e-6))
    assert torch.equal(qo, ops.rope_reference(q, k, cos, sin)[0])
    assert torch.equal(tok, ops.sample_reference(L, 1.0, 10, 0.9, torch.arange(4)))
    monkeypatch.setenv("PREFLEXOR_KERNELS", "csrc")
    with pytest.raises(RuntimeError, match="PREFLEXOR_KERNELS=csrc"):
        ops.rms_norm(x, w, 1e-6)


# ----------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 33)])
def test_swiglu_forward_and_gradients_match_eager(shape):
    from preflexor_core.llm.ops import swiglu, swiglu_reference
    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    u = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (g, u))
    out = swiglu(g, u)
    ref = swiglu_reference(g, u)
    assert torch.allclose(out, ref)
    dy = torch.randn_like(out)
    ga, ua = torch.autograd.grad(out, (g, u), dy)
    gb, ub = torch.autograd.grad(ref, (g, u), dy)
    assert torch.allclose(ga, gb) and torch.allclose(ua, ub)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(g, u[..., :-1])
