"""One ORPO training step, two ways, for ``test_bench_trainer.py``.

- ``ours``: ``train.orpo_objective`` (final hidden states -> ``kernels.linear_logprobs``; the
  (N, V) logits are never materialised), backward, AdamW step.
- ``naive``: full (B, T, V) fp32 logits -> log_softmax -> gather -> the same ORPO math
  (``losses.orpo_loss`` on mean log-probs + the chosen NLL), backward, AdamW step.

Batches are synthetic preference pairs built as token ids (``PairExample``). Run as a script it
measures the peak memory of one step in this fresh process and prints one JSON line
(method: ``measure_peak``):

    python tests/benchmarks/orpo_step.py --preset small --variant naive
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

from preflexor_core import Llama, ModelConfig
from preflexor_core.train.batches import Batch, PairExample, collate_pairs
from preflexor_core.losses.preference import IGNORE_INDEX, orpo_loss
from preflexor_core.train import orpo_objective

BETA = 0.1
LR = 5e-6
VARIANTS = ("ours", "naive")


def make_examples(vocab: int, n_pairs: int = 8, prompt_len: int = 64, completion: tuple[int, int] = (192, 256),
                  seed: int = 0) -> list[PairExample]:
    """Random-id preference pairs: a shared prompt of ``prompt_len`` tokens (labels IGNORE_INDEX)
    followed by chosen / rejected completions of random lengths in ``completion`` (inclusive)."""
    rng = random.Random(seed)
    lo = 5                                  # keep clear of the special ids 0..4 of the presets
    out = []
    for i in range(n_pairs):
        prompt = [rng.randrange(lo, vocab) for _ in range(prompt_len)]
        seqs = []
        for _ in range(2):
            comp = [rng.randrange(lo, vocab) for _ in range(rng.randint(*completion))]
            seqs += [prompt + comp, [IGNORE_INDEX] * prompt_len + comp]
        out.append(PairExample(*seqs, index=i))
    return out


def build(preset: str, n_pairs: int = 8, packed: bool = False, device: str = "cpu",
          dtype: torch.dtype | None = None, seed: int = 0, **example_kw):
    """(model, optimizer, batch) for one preset; full fine-tuning, AdamW over all parameters."""
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset)
    model = Llama(cfg, device=device, dtype=dtype).train()
    examples = make_examples(cfg.vocab_size, n_pairs, seed=seed, **example_kw)
    batch = collate_pairs(examples, pad_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0,
                          packed=packed).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, opt, batch


def naive_objective(model, batch: Batch, beta: float = BETA) -> torch.Tensor:
    """ORPO loss through the full (B, T, V) fp32 logits (what the trainer avoids)."""
    logits = model(batch.input_ids, attention_mask=batch.attention_mask).float()   # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)                                # (B, T-1, V)
    lab = batch.labels[:, 1:]                                                       # (B, T-1)
    valid = lab != IGNORE_INDEX
    picked = logp.gather(-1, torch.where(valid, lab, 0)[..., None])[..., 0]        # (B, T-1)
    picked = torch.where(valid, picked, torch.zeros_like(picked))
    sums, counts = picked.sum(-1), valid.sum(-1)
    n = batch.n_pairs
    cs, rs, cc, rc = sums[:n], sums[n:], counts[:n], counts[n:]
    nll = -cs.sum() / cc.sum().clamp(min=1)
    losses, _, _, _ = orpo_loss(cs / cc.clamp(min=1), rs / rc.clamp(min=1), beta)
    return nll + losses.mean()


def loss_of(variant: str, model, batch: Batch) -> torch.Tensor:
    if variant == "ours":
        return orpo_objective(model, batch, BETA)[0]
    if variant == "naive":
        return naive_objective(model, batch)
    raise ValueError(f"variant {variant!r}: use one of {VARIANTS}")


def train_step(variant: str, model, opt, batch: Batch) -> float:
    """Forward, backward, AdamW step, zero_grad (grads freed). Returns the loss."""
    loss = loss_of(variant, model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def peak_memory_env() -> dict:
    """Environment for a peak-memory subprocess (see the module docstring)."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_peak(preset: str, variant: str, n_pairs: int, threads: int) -> dict:
    """Build the model, batch and AdamW, run one warm-up step (it also allocates the AdamW moments),
    drop the gradients, reset the kernel's peak-RSS mark by writing "5" to ``/proc/self/clear_refs``,
    read VmRSS (the baseline: weights + optimizer state + allocator leftovers), run one step, read
    VmHWM (the peak RSS since the reset); extra = VmHWM - baseline. Launch with ``peak_memory_env``:
    it pins glibc's mmap threshold, so every large tensor is mmapped and unmapped on free (otherwise
    glibc raises the threshold after the first large free, keeps freed warm-up buffers in its heap,
    and the measured step reuses them without touching the peak mark)."""
    torch.set_num_threads(threads)
    model, opt, batch = build(preset, n_pairs)
    params = sum(p.numel() for p in model.parameters())
    train_step(variant, model, opt, batch)               # warm-up: also allocates the AdamW moments
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:        # reset VmHWM to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    loss = train_step(variant, model, opt, batch)
    dt = time.perf_counter() - t0
    hwm = _status_kib("VmHWM")
    return {"preset": preset, "variant": variant, "n_pairs": n_pairs, "params": params,
            "vocab": model.config.vocab_size,
            "tokens": batch.num_tokens, "rows": batch.input_ids.shape[0], "seq_len": batch.input_ids.shape[1],
            "base_kib": base, "peak_kib": hwm, "extra_kib": hwm - base, "step_s": dt, "loss": loss,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Peak extra RSS of one ORPO training step (see module docstring).")
    ap.add_argument("--preset", required=True, help="ModelConfig preset name (tiny, small)")
    ap.add_argument("--variant", required=True, choices=VARIANTS)
    ap.add_argument("--pairs", type=int, default=8, help="preference pairs per batch")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    print(json.dumps(measure_peak(args.preset, args.variant, args.pairs, args.threads)))


if __name__ == "__main__":
    sys.exit(main())
