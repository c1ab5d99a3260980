"""Where one preference training step spends its time: forward (decoder body), LM head (log-probs of the
labelled tokens), loss, backward, optimizer; then the top operators of one profiled step.

The bundled SmolLM2-135M-Instruct, full fine-tuning, fp32 (or bf16 autocast), AdamW, on 2 synthetic
pairs with the lengths of real datagen rows (prompt 110-185 tokens, chosen 421-531, rejected 210-392).
ORPO (stage 1) or EXO (stage 2, reference log-probs precomputed). Layouts: ``padded`` (one row per
sequence), ``packed`` (one row, varlen attention per sequence) and ``shared`` (packed, each prompt
encoded once for its two answers: prefix sharing).

    python tests/benchmarks/profile_step.py --objective orpo --layout padded
    python tests/benchmarks/profile_step.py --objective exo --layout shared --steps 5

Prints one JSON line (phase medians in seconds, tokens processed) and, with ``--table``, torch's
operator table of the last step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time

import torch

from preflexor_core.kernels import IGNORE_INDEX
from preflexor_core.llm.registry import load_model_and_tokenizer
from preflexor_core.losses.preference import dpo_loss, logps_from_hidden, orpo_loss, sequence_sums
from preflexor_core.train.batches import PairExample, collate_pairs

LAYOUTS = ("padded", "packed", "shared")


def real_length_pairs(vocab: int, n_pairs: int = 2, seed: int = 0) -> list[PairExample]:
    """Random-id pairs with datagen's length ranges; ids avoid the first 200 (special tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n_pairs):
        prompt = [rng.randrange(200, vocab) for _ in range(rng.randint(110, 185))]
        seqs = []
        for lo, hi in ((421, 531), (210, 392)):
            comp = [rng.randrange(200, vocab) for _ in range(rng.randint(lo, hi))]
            seqs += [prompt + comp, [IGNORE_INDEX] * len(prompt) + comp]
        out.append(PairExample(*seqs, index=i))
    return out


def _batch(examples, layout: str):
    if layout == "padded":
        return collate_pairs(examples, pad_id=0)
    return collate_pairs(examples, pad_id=0, packed=True, share_prompt=layout == "shared")


def step(model, opt, batch, objective: str, ref, autocast: bool) -> dict:
    """One step with a wall-clock split; returns the phase times."""
    t = {}
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        hidden = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                       return_hidden=True, cu_seqlens=batch.cu_seqlens, pieces=batch.pieces)
    t1 = time.perf_counter()
    with ctx:
        tok = logps_from_hidden(hidden, model.output_weight, batch.labels)
    sums, counts = sequence_sums(tok, batch.labels, batch.cu_seqlens)
    t2 = time.perf_counter()
    n = batch.n_pairs
    if objective == "orpo":
        nll = -sums[:n].sum() / counts[:n].sum().clamp(min=1)
        losses = orpo_loss(sums[:n] / counts[:n].clamp(min=1), sums[n:] / counts[n:].clamp(min=1), 0.1)[0]
        loss = nll + losses.mean()
    else:
        loss = dpo_loss(sums[:n], sums[n:], ref[0], ref[1], 0.5, "exo_pair", 5e-3)[0].mean()
    t3 = time.perf_counter()
    loss.backward()
    t4 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t5 = time.perf_counter()
    return {"forward_body": t1 - t0, "lm_head": t2 - t1, "loss": t3 - t2, "backward": t4 - t3,
            "optimizer": t5 - t4, "step": t5 - t0, "loss_value": float(loss.detach())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objective", choices=("orpo", "exo"), default="orpo")
    ap.add_argument("--layout", choices=LAYOUTS, default="padded")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    ap.add_argument("--table", action="store_true", help="also print torch.profiler's operator table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer("smollm2-135m-instruct", "cpu", torch.float32)
    model.train()
    batch = _batch(real_length_pairs(model.config.vocab_size), args.layout)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6, fused=True)          # as the trainer
    ref = None
    if args.objective == "exo":
        with torch.no_grad():
            h = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                      return_hidden=True, cu_seqlens=batch.cu_seqlens, pieces=batch.pieces)
            s, _ = sequence_sums(logps_from_hidden(h, model.output_weight, batch.labels), batch.labels, batch.cu_seqlens)
        ref = (s[:batch.n_pairs] - 0.5, s[batch.n_pairs:] + 0.5)
    step(model, opt, batch, args.objective, ref, args.bf16)                  # warm-up (allocates AdamW state)
    runs = [step(model, opt, batch, args.objective, ref, args.bf16) for _ in range(args.steps)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "loss_value"}
    out.update(objective=args.objective, layout=args.layout, bf16=args.bf16, threads=args.threads,
               rows=int(batch.input_ids.shape[0]), tokens_processed=int(batch.input_ids.numel()),
               losses=[r["loss_value"] for r in runs])
    print(json.dumps(out))
    if args.table:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(model, opt, batch, args.objective, ref, args.bf16)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
