"""Structure rewards of the graph thinking format: ``format_reward`` and ``graph_validity_reward``,
the ``Reward`` value type, and the completion's graph as a ``networkx.DiGraph``.

Both rewards read a completion (a str, or the ``ParsedGraphThinking`` of one) and return a
``Reward``: a value in [0, 1] and its components in [0, 1]. Rules are in the functions' docstrings.

References: the graph thinking format of ``graph_format`` (Graph-PReFLexOR, arXiv 2501.08120).
Tests: ``python -m pytest -q tests/test_rewards.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx

from ..thinking.graph import GRAPH_SECTIONS, Edge, ParsedGraphThinking, parse_graph_thinking
from ..thinking.graph_io import GraphJSONError, as_parsed, completion_graph, json_digraph, json_type
from ..text.words import normalize_text

__all__ = ["Reward", "format_reward", "graph_validity_reward"]


@dataclass(frozen=True)
class Reward:
    """A reward ``value`` in [0, 1], its ``components`` (name -> float) and a ``note`` ("ok" or
    why the value is low)."""

    value: float
    components: dict[str, float] = field(default_factory=dict)
    note: str = "ok"

    def __post_init__(self):
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and 0.0 <= self.value <= 1.0):
            raise ValueError(f"Reward value must be a finite float in [0, 1], got {self.value!r} ({self.note})")


def _longest_increasing(xs: list[int]) -> int:
    best: list[int] = []  # best[k] = smallest tail of a strictly increasing run of length k + 1
    for x in xs:
        lo, hi = 0, len(best)
        while lo < hi:
            mid = (lo + hi) // 2
            if best[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        best[lo:lo + 1] = [x]
    return len(best)


def format_reward(completion: str | ParsedGraphThinking) -> Reward:
    """Mean of four components:

    - ``thinking``: 1 when one ``<|thinking|>`` opens the text (only whitespace before it) and one
      ``<|/thinking|>`` closes it;
    - ``sections``: share of the five sections (Brainstorm, Graph, Graph JSON, Patterns, Synthesis)
      with a header in the thinking block;
    - ``order``: the longest run of headers in that order (a longest increasing subsequence) over five;
    - ``answer``: 1 when the answer after ``<|/thinking|>`` is non-empty.
    """
    p = as_parsed(completion)
    idx = {name: i for i, name in enumerate(GRAPH_SECTIONS)}
    comps = {"thinking": float(p.thinking_closed and not p.prefix),
             "sections": len(set(p.sections)) / len(GRAPH_SECTIONS),
             "order": _longest_increasing([idx[s] for s in p.sections]) / len(GRAPH_SECTIONS),
             "answer": float(bool(p.answer))}
    missing = [s for s in GRAPH_SECTIONS if s not in p.sections]
    note = ("thinking not closed" if not p.thinking_closed else "text before <|thinking|>" if p.prefix
            else f"missing sections: {', '.join(missing)}" if missing
            else "sections out of order" if comps["order"] < 1 else "empty answer" if not p.answer else "ok")
    return Reward(sum(comps.values()) / len(comps), comps, note)


def _triple(e: Edge) -> tuple[str, str, str]:
    return normalize_text(e.source), normalize_text(e.relation), normalize_text(e.target)


def graph_validity_reward(completion: str | ParsedGraphThinking) -> Reward:
    """Mean of three components (all 0 when the Graph JSON is absent or not valid):

    - ``json``: the Graph JSON section decodes into a ``networkx.DiGraph`` (:func:`json_digraph`);
    - ``no_dangling``: share of JSON edges whose two endpoints are listed nodes (0 with no edges);
    - ``agreement``: Jaccard overlap of the JSON edges and the Graph section's edge lines, as
      (source, relation, target) triples compared after ``text.normalize_text`` (0 when both are empty).
    """
    p = as_parsed(completion)
    zero = {"json": 0.0, "no_dangling": 0.0, "agreement": 0.0}
    if p.graph_json is None:
        return Reward(0.0, zero, p.json_error or "no Graph JSON section")
    try:
        g, edges = json_digraph(p.graph_json)
    except GraphJSONError as e:
        return Reward(0.0, zero, str(e))
    declared = {n for n, d in g.nodes(data="declared") if d}
    if edges:
        no_dangling = sum(e.source in declared and e.target in declared for e in edges) / len(edges)
    else:
        no_dangling = 0.0
    js, tx = {_triple(e) for e in edges}, {_triple(e) for e in p.edges}
    agreement = len(js & tx) / len(js | tx) if js | tx else 0.0
    comps = {"json": 1.0, "no_dangling": no_dangling, "agreement": agreement}
    note = ("Graph JSON has no edges" if not edges else "dangling edges" if no_dangling < 1
            else "Graph and Graph JSON disagree" if agreement < 1 else "ok")
    return Reward(sum(comps.values()) / 3, comps, note)
