"""Launch planning of the Triton kernels, without a GPU (``preflexor_core/kernels/_launch.py``).

- Tiles per device: the configuration chosen for sm_80 / sm_86 / sm_89 / sm_90 shared-memory limits
  fits them (by the estimate that ``tests/test_triton_compile.py`` holds against compiled kernels).
- fp32 dots follow torch.get_float32_matmul_precision(), checked on what the launchers pass.
  Triton's interpreter computes every fp32 dot exactly in float32 (it ignores input_precision), so
  it cannot show TF32's error; a torch emulation of TF32 rounding bounds it against float64 instead.
- Sizes past 2^31 elements: the launchers run on meta tensors with the kernels replaced by
  recorders; grids stay inside CUDA's launch limits and every program count covers the problem.
Run: ``python -m pytest tests/test_kernels_launch.py -q``.
"""
import pytest
import torch

from preflexor_core.kernels import _launch, attention, attention_jit, logprobs
from preflexor_core.kernels._launch import DeviceLimits

KB = 1024
CARDS = {"sm_80": DeviceLimits(80, 163 * KB, 108), "sm_86": DeviceLimits(86, 99 * KB, 84),
         "sm_89": DeviceLimits(89, 99 * KB, 128), "sm_90": DeviceLimits(90, 227 * KB, 132)}


@pytest.fixture
def precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("card", sorted(CARDS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prec", ["ieee", "tf32"])
def test_attention_tiles_fit_each_card(card, dtype, prec):
    lim = CARDS[card]
    elem = dtype.itemsize
    for kind in ("fwd", "dkdv", "dq"):
        for d in (64, 128, 256):
            bm, bn, warps, stages = _launch.attention_config(kind, d, dtype, lim, prec)
            smem = _launch.attention_smem(kind, bm, bn, max(16, d), stages, elem)
            assert smem <= lim.max_shared, (card, kind, d, smem)
            assert bm >= 16 and bn >= 16 and warps in (4, 8) and stages >= 1


def test_consumer_cards_get_smaller_tiles_where_the_big_ones_do_not_fit():
    big = _launch.attention_config("fwd", 128, torch.float32, CARDS["sm_90"], "tf32")
    small = _launch.attention_config("fwd", 128, torch.float32, CARDS["sm_86"], "tf32")
    assert _launch.attention_smem("fwd", *big[:2], 128, big[3], 4) > CARDS["sm_86"].max_shared
    assert small != big
    assert _launch.logprobs_config(torch.float32, CARDS["sm_86"], "tf32") != \
        _launch.logprobs_config(torch.float32, CARDS["sm_90"], "tf32")


def test_dot_precision_follows_torch(precision):
    for setting, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
        precision(setting)
        assert _launch.dot_precision(torch.float32) == want
        assert _launch.dot_precision(torch.bfloat16) == "tf32"        # ignored for 16-bit operands


class _Recorder:
    """Stands in for a @triton.jit kernel: records grid and keyword arguments of each launch."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.name, tuple(grid), args, kw))


KERNELS = {attention_jit: ["_flash_attention_fwd_kernel", "_flash_attention_bwd_preprocess_kernel",
                           "_flash_attention_bwd_dkdv_kernel", "_flash_attention_bwd_dq_kernel"],
           logprobs: ["_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_kernel"]}


@pytest.fixture
def launches(monkeypatch):
    """Kernels replaced by recorders; the launchers plan for an H100 (not the interpreter)."""
    calls = []
    for mod, names in KERNELS.items():
        for name in names:
            monkeypatch.setattr(mod, name, _Recorder(name, calls))
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(_launch, "device_limits", lambda device: CARDS["sm_90"])
    return calls


@pytest.mark.parametrize("setting,want", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_launchers_pass_the_torch_precision(launches, precision, setting, want):
    precision(setting)
    q = torch.empty(1, 2, 64, 64, device="meta")
    o, lse = attention.flash_attention_forward(q, q, q, True, 0.125)
    attention.flash_attention_backward(o, q, q, q, o, lse, True, 0.125)
    h, w = torch.empty(8, 64, device="meta"), torch.empty(100, 64, device="meta")
    labels = torch.zeros(8, dtype=torch.long, device="meta")
    _, lse = logprobs.linear_logprobs_forward(h, w, labels, -100)
    logprobs.linear_logprobs_backward(torch.empty(8, device="meta"), h, w, labels, lse, -100, True, True)
    with_dots = [c for c in launches if "preprocess" not in c[0]]
    assert len(with_dots) == 5
    assert {c[3]["DOT_PRECISION"] for c in with_dots} == {want}


def _covers(grid, blocks, count):
    x, y, z = grid
    assert x == blocks and y <= _launch.GRID_YZ_MAX and z <= _launch.GRID_YZ_MAX and y * z >= count
    assert y * (z - 1) < count                      # no whole row of idle programs


def test_attention_past_2_31_elements_and_65535_heads(launches):
    # q: 8 x 16384 x 130 x 128 > 2^31 elements; B * Hq = 131072 > 65535 programs along batch x heads.
    B, Hq, Hkv, T, D = 8, 16384, 4096, 130, 128
    q = torch.empty(B, Hq, T, D, device="meta", dtype=torch.bfloat16)
    k = torch.empty(B, Hkv, T, D, device="meta", dtype=torch.bfloat16)
    assert q.numel() > 2**31
    o, lse = attention.flash_attention_forward(q, k, k, True, 0.1)
    attention.flash_attention_backward(o, q, k, k, o, lse, True, 0.1)
    for name, grid, args, kw in launches:
        heads = Hkv if "dkdv" in name else Hq
        block = kw["BLOCK_N"] if "dkdv" in name else kw["BLOCK_M"]
        _covers(grid, -(-T // block), B * heads)
        assert B * heads in [a for a in args if isinstance(a, int)]     # NBH: programs past it return
    assert len(launches) == 4 and B * Hq > _launch.GRID_YZ_MAX


def test_varlen_attention_with_a_packed_total_past_2_31(launches):
    total, H, D = 2**24 + 3, 32, 128             # 2^33 elements in q
    q = torch.empty(total, H, D, device="meta", dtype=torch.bfloat16)
    cu = torch.empty(4097, dtype=torch.int32, device="meta")
    o, lse = attention.flash_attention_forward(q, q, q, True, 0.1, cu, 8192)
    attention.flash_attention_backward(o, q, q, q, o, lse, True, 0.1, cu, 8192)
    assert len(launches) == 4
    for name, grid, args, kw in launches:
        _covers(grid, -(-8192 // (kw["BLOCK_N"] if "dkdv" in name else kw["BLOCK_M"])), 4096 * H)


def test_logprobs_with_hidden_past_2_31_elements_and_a_large_vocab(launches):
    N, H, V = 2**19 + 5, 4096, 128256             # hidden: 2^31 + 20480 elements
    h = torch.empty(N, H, device="meta", dtype=torch.bfloat16)
    w = torch.empty(V, H, device="meta", dtype=torch.bfloat16)
    labels = torch.empty(N, dtype=torch.long, device="meta")
    assert h.numel() > 2**31
    _, lse = logprobs.linear_logprobs_forward(h, w, labels, -100)
    logprobs.linear_logprobs_backward(torch.empty(N, device="meta"), h, w, labels, lse, -100, True, True)
    fwd = [c for c in launches if "fwd" in c[0]]
    assert len(fwd) == 1 and fwd[0][1][0] * fwd[0][3]["BLOCK_N"] >= N
    for name, grid, args, kw in launches:
        assert grid[0] <= _launch.GRID_X_MAX and grid[1] <= _launch.GRID_YZ_MAX
        if "bwd" in name:
            assert grid[1] * kw["BLOCK_V"] >= V


def test_grid_limits_and_tile_span_errors():
    assert _launch.grid_3d(3, 65535) == (3, 65535, 1)
    assert _launch.grid_3d(3, 65536) == (3, 65535, 2)
    with pytest.raises(ValueError, match="do not fit CUDA's grid"):
        _launch.grid_3d(1, 65535**2 + 1)
    with pytest.raises(ValueError, match="grid y"):
        _launch.grid_2d(1, 70000, "vocab splits")
    _launch.check_tile_span("op", "q", 2**20, 128, 128)
    with pytest.raises(ValueError, match="q's row stride .* make q contiguous"):
        _launch.check_tile_span("op", "q", 2**26, 64, 128)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10 explicit mantissa bits, round to nearest even), as the tensor cores
    read fp32 operands."""
    bits = x.contiguous().view(torch.int32)
    bias = ((bits >> 13) & 1) + 0x0FFF
    return ((bits + bias) & ~0x1FFF).view(torch.float32)


def test_tf32_logit_error_bound_against_float64():
    """TF32 products (what "high" gives on a GPU) vs float64: each product has relative error
    <= 2^-10 (two operands rounded at 2^-11), so |err| <= 2^-10 * sum|h||w| per logit, ~1e-3
    relative to the logits; fp32 "highest" (the interpreter's numbers) stays ~1e-6."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(64, 576, generator=g), torch.randn(512, 576, generator=g)
    exact = h.double() @ w.double().T
    tf32 = _tf32(h).double() @ _tf32(w).double().T
    scale = h.double().abs() @ w.double().abs().T
    assert ((tf32 - exact).abs() <= 2.0**-10 * scale + 1e-12).all()
    rel_tf32 = ((tf32 - exact).norm() / exact.norm()).item()
    rel_fp32 = (((h @ w.T).double() - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel_tf32 < 2e-3 and rel_fp32 < 1e-5
    assert torch.equal(_tf32(torch.tensor([1.0, 2.0**-20])), torch.tensor([1.0, 2.0**-20]))
