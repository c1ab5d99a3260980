"""Every Triton kernel compiled for sm_80 and sm_90 with no GPU (``tests/triton_compile.py``).

The check runs in its own process (this suite sets TRITON_INTERPRET=1, which turns kernels into
Python), through the project's launchers with the tiles they choose on those GPUs, down to cubin with
the ptxas in Triton's wheel. It fails on a compile error, shared memory over the target's limit,
register spills over ``SPILL_BOUND``, a grid outside CUDA's limits, or a dot off the tensor cores.
The quick set runs here (24 launches: 18 s on 2 idle cores, about 70 s on 2 busy ones; then cached
per source hash); ``make
compile-check`` runs the full set (sm_80/86/89/90, head dims 64-256, vocab 128256, every dtype).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import triton_compile  # noqa: E402

ALL_KERNELS = {"_flash_attention_fwd_kernel", "_flash_attention_bwd_preprocess_kernel",
               "_flash_attention_bwd_dkdv_kernel", "_flash_attention_bwd_dq_kernel",
               "_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_kernel"}


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.access(get_ptxas(90).path, os.X_OK)
    except Exception:                                           # noqa: BLE001 - any import / lookup failure
        return False


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not _ptxas_available():
        pytest.skip("Triton's NVIDIA backend or its bundled ptxas is missing on this platform")
    out = tmp_path_factory.mktemp("compile") / "quick.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "triton_compile.py"), "--set", "quick", "--jobs", "2",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"the compile check wrote no report (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    rep = json.loads(out.read_text())
    rep["rc"], rep["stdout"] = proc.returncode, proc.stdout
    return rep


def test_every_kernel_compiles_for_sm80_and_sm90_within_limits(report):
    failing = [f"{r['case']} {r['kernel']}: {'; '.join(r['problems'])}" for r in report["launches"] if r["problems"]]
    assert not failing, "\n".join(failing)
    assert report["rc"] == 0, report["stdout"][-4000:]
    for cap in (80, 90):
        assert {r["kernel"] for r in report["launches"] if r["target"] == cap} == ALL_KERNELS


def test_tensor_cores_per_target_and_precision(report):
    """16-bit and TF32 dots on mma (sm_80) / wgmma (sm_90) layouts; IEEE fp32 dots on FMA."""
    dotted = [r for r in report["launches"] if r["dots"]]
    assert dotted
    for r in dotted:
        ieee = "dtype=float32" in r["case"] and "precision=highest" in r["case"]
        assert r["tensor_core_dots"] == (0 if ieee else r["dots"]), r["case"]
    assert any("dtype=float32" in r["case"] and "precision=high," in r["case"] for r in dotted)


def test_dkdv_16bit_has_no_spills(report):
    dkdv = [r for r in report["launches"] if r["kernel"] == "_flash_attention_bwd_dkdv_kernel"
            and "bfloat16" in r["case"]]
    assert len(dkdv) == 2 and all(r["spill_stores"] == 0 and r["regs"] <= 255 for r in dkdv)


def test_shared_memory_estimate_is_conservative(report):
    """The launchers choose tiles by ``_launch.attention_smem``; it must not undercount the compiler."""
    from preflexor_core.kernels import _launch
    kinds = {"_flash_attention_fwd_kernel": "fwd", "_flash_attention_bwd_dkdv_kernel": "dkdv",
             "_flash_attention_bwd_dq_kernel": "dq"}
    seen = 0
    for r in report["launches"]:
        if r["kernel"] in kinds:
            elem = 4 if "float32" in r["case"] else 2
            est = _launch.attention_smem(kinds[r["kernel"]], r["BLOCK_M"], r["BLOCK_N"], r["BLOCK_D"],
                                         r["num_stages"], elem)
            assert r["shared"] <= est + 2048, (r["case"], r["kernel"], r["shared"], est)
            seen += 1
    assert seen >= 12


def test_target_limits_table():
    assert triton_compile.TARGETS[80][0] == 163 * 1024 and triton_compile.TARGETS[90][0] == 227 * 1024
    assert triton_compile.TARGETS[86][0] == triton_compile.TARGETS[89][0] == 99 * 1024


def test_checker_flags_each_kind_of_problem():
    ok = {"kernel": "k", "grid": [4, 16, 1], "shared": 1000, "regs": 128, "spill_stores": 0, "dots": 2,
          "tensor_core_dots": 2}
    check = triton_compile.check
    assert check(ok, 90, "highest", "bfloat16") == []
    assert "shared memory" in check(dict(ok, shared=100 * 1024), 86, "highest", "bfloat16")[0]
    assert check(dict(ok, shared=100 * 1024), 80, "highest", "bfloat16") == []
    assert "spill" in check(dict(ok, spill_stores=8), 90, "highest", "bfloat16")[0]
    assert "launch limits" in check(dict(ok, grid=[4, 65536, 1]), 90, "highest", "bfloat16")[0]
    assert "tensor cores" in check(dict(ok, tensor_core_dots=1), 90, "highest", "bfloat16")[0]
    assert "IEEE" in check(ok, 90, "highest", "float32")[0]                  # fp32 "highest" must not be TF32
    assert check(dict(ok, tensor_core_dots=0), 90, "highest", "float32") == []
    assert check(ok, 90, "high", "float32") == []
    assert "compile error" in check({"kernel": "k", "error": "PTXASError: x"}, 90, "highest", "bfloat16")[0]


def test_ttgir_dot_classification():
    mma = "%5 = tt.dot %a, %b, %c : tensor<64x16xf16, #ttg.dot_op<{opIdx = 0}>> -> tensor<64x64xf32, #mma>"
    wgmma = "%7 = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<64x16xf16> -> tensor<64x64xf32, #mma1>"
    fma = "%9 = tt.dot %a, %b, %c, inputPrecision = ieee : tensor<32x16xf32> -> tensor<32x32xf32, #blocked2>"
    assert triton_compile._dots("\n".join([mma, wgmma, fma, "%1 = arith.addf %x, %y"])) == (3, 2)
