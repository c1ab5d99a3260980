"""Stage 3: GRPO on graph-grounded rewards (``train.py --stage 3``, alias ``grpo``).

Per generation batch ``k``: ``grpo_prompts`` questions from the extractive teacher (seeded by run seed,
``k`` and rank; reference answer = the teacher's), G = ``num_generations`` samples each from ONE
``sampler.generate`` call (``SamplingParams(n=G)``: the G rows of a prompt share its prefill), the
graph thinking opened by the forced ``<|thinking|>``; rewards from ``rewards.GraphRewards`` (corpus =
the run's retriever); advantages ``grpo.group_advantages`` (``--scale-rewards``); groups with zero
spread dropped (``keep_groups_with_spread``); old (and reference, ``--beta`` > 0) log-probs computed
once per batch; ``--grpo-updates`` optimizer steps on the clipped ``grpo_loss`` (``--loss-type``).
Optional ``--grpo-sft-steps`` of causal LM on the teacher's graph-format answers first.
Position, optimizer, scheduler and RNG are saved by ``checkpointing`` (exact resume).

References: GRPO (arXiv 2402.03300), DAPO (2503.14476), Dr. GRPO (2503.20783), Graph-PReFLexOR
(2501.08120). Tests: ``python -m pytest -q tests/test_grpo_stage.py``.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch

from ..thinking.formats import prompt
from ..thinking.tokens import THINK_START
from ..llm.lora import disable_adapters
from ..losses.grpo import group_advantages, grpo_loss, keep_groups_with_spread
from ..losses.preference import IGNORE_INDEX, _unwrap, logps_from_hidden
from ..sampler import SamplingParams, generate
from ..teachers.base import hash_seed
from ..rewards import REWARD_NAMES, GraphRewards, RewardWeights
from . import distributed as D
from .batches import pack_sharing, prompt_ids
from .checkpointing import load_checkpoint, save_checkpoint, save_final, seed_everything
from .stage import StageRun, _bar, make_scheduler

log = logging.getLogger("preflexor.train")

__all__ = ["GRPOStage", "GRPOPrompt", "parse_reward_weights", "grpo_prompts"]


def parse_reward_weights(text: str) -> RewardWeights:
    """``"format=1,groundedness=0.5"`` -> RewardWeights (unnamed rewards keep their defaults)."""
    if not text or not text.strip():
        return RewardWeights()
    d = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            d[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--reward-weights {text!r}: {part!r} is not name=number; known names: "
                             f"{', '.join(REWARD_NAMES)}") from None
        if not sep:
            raise ValueError(f"--reward-weights {text!r}: {part!r} has no '='; write name=number")
    return RewardWeights.from_dict(d)


class GRPOPrompt:
    """One stage-3 question: the prompt text, the teacher's reference answer and graph-format chosen."""

    def __init__(self, question: str, reference: str, chosen: str | None):
        self.question, self.reference, self.chosen = question, reference, chosen

    @property
    def prompt(self) -> str:
        return prompt(self.question, "graph")


def grpo_prompts(retriever, teacher, n: int, seed: int, number_nodes: int = 3, with_chosen: bool = False,
                 max_tries: int = 4) -> list[GRPOPrompt]:
    """``n`` questions made by ``teacher`` (an extractive-style teacher: make_question, context, answer,
    graph_thinking) from random corpus chunks; deterministic for ``seed``."""
    for need in ("make_question", "context", "answer", "graph_thinking"):
        if not hasattr(teacher, need):
            raise NotImplementedError(f"stage 3 needs the extractive teacher for its questions and reference "
                                      f"answers ({getattr(teacher, 'name', type(teacher).__name__)} has no {need}); "
                                      "use --teacher extractive")
    out = []
    for i in range(n * max_tries):
        if len(out) == n:
            break
        nodes = retriever.random_nodes(number_nodes, seed=hash_seed(seed, "grpo", i) % 2**31)
        q = teacher.make_question(nodes, salt=f"grpo-{seed}-{i}")
        if not q:
            continue
        ctx = teacher.context(q, seed_hits=nodes)
        ref = teacher.answer(q, ctx)
        chosen = None
        if with_chosen:
            try:
                chosen = teacher.graph_thinking(q, ctx).chosen(ref)
            except ValueError:
                continue
        if ref:
            out.append(GRPOPrompt(q, ref, chosen))
    if len(out) < n:
        raise ValueError(f"stage 3: the teacher made only {len(out)} of {n} questions from the corpus; "
                         "use a larger corpus or fewer --grpo-prompts")
    return out


class GRPOStage(StageRun):
    """Stage 3 on a ``StageRun``'s optimizer, checkpoints and logs. ``pos``: ``step`` = generation
    batches done, ``global_step`` = optimizer steps, ``sft_step`` = warm-up steps done."""

    def __init__(self, trainer, stage, model, tok, ref, lora_cfg):
        super().__init__(trainer, stage, model, tok, ref, lora_cfg)
        g, o = self.cfg.grpo, self.cfg.optim
        self.g = g
        self.total_steps = g.grpo_steps * g.grpo_updates
        self.sched = make_scheduler(self.opt, o.warmup_steps, self.total_steps, o.schedule)
        self.pos["sft_step"] = 0
        r = trainer.retriever()
        self.rewards = GraphRewards(corpus=r, embedder=getattr(r, "embedder", None),
                                    weights=parse_reward_weights(g.reward_weights))
        end = tok.end_of_turn_id
        self.end_id = end if end is not None else tok.eos_token_id

    # -- the loop -------------------------------------------------------------
    def train(self) -> None:
        resumed = self.cfg.checkpoint.resume and load_checkpoint(self)
        if not resumed:
            seed_everything(self.cfg.run.seed + 3000)
        if self.pos.get("sft_step", 0) < self.g.grpo_sft_steps:
            self.warmup()
        bar = _bar(self.g.grpo_steps, f"stage 3 (GRPO/{self.g.loss_type})", self.cfg.run.progress and self.is_main,
                   initial=self.pos["step"])
        every = self.cfg.checkpoint.save_every
        while self.pos["step"] < self.g.grpo_steps and not self._stop_early():
            before = self.pos["global_step"]
            self.generation_step(self.pos["step"])
            self.pos["step"] += 1
            bar.update(1)
            saved = bool(every) and self.pos["global_step"] // every > before // every
            if saved:
                save_checkpoint(self)
            self.stop_if_signalled(saved)
        bar.close()
        if self.pos["step"] < self.g.grpo_steps:
            save_checkpoint(self)
            log.info("stage 3 stopped at generation batch %d by max_steps; continue with --resume", self.pos["step"])
            self.t.stopped_early = True
            return
        save_final(self)

    def prompts(self, k: int, with_chosen: bool = False) -> list[GRPOPrompt]:
        seed = hash_seed(self.cfg.run.seed, "grpo" if not with_chosen else "grpo-sft", k, self.rank) % 2**31
        return grpo_prompts(self.t.retriever(), self.t.teacher(), self.g.grpo_prompts, seed,
                            self.cfg.data.number_nodes_to_get, with_chosen=with_chosen)

    def generate_batch(self, k: int, prompts: list[GRPOPrompt]):
        """G samples per prompt from one sampler call; returns (completions, seconds)."""
        params = SamplingParams(max_new_tokens=self.g.grpo_max_new_tokens, temperature=self.g.grpo_temperature,
                                n=self.g.num_generations, prepend_response=THINK_START,
                                seed=hash_seed(self.cfg.run.seed, "grpo-sample", k, self.rank) % 2**31)
        chats = [[{"role": "user", "content": p.prompt}] for p in prompts]
        t0 = time.perf_counter()
        outs = generate(self.plain_model(), self.tok, chats, params, decode_weights=self.cfg.data.decode_weights)
        return outs, time.perf_counter() - t0

    def generation_step(self, k: int) -> None:
        g = self.g
        prompts = self.prompts(k)
        outs, gen_s = self.generate_batch(k, prompts)
        G = g.num_generations
        texts = [o.text for o in outs]
        refs = [prompts[i // G].reference for i in range(len(outs))]
        scored = self.rewards.score_many(texts, refs, [prompts[i // G].question for i in range(len(outs))])
        values = torch.tensor([r.value for r in scored], dtype=torch.float64)
        adv = group_advantages(values, G, scale=g.scale_rewards)
        keep = keep_groups_with_spread(values, G)
        gen_tokens = sum(len(o.token_ids) - o.num_forced_tokens for o in outs)
        info = {"reward": float(values.mean()), "reward_std": float(values.std()) if len(values) > 1 else 0.0,
                "groups_kept": len(keep) / len(outs), "completion_tokens": gen_tokens / len(outs),
                "gen_tokens_per_s": gen_tokens / max(gen_s, 1e-9), "gen_rows": len(outs), "generation": k}
        for name in REWARD_NAMES:
            vals = [r.components[name] for r in scored if name in r.components]
            if vals:
                info[f"reward/{name}"] = sum(vals) / len(vals)
        if not keep:
            self.t.log.write({"stage": 3, "event": "skipped_generation", "global_step": self.pos["global_step"], **info})
            return
        batch = self.sequences(prompts, [outs[i] for i in keep], G, [int(i) for i in keep])
        adv_k = adv[keep].float()
        old = self.batch_logps(batch, self.base) if g.grpo_updates > 1 else None
        ref = self.reference_token_logps(batch) if g.beta > 0 else None
        for u in range(g.grpo_updates):
            m = self.update(batch, adv_k, old, ref)
            m.update(info if u == 0 else {"generation": k})
            self.pos["global_step"] += 1
            self._log(m, update=u)

    # -- tensors ----------------------------------------------------------------
    def sequences(self, prompts, outs, G: int, idx: list[int]) -> dict:
        """Right-padded (input_ids, labels, attention_mask) of prompt + completion; labels only on
        generated tokens (forced ``<|thinking|>`` excluded) and the end-of-turn token of a stopped row."""
        rows = []
        for o, i in zip(outs, idx):
            chat = [{"role": "user", "content": prompts[i // G].prompt}]
            p = self.tok.encode(self.tok.apply_chat_template(chat, add_generation_prompt=True))
            c = list(o.token_ids) + ([self.end_id] if o.finish_reason == "stop" else [])
            lab = [IGNORE_INDEX] * (len(p) + o.num_forced_tokens) + c[o.num_forced_tokens:]
            rows.append((p + c, lab))
        T = max(len(x) for x, _ in rows)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        att = torch.zeros((len(rows), T), dtype=torch.long)
        for j, (x, lab) in enumerate(rows):
            ids[j, :len(x)], labels[j, :len(x)], att[j, :len(x)] = torch.tensor(x), torch.tensor(lab), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": att, "rows": rows,
                "prompt_of": [i // G for i in idx]}

    def _chunks(self, n: int):
        mb = self.g.grpo_micro_batch
        return [slice(i, min(n, i + mb)) for i in range(0, n, mb)]

    def token_logps(self, model, batch: dict, sl: slice) -> torch.Tensor:
        """Per-token log-probs (rows of ``sl``, T - 1): entry t scores token t + 1. With prefix sharing the
        rows of one prompt are packed into one row that encodes their prompt once, then put back in place."""
        bare = _unwrap(model)
        cap = bare.config.final_logit_softcapping
        if self.share_prompt:
            rows, first = batch["rows"][sl], {}
            leader = [first.setdefault(p, j) for j, p in enumerate(batch["prompt_of"][sl])]
            b = pack_sharing(rows, [None if lead == j else lead for j, lead in enumerate(leader)]).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.t.autocast):
                hidden = model(b.input_ids, position_ids=b.position_ids, return_hidden=True,
                               cu_seqlens=b.cu_seqlens, pieces=b.pieces)
                tok = logps_from_hidden(hidden, bare.output_weight, b.labels, cap)[0]    # (Ttot - 1,)
            out = tok.new_zeros(len(rows), batch["labels"].shape[1] - 1)
            row, col = b.origin[1:, 0], b.origin[1:, 1] - 1     # packed token t + 1 -> (row, position - 1)
            keep = col >= 0
            return out.index_put((row[keep], col[keep]), tok[keep])
        ids, lab, att = (batch[k][sl].to(self.device) for k in ("input_ids", "labels", "attention_mask"))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.t.autocast):
            hidden = model(ids, attention_mask=att, return_hidden=True)
            return logps_from_hidden(hidden, bare.output_weight, lab, cap)

    @torch.no_grad()
    def batch_logps(self, batch: dict, model) -> torch.Tensor:
        return torch.cat([self.token_logps(model, batch, sl).float().cpu() for sl in self._chunks(len(batch["labels"]))])

    def reference_token_logps(self, batch: dict) -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            if self.ref is None:
                stack.enter_context(disable_adapters(self.base))
            return self.batch_logps(batch, self.ref if self.ref is not None else self.base)

    def update(self, batch: dict, adv: torch.Tensor, old, ref) -> dict:
        """One optimizer step over the kept completions (micro-batches weighted to equal one batch)."""
        g = self.g
        self.model.train()
        mask_all = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
        n, n_tok = mask_all.shape[0], float(mask_all.sum().clamp(min=1))
        chunks = self._chunks(n)
        total, stats = 0.0, {}
        for i, sl in enumerate(chunks):
            with D.no_grad_sync(self.model, enabled=i < len(chunks) - 1 and self.t.dist.enabled):
                lp = self.token_logps(self.model, batch, sl)
                mask = mask_all[sl].to(lp.device)
                loss, st = grpo_loss(lp, None if old is None else old[sl].to(lp.device), adv[sl].to(lp.device), mask,
                                     loss_type=g.loss_type, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high,
                                     beta=g.beta, ref_logps=None if ref is None else ref[sl].to(lp.device),
                                     max_completion_length=g.grpo_max_new_tokens + 1)
                w = float(mask.sum()) / n_tok if g.loss_type == "dapo" else (sl.stop - sl.start) / n
                (loss * w * self.world).backward()
            total += float(loss.detach()) * w
            tw = float(mask.sum()) / n_tok
            for k_, v in st.items():
                stats[k_] = stats.get(k_, 0.0) + v * tw
        grad_norm, lr = self.clip_and_step()
        return {"loss": total, "grad_norm": float(grad_norm), "lr": lr, "rows": n, **stats}

    # -- warm-up ------------------------------------------------------------------
    def sft_rows(self, prompts: list[GRPOPrompt]) -> list[tuple[list[int], list[int]]]:
        """(ids, labels) of prompt + the teacher's graph-format chosen + end of turn, at most
        ``--max-length`` tokens (prompts cut from the left at ``--max-prompt-length``); a chosen cut at that length gets no end-of-turn token (a cut answer must
        not teach the model to stop there)."""
        rows = []
        for p in prompts:
            pid = prompt_ids(self.tok, p.prompt, self.cfg.data.max_prompt_length)
            cid = self.tok.encode_text(p.chosen) + [self.end_id]
            room = self.cfg.data.max_length - len(pid)
            if len(cid) > room:
                cid = cid[:max(room, 0)]
            rows.append((pid + cid, [IGNORE_INDEX] * len(pid) + cid))
        return rows

    def warmup(self) -> None:
        """``--grpo-sft-steps`` causal-LM steps (stage 1's learning rate) on the teacher's graph-format
        answers, with their own AdamW; a checkpoint is written when they are done."""
        opt = torch.optim.AdamW([p for p in self.base.parameters() if p.requires_grad], lr=self.cfg.lr_for("1"))
        bar = _bar(self.g.grpo_sft_steps, "stage 3 (graph-format warm-up)", self.cfg.run.progress and self.is_main,
                   initial=self.pos["sft_step"])
        while self.pos["sft_step"] < self.g.grpo_sft_steps:
            s = self.pos["sft_step"]
            rows = self.sft_rows(self.prompts(s, with_chosen=True))
            T = max(len(x) for x, _ in rows)
            ids = torch.zeros((len(rows), T), dtype=torch.long)
            lab = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
            att = torch.zeros((len(rows), T), dtype=torch.long)
            for j, (x, y) in enumerate(rows):
                ids[j, :len(x)], lab[j, :len(x)], att[j, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            batch = {"input_ids": ids, "labels": lab, "attention_mask": att, "rows": rows,
                     "prompt_of": list(range(len(rows)))}          # packed without padding, nothing shared
            self.model.train()
            n_tok = float((lab[:, 1:] != IGNORE_INDEX).sum())
            nll = 0.0
            for sl in self._chunks(len(rows)):
                part = -self.token_logps(self.model, batch, sl).sum() / n_tok
                part.backward()
                nll += float(part.detach())
            torch.nn.utils.clip_grad_norm_([p for p in self.base.parameters() if p.requires_grad],
                                           self.cfg.optim.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.pos["sft_step"] = s + 1
            self.t.log.write({"stage": 3, "event": "grpo_sft", "sft_step": s + 1, "nll": nll, "time": time.time()})
            bar.update(1)
            bar.set_postfix(nll=f"{nll:.3f}")
        bar.close()
        save_checkpoint(self)
