"""One training stage: optimizer, schedule, the step loop with accumulation, on-the-fly datasets.

``StageRun(trainer, stage, model, tok, ref, lora_cfg).train()`` runs stage 0 (causal LM on packed
corpus blocks) or a preference stage: ``iterations`` rounds of "generate pairs with the current
policy (rank 0), tokenise, train ``n_steps`` on them" (PRefLexOR, arXiv 2410.12375, sec. 2).
Stage 2 scores the reference (frozen initial policy, or LoRA disabled) once per dataset. Micro-batch
``a`` of step ``s`` on rank ``r`` takes items ``((s * grad_accum + a) * world + r) * bs`` onward of a
seeded permutation, so a run is reproducible and resumes exactly (see ``checkpointing``).

Tests: ``python -m pytest -q tests/test_trainer.py``
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..infra.errors import PreflexorError
from ..tokenization.tokenizer import Tokenizer
from ..llm.lora import disable_adapters
from ..llm.model import Llama
from ..losses.preference import forward_logps
from ..sampler import SamplingParams
from ..datagen import generate_pairs, read_pairs
from ..datagen.pairs_io import nothing_produced
from . import distributed as D
from .batches import Batch, PairFormat, collate_pairs, collate_sequences, pack_lm_stream, tokenize_pair
from .checkpointing import load_checkpoint, save_checkpoint, save_final, seed_everything
from .objectives import ADDITIVE_METRICS, dpo_objective, lm_objective, orpo_objective
from .provenance import datagen_seed, pair_id_prefix, settings_hash
from .signals import TrainingInterrupted, current_stop

log = logging.getLogger("preflexor.train")

__all__ = ["StageRun", "MicroBatch", "make_scheduler", "datagen_seed", "settings_hash", "pair_id_prefix",
           "PAIRS_FILE"]


class StageError(PreflexorError, ValueError):
    """A stage that cannot train (no data to train on); it exports nothing and writes no DONE."""


def make_scheduler(opt, warmup: int, total: int, kind: str):
    """Linear warmup over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


PAIRS_FILE = "pairs.jsonl"


def _bar(total: int, desc: str, enabled: bool, initial: int = 0):
    return tqdm(total=total, desc=desc, disable=not enabled, initial=initial, dynamic_ncols=True)


class StageRun:
    """One stage: optimizer, schedule, data, the step loop, checkpoints and exact resume. ``trainer``
    is the run's ``Trainer`` (device, run directory, log, retriever, teacher)."""

    def __init__(self, trainer, stage: str, model: Llama, tok: Tokenizer, ref: Llama | None, lora_cfg):
        self.t, self.cfg, self.stage = trainer, trainer.cfg, stage
        self.tok, self.ref, self.lora_cfg = tok, ref, lora_cfg
        self.device = trainer.device
        self.base = model
        # prefix sharing needs attention pieces, which sliding-window layers do not take
        self.share_prompt = trainer.packed and not model.config.has_sliding_layers
        self.fsdp = self.cfg.parallel.fsdp and trainer.dist.enabled
        self.model = D.wrap_model(model, trainer.dist, fsdp=self.cfg.parallel.fsdp)
        self.ckpt_dir = trainer.out / "checkpoints" / f"stage{stage}"
        self.final_dir = trainer.out / f"stage{stage}"
        o, d = self.cfg.optim, self.cfg.data
        self.total_steps = o.sft_steps if stage == "0" else self.cfg.iterations_for(stage) * o.n_steps
        params = [p for p in model.parameters() if p.requires_grad]
        # one fused kernel per step on CUDA and CPU (same update as the foreach loop, up to float rounding);
        # stage 3 keeps the foreach loop on CPU: with the fused one its resume was not bit-identical
        fused = trainer.device.type == "cuda" or (trainer.device.type == "cpu" and stage != "3")
        kw = {"fused": True} if fused else {}
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr_for(stage), betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=o.weight_decay, **kw)
        self.sched = make_scheduler(self.opt, o.warmup_steps, self.total_steps, o.schedule)
        self.pos = {"iteration": 0, "step": 0, "global_step": 0}
        p = self.cfg.preference
        self.fmt = PairFormat(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                              truncation_mode=d.truncation_mode, mask_mode=p.mask_mode if stage == "2" else "none",
                              mask_fraction=p.mask_fraction,
                              include_thinking_token_in_labels=p.include_thinking_token_in_labels,
                              on_unclosed=self.cfg.unclosed_policy, answer_after=p.answer_after)

    @property
    def rank(self) -> int:
        return self.t.dist.rank

    @property
    def world(self) -> int:
        return self.t.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.t.dist.is_main

    def plain_model(self, state: dict[str, torch.Tensor] | None = None) -> Llama:
        """An unsharded Llama with the current weights (the model itself unless FSDP2 shards it)."""
        if not self.fsdp:
            return self.base
        model = Llama(self.base.config, device="meta")
        model.load_state_dict(state if state is not None else D.full_state_dict(self.base), assign=True)
        return model

    # -- one optimizer step -----------------------------------------------------
    def accumulate(self, micro_batches: list["MicroBatch"]) -> dict:
        """Forward + backward every micro-batch; gradients are those of ONE batch made of all of them
        on all ranks: token sums / the total labelled tokens, pair sums / the total pairs (both
        all-reduced first), times the world size (DDP and FSDP2 average gradients over ranks). The
        gradient all-reduce runs only in the last backward (``no_grad_sync`` before it)."""
        self.model.train()
        totals = torch.tensor([[mb.n_tokens, mb.n_pairs] for mb in micro_batches], dtype=torch.float64).sum(0)
        n_tokens, n_pairs = D.all_reduce_sum(totals.to(self.device)).tolist()
        metrics: dict[str, float] = {}
        ntok = 0
        last = len(micro_batches) - 1
        for i, mb in enumerate(micro_batches):
            with D.no_grad_sync(self.model, enabled=i < last and self.t.dist.enabled):
                with torch.autocast(self.device.type, dtype=self.t.autocast_dtype, enabled=self.t.autocast):
                    loss, m = self._loss(mb, n_tokens, n_pairs)
                (loss * self.world).backward()
            ntok += mb.batch.num_tokens
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + (v * self.world if k in ADDITIVE_METRICS else v / len(micro_batches))
        metrics["_tokens"] = float(ntok) * self.world
        return metrics

    def clip_and_step(self) -> tuple[torch.Tensor, float]:
        """Clip the accumulated gradients, step the optimizer and the schedule, clear the gradients;
        returns (grad norm before clipping, the learning rate used)."""
        params = [p for p in self.base.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm, lr

    def optimizer_step(self, micro_batches: list["MicroBatch"]) -> dict:
        """``accumulate``, clip, step; additive metrics (loss, nll) are the whole step's, the others
        are averaged over micro-batches and ranks."""
        t0 = time.perf_counter()
        metrics = self.accumulate(micro_batches)
        grad_norm, lr = self.clip_and_step()
        keys = sorted(metrics)
        vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        vals = D.all_reduce_mean(vals.to(self.device)).cpu()
        out = {k: float(v) for k, v in zip(keys, vals)}
        dt = time.perf_counter() - t0
        out.update(grad_norm=float(grad_norm), lr=lr, tokens_per_s=out.pop("_tokens") / dt)
        return out

    def _loss(self, mb: "MicroBatch", n_tokens: float, n_pairs: float) -> tuple[torch.Tensor, dict]:
        b = mb.batch.to(self.device)
        if self.stage == "0":
            return lm_objective(self.model, b, num_tokens=n_tokens)
        if self.stage == "1":
            return orpo_objective(self.model, b, self.cfg.preference.orpo_beta, num_tokens=n_tokens,
                                  num_pairs=n_pairs)
        rc, rr = (r.to(self.device) for r in mb.refs)
        return dpo_objective(self.model, b, rc, rr, self.cfg.preference, num_tokens=n_tokens, num_pairs=n_pairs)

    def _indices(self, order: torch.Tensor, step: int, a: int, bs: int) -> torch.Tensor:
        start = ((step * self.cfg.optim.grad_accum + a) * self.world + self.rank) * bs
        return order[start:start + bs]

    def _log(self, metrics: dict, **extra) -> None:
        self.t.log.write({"stage": int(self.stage), **extra, "global_step": self.pos["global_step"], **metrics,
                          "time": time.time()})

    def _stop_early(self) -> bool:
        return self.cfg.run.max_steps is not None and self.pos["global_step"] >= self.cfg.run.max_steps

    def _after_step(self, m: dict, bar, **extra) -> None:
        self.pos["global_step"] += 1
        self._log(m, **extra)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}")
        every = self.cfg.checkpoint.save_every
        saved = bool(every) and self.pos["global_step"] % every == 0
        if saved:
            save_checkpoint(self)
        self.stop_if_signalled(saved)

    def stop_if_signalled(self, saved: bool = False) -> None:
        """At a step boundary: after SIGTERM / SIGINT, save a resumable checkpoint (unless one was just
        saved) and stop with :class:`TrainingInterrupted` (see ``signals``)."""
        stop = current_stop()
        if stop is None or not stop.requested():
            return
        if not saved:
            save_checkpoint(self)
        raise TrainingInterrupted(f"stopped by {stop.name} at stage {self.stage}, step {self.pos['global_step']}: "
                                  f"a checkpoint was saved in {self.ckpt_dir}; continue with --resume", stop.signum)

    # -- the loops --------------------------------------------------------------
    def train(self) -> None:
        resumed = self.cfg.checkpoint.resume and load_checkpoint(self)
        if not resumed:
            seed_everything(self.cfg.run.seed + 1000 * int(self.stage))
        self.t.log.rewind(self.stage, self.pos)       # one log row per step after a resume or a rerun
        if self.stage == "0":
            self.train_lm()
        else:
            self.train_preference()
        if self._stop_early() and self.pos["global_step"] < self.total_steps:
            log.info("stage %s stopped at step %d by max_steps; continue with --resume", self.stage,
                     self.pos["global_step"])
            self.t.stopped_early = True
            return
        if self.pos["global_step"] == 0:               # never a DONE for a stage that did not train
            raise StageError(f"stage {self.stage} trained no optimizer step (position {self.pos}); nothing is "
                             f"exported and {self.final_dir} gets no DONE")
        save_final(self)

    def train_lm(self) -> None:
        o = self.cfg.optim
        blocks = pack_lm_stream([self.tok.encode_text(t, allow=()) for t in self.t.corpus_texts()], self.cfg.data.sft_seq_len + 1,
                                self.tok.token_to_id("<|end_of_text|>") or self.tok.eos_token_id)
        g = torch.Generator().manual_seed(self.cfg.run.seed)
        need = self.total_steps * o.sft_batch_size * self.world * o.grad_accum
        order = torch.cat([torch.randperm(len(blocks), generator=g) for _ in range(need // len(blocks) + 1)])
        bar = _bar(self.total_steps, f"stage 0 (causal LM, {len(blocks)} blocks)",
                   self.cfg.run.progress and self.is_main, initial=self.pos["global_step"])
        while self.pos["global_step"] < self.total_steps and not self._stop_early():
            fns = []
            for a in range(o.grad_accum):
                rows = blocks[self._indices(order, self.pos["global_step"], a, o.sft_batch_size)]
                fns.append(self._lm_micro_batch([(r.tolist(), r.tolist()) for r in rows]))
            m = self.optimizer_step(fns)
            self.pos["step"] = self.pos["global_step"] + 1
            self._after_step(m, bar)
        bar.close()
        save_checkpoint(self)

    def _lm_micro_batch(self, seqs) -> "MicroBatch":
        b = collate_sequences(seqs, pad_id=0, packed=False)
        b.attention_mask = None          # equal-length blocks: no padding
        return MicroBatch(b, int(b.label_counts().sum()), 0)

    # -- preference stages ------------------------------------------------------
    def generate(self, iteration: int) -> list[dict]:
        """Rank 0 generates this iteration's pairs with the current policy (or, under --resume, reloads
        the rows an interrupted run made for the same provenance); all ranks receive the same rows."""
        rows = None
        self.t.retriever()            # collective (built on rank 0, loaded everywhere): call on every rank
        state = D.full_state_dict(self.base) if self.fsdp else None        # collective under FSDP2
        if self.is_main:
            d = self.cfg.data
            policy = self.plain_model(state)
            meta = self.provenance(iteration)
            prefix = pair_id_prefix(meta)
            was_training = policy.training
            policy.eval()
            if self.pos["step"] > 0:
                # resumed inside an iteration: its dataset was complete before training on it began, so
                # rows are only reloaded (a row skipped then must not be sampled now by a later policy)
                rows = sorted((r for r in read_pairs(self.t.out / PAIRS_FILE)
                               if str(r["id"]).startswith(prefix + "-")), key=lambda r: int(r.get("index", 0)))
                self.gen_skipped = {}
            else:
                rows = None
            rows = rows if rows is not None else generate_pairs(
                self.t.retriever(), self.t.teacher(), policy=(policy, self.tok), tokenizer=self.tok,
                n=d.pairs_per_iteration, number_nodes_to_get=d.number_nodes_to_get,
                rejected_from="policy", with_thinking=self.stage == "2",
                k_samples=d.k_samples if self.stage == "2" else 1,
                seed=datagen_seed(self.cfg.run.seed, self.stage, iteration), id_prefix=prefix, row_meta=meta,
                out_path=str(self.t.out / PAIRS_FILE), sampling=self._sampling_params(),
                progress=self.cfg.run.progress, batch_size=d.gen_batch_size, thinking_format=d.thinking_format,
                decode_weights=d.decode_weights)
            policy.train(was_training)
            del policy
            if hasattr(rows, "stats"):
                self.gen_skipped = dict(rows.stats.skipped)  # why rows were not generated (for the error)
            rows = [dict(r) for r in rows if str(r["id"]).startswith(prefix + "-")]
        return D.broadcast_object(rows)

    def provenance(self, iteration: int) -> dict:
        """What a generated row records: stage, iteration, the optimizer step of the policy that sampled
        it (steps of this stage before the iteration) and a short hash of the sampling and teacher
        settings. Rows are reused (on --resume only) when all four match."""
        return {"stage": int(self.stage), "iteration": iteration,
                "policy_step": self.pos["global_step"] - self.pos["step"],
                "settings_hash": settings_hash(self.cfg, self._sampling_params(), self.stage)}

    def _sampling_params(self):
        d = self.cfg.data
        cap = d.thinking_max_new_tokens if self.stage == "2" else d.sample_max_new_tokens
        return SamplingParams(max_new_tokens=cap, temperature=d.sample_temperature, top_p=d.sample_top_p)

    @torch.no_grad()
    def reference_logps(self, examples) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference (frozen initial policy, or LoRA disabled) summed log-probs, once per dataset."""
        out_c, out_r = [], []
        bs = self.cfg.optim.batch_size
        with contextlib.ExitStack() as stack:
            if self.ref is None:
                stack.enter_context(disable_adapters(self.base))
            model = self.ref if self.ref is not None else self.base
            was = model.training
            model.eval()
            stack.callback(model.train, was)
            for i in range(0, len(examples), bs):
                b = collate_pairs(examples[i:i + bs], self.tok.pad_token_id, packed=self.t.packed,
                                  share_prompt=self.share_prompt).to(self.device)
                with torch.autocast(self.device.type, dtype=self.t.autocast_dtype, enabled=self.t.autocast):
                    sums, _ = forward_logps(model, b)
                out_c.append(sums[:b.n_pairs].float().cpu())
                out_r.append(sums[b.n_pairs:].float().cpu())
        return torch.cat(out_c), torch.cat(out_r)

    def tokenize(self, rows: list[dict], generator: torch.Generator) -> tuple[list, dict[str, int]]:
        """Rows -> PairExamples with this stage's format; also the count of dropped rows per reason."""
        examples, dropped = [], {}
        for i, row in enumerate(rows):
            ex, why = tokenize_pair(self.tok, row, self.fmt, generator=generator, index=i)
            if ex is None:
                dropped[why] = dropped.get(why, 0) + 1
            else:
                examples.append(ex)
        return examples, dropped

    def train_preference(self) -> None:
        o = self.cfg.optim
        name = "ORPO" if self.stage == "1" else f"DPO/{self.cfg.preference.dpo_loss_type}"
        bar = _bar(self.total_steps, f"stage {self.stage} ({name})", self.cfg.run.progress and self.is_main,
                   initial=self.pos["global_step"])
        while self.pos["iteration"] < self.cfg.iterations_for(self.stage) and not self._stop_early():
            it = self.pos["iteration"]
            rows = self.generate(it)
            g = torch.Generator().manual_seed(self.cfg.run.seed * 7919 + it)
            examples, dropped = self.tokenize(rows, g)
            self.t.log.write({"stage": int(self.stage), "iteration": it, "event": "dataset", "pairs": len(rows),
                              "kept": len(examples), "dropped": dropped})
            if not examples:      # a stage that trains on nothing fails (no DONE) with the dominant cause
                raise nothing_produced(f"stage {self.stage} iteration {it}", getattr(self, "gen_skipped", None),
                                       dropped, total=len(rows))
            ref_c = ref_r = None
            if self.stage == "2":
                ref_c, ref_r = self.reference_logps(examples)
            need = o.n_steps * o.grad_accum * o.batch_size * self.world
            perm = torch.cat([torch.randperm(len(examples), generator=g) for _ in range(need // len(examples) + 1)])
            while self.pos["step"] < o.n_steps and not self._stop_early():
                fns = []
                for a in range(o.grad_accum):
                    idx = self._indices(perm, self.pos["step"], a, o.batch_size).tolist()
                    fns.append(self._pair_micro_batch([examples[j] for j in idx],
                                                      None if ref_c is None else (ref_c[idx], ref_r[idx])))
                m = self.optimizer_step(fns)
                self.pos["step"] += 1
                self._after_step(m, bar, iteration=it)
                bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['rewards/accuracies']:.2f}")
            if self.pos["step"] >= o.n_steps:
                self._next_iteration()
            else:
                save_checkpoint(self)
        bar.close()

    def _next_iteration(self) -> None:
        self.pos["iteration"] += 1
        self.pos["step"] = 0
        save_checkpoint(self)

    def _pair_micro_batch(self, chunk, refs) -> "MicroBatch":
        b = collate_pairs(chunk, self.tok.pad_token_id, packed=self.t.packed, share_prompt=self.share_prompt)
        return MicroBatch(b, int(b.label_counts()[:b.n_pairs].sum()), b.n_pairs, refs)


@dataclass
class MicroBatch:
    """A collated micro-batch (on CPU) and what normalises its loss: ``n_tokens`` labelled tokens
    (chosen rows only in a pair batch: the NLL's), ``n_pairs``, and stage 2's reference log-probs."""
    batch: Batch
    n_tokens: int
    n_pairs: int
    refs: tuple[torch.Tensor, torch.Tensor] | None = None
