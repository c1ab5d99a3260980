"""One training step, ours vs TRL's trainers, on the same work (``test_bench_trl.py`` runs it).

Same work on both sides:

- weights: SmolLM2-135M-Instruct with the four thinking tokens, converted once to an HF folder
  (``Llama.save_pretrained`` + ``Tokenizer.save_pretrained``) that both sides load;
- data: preference pairs from ``datagen.generate_pairs`` (extractive teacher over the shipped corpus,
  rejected = the teacher's plain answers; ``Settings.rejected_from="policy"`` samples them from the model
  instead, longer but about 5 min on 2 cores), each prompt preceded by the opening of its source passage
  so prompts are ~110-185 tokens; cached in the run folder;
- token ids: ours from ``train.batches.tokenize_pair``; TRL is fed the same ids (its own tokenisation
  of the same conversation is compared and reported, see ``trl_native_tokenisation``), and every step's
  batch is hashed on both sides (ids, scored positions) so the parent can assert the batches are equal;
- batches of 2 pairs in file order, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), constant LR,
  grad clip 1.0, no accumulation, no gradient checkpointing, fp32 weights (``--dtype bf16``: bf16
  autocast over fp32 weights on both sides);
- ORPO beta 0.1, lr 5e-6; EXO (``exo_pair``) beta 0.5, label smoothing 5e-3, lr 1e-6, reference
  log-probs precomputed before training on both sides (TRL: ``precompute_ref_log_probs=True``).

ORPO's NLL differs by design: TRL's ORPOTrainer averages it over the chosen prompt AND completion
tokens, ours over the completion only. TRL has no option for the completion-only NLL, so
``--side ours --orpo-nll full`` runs our step with TRL's definition (one forward; the chosen rows are
scored over every token, the odds ratio still on completion means): its losses must match TRL's.

Each side runs in its own process: warm-up steps, then the timed steps (median reported); peak RSS
is VmHWM of the process. One JSON line on stdout:

    python tests/benchmarks/trl_step.py --prepare [--quick]
    python tests/benchmarks/trl_step.py --side ours --objective orpo --dtype fp32 [--quick]
    python tests/benchmarks/trl_step.py --side trl --objective exo --dtype fp32 [--quick]

The run folder (default ``runs/bench-trl-step/{full,quick}``, ``--run-dir``) holds the HF model
folder, pairs.jsonl and rows.json; they are reused when present.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from preflexor_core.losses.preference import IGNORE_INDEX, logps_from_hidden, orpo_loss  # noqa: E402

MODEL = "smollm2-135m-instruct"
ORPO_BETA, ORPO_LR = 0.1, 5e-6
EXO_BETA, EXO_SMOOTHING, EXO_LR = 0.5, 5e-3, 1e-6
PAIRS_PER_BATCH = 2
MAX_GRAD_NORM = 1.0
SEED = 0


@dataclass(frozen=True)
class Settings:
    name: str
    warmup: int               # untimed steps
    steps: int                # timed steps (median reported)
    pairs: int                # rows generated (>= PAIRS_PER_BATCH * (warmup + steps))
    max_length: int           # prompt + completion, tokens (our PairFormat truncates; TRL gets our ids)
    rejected_from: str        # "policy" (sampled, ``reject_tokens`` new tokens at most) or "teacher"
    reject_tokens: int
    answer_sentences: int     # extractive teacher: corpus sentences in the chosen answer
    context_words: int        # words of the source passage put before each prompt

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


FULL = Settings("full", warmup=2, steps=5, pairs=16, max_length=1024, rejected_from="policy", reject_tokens=320,
                answer_sentences=3, context_words=80)
QUICK = Settings("quick", warmup=1, steps=2, pairs=6, max_length=256, rejected_from="teacher", reject_tokens=0,
                 answer_sentences=2, context_words=40)


def settings(quick: bool) -> Settings:
    return QUICK if quick else FULL


def default_run_dir(s: Settings) -> Path:
    return REPO / "runs" / "bench-trl-step" / s.name


# ----------------------------------------------------------------------------- shared helpers
def peak_rss_kib() -> int:
    """Peak resident set of this process (VmHWM; ru_maxrss where /proc is missing), KiB."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def batch_digest(ids: torch.Tensor, attention: torch.Tensor, scored: torch.Tensor) -> str:
    """sha256 over the rows (chosen rows first, then rejected) of (token ids, scored positions),
    padding removed: equal on both sides iff the batches hold the same sequences in the same order."""
    h = hashlib.sha256()
    for r in range(ids.shape[0]):
        n = int(attention[r].sum())
        row = ids[r, :n].tolist()
        pos = torch.nonzero(scored[r, :n]).flatten().tolist()
        h.update(json.dumps([row, pos]).encode())
    return h.hexdigest()[:16]


def load_rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "rows.json").read_text())


def our_examples(tok, rows: list[dict], s: Settings):
    from preflexor_core.train.batches import PairFormat, tokenize_pair
    fmt = PairFormat(max_length=s.max_length, max_prompt_length=min(512, s.max_length - 1))
    out = []
    for i, row in enumerate(rows):
        ex, why = tokenize_pair(tok, row, fmt, index=i)
        if ex is None:
            raise RuntimeError(f"pair {i} dropped by tokenize_pair: {why}")
        out.append(ex)
    return out


def split_example(ex) -> dict:
    """Our PairExample as TRL's pre-tokenised columns (prompt ids, chosen / rejected completion ids)."""
    n = next(i for i, x in enumerate(ex.chosen_labels) if x != IGNORE_INDEX)
    m = next(i for i, x in enumerate(ex.rejected_labels) if x != IGNORE_INDEX)
    assert n == m and ex.chosen_ids[:n] == ex.rejected_ids[:n], "chosen and rejected share the prompt"
    assert all(x != IGNORE_INDEX for x in ex.chosen_labels[n:] + ex.rejected_labels[n:])
    return {"prompt_ids": ex.chosen_ids[:n], "chosen_ids": ex.chosen_ids[n:], "rejected_ids": ex.rejected_ids[n:]}


# ----------------------------------------------------------------------------- prepare
def _with_context(row: dict, retriever, words: int) -> str:
    """The row's prompt preceded by the first ``words`` words (whole sentences) of its source passage."""
    chunks = {c.chunk_id: c for c in retriever.chunks}
    src = next((chunks[c] for c in row.get("source_chunk_ids", []) if c in chunks), None)
    if src is None or words <= 0:
        return row["prompt"]
    text = " ".join(src.text.split())
    out = []
    for sent in re.split(r"(?<=[.!?])\s+", text):
        if out and len(" ".join(out + [sent]).split()) > words:
            break
        out.append(sent)
    return "Context: " + " ".join(out) + "\n\nQuestion: " + row["prompt"]


def prepare(run_dir: Path, s: Settings) -> dict:
    """HF model folder (with the thinking tokens), pairs.jsonl and rows.json in ``run_dir`` (reused when
    present); checks that transformers and our model give the same logits on the HF folder."""
    from preflexor_core.datagen import generate_pairs
    from preflexor_core.llm.model import Llama
    from preflexor_core.llm.registry import load_model_and_tokenizer
    from preflexor_core.llm.vocab import setup_thinking_tokens
    from preflexor_core.retrieval import GraphRetriever, HashingEmbedder
    from preflexor_core.sampler.params import SamplingParams
    from preflexor_core.teachers import ExtractiveTeacher
    from preflexor_core.tokenization.tokenizer import Tokenizer
    from preflexor_core.train.trainer import shipped_corpus_files

    torch.manual_seed(SEED)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = run_dir / "model"
    t0 = time.perf_counter()
    policy = None
    if not (model_dir / "config.json").exists() or not (model_dir / "tokenizer.json").exists():
        model, tok = load_model_and_tokenizer(MODEL, "cpu", "fp32")
        setup_thinking_tokens(model, tok)
        model.save_pretrained(str(model_dir))
        tok.save_pretrained(str(model_dir))
        policy = (model.eval(), tok)
    if not (run_dir / "rows.json").exists():
        retriever = GraphRetriever.build(shipped_corpus_files(), embedder=HashingEmbedder(256))
        teacher = ExtractiveTeacher(retriever, seed=SEED, max_items=1, max_answer_sentences=s.answer_sentences)
        kw = {}
        if s.rejected_from == "policy":
            if policy is None:
                policy = (Llama.from_pretrained(str(model_dir), dtype=torch.float32).eval(),
                          Tokenizer.from_pretrained(str(model_dir)))
            kw = dict(policy=policy, batch_size=s.pairs,
                      sampling=SamplingParams(max_new_tokens=s.reject_tokens, temperature=0.8, top_p=0.9))
        pairs = generate_pairs(retriever, teacher, n=s.pairs, rejected_from=s.rejected_from, seed=SEED,
                               out_path=run_dir / "pairs.jsonl", progress=False, **kw)
        rows = [{"prompt": _with_context(r, retriever, s.context_words), "chosen": r["chosen"],
                 "rejected": r["rejected"], "id": r["id"]} for r in pairs][:s.pairs]
        (run_dir / "rows.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    prep_s = time.perf_counter() - t0
    rows = load_rows(run_dir)
    tok = Tokenizer.from_pretrained(str(model_dir))
    exs = [split_example(e) for e in our_examples(tok, rows, s)]
    lengths = {k: [len(e[k]) for e in exs] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    return {"run_dir": os.path.relpath(run_dir, REPO), "settings": asdict(s), "prepare_s": round(prep_s, 1),
            "lengths": {k: {"min": min(v), "max": max(v), "mean": round(sum(v) / len(v), 1)}
                        for k, v in lengths.items()},
            "logits_max_abs_diff": logits_agreement(model_dir, exs[0])}


def logits_agreement(model_dir: Path, ex: dict) -> float:
    """max |logits ours - logits transformers| on one chosen sequence, both loaded from ``model_dir``."""
    from transformers import AutoModelForCausalLM

    from preflexor_core.llm.model import Llama
    ids = torch.tensor([ex["prompt_ids"] + ex["chosen_ids"]])
    with torch.no_grad():
        ours = Llama.from_pretrained(str(model_dir), dtype=torch.float32).eval()(ids).float()
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        theirs = hf(input_ids=ids).logits.float()
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float((ours - theirs).abs().max())


# ----------------------------------------------------------------------------- our side
def _orpo_full_nll(model, batch, beta: float):
    """Our ORPO step with TRL's NLL: mean -log p over every chosen token after the first (prompt
    included), plus the odds-ratio term on completion-mean log-probs (``orpo_loss``); one forward."""
    n = batch.n_pairs
    valid = batch.attention_mask.bool()
    full = torch.where(valid, batch.input_ids, torch.full_like(batch.input_ids, IGNORE_INDEX))
    labels = torch.cat([full[:n], batch.labels[n:]])                  # chosen: every token; rejected: completion
    hidden = model(batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)
    tok = logps_from_hidden(hidden, model.output_weight, labels)       # (R, T-1)
    comp = (batch.labels[:, 1:] != IGNORE_INDEX) & valid[:, 1:]
    sums, counts = (tok * comp).sum(-1), comp.sum(-1).clamp(min=1)
    nll = -tok[:n].sum() / (labels[:n, 1:] != IGNORE_INDEX).sum().clamp(min=1)
    losses, _, _, _ = orpo_loss(sums[:n] / counts[:n], sums[n:] / counts[n:], beta)
    return nll + losses.mean()


def run_ours(run_dir: Path, s: Settings, objective: str, dtype: str, orpo_nll: str, layout: str = "shared") -> dict:
    from preflexor_core.llm.model import Llama
    from preflexor_core.losses.preference import forward_logps
    from preflexor_core.tokenization.tokenizer import Tokenizer
    from preflexor_core.train import dpo_objective, orpo_objective
    from preflexor_core.train.batches import collate_pairs
    from preflexor_core.train.config import PreferenceConfig

    torch.manual_seed(SEED)
    model_dir = str(run_dir / "model")
    tok = Tokenizer.from_pretrained(model_dir)
    model = Llama.from_pretrained(model_dir, dtype=torch.float32).train()
    examples = our_examples(tok, load_rows(run_dir), s)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    chunks = [examples[i:i + PAIRS_PER_BATCH] for i in range(0, PAIRS_PER_BATCH * s.total_steps, PAIRS_PER_BATCH)]
    padded = [collate_pairs(c, pad) for c in chunks]           # the digests: same sequences as TRL's rows
    # the trainer's layout: packed, each prompt encoded once for its two answers (TRL's NLL needs padded rows)
    shared = layout == "shared" and orpo_nll != "full"
    batches = [collate_pairs(c, pad, packed=True, share_prompt=True) for c in chunks] if shared else padded
    bf16 = dtype == "bf16"
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    refs = []
    if objective == "exo":
        pref = PreferenceConfig(dpo_loss_type="exo_pair", dpo_beta=EXO_BETA, label_smoothing=EXO_SMOOTHING)
        with torch.no_grad(), amp():
            for b in batches:                                   # reference = the initial policy, before training
                sums, _ = forward_logps(model, b)
                refs.append((sums[:b.n_pairs].float(), sums[b.n_pairs:].float()))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ORPO_LR if objective == "orpo" else EXO_LR, betas=(0.9, 0.999), eps=1e-8,
                            fused=True,                          # as the trainer (train/stage.py)
                            weight_decay=0.0)
    losses, times, digests = [], [], []
    for i, b in enumerate(batches):
        p = padded[i]
        digests.append(batch_digest(p.input_ids, p.attention_mask, p.labels != IGNORE_INDEX))
        t0 = time.perf_counter()
        with amp():
            if objective == "exo":
                loss, _ = dpo_objective(model, b, refs[i][0], refs[i][1], pref)
            elif orpo_nll == "full":
                loss = _orpo_full_nll(model, b, ORPO_BETA)
            else:
                loss, _ = orpo_objective(model, b, ORPO_BETA)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return {"tokens": [b.num_tokens for b in batches], "losses": losses, "step_times": times, "digests": digests,
            "layout": "shared" if shared else "padded"}


# ----------------------------------------------------------------------------- TRL side
def run_trl(run_dir: Path, s: Settings, objective: str, dtype: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from preflexor_core.tokenization.tokenizer import Tokenizer

    torch.manual_seed(SEED)
    model_dir = str(run_dir / "model")
    rows = load_rows(run_dir)[:PAIRS_PER_BATCH * s.total_steps]
    ours = [split_example(e) for e in our_examples(Tokenizer.from_pretrained(model_dir), rows, s)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    conv = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}],
                               "index": i} for i, r in enumerate(rows)])
    native: list[dict] = []            # TRL's own tokenisation of each row, for the report
    rec = {"losses": [], "digests": [], "t0": [], "times": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            rec["t0"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            rec["times"].append(time.perf_counter() - rec["t0"][-1])

    common = dict(output_dir=str(run_dir / "trl-out"), per_device_train_batch_size=PAIRS_PER_BATCH,
                  gradient_accumulation_steps=1, max_steps=s.total_steps, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                  optim="adamw_torch_fused", max_grad_norm=MAX_GRAD_NORM,   # transformers' default
                  bf16=dtype == "bf16", use_cpu=True, train_sampling_strategy="sequential",
                  dataloader_num_workers=0, logging_strategy="no", save_strategy="no", report_to=[],
                  disable_tqdm=True, seed=SEED, data_seed=SEED)

    def record(inputs, loss):
        if "input_ids" in inputs:           # DPO: [chosen; rejected] rows, completion_mask
            d = batch_digest(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        else:                               # ORPO: chosen_* and rejected_* rows, labels -100 on the prompt
            ids, att, lab = (torch.cat(_pad_to(inputs[f"chosen_{k}"], inputs[f"rejected_{k}"], v))
                             for k, v in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)))
            d = batch_digest(ids, att, lab != -100)
        rec["digests"].append(d)
        rec["losses"].append(float(loss.detach()))

    if objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        class Trainer(ORPOTrainer):
            def tokenize_row(self, feature, model=None):
                native.append(super().tokenize_row(feature, model))
                o = ours[feature["index"]]
                c, r = o["prompt_ids"] + o["chosen_ids"], o["prompt_ids"] + o["rejected_ids"]
                p = len(o["prompt_ids"])
                return {"prompt_input_ids": o["prompt_ids"], "prompt_attention_mask": [1] * p,
                        "chosen_input_ids": c, "chosen_attention_mask": [1] * len(c),
                        "chosen_labels": [-100] * p + o["chosen_ids"],
                        "rejected_input_ids": r, "rejected_attention_mask": [1] * len(r),
                        "rejected_labels": [-100] * p + o["rejected_ids"]}

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                record(inputs, out[0] if return_outputs else out)
                return out

        cfg = ORPOConfig(beta=ORPO_BETA, learning_rate=ORPO_LR, max_length=4 * s.max_length,
                         remove_unused_columns=False, **common)
        trainer = Trainer(model=model, args=cfg, train_dataset=conv, processing_class=tok, callbacks=[Timer()])
        nat = [{"prompt_ids": n["prompt_input_ids"],
                "chosen_ids": n["chosen_input_ids"][len(n["prompt_input_ids"]):],
                "rejected_ids": n["rejected_input_ids"][len(n["prompt_input_ids"]):]} for n in native]
    else:
        from trl import DPOConfig, DPOTrainer

        class Trainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                nat = super()._prepare_dataset(conv, processing_class, args, dataset_name)
                native.extend({k: list(x[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for x in nat)
                return Dataset.from_list(ours)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                record(inputs, out[0] if return_outputs else out)
                return out

        cfg = DPOConfig(beta=EXO_BETA, loss_type=["exo_pair"], label_smoothing=EXO_SMOOTHING, learning_rate=EXO_LR,
                        precompute_ref_log_probs=True, precompute_ref_batch_size=PAIRS_PER_BATCH, max_length=None,
                        padding_free=False, **common)
        trainer = Trainer(model=model, args=cfg, train_dataset=conv, processing_class=tok, callbacks=[Timer()])
        nat = native
    trainer.train()
    same = [n == o for n, o in zip(nat, ours)]
    diff = next((i for i, ok in enumerate(same) if not ok), None)
    note = None
    if diff is not None:
        n, o = nat[diff], ours[diff]
        note = {k: {"ours_tail": o[k][-3:], "trl_tail": n[k][-3:], "ours_len": len(o[k]), "trl_len": len(n[k])}
                for k in o if n[k] != o[k]}
    return {"losses": rec["losses"], "step_times": rec["times"], "digests": rec["digests"],
            "trl_native_tokenisation": {"equal_rows": sum(same), "rows": len(same), "first_difference": note}}


def _pad_to(a: torch.Tensor, b: torch.Tensor, value: int) -> list[torch.Tensor]:
    """a and b right-padded with ``value`` to the same width."""
    w = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, w - t.shape[1]), value=value)  # noqa: E731
    return [pad(a), pad(b)]


# ----------------------------------------------------------------------------- CLI
def run_side(side: str, run_dir: Path, s: Settings, objective: str, dtype: str, threads: int,
             orpo_nll: str = "completion", layout: str = "shared") -> dict:
    torch.set_num_threads(threads)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    if side == "ours":
        out = run_ours(run_dir, s, objective, dtype, orpo_nll, layout)
    else:
        out = run_trl(run_dir, s, objective, dtype)
    timed = out["step_times"][s.warmup:]
    return {"side": side, "objective": objective, "dtype": dtype, "orpo_nll": orpo_nll if objective == "orpo" else None,
            "threads": torch.get_num_threads(), "warmup": s.warmup, "steps": s.steps,
            "median_step_s": statistics.median(timed), "step_times": out["step_times"], "losses": out["losses"],
            "digests": out["digests"], "peak_rss_kib": peak_rss_kib(), "wall_s": time.perf_counter() - t0,
            "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
            **{k: v for k, v in out.items() if k not in ("losses", "step_times", "digests")}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="One training step, ours vs TRL (see the module docstring).")
    ap.add_argument("--prepare", action="store_true", help="build the model folder and the pairs, then exit")
    ap.add_argument("--side", choices=("ours", "trl"))
    ap.add_argument("--objective", choices=("orpo", "exo"), default="orpo")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--orpo-nll", choices=("completion", "full"), default="completion",
                    help="ours only: the ORPO NLL over the completion (ours) or over prompt + completion (TRL's)")
    ap.add_argument("--layout", choices=("shared", "padded"), default="shared",
                    help="ours only: the trainer's packed row with each prompt shared (default) or padded rows")
    ap.add_argument("--quick", action="store_true", help="small settings for development")
    ap.add_argument("--run-dir", type=Path, help="default runs/bench-trl-step/{full,quick}")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = ap.parse_args(argv)
    s = settings(args.quick)
    run_dir = (args.run_dir or default_run_dir(s)).resolve()
    if args.prepare:
        print(json.dumps(prepare(run_dir, s)))
        return
    if args.side is None:
        ap.error("--side is required unless --prepare")
    if args.orpo_nll == "full" and (args.side != "ours" or args.objective != "orpo"):
        ap.error("--orpo-nll full is our ORPO step with TRL's NLL definition: use it with --side ours --objective orpo")
    print(json.dumps(run_side(args.side, run_dir, s, args.objective, args.dtype, args.threads, args.orpo_nll,
                              args.layout)))


if __name__ == "__main__":
    sys.exit(main())
