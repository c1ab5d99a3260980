"""Evaluation runs: generate answers with a checkpoint, score them, and the DPO reward accuracy.

Each question is asked as in training (``thinking.formats.chat``), greedy by default, nothing
forced unless ``force_thinking`` (then the forced ``<|thinking|>`` is part of the scored text). A base
model (``instructed``) also gets ``FORMAT_INSTRUCTION``, the format in words, as a system message;
tags written as ``<thinking>`` / ``</thinking>`` count as the thinking tokens for every model.
Every ``metrics`` entry lies in [0, 1] (``METRIC_KEYS``). ``reward_accuracy``: share of preference
pairs with beta * (log pi - log ref)(chosen) strictly above the same for rejected (Rafailov et al.,
NeurIPS 2023), summed log-probs over answer tokens only as stage 2 scores them; ties count as wrong,
so a model against itself gets 0. Pairs should be held out. Settings: :class:`EvalConfig`.
Tests: ``python -m pytest -q tests/test_evaluation.py``.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..text.metrics import rouge_l, token_f1
from ..thinking.check import check_format, normalize_tags
from ..thinking.formats import chat
from ..thinking.layout import DEFAULT_CATEGORIES
from ..thinking.tokens import THINK_START, THINKING_TOKENS
from ..llm.registry import load_model_and_tokenizer
from ..llm.vocab import setup_thinking_tokens
from ..losses.preference import forward_logps
from ..sampler import SamplingParams, generate
from ..train.batches import PairFormat, collate_pairs, tokenize_pair
from .inputs import DEFAULT_QUESTIONS, EvaluationInputError, check_model_dir, load_pairs, load_questions
from .report import write_report

__all__ = ["EvalConfig", "METRIC_KEYS", "STAGES", "FORMAT_INSTRUCTION", "evaluate", "evaluate_models",
           "evaluate_stages", "reward_accuracy", "architecture"]

log = logging.getLogger("preflexor.evaluation")

STAGES = ("0", "1", "2")
# metrics (all in [0, 1]) in report / chart order; reward_accuracy is present only with pairs + a reference
# What a base model (never trained on the format) is told, as a system message, besides the question.
FORMAT_INSTRUCTION = (
    "Answer in two parts. First think: write <|thinking|>, then your reasoning under bold headers such as "
    "**Reasoning Steps**: (numbered steps), **Relevant Materials or Concepts**:, **Design Principles**:, "
    "**Material Properties**:, **Hypothesis**: and **Additional Background**:, then write <|/thinking|>. "
    "After <|/thinking|>, give the final answer in two or three sentences.")
METRIC_KEYS = ("format_compliance", "header_share", "thinking_closed", "answer_nonempty", "answer_f1",
               "answer_rouge_l", "reward_accuracy", "truncated")


@dataclass(kw_only=True)
class EvalConfig:
    """How to generate and score (the CLI's defaults live here)."""

    max_new_tokens: int = 200          # generated tokens per answer
    temperature: float = 0.0           # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    force_thinking: bool = False       # start every response with a forced <|thinking|>
    categories: tuple[str, ...] = tuple(DEFAULT_CATEGORIES)
    min_headers: int = 1               # category headers a compliant thinking block needs
    beta: float = 0.5                  # DPO beta of the implicit reward
    batch_size: int = 16               # questions per generate call (pairs: half of it)
    limit: int | None = None           # only the first N questions
    pairs_limit: int | None = None     # only the first N pairs
    device: str = "cpu"
    dtype: Any = "auto"                # models.parse_dtype: "auto" (bf16 on cuda, fp32 on cpu), a name or a torch dtype
    progress: bool = True

    def __post_init__(self):
        self.categories = tuple(self.categories)
        if not self.categories:
            raise ValueError("EvalConfig: categories is empty; give at least one thinking category")
        if not 0 <= self.min_headers <= len(self.categories):
            raise ValueError(f"EvalConfig: min_headers={self.min_headers} must lie in [0, {len(self.categories)}]")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"EvalConfig: batch_size ({self.batch_size}) and max_new_tokens "
                             f"({self.max_new_tokens}) must be >= 1")
        for name in ("limit", "pairs_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"EvalConfig: {name} must be >= 1 (or None for all), got {getattr(self, name)}")
        if not 0 < self.beta < math.inf:
            raise ValueError(f"EvalConfig: beta must be > 0 and finite, got {self.beta}")
        # upper limits: a typo (1e9) is refused before anything is allocated; NaN fails every test
        for name, ok, allowed in (("max_new_tokens", lambda v: v <= 1 << 20, f"<= {1 << 20}"),
                                  ("batch_size", lambda v: v <= 4096, "<= 4096"),
                                  ("temperature", lambda v: 0 <= v <= 100, "in [0, 100] (0 = greedy)"),
                                  ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
                                  ("seed", lambda v: 0 <= v < 2**63, "in 0..2**63-1"),
                                  ("limit", lambda v: v is None or v <= 10**7, "<= 10000000"),
                                  ("pairs_limit", lambda v: v is None or v <= 10**7, "<= 10000000")):
            if not ok(getattr(self, name)):
                raise ValueError(f"EvalConfig: {name} must be {allowed}, got {getattr(self, name)}")

    def settings(self) -> dict:
        """The generation and scoring settings recorded with each result."""
        keys = ("max_new_tokens", "temperature", "top_p", "seed", "force_thinking", "min_headers", "beta")
        return {**{k: getattr(self, k) for k in keys}, "categories": list(self.categories)}


# ============================================================================ models

class _Models:
    """Checkpoints loaded once (by real path) and shared between evaluations; paths come resolved."""

    def __init__(self, cfg: EvalConfig):
        self.cfg, self.loaded = cfg, {}
        self.logps: dict = {}           # reward_accuracy's per-model sums: a model scored as policy, then as reference

    def get(self, path: str):
        key = os.path.realpath(path)
        if key not in self.loaded:
            model, tok = load_model_and_tokenizer(path, self.cfg.device, self.cfg.dtype)
            self.loaded[key] = (model.eval(), tok)
        return self.loaded[key]

    def keep_only(self, paths) -> None:
        needed = {os.path.realpath(p) for p in paths if p}
        for key in [k for k in self.loaded if k not in needed]:
            del self.loaded[key]


# ============================================================================ generation + scoring

def _generate(model, tok, questions: list[dict], cfg: EvalConfig, desc: str, instructed: bool = False):
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            seed=cfg.seed, prepend_response=THINK_START if cfg.force_thinking else "",
                            truncate_prompt_left=True)
    system = [{"role": "system", "content": FORMAT_INSTRUCTION}] if instructed else []
    chats = [system + chat(q["question"]) for q in questions]
    bar = None
    if cfg.progress:
        bar = tqdm(total=len(chats), desc=desc, unit="q", dynamic_ncols=True, file=sys.stderr)
    outs = []
    try:
        for i in range(0, len(chats), cfg.batch_size):
            outs += generate(model, tok, chats[i:i + cfg.batch_size], params)
            if bar is not None:
                bar.update(len(chats[i:i + cfg.batch_size]))
    finally:
        if bar is not None:
            bar.close()
    return outs


def _score(q: dict, c, cfg: EvalConfig) -> dict:
    """One question's output row: the format check and the answer metrics."""
    fc = check_format(normalize_tags(c.text), cfg.categories, cfg.min_headers)
    return {"id": q["id"], "question": q["question"], "reference": q["reference"], "output": c.text,
            "answer": fc.answer, "compliant": fc.compliant, "format_reason": fc.reason,
            "headers": fc.headers, "header_share": fc.header_share,
            "thinking_closed": fc.n_think_end > 0, "finish_reason": c.finish_reason,
            "new_tokens": len(c.token_ids) - c.num_forced_tokens,
            "f1": token_f1(fc.answer, q["reference"]), "rouge_l": rouge_l(fc.answer, q["reference"])}


def _metrics(rows: list[dict]) -> dict:
    n = len(rows)
    mean = lambda key: sum(float(r[key]) for r in rows) / n  # noqa: E731
    return {"format_compliance": mean("compliant"), "header_share": mean("header_share"),
            "thinking_closed": mean("thinking_closed"),
            "answer_nonempty": sum(bool(r["answer"]) for r in rows) / n,
            "answer_f1": mean("f1"), "answer_rouge_l": mean("rouge_l"),
            "truncated": sum(r["finish_reason"] == "length" for r in rows) / n}


def reward_accuracy(model, ref_model, tok, pairs: Sequence[dict], beta: float = 0.5, batch_size: int = 8,
                    max_length: int | None = None, cache: dict | None = None,
                    keys: tuple[str | None, str | None] = (None, None)) -> dict:
    """Implicit-DPO reward accuracy of ``model`` against ``ref_model`` on preference rows.

    Pairs are tokenized as stage 2 does (``data.tokenize_pair``, answer-only mask, unclosed thinking
    kept); those it drops are counted. Sequences are scored as the trainer scores them: packed, each
    prompt encoded once for its two answers (padded rows for models with sliding-window layers). With
    ``cache`` (a dict kept across calls on the same ``pairs``), a model's sums are stored under its key in
    ``keys`` (model's, ref_model's; None = not cached) and reused: the middle stage of a chain is scored
    once, as policy and then as reference. Returns ``{"reward_accuracy", "reward_margin" (mean beta * h),
    "n_pairs", "n_pairs_dropped", "dropped": {reason: count}}``; ``reward_accuracy`` is None when no
    pair could be scored. Ties (equal rewards) count as not correct.
    """
    if beta <= 0:
        raise ValueError(f"reward_accuracy: beta must be > 0, got {beta}")
    L = min(max_length or 1024, model.config.max_position_embeddings)
    fmt = PairFormat(max_length=L, max_prompt_length=max(1, L // 2), mask_mode="answer_only", on_unclosed="keep")
    examples, dropped = [], {}
    for i, row in enumerate(pairs):
        ex, why = tokenize_pair(tok, row, fmt, index=i)
        if ex is None:
            dropped[why] = dropped.get(why, 0) + 1
        else:
            examples.append(ex)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    correct, margins = 0, []
    device = next(model.parameters()).device
    share = not (model.config.has_sliding_layers or ref_model.config.has_sliding_layers)
    fingerprint = (batch_size, share, tuple((tuple(e.chosen_ids), tuple(e.rejected_ids)) for e in examples))

    def scored(m, key, i, batch):
        slot = (key, i, fingerprint)
        if cache is not None and key is not None and slot in cache:
            return cache[slot]
        sums = forward_logps(m, batch)[0].float()
        if cache is not None and key is not None:
            cache[slot] = sums
        return sums

    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            batch = collate_pairs(examples[i:i + batch_size], pad, packed=share, share_prompt=share).to(device)
            n = batch.n_pairs
            sums = scored(model, keys[0], i, batch)
            ref_sums = sums if ref_model is model else scored(ref_model, keys[1], i, batch)
            rc, rr = beta * (sums[:n] - ref_sums[:n]), beta * (sums[n:] - ref_sums[n:])
            correct += int((rc > rr).sum())
            margins += (rc - rr).tolist()
    k = len(examples)
    return {"reward_accuracy": correct / k if k else None, "reward_margin": sum(margins) / k if k else None,
            "n_pairs": k, "n_pairs_dropped": len(pairs) - k, "dropped": dropped}


# ============================================================================ entry points

def _as_reference(ref, ref_tok, ref_dir: str, tok):
    """``ref`` as the reference of a model trained from it: a base without the thinking tokens gets them
    the way training added them (``vocab.setup_thinking_tokens`` on a copy), so the ids of ``tok`` fit."""
    if ref.model.embed_tokens.weight.shape[0] >= tok.vocab_size:
        return ref
    ref, ref_tok = copy.deepcopy(ref), copy.deepcopy(ref_tok)
    setup_thinking_tokens(ref, ref_tok)
    if ref_tok.vocab_size != tok.vocab_size or any(ref_tok.token_to_id(t) != tok.token_to_id(t)
                                                   for t in THINKING_TOKENS):
        raise EvaluationInputError(f"reference {ref_dir} has {ref_tok.vocab_size} tokens with the thinking tokens "
                                   f"added, the evaluated model {tok.vocab_size}: pass as --ref-model / --base the "
                                   f"model this one was trained from")
    return ref


def architecture(model) -> dict:
    """The evaluated model's shape, from its config: hidden size, layers, heads, vocabulary, parameters."""
    c = model.config
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "tie_word_embeddings")
    return {**{k: getattr(c, k) for k in keys if hasattr(c, k)},
            "parameters": sum(p.numel() for p in model.parameters())}


def _questions(questions, cfg: EvalConfig) -> list[dict]:
    if isinstance(questions, (str, os.PathLike)):
        questions = load_questions(str(questions))
    questions = list(questions)[:cfg.limit] if cfg.limit is not None else list(questions)
    if not questions:
        raise ValueError("evaluate: no questions")
    return questions


def _pairs(pairs, cfg: EvalConfig) -> list[dict] | None:
    if isinstance(pairs, (str, os.PathLike)):
        return load_pairs(str(pairs), cfg.pairs_limit)
    if pairs is not None and cfg.pairs_limit is not None:
        return list(pairs)[:cfg.pairs_limit]
    return None if pairs is None else list(pairs)


def evaluate(model_dir: str, questions: Sequence[dict] | str, cfg: EvalConfig | None = None, *,
             ref_model_dir: str | None = None, pairs: Sequence[dict] | str | None = None,
             name: str | None = None, instructed: bool = False, _models: _Models | None = None) -> dict:
    """Generate answers to ``questions`` with the checkpoint in ``model_dir`` and score them
    (``instructed``: with ``FORMAT_INSTRUCTION`` as a system message, for a base model).

    ``questions``: rows as returned by ``load_questions`` or a JSONL path. With ``pairs`` (rows or
    a JSONL path) and ``ref_model_dir``, also the DPO reward accuracy (``ref_model_dir`` equal to
    ``model_dir`` is allowed and gives 0: every pair is a tie). Returns
    ``{"name", "model", "ref_model", "n_questions", "n_pairs", "n_pairs_dropped", "reward_margin",
    "mean_new_tokens", "instructed", "architecture", "settings", "metrics": {key: value in [0, 1]},
    "outputs": [per question]}``.
    """
    cfg = cfg if cfg is not None else EvalConfig()
    questions, pairs = _questions(questions, cfg), _pairs(pairs, cfg)
    name = name or os.path.basename(os.path.normpath(model_dir))
    if _models is None:                 # a direct call: resolve the paths here (evaluate_models resolved them)
        model_dir = check_model_dir(model_dir)
        ref_model_dir = check_model_dir(ref_model_dir) if ref_model_dir is not None else None
    models = _models if _models is not None else _Models(cfg)
    model, tok = models.get(model_dir)
    outs = _generate(model, tok, questions, cfg, f"eval {name}", instructed=instructed)
    rows = [_score(q, c, cfg) for q, c in zip(questions, outs)]
    metrics = _metrics(rows)
    result = {"name": name, "model": str(model_dir), "ref_model": None, "n_questions": len(rows), "n_pairs": 0,
              "n_pairs_dropped": 0, "reward_margin": None,
              "mean_new_tokens": sum(r["new_tokens"] for r in rows) / len(rows), "instructed": bool(instructed),
              "architecture": architecture(model), "settings": cfg.settings(), "metrics": metrics, "outputs": rows}
    if pairs is not None and ref_model_dir is not None:
        same = os.path.realpath(ref_model_dir) == os.path.realpath(model_dir)
        ref = model if same else _as_reference(*models.get(ref_model_dir), ref_model_dir, tok)
        ra = reward_accuracy(model, ref, tok, pairs, beta=cfg.beta, batch_size=max(1, cfg.batch_size // 2),
                             cache=models.logps, keys=(os.path.realpath(model_dir),
                                                       None if ref is not models.get(ref_model_dir)[0]
                                                       else os.path.realpath(ref_model_dir)))
        result.update(ref_model=str(ref_model_dir), n_pairs=ra["n_pairs"], n_pairs_dropped=ra["n_pairs_dropped"],
                      reward_margin=ra["reward_margin"])
        if ra["reward_accuracy"] is not None:
            metrics["reward_accuracy"] = ra["reward_accuracy"]
        else:
            log.warning("%s: no preference pair could be scored (dropped: %s)", name, ra["dropped"])
    result["metrics"] = {k: metrics[k] for k in METRIC_KEYS if k in metrics}
    return result


def evaluate_models(model_dirs: Sequence[str], questions: Sequence[dict] | str, cfg: EvalConfig | None = None, *,
                    names: Sequence[str] | None = None, ref_model_dirs: Sequence[str | None] | None = None,
                    pairs: Sequence[dict] | str | None = None,
                    instructed: Sequence[bool] | None = None) -> list[dict]:
    """``evaluate`` for several checkpoints (loaded once each); ``ref_model_dirs[i]`` is model i's reference,
    ``instructed[i]`` whether model i gets the format instruction (a base model)."""
    cfg = cfg if cfg is not None else EvalConfig()
    questions, pairs = _questions(questions, cfg), _pairs(pairs, cfg)
    names = list(names) if names else [os.path.basename(os.path.normpath(d)) for d in model_dirs]
    model_dirs = [check_model_dir(d) for d in model_dirs]          # once each, before any model loads
    refs = [check_model_dir(r) if r else None for r in (ref_model_dirs or [None] * len(model_dirs))]
    models = _Models(cfg)
    results = []
    for i, d in enumerate(model_dirs):
        results.append(evaluate(d, questions, cfg, ref_model_dir=refs[i], pairs=pairs if refs[i] else None,
                                name=names[i],
                                instructed=bool(instructed[i]) if instructed else False, _models=models))
        if pairs is not None and not refs[i]:
            is_ref = os.path.realpath(d) in {os.path.realpath(r) for r in refs if r}
            results[-1]["reward_note"] = "the reference" if is_ref else "no reference"
        models.keep_only([*refs[i + 1:], *model_dirs[i + 1:]])   # what later models still need
    return results


def _stage_dirs(run_dir: str) -> list[tuple[str, str]]:
    found = [(f"stage{s}", os.path.join(run_dir, f"stage{s}")) for s in STAGES
             if os.path.isfile(os.path.join(run_dir, f"stage{s}", "config.json"))]
    if not found:
        raise EvaluationInputError(f"run dir {run_dir} has no stage0/, stage1/ or stage2/ checkpoint "
                                   f"(a dir with config.json); train first or pass --model DIR")
    return found


def evaluate_stages(run_dir: str, questions: Sequence[dict] | str = DEFAULT_QUESTIONS,
                    cfg: EvalConfig | None = None, *, pairs: Sequence[dict] | str | None = None,
                    out_dir: str | None = None, log_path: str | None = None, base: str | None = None) -> list[dict]:
    """Evaluate ``run_dir/stage0``, ``stage1``, ``stage2`` (those present); one result per stage.

    With ``base`` (the pretrained model the run started from: a name, .gguf file or dir) it comes
    first, named "base", asked with ``FORMAT_INSTRUCTION``. Each stage's reference for the reward
    accuracy is the model before it (the policy that stage started from; the first has none). With
    ``out_dir`` the report, charts and metrics.json are written there; the training curves come from
    ``log_path`` (default ``run_dir/log.jsonl`` when it exists). Print ``format_table(results)`` for the table.
    """
    stages = ([("base", base)] if base is not None else []) + _stage_dirs(run_dir)
    refs = [None] + [d for _, d in stages[:-1]]
    results = evaluate_models([d for _, d in stages], questions, cfg, names=[n for n, _ in stages],
                              ref_model_dirs=refs, pairs=pairs, instructed=[n == "base" for n, _ in stages])
    if out_dir is not None:
        if log_path is None and os.path.isfile(os.path.join(run_dir, "log.jsonl")):
            log_path = os.path.join(run_dir, "log.jsonl")
        write_report(results, out_dir, log_path=log_path)
    return results
