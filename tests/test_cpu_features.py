"""CPU feature detection and the ISA path of the compiled CPU kernels (preflexor_core/llm/cpu_features.py):
the level from the flags, PREFLEXOR_CPU_ISA (read once, lowered only), bf16 autocast and oneDNN bf16
packing decisions, and the bf16 model paths on every ISA this machine runs.

    python -m pytest tests/test_cpu_features.py -q
"""
import os
import subprocess
import sys

import pytest
import torch

from preflexor_core.llm import cpu_features
from preflexor_core.llm.cpu_features import CpuIsaError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flags,level", [
    ("fpu sse sse2 avx", "generic"),
    ("fpu avx avx2", "generic"),                                   # AVX2 without FMA: no avx2 path
    ("fpu avx avx2 fma", "avx2"),
    ("fpu avx2 fma avx512f", "avx2"),                              # AVX-512 F alone is not enough
    ("fpu avx2 fma avx512f avx512bw avx512vl avx512dq", "avx512"),
    ("fp asimd evtstrm aes crc32", "generic"),                     # aarch64's Features line
])
def test_isa_from_flags(flags, level):
    assert cpu_features._isa_from_flags(frozenset(flags.split())) == level


def test_flags_and_model_are_read_from_this_machine():
    assert isinstance(cpu_features.cpu_model(), str) and cpu_features.cpu_model()
    native = cpu_features.native_isa()
    assert native in cpu_features.ISA_LEVELS
    if cpu_features.cpu_flags():       # the extension's detection agrees with /proc/cpuinfo
        assert native == cpu_features._isa_from_flags(cpu_features.cpu_flags())
    assert cpu_features.available_isas()[0] == "generic"
    if os.environ.get("PREFLEXOR_CPU_ISA", "auto") in ("auto", ""):
        assert cpu_features.available_isas()[-1] == native


def test_native_cpu_bf16_needs_the_flags_and_the_avx512_path(monkeypatch):
    monkeypatch.setenv("PREFLEXOR_CPU_BF16", "auto")
    monkeypatch.setattr(cpu_features, "cpu_isa", lambda: "avx512")
    for flags, want in (("avx512f", False), ("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda f=flags: frozenset(f.split()))
        assert cpu_features.native_cpu_bf16() is want, flags
    monkeypatch.setattr(cpu_features, "cpu_isa", lambda: "avx2")           # a lowered run behaves as AVX2
    assert cpu_features.native_cpu_bf16() is False
    monkeypatch.setenv("PREFLEXOR_CPU_BF16", "1")
    assert cpu_features.native_cpu_bf16() is True
    monkeypatch.setenv("PREFLEXOR_CPU_BF16", "0")
    assert cpu_features.native_cpu_bf16() is False
    monkeypatch.setenv("PREFLEXOR_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="PREFLEXOR_CPU_BF16"):
        cpu_features.native_cpu_bf16()


def test_onednn_bf16_packing_only_where_onednn_packs_bf16(every_isa):
    ok = cpu_features.onednn_bf16_packing()
    if every_isa == "generic" or (every_isa == "avx2" and "avx_ne_convert" not in cpu_features.cpu_flags()):
        assert ok is False
    if ok:                              # then the reorder really runs
        w = torch.randn(32, 16).bfloat16()
        assert torch.ops.mkldnn._reorder_linear_weight(w).layout == torch._mkldnn


def test_a_level_above_the_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_features, "native_isa", lambda: "avx2")
    with pytest.raises(CpuIsaError, match="runs at most avx2"):
        cpu_features._apply("avx512", "PREFLEXOR_CPU_ISA=avx512")
    with pytest.raises(CpuIsaError, match="use one of"):
        cpu_features.set_cpu_isa("sse9")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=full,
                          timeout=120)


def test_env_var_lowers_the_path_for_the_whole_process():
    code = ("import torch, preflexor_core.llm.ops; from preflexor_core.llm import cpu_features as c; "
            "print(c.cpu_isa(), int(torch.ops.preflexor.cpu_isa_active()), ','.join(c.available_isas()))")
    r = _run(code, PREFLEXOR_CPU_ISA="generic")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["generic", "0", "generic"]          # the suite's ISA fixture is capped too
    r = _run(code, PREFLEXOR_CPU_ISA="sse9")
    assert r.returncode != 0 and "PREFLEXOR_CPU_ISA='sse9' is not one of auto, avx512, avx2, generic" in r.stderr


def test_bf16_model_generates_on_every_path(every_isa, id_tokenizer):
    """A bf16 model decodes on each path (the case that crashed in oneDNN's bf16 reorder on AVX2 CPUs),
    and its greedy tokens match the fp32 model's on the same bf16-rounded weights for most steps."""
    from preflexor_core import Llama, ModelConfig
    from preflexor_core.sampler import SamplingParams, generate
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    m32 = Llama(cfg).eval()
    m16 = Llama(cfg).eval().to(torch.bfloat16)
    m16.load_state_dict(m32.state_dict())
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    prompts = ["5 6 7 8", "9 10 11", "12 13 14 15 16", "3 4"]       # 4 rows: past the small-batch cut
    p = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    got = [c.token_ids for c in generate(m16, id_tokenizer, prompts, p)]
    want = [c.token_ids for c in generate(m32, id_tokenizer, prompts, p)]
    assert all(len(g) == 8 for g in got)
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert same / 32 >= 0.75, (got, want)     # bf16 activations / cache round differently; near-ties may flip


def test_library_caps_cap_torch_below_the_native_path_only(monkeypatch):
    monkeypatch.setattr(cpu_features, "native_isa", lambda: "avx512")
    assert cpu_features.library_caps("avx512") == {}
    assert cpu_features.library_caps("avx2") == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                                 "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert cpu_features.library_caps("generic")["ATEN_CPU_CAPABILITY"] == "default"
    monkeypatch.setattr(cpu_features, "native_isa", lambda: "avx2")
    assert cpu_features.library_caps("avx2") == {}
    with pytest.raises(CpuIsaError, match="use one of"):
        cpu_features.library_caps("sse")


def test_library_caps_are_accepted_by_torch_in_a_new_process():
    """torch reads the variables when it loads: with them, its own kernels report the capped level (the
    generic caps on every CPU; the avx2 ones too where torch runs AVX kernels at all)."""
    def capability(caps):
        return subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                              env={**os.environ, **caps}, capture_output=True, text=True, check=True).stdout.strip()
    assert capability(cpu_features._LIBRARY_CAPS["generic"]) == "DEFAULT"
    assert cpu_features._LIBRARY_CAPS["avx2"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                                  "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    if torch.backends.cpu.get_cpu_capability().upper().startswith("AVX"):
        assert capability(cpu_features._LIBRARY_CAPS["avx2"]) == "AVX2"
