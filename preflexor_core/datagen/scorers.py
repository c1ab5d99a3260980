"""Scorers of rejected candidates: how close each policy sample is to the chosen answer.

``score_many(questions, references, candidates) -> list[list[float]]`` (one row of scores per
question). :class:`EmbeddingScorer` (cosine of unit-norm embeddings), :class:`CallableScorer`
(``fn(question, reference, candidate)``), :class:`JudgeScorer` (a teacher rates 0-10);
``make_scorer`` picks one from what it is given.

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.3 (rejection sampling keeps the worst
sample; ``only_include_wrong_answers`` in its notebooks).

Tests: ``python -m pytest -q tests/test_datagen.py -k scorer``.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from ..teachers.base import complete_many
from ..thinking.layout import answer_part
from .pairs_io import DatagenError

JUDGE_PROMPT = ("Reference answer:\n{reference}\n\nCandidate answer:\n{candidate}\n\nQuestion: "
                "{question}\n\nRate from 0 to 10 how correct and complete the candidate is compared "
                "with the reference. Reply with the number only.")


class EmbeddingScorer:
    """Cosine similarity between a sample's answer and the chosen answer (unit-norm embeddings)."""

    def __init__(self, embedder):
        self.embedder = embedder
        self.name = f"embedding:{getattr(embedder, 'name', type(embedder).__name__)}"

    def score_many(self, questions: Sequence[str], references: Sequence[str],
                   candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        flat = [answer_part(c) for cs in candidates for c in cs]
        ref = self.embedder.encode(list(references))
        cand = self.embedder.encode(flat) if flat else None
        out, j = [], 0
        for i, cs in enumerate(candidates):
            row = []
            for c in flat[j:j + len(cs)]:
                row.append(float(ref[i] @ cand[j]) if c.strip() else 0.0)
                j += 1
            out.append(row)
        return out


class CallableScorer:
    """Wraps ``fn(question, reference_answer, candidate_text) -> float``."""

    def __init__(self, fn: Callable[[str, str, str], float]):
        self.fn = fn
        self.name = f"callable:{getattr(fn, '__name__', type(fn).__name__)}"

    def score_many(self, questions, references, candidates) -> list[list[float]]:
        return [[float(self.fn(q, r, c)) for c in cs] for q, r, cs in zip(questions, references, candidates)]


class JudgeScorer:
    """A teacher rates each candidate 0-10 against the reference; score = rating / 10."""

    def __init__(self, teacher, max_tokens: int = 8):
        self.teacher = teacher
        self.max_tokens = max_tokens
        self.name = f"judge:{teacher.name}"

    def score_many(self, questions, references, candidates) -> list[list[float]]:
        chats = [[{"role": "user", "content": JUDGE_PROMPT.format(
            reference=r, candidate=answer_part(c) or "(no answer)", question=q)}]
            for q, r, cs in zip(questions, references, candidates) for c in cs]
        replies = complete_many(self.teacher, chats, max_tokens=self.max_tokens)
        flat = []
        for rep in replies:
            m = re.search(r"\d+(?:\.\d+)?", rep) if isinstance(rep, str) else None
            flat.append(min(10.0, float(m.group(0))) / 10.0 if m else 0.0)
        out, j = [], 0
        for cs in candidates:
            out.append(flat[j:j + len(cs)])
            j += len(cs)
        return out


def make_scorer(scorer, retriever):
    """``"embedding"`` (the retriever's embedder), an object with ``score_many``, a Teacher (used
    as judge) or a callable ``(question, reference, candidate) -> float``."""
    if scorer == "embedding":
        return EmbeddingScorer(retriever.embedder)
    if hasattr(scorer, "score_many"):
        return scorer
    if hasattr(scorer, "complete"):
        return JudgeScorer(scorer)
    if callable(scorer):
        return CallableScorer(scorer)
    raise DatagenError(f"scorer must be 'embedding', a callable (question, reference, candidate) -> "
                       f"float, or a Teacher used as judge; got {scorer!r}")
