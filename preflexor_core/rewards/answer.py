"""Answer correctness against a reference answer: SQuAD token F1, ROUGE-L and, with an embedder,
the cosine of the two answers' embeddings.

The answer is the text after ``<|/thinking|>`` (``graph_format.parse_graph_thinking``). The
embedder is any ``retrieval.embedding.Embedder`` (``encode(list[str])`` -> unit-norm rows), e.g.
``MiniLMEmbedder()``; negative cosines count as 0.

References: token F1 and ROUGE-L as in ``evaluation.metrics`` (SQuAD, Rajpurkar et al. 2016; Lin 2004).
Tests: ``python -m pytest -q tests/test_rewards.py``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..text.metrics import rouge_l, token_f1
from ..thinking.graph import ParsedGraphThinking
from .structure import Reward
from ..thinking.graph_io import as_parsed

__all__ = ["correctness_reward", "embedding_cosine"]


def embedding_cosine(embedder, answer: str, references: Sequence[str]) -> float:
    """max over references of cos(embed(answer), embed(reference)), clipped to [0, 1]."""
    if not hasattr(embedder, "encode"):
        raise TypeError(f"embedder must have encode(list[str]) -> array (a retrieval.embedding.Embedder), "
                        f"got {type(embedder).__name__}")
    vecs = np.asarray(embedder.encode([answer, *references]), dtype=np.float64)
    if vecs.ndim != 2 or vecs.shape[0] != 1 + len(references):
        raise ValueError(f"embedder.encode returned shape {vecs.shape}, expected ({1 + len(references)}, dim)")
    norms = np.maximum(np.linalg.norm(vecs, axis=1), 1e-12)
    cos = (vecs[1:] @ vecs[0]) / (norms[1:] * norms[0])
    return float(np.clip(cos.max(), 0.0, 1.0))


def correctness_reward(completion: str | ParsedGraphThinking, reference: str | Sequence[str],
                       embedder=None) -> Reward:
    """Mean of ``f1`` (token F1), ``rouge_l`` and, when ``embedder`` is given, ``cosine``, each
    against ``reference`` (a list: the best reference per component). An empty answer scores 0."""
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs or not any(r.strip() for r in refs):
        raise ValueError("correctness_reward: the reference answer is empty; pass the teacher's answer "
                         "(or leave correctness out of the combined reward)")
    answer = as_parsed(completion).answer
    comps = {"f1": token_f1(answer, refs) if answer else 0.0, "rouge_l": rouge_l(answer, refs) if answer else 0.0}
    if embedder is not None:
        comps["cosine"] = embedding_cosine(embedder, answer, refs) if answer else 0.0
    return Reward(sum(comps.values()) / len(comps), comps, "ok" if answer else "empty answer")
