"""Trainer benchmark: one ORPO training step (loss, backward, AdamW), ours vs the naive full-logits path.

    python -m pytest tests/benchmarks/test_bench_trainer.py --benchmark-only -s

Paths (``orpo_step.py``): ``ours`` = ``train.orpo_objective`` (final hidden states -> chunked
``kernels.linear_logprobs``, the (N, V) logits never exist at once); ``naive`` = (B, T, V) fp32
logits -> log_softmax -> gather -> the same ORPO math. Synthetic pairs (random ids, 64-token prompt).
CPU: speed (pytest-benchmark; tokens/s = non-pad tokens / mean step time, threads from
``PREFLEXOR_BENCH_THREADS``) and peak memory (one fresh subprocess per path and preset), tiny and
small presets; asserts that both paths compute the same loss and ours uses less memory
(``MAX_RATIO``). CUDA: llama-3.2-3b shape, LoRA r=64, packed, checkpointing, with MFU.
Results go to ``extra_info``; measured figures belong in docs/benchmarks.md.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orpo_step import BETA, build, loss_of, make_examples, peak_memory_env, train_step

from preflexor_core.train.batches import collate_pairs

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CUDA = torch.cuda.is_available()

PAIRS = {"tiny": 8, "small": 8}
ROUNDS = 2
MAX_RATIO = {"tiny": 1.0, "small": 0.75}   # what every run must show (see the module docstring)
TARGET_RATIO = 0.5                          # the design target for the small preset

_speed: dict[tuple[str, str], dict] = {}     # (preset, variant) -> tokens/s, filled by the speed test


def _threads() -> int:
    return int(os.environ.get("PREFLEXOR_BENCH_THREADS", torch.get_num_threads()))


@pytest.fixture(scope="module", params=["tiny", "small"])
def preset_state(request):
    """Model, AdamW and batch for one preset, after a 1-pair warm-up step (allocates AdamW state)."""
    preset = request.param
    torch.set_num_threads(_threads())
    model, opt, batch = build(preset, PAIRS[preset])
    cfg = model.config
    warm = collate_pairs(make_examples(cfg.vocab_size, 1, seed=1), pad_id=cfg.pad_token_id)
    with torch.no_grad():                       # same weights, same batch: the two paths must agree
        ours, naive = loss_of("ours", model, warm), loss_of("naive", model, warm)
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5)
    train_step("ours", model, opt, warm)
    return preset, model, opt, batch


@pytest.mark.parametrize("variant", ["ours", "naive"])
def test_bench_orpo_step_speed(benchmark, preset_state, variant):
    preset, model, opt, batch = preset_state
    benchmark.group = f"orpo step {preset} cpu ({batch.n_pairs} pairs, {batch.num_tokens} tokens)"
    losses = benchmark.pedantic(train_step, args=(variant, model, opt, batch), rounds=ROUNDS, iterations=1)
    assert math.isfinite(losses)
    st = benchmark.stats.stats
    tok_s = batch.num_tokens / st.mean
    _speed[(preset, variant)] = {"tokens_per_s": tok_s, "step_s": st.mean}
    benchmark.extra_info.update(preset=preset, variant=variant, pairs=batch.n_pairs, tokens=batch.num_tokens,
                                padded_shape=list(batch.input_ids.shape), threads=torch.get_num_threads(),
                                tokens_per_s=round(tok_s, 1), tokens_per_s_best=round(batch.num_tokens / st.min, 1))
    print(f"\n[{preset} {variant}] {st.mean:.2f} s/step, {tok_s:.0f} tokens/s")


def _peak(preset: str, variant: str) -> dict:
    env = peak_memory_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(HERE / "orpo_step.py"), "--preset", preset, "--variant", variant,
                           "--pairs", str(PAIRS[preset]), "--threads", str(_threads())],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read from /proc (Linux only)")
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_bench_orpo_step_peak_memory(benchmark, preset):
    """Peak extra RSS of one step per path: after the model, AdamW state and a warm-up step exist, the
    subprocess resets the peak-RSS mark (``/proc/self/clear_refs`` <- "5"), runs one step and reports
    VmHWM - VmRSS(before the step), with glibc's mmap threshold pinned so freed tensors go back to the
    OS. The ratio depends on the batch: fp32 gradients and the chunked log-prob buffer are fixed costs."""
    res = {}

    def measure():
        res["ours"] = _peak(preset, "ours")
        res["naive"] = _peak(preset, "naive")

    benchmark.pedantic(measure, rounds=1, iterations=1)
    ours, naive = res["ours"], res["naive"]
    mib = lambda kib: round(kib / 1024, 1)   # noqa: E731
    ratio = ours["extra_kib"] / naive["extra_kib"]
    benchmark.group = "orpo step peak memory (CPU, subprocess per path)"
    info = dict(preset=preset, pairs=ours["n_pairs"], tokens=ours["tokens"], params=ours["params"],
                padded_shape=[ours["rows"], ours["seq_len"]],
                ours_peak_extra_mib=mib(ours["extra_kib"]), naive_peak_extra_mib=mib(naive["extra_kib"]),
                baseline_rss_mib=mib(ours["base_kib"]), memory_ratio=round(ratio, 3),
                logits_fp32_mib=round(ours["rows"] * ours["seq_len"] * ours["vocab"] * 4 / 2**20, 1),
                target_ratio=TARGET_RATIO, target_met=ratio <= TARGET_RATIO)
    for v in ("ours", "naive"):
        if (preset, v) in _speed:
            info[f"{v}_tokens_per_s"] = round(_speed[(preset, v)]["tokens_per_s"], 1)
    if (preset, "ours") in _speed and (preset, "naive") in _speed:
        info["speedup"] = round(_speed[(preset, "naive")]["step_s"] / _speed[(preset, "ours")]["step_s"], 3)
    benchmark.extra_info.update(info)
    print(f"\n[{preset}] peak extra RSS of one ORPO step: ours {info['ours_peak_extra_mib']} MiB, "
          f"naive {info['naive_peak_extra_mib']} MiB, ratio {ratio:.3f} (target <= {TARGET_RATIO}: "
          f"{'met' if info['target_met'] else 'NOT met'}); " + json.dumps(info))
    assert ours["loss"] == pytest.approx(naive["loss"], rel=1e-4)
    assert ratio <= MAX_RATIO[preset], \
        f"{preset}: trainer step peak memory is {ratio:.2f}x the naive path (must be <= {MAX_RATIO[preset]})"


# ----------------------------------------------------------------------------- CUDA
_PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12))


def _peak_flops(name: str) -> float | None:
    return next((f for key, f in _PEAK_BF16 if key in name), None)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (llama-3.2-3b shape, bf16, LoRA r=64)")
def test_bench_orpo_step_gpu_llama32_3b_lora(benchmark):
    """llama-3.2-3b shape, random bf16 weights, LoRA r=64 on all linear layers, gradient checkpointing,
    4 pairs of <= 2048 tokens packed into one row: step time, tokens/s, peak allocated memory and MFU with

        model FLOPs = 4 * N_base * tokens + 6 * N_lora * tokens + 6 * L * Hq * D * sum(len_i^2)

    (frozen base: forward 2N + activation gradients 2N; adapters: 6N; causal attention per layer and
    sequence: forward 2 * Hq * D * len^2, backward 2x forward; recompute not counted). MFU = model
    FLOPs / step time / the card's peak dense bf16 FLOP/s (``_PEAK_BF16``)."""
    from preflexor_core import Llama, ModelConfig
    from preflexor_core.llm.lora import LoRAConfig, apply_lora, count_trainable_parameters

    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama-3.2-3b")
    model = Llama(cfg, device="cuda", dtype=torch.bfloat16)
    n_base = model.num_parameters()
    apply_lora(model, LoRAConfig(r=64, alpha=64))
    model.gradient_checkpointing = True
    model.train()
    n_lora = count_trainable_parameters(model)
    examples = make_examples(cfg.vocab_size, 4, prompt_len=512, completion=(1280, 1536))   # <= 2048 tokens each
    batch = collate_pairs(examples, pad_id=0, packed=True).to("cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    tokens = batch.num_tokens

    def step():
        loss = train_step("ours", model, opt, batch)
        torch.cuda.synchronize()
        return loss

    assert math.isfinite(step())                 # Triton autotune / compile + AdamW state outside the timing
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = benchmark.pedantic(step, rounds=3, iterations=1)
    assert math.isfinite(loss)
    peak = torch.cuda.max_memory_allocated()
    t = benchmark.stats.stats.mean
    L, Hq, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or D
    flops = 4.0 * n_base * tokens + 6.0 * n_lora * tokens + 6.0 * L * Hq * D * sum(n * n for n in lens)
    name = torch.cuda.get_device_name()
    peak_flops = _peak_flops(name)
    benchmark.group = "orpo step llama-3.2-3b LoRA r=64 bf16 cuda"
    benchmark.extra_info.update(
        device=name, pairs=batch.n_pairs, tokens=tokens, max_seqlen=max(lens), packed=True,
        gradient_checkpointing=True, base_params=n_base, lora_params=n_lora, beta=BETA,
        step_s=round(t, 4), tokens_per_s=round(tokens / t, 1), model_tflops_per_step=round(flops / 1e12, 2),
        achieved_tflops=round(flops / t / 1e12, 1),
        mfu=round(flops / t / peak_flops, 4) if peak_flops else None, peak_bf16_flops=peak_flops,
        flops_formula="4*N_base*tokens + 6*N_lora*tokens + 6*L*Hq*D*sum(len^2); recompute not counted",
        peak_allocated_gib=round(peak / 2**30, 2), peak_extra_gib=round((peak - base) / 2**30, 2))
    print(f"\n[llama-3.2-3b LoRA r=64, {tokens} tokens] {t:.3f} s/step, {tokens / t:.0f} tokens/s, "
          f"{flops / t / 1e12:.0f} TFLOP/s, peak {peak / 2**30:.1f} GiB")
