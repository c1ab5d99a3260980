"""The graph a graph-format completion holds: its Graph JSON checked and read into networkx, or its
Graph lines when the JSON is missing or invalid; and the graph's GraphML export.

    nodes, edges, source = completion_graph(text)     # source: "json", "text" or "none"
    export_graphml(text, "q0.graphml")                 # opens in Gephi, Cytoscape, yEd

The rewards (``rewards.structure``, ``rewards.corpus``) score these graphs; inference and
evaluation export them. Layout of the format: ``thinking.graph``.

Tests: ``python -m pytest -q tests/test_rewards.py tests/test_graph_format.py``.
"""
from __future__ import annotations

import os

import networkx as nx

from .graph import Edge, ParsedGraphThinking, parse_graph_thinking

__all__ = ["GraphJSONError", "as_parsed", "json_type", "json_digraph", "completion_graph", "completion_digraph",
           "export_graphml"]


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


def completion_digraph(completion: str) -> nx.DiGraph:
    """The completion's graph (Graph JSON when valid, else the Graph lines) with ``relation`` on edges."""
    nodes, edges, source = completion_graph(completion)
    g = nx.DiGraph(source=source)
    g.add_nodes_from(nodes)
    for e in edges:
        if not g.has_edge(e.source, e.target):
            g.add_edge(e.source, e.target, relation=e.relation)
    return g


def export_graphml(completion: str, path: str) -> str:
    """Write the completion's graph as GraphML (opens in Gephi, Cytoscape, yEd)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nx.write_graphml(completion_digraph(completion), path)
    return path
