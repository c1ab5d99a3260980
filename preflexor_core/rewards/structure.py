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
from ..text.words import normalize_text

__all__ = ["Reward", "GraphJSONError", "as_parsed", "json_digraph", "completion_graph", "format_reward",
           "graph_validity_reward"]


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


class GraphJSONError(ValueError):
    """The Graph JSON section decoded but is not ``{"nodes": [...], "edges": [...]}``."""


def as_parsed(completion: str | ParsedGraphThinking) -> ParsedGraphThinking:
    if isinstance(completion, ParsedGraphThinking):
        return completion
    if not isinstance(completion, str):
        raise TypeError(f"a reward takes a completion str or a ParsedGraphThinking, got {type(completion).__name__}")
    return parse_graph_thinking(completion)


def _name(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise GraphJSONError(f"{where} must be a string, got {json_type(value)}")
    text = " ".join(str(value).split())
    if not text:
        raise GraphJSONError(f"{where} is empty")
    return text


def json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def json_digraph(obj) -> tuple[nx.DiGraph, list[Edge]]:
    """The ``networkx.DiGraph`` of a decoded Graph JSON object, and its edges in order.

    ``obj`` must be ``{"nodes": [...], "edges": [...]}``; a node is ``{"id": name}`` (or a bare
    name), an edge ``{"source": a, "relation": r, "target": b}`` (``relation`` may be missing).
    Listed nodes get ``declared=True``; an edge endpoint that is not listed is added with
    ``declared=False`` (a dangling edge). Edges carry ``relation`` (the first one of a repeated pair).
    Raises :class:`GraphJSONError` naming the item that is wrong.
    """
    if not isinstance(obj, dict):
        raise GraphJSONError(f'Graph JSON must be an object {{"nodes": [...], "edges": [...]}}, got {json_type(obj)}')
    for key in ("nodes", "edges"):
        if not isinstance(obj.get(key), list):
            raise GraphJSONError(f'Graph JSON needs a "{key}" array, got '
                                 f'{"nothing" if key not in obj else json_type(obj[key])}')
    g = nx.DiGraph()
    for i, node in enumerate(obj["nodes"]):
        if isinstance(node, dict):
            if "id" not in node:
                raise GraphJSONError(f'Graph JSON nodes[{i}] has no "id"')
            node = node["id"]
        g.add_node(_name(node, f"Graph JSON nodes[{i}].id"), declared=True)
    edges = []
    for i, e in enumerate(obj["edges"]):
        if not isinstance(e, dict):
            raise GraphJSONError(f"Graph JSON edges[{i}] must be an object, got {json_type(e)}")
        for key in ("source", "target"):
            if key not in e:
                raise GraphJSONError(f'Graph JSON edges[{i}] has no "{key}"')
        s, t = _name(e["source"], f"Graph JSON edges[{i}].source"), _name(e["target"], f"Graph JSON edges[{i}].target")
        rel = e.get("relation")
        rel = _name(rel, f"Graph JSON edges[{i}].relation") if rel is not None and str(rel).strip() else ""
        for n in (s, t):
            if n not in g:
                g.add_node(n, declared=False)
        if not g.has_edge(s, t):
            g.add_edge(s, t, relation=rel)
        edges.append(Edge(s, rel, t))
    return g, edges


def completion_graph(completion: str | ParsedGraphThinking) -> tuple[list[str], list[Edge], str]:
    """(nodes, edges, source) of a completion's graph: from the Graph JSON when it is valid
    (``source="json"``; nodes = listed nodes and edge endpoints), else from the Graph section's
    edge lines (``"text"``), else nothing (``"none"``)."""
    p = as_parsed(completion)
    if p.graph_json is not None:
        try:
            g, edges = json_digraph(p.graph_json)
            if len(g):
                return list(g.nodes), edges, "json"
        except GraphJSONError:
            pass
    if p.edges:
        return list(dict.fromkeys(n for e in p.edges for n in (e.source, e.target))), list(p.edges), "text"
    return [], [], "none"


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
