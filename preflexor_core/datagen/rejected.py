"""The rejected side of a batch of preference rows: ``k_samples`` answers per question from the policy
being trained (one batched ``generate`` call for the whole batch; with ``with_thinking`` it answers
the thinking prompt, stage 2) or from the teacher's plain answers (``rejected_from="teacher"``).
The pipeline (``pipeline.py``) scores them and keeps the lowest-scored one.

References: PRefLexOR (arXiv 2410.12375) Sec. 2.1 (in-situ rejected answers) and 2.3 (rejection
sampling from the current policy).

Tests: ``python -m pytest -q tests/test_datagen.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ..thinking.layout import strip_thinking_tokens
from ..thinking.tokens import THINK_START
from ..sampler import SamplingParams, generate
from ..teachers.base import complete_many, hash_seed


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def policy_samples(model, tokenizer, prepared: Sequence, cfg) -> list[list[str]]:
    """``cfg.k_samples`` policy answers per prepared row (``.question``, ``.prompt``, ``.index``)."""
    k = cfg.k_samples
    params = cfg.sampling if cfg.sampling is not None else SamplingParams(
        max_new_tokens=256, temperature=0.8, top_p=0.9, top_k=50)
    prepend = THINK_START if cfg.with_thinking else ""
    params = dataclasses.replace(params, n=k, prepend_response=prepend,
                                 seed=hash_seed(cfg.seed, "policy", prepared[0].index) % (2**31))
    chats = [_user(p.prompt if cfg.with_thinking else p.question) for p in prepared]
    outs = generate(model, tokenizer, chats, params, decode_weights=cfg.decode_weights)
    if len(outs) != len(prepared) * k:
        raise RuntimeError(f"sampler returned {len(outs)} completions for {len(prepared)} prompts x n={k}")
    texts = [(o.text if not prepend or o.text.startswith(prepend) else prepend + o.text).strip() for o in outs]
    return [texts[j * k:(j + 1) * k] for j in range(len(prepared))]


def teacher_samples(teacher, prepared: Sequence, cfg) -> list[list[Any]]:
    """``cfg.k_samples`` plain teacher answers per row (a failed request is its exception)."""
    k = cfg.k_samples
    if hasattr(teacher, "plain_answer"):
        replies = [teacher.plain_answer(p.question, salt=f"{cfg.seed}-{p.index}/{s}")
                   for p in prepared for s in range(k)]
    else:
        chats = [_user(p.question) for p in prepared for _ in range(k)]
        replies = complete_many(teacher, chats, temperature=0.7 if k > 1 else 0.0, max_tokens=cfg.teacher_max_tokens)
    # a teacher's text must not open or close the pipeline's thinking structure
    replies = [strip_thinking_tokens(r) if isinstance(r, str) else r for r in replies]
    return [replies[j * k:(j + 1) * k] for j in range(len(prepared))]
