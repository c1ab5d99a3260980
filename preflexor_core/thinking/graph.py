"""The graph thinking format: a thinking block that holds a knowledge graph, and its parser.

Inside ``<|thinking|>...<|/thinking|>`` come, in this order, the sections of ``GRAPH_SECTIONS``
with the ``**Category**:`` headers of the paper's format (``datagen.format.format_thinking``):
Brainstorm (free text), Graph (one ``source -[relation]-> target`` per line), Graph JSON
(``{"nodes": [{"id": ...}], "edges": [{"source": ..., "relation": ..., "target": ...}]}``),
Patterns and Synthesis; the answer follows ``<|/thinking|>``.

References: PRefLexOR (arXiv 2410.12375) for the thinking tokens and headers; the section layout
follows its successor, Graph-PReFLexOR (Buehler 2025, arXiv 2501.08120).

Tests: ``python -m pytest -q tests/test_graph_format.py``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from .spans import extract_spans
from .tokens import THINK_END, THINK_START

__all__ = ["GRAPH_SECTIONS", "Edge", "ParsedGraphThinking", "format_graph_thinking",
           "format_edge", "parse_edge", "parse_graph_thinking", "graph_json"]

GRAPH_SECTIONS = ("Brainstorm", "Graph", "Graph JSON", "Patterns", "Synthesis")

# "**Graph JSON**:" before "**Graph**:" in the alternation, so the longer name wins
_HEADER_RE = re.compile(r"^[ \t]*\*\*[ \t]*(brainstorm|graph[ \t]+json|graph|patterns|synthesis)[ \t]*\*\*"
                        r"[ \t]*:[ \t]*", re.IGNORECASE | re.MULTILINE)
_CANON = {" ".join(s.lower().split()): s for s in GRAPH_SECTIONS}
# "source -[relation]-> target", optionally as a list item ("- ", "* ", "1. ")
_EDGE_RE = re.compile(r"^\s*(?:[-*]\s+|\d+[.)]\s+)?(?P<s>.+?)\s*-\[\s*(?P<r>[^\]\n]*?)\s*\]->\s*(?P<t>.+?)\s*$")
_FENCE_RE = re.compile(r"^\s*```[a-zA-Z]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


@dataclass(frozen=True)
class Edge:
    source: str
    relation: str
    target: str


@dataclass
class ParsedGraphThinking:
    """What ``parse_graph_thinking`` found in one completion (texts stripped)."""

    n_think_start: int
    n_think_end: int
    sections: list[str] = field(default_factory=list)     # canonical section names, in order of appearance
    texts: dict[str, str] = field(default_factory=dict)   # section -> text (its first occurrence)
    edges: list[Edge] = field(default_factory=list)       # the edge lines of the Graph section
    bad_edge_lines: list[str] = field(default_factory=list)  # non-empty Graph lines that are not edges
    graph_json: dict | list | None = None                 # the Graph JSON section decoded (None: absent/invalid)
    json_error: str = ""                                  # why it did not decode ("" when it did or is absent)
    answer: str = ""                                      # reasoning.extract_spans(text).answer
    thinking_closed: bool = False   # exactly one <|thinking|>, then exactly one <|/thinking|>
    prefix: str = ""                # the text before the first <|thinking|> (stripped)


def _clean_field(value, what: str) -> str:
    text = " ".join(str(value).split())
    if not text:
        raise ValueError(f"format_edge: empty {what}; every edge needs a source, a relation and a target")
    if "-[" in text or "]->" in text or (what == "relation" and ("[" in text or "]" in text)):
        raise ValueError(f"format_edge: {what} {text!r} contains the edge markup '-[', ']->' or brackets; "
                         "rename it so the Graph line stays parseable")
    return text


def format_edge(source: str, relation: str, target: str) -> str:
    """``source -[relation]-> target`` (whitespace collapsed; markup inside a field is refused)."""
    return f"{_clean_field(source, 'source')} -[{_clean_field(relation, 'relation')}]-> " \
           f"{_clean_field(target, 'target')}"


def parse_edge(line: str) -> Edge | None:
    """The edge of one Graph line, or None when the line is not ``source -[relation]-> target``."""
    m = _EDGE_RE.match(line)
    if not m or not m.group("s").strip() or not m.group("t").strip():
        return None
    return Edge(m.group("s").strip(), m.group("r").strip(), m.group("t").strip())


def _as_edges(edges: Sequence) -> list[Edge]:
    out = []
    for i, e in enumerate(edges):
        if isinstance(e, Edge):
            out.append(e)
        elif isinstance(e, (tuple, list)) and len(e) == 3:
            out.append(Edge(*(" ".join(str(x).split()) for x in e)))
        else:
            raise ValueError(f"format_graph_thinking: edge {i} is {e!r}; give Edge or (source, relation, target)")
    return out


def graph_json(edges: Sequence, nodes: Sequence[str] | None = None) -> dict:
    """The Graph JSON object of ``edges`` (``nodes``: default the edge endpoints, first seen first)."""
    es = _as_edges(edges)
    if nodes is None:
        nodes = list(dict.fromkeys(n for e in es for n in (e.source, e.target)))
    return {"nodes": [{"id": str(n)} for n in nodes],
            "edges": [{"source": e.source, "relation": e.relation, "target": e.target} for e in es]}


def format_graph_thinking(brainstorm: str, edges: Sequence, patterns: str, synthesis: str,
                          nodes: Sequence[str] | None = None) -> str:
    """The thinking block, exactly::

        <|thinking|>\\n**Brainstorm**:\\n\\n{brainstorm}\\n\\n**Graph**:\\n\\n{a -[r]-> b lines}\\n\\n
        **Graph JSON**:\\n\\n{one-line JSON}\\n\\n**Patterns**:\\n\\n{patterns}\\n\\n**Synthesis**:\\n\\n{synthesis}\\n\\n<|/thinking|>

    ``edges``: ``Edge`` or ``(source, relation, target)`` items (at least one); ``nodes``: the JSON
    node ids (default: the edge endpoints). Every section is written, even when its text is empty.
    """
    es = _as_edges(edges)
    if not es:
        raise ValueError("format_graph_thinking: no edges; the Graph section needs at least one edge")
    texts = {"Brainstorm": brainstorm, "Graph": "\n".join(format_edge(e.source, e.relation, e.target) for e in es),
             "Graph JSON": json.dumps(graph_json(es, nodes), ensure_ascii=False),
             "Patterns": patterns, "Synthesis": synthesis}
    body = "".join(f"**{name}**:\n\n{(texts[name] or '').strip()}\n\n" for name in GRAPH_SECTIONS)
    return f"{THINK_START}\n{body}{THINK_END}"


def _decode_json(text: str) -> tuple[dict | list | None, str]:
    m = _FENCE_RE.match(text)
    if m:  # ```json ... ``` fences are tolerated
        text = m.group(1)
    text = text.strip()
    if not text:
        return None, "Graph JSON section is empty"
    try:
        return json.loads(text), ""
    except json.JSONDecodeError as e:
        return None, f"Graph JSON does not parse: {e.msg} at line {e.lineno} column {e.colno}"


def parse_graph_thinking(text: str) -> ParsedGraphThinking:
    """Split one completion into the sections of the graph thinking format.

    The thinking block is the text after the first ``<|thinking|>`` up to the first
    ``<|/thinking|>`` after it (to the end of the text when unclosed; the whole text before a
    ``<|/thinking|>`` when no start tag exists). Headers are matched case-insensitively at line
    starts; a section runs to the next header. The answer is ``extract_spans(text).answer``.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_graph_thinking expects a str, got {type(text).__name__}")
    s = text.find(THINK_START)
    start = 0 if s < 0 else s + len(THINK_START)
    e = text.find(THINK_END, start)
    block = text[start:] if e < 0 else text[start:e]
    if s < 0 and e < 0:
        block = ""
    n_s, n_e = text.count(THINK_START), text.count(THINK_END)
    out = ParsedGraphThinking(n_s, n_e, answer=extract_spans(text).answer,
                              thinking_closed=n_s == 1 and n_e == 1 and 0 <= s < e,
                              prefix=text[:s].strip() if s >= 0 else "")
    heads = list(_HEADER_RE.finditer(block))
    for i, m in enumerate(heads):
        name = _CANON[" ".join(m.group(1).lower().split())]
        end = heads[i + 1].start() if i + 1 < len(heads) else len(block)
        out.sections.append(name)
        out.texts.setdefault(name, block[m.end():end].strip())
    for line in out.texts.get("Graph", "").splitlines():
        if line.strip():
            edge = parse_edge(line)
            if edge is None:
                out.bad_edge_lines.append(line.strip())
            else:
                out.edges.append(edge)
    if "Graph JSON" in out.texts:
        out.graph_json, out.json_error = _decode_json(out.texts["Graph JSON"])
    return out
