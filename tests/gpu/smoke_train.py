"""Real-model training smoke test for ``make gpu-check``: one ORPO and one EXO step on llama-3.2-3b.

Random bf16 weights, LoRA r=16 (fp32 adapters) with trainable thinking-token rows, Triton attention
and log-probs (PREFLEXOR_KERNELS=triton), packed pair batches, gradient checkpointing, bf16 autocast.
Writes ``train_smoke.json`` (tokens/s, peak memory, MFU per step); without CUDA it writes a skip
record and exits 0. Imports nothing that needs hnswlib or gguf.
Run: ``python tests/gpu/smoke_train.py --out DIR``; CPU-side tests: ``pytest tests/test_trainer.py -k smoke``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Dense bf16 tensor-core peak FLOP/s by card name (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                   "L4": 121e12, "RTX 4090": 165e12}


def peak_flops(card: str) -> float | None:
    """Datasheet bf16 peak of ``card`` (longest matching name), None when unknown."""
    hits = [k for k in PEAK_BF16_FLOPS if k.lower() in card.lower()]
    return PEAK_BF16_FLOPS[max(hits, key=len)] if hits else None


def train_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int,
                          recompute: bool = False) -> float:
    """Model FLOPs per trained token: 6 N (forward 2 N, backward 4 N; a frozen LoRA base still needs
    its activation gradients, so the count stays about the same) + attention 12 L H T (PaLM, app. B).
    Recomputation (gradient checkpointing) is not counted: MFU counts model FLOPs, not hardware FLOPs."""
    del recompute
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the card's peak (None without a peak)."""
    if not peak or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / peak


def _pairs(vocab: int, n_pairs: int, prompt: int, completion: int, think: tuple[int, int], seed: int):
    import torch

    from preflexor_core.train.batches import PairExample
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_pairs):
        p = torch.randint(0, vocab - 8, (prompt,), generator=g).tolist()
        c = [think[0]] + torch.randint(0, vocab - 8, (completion - 2 - i,), generator=g).tolist() + [think[1]]
        r = torch.randint(0, vocab - 8, (completion - 3 * i,), generator=g).tolist()
        out.append(PairExample(p + c, [-100] * prompt + c, p + r, [-100] * prompt + r, index=i))
    return out


def run_smoke(n_pairs: int = 4, prompt: int = 128, completion: int = 384) -> dict:
    import torch

    from preflexor_core import Llama, ModelConfig
    from preflexor_core.train.batches import collate_pairs
    from preflexor_core.llm.lora import LoRAConfig, apply_lora
    from preflexor_core.train import PreferenceConfig, dpo_objective, orpo_objective
    from preflexor_core.losses.preference import forward_logps
    os.environ["PREFLEXOR_KERNELS"] = "triton"
    dev = torch.device("cuda")
    cfg = ModelConfig.preset("llama-3.2-3b")
    torch.manual_seed(0)
    model = Llama(cfg, device=dev, dtype=torch.bfloat16)
    think = (cfg.vocab_size - 2, cfg.vocab_size - 1)          # stand-ins for reserved thinking tokens
    n_params = model.num_parameters()
    apply_lora(model, LoRAConfig(r=16, alpha=16, trainable_token_indices=think))
    model.gradient_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    batch = collate_pairs(_pairs(cfg.vocab_size, n_pairs, prompt, completion, think, 0), cfg.pad_token_id or 0,
                          packed=True).to(dev)
    ntok = batch.num_tokens
    card = torch.cuda.get_device_name()
    peak = peak_flops(card)
    fpt = train_flops_per_token(n_params, cfg.num_hidden_layers, cfg.hidden_size, prompt + completion)
    with torch.no_grad(), model.disable_adapters(), torch.autocast("cuda", dtype=torch.bfloat16):
        sums, _ = forward_logps(model, batch)
    ref_c, ref_r = sums[:n_pairs].float(), sums[n_pairs:].float()
    steps = {}
    for name in ("orpo", "exo", "orpo_warm"):       # the first step includes Triton compilation
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if name.startswith("orpo"):
                loss, m = orpo_objective(model, batch, beta=0.1)
            else:
                loss, m = dpo_objective(model, batch, ref_c, ref_r, PreferenceConfig())
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tps = ntok / dt
        steps[name] = {"loss": float(loss), "grad_norm": float(gnorm), "seconds": round(dt, 3),
                       "tokens": ntok, "tokens_per_s": round(tps, 1),
                       "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                       "mfu": mfu(tps, fpt, peak)}
        if not (steps[name]["loss"] == steps[name]["loss"] and steps[name]["grad_norm"] == steps[name]["grad_norm"]):
            raise RuntimeError(f"{name} step: non-finite loss or gradient norm {steps[name]}")
    return {"status": "ok", "card": card, "model": "llama-3.2-3b", "params": n_params,
            "trainable_params": sum(p.numel() for p in params), "lora_r": 16, "packed": True,
            "gradient_checkpointing": True, "kernels": "triton", "peak_bf16_flops": peak,
            "flops_per_token": fpt, "steps": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for train_smoke.json")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        result = {"status": "skipped", "reason": "no CUDA device (torch.cuda.is_available() is False)"}
    else:
        try:
            result = run_smoke()
        except Exception as e:                         # recorded in the gpu_check JSON, then rc 1
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_smoke.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if result["status"] == "failed" else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
