"""The combined reward: ``RewardWeights`` (documented defaults), ``combine_rewards`` and
``GraphRewards``, the scorer a GRPO stage calls on a batch of completions.

The combined value is the weighted mean of the rewards that could be computed: groundedness
needs a corpus, correctness a reference answer, the judge an ``HTTPJudge``; a reward that is
missing drops out and the weights of the others are renormalised, so the value stays in [0, 1].
Components are logged as ``name`` (each reward's value) and ``name.component``.

References: Graph-PReFLexOR (arXiv 2501.08120) rewards format, correctness and graph use.
Tests: ``python -m pytest -q tests/test_rewards.py``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Mapping, Sequence

from ..thinking.graph import ParsedGraphThinking
from .answer import correctness_reward
from .corpus import CorpusConcepts, graph_utility_reward, groundedness_reward
from .structure import Reward, format_reward, graph_validity_reward
from ..thinking.graph_io import as_parsed

__all__ = ["RewardWeights", "combine_rewards", "GraphRewards", "REWARD_NAMES"]


@dataclass(frozen=True, kw_only=True)
class RewardWeights:
    """Weights of the combined reward (any non-negative floats; they are renormalised).

    Defaults: the format, the graph's validity, its groundedness in the corpus and the answer's
    correctness weigh 1 each; graph utility 0.5 (it rewards a graph that names the answer's
    concepts, which a graph padded with them also earns); the judge 1 when one is given.
    """

    format: float = 1.0
    graph_validity: float = 1.0
    groundedness: float = 1.0
    graph_utility: float = 0.5
    correctness: float = 1.0
    judge: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            w = getattr(self, f.name)
            if not isinstance(w, (int, float)) or not w >= 0:
                raise ValueError(f"RewardWeights.{f.name} must be a float >= 0, got {w!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> "RewardWeights":
        unknown = sorted(set(d) - set(REWARD_NAMES))
        if unknown:
            raise ValueError(f"RewardWeights: unknown reward(s) {', '.join(unknown)}; known: {', '.join(REWARD_NAMES)}")
        return cls(**{k: float(v) for k, v in d.items()})


REWARD_NAMES = tuple(f.name for f in fields(RewardWeights))


def combine_rewards(rewards: Mapping[str, Reward], weights: RewardWeights = RewardWeights()) -> Reward:
    """Weighted mean of ``rewards`` (name -> Reward, names from ``REWARD_NAMES``); components hold
    every reward's value and sub-components. Raises when the given rewards all weigh 0."""
    unknown = sorted(set(rewards) - set(REWARD_NAMES))
    if unknown:
        raise ValueError(f"combine_rewards: unknown reward(s) {', '.join(unknown)}; known: {', '.join(REWARD_NAMES)}")
    w = asdict(weights)
    total = sum(w[n] for n in rewards)
    if total <= 0:
        raise ValueError(f"combine_rewards: no reward with a weight > 0 to combine (given: {', '.join(rewards) or 'none'}); "
                         "set a weight > 0 for a reward that can be computed (groundedness needs a corpus, "
                         "correctness a reference, judge a judge)")
    value = sum(w[n] * r.value for n, r in rewards.items()) / total
    comps: dict[str, float] = {}
    for n, r in rewards.items():
        comps[n] = r.value
        comps.update({f"{n}.{k}": v for k, v in r.components.items()})
    notes = [f"{n}: {r.note}" for n, r in rewards.items() if r.note != "ok" and w[n] > 0]
    return Reward(min(1.0, max(0.0, value)), comps, "; ".join(notes) or "ok")


class GraphRewards:
    """Judge-free (judge optional) rewards of graph-format completions.

    ``corpus``: a ``GraphRetriever``, ``KnowledgeGraph`` or :class:`CorpusConcepts` (None: no
    groundedness; graph utility counts the answer's own key terms); ``embedder``: adds the cosine
    to correctness; ``judge``: an ``HTTPJudge``. Rewards whose weight is 0 are not computed.
    """

    def __init__(self, corpus=None, embedder=None, judge=None, weights: RewardWeights = RewardWeights()):
        self.corpus = corpus if corpus is None or isinstance(corpus, CorpusConcepts) else CorpusConcepts.from_graph(corpus)
        self.embedder, self.judge, self.weights = embedder, judge, weights

    def _parts(self, p: ParsedGraphThinking, reference: str | None) -> dict[str, Reward]:
        w = asdict(self.weights)
        out = {}
        if w["format"] > 0:
            out["format"] = format_reward(p)
        if w["graph_validity"] > 0:
            out["graph_validity"] = graph_validity_reward(p)
        if w["groundedness"] > 0 and self.corpus is not None:
            out["groundedness"] = groundedness_reward(p, self.corpus)
        if w["graph_utility"] > 0:
            out["graph_utility"] = graph_utility_reward(p, self.corpus)
        if w["correctness"] > 0 and reference and reference.strip():
            out["correctness"] = correctness_reward(p, reference, self.embedder)
        return out

    def score(self, completion: str | ParsedGraphThinking, reference: str | None = None,
              question: str | None = None) -> Reward:
        return self.score_many([completion], None if reference is None else [reference],
                               None if question is None else [question])[0]

    def score_many(self, completions: Sequence[str | ParsedGraphThinking], references: Sequence[str] | None = None,
                   questions: Sequence[str] | None = None) -> list[Reward]:
        """One combined :class:`Reward` per completion (``references`` / ``questions`` aligned with
        it; the judge needs the questions)."""
        n = len(completions)
        for name, xs in (("references", references), ("questions", questions)):
            if xs is not None and len(xs) != n:
                raise ValueError(f"GraphRewards.score_many: {len(xs)} {name} for {n} completions")
        parsed = [as_parsed(c) for c in completions]
        refs = list(references) if references is not None else [None] * n
        parts = [self._parts(p, r) for p, r in zip(parsed, refs)]
        if self.judge is not None and self.weights.judge > 0:
            if questions is None:
                raise ValueError("GraphRewards.score_many: the judge needs the questions; pass questions=[...]")
            for d, j in zip(parts, self.judge.score_many(questions, parsed, [r or "" for r in refs])):
                d["judge"] = j
        return [combine_rewards(d, self.weights) for d in parts]
