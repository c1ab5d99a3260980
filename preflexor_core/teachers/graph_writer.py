"""The extractive teacher's graph-format writer: a chosen side whose knowledge graph comes from the
retriever's concept graph, every node and edge traceable to a corpus sentence.

``GraphWriter(retriever).write(question, context, answer)`` -> :class:`GraphThinking` with the
thinking block (``graph_format.format_graph_thinking``), its edges and ``sources`` (one entry per
edge: the corpus sentence that joins its two concepts, its chunk id). Nodes are concept nodes of the
retriever's graph: the question's concepts, their co-occurring neighbours and the concepts on the
paths linking them. An edge joins two of them when one corpus sentence mentions both (the test of
``rewards.groundedness_reward``); its relation is the words between the two mentions in that sentence
(``co-occurs with`` when they are adjacent or far apart). Brainstorm and Synthesis quote corpus
sentences; Patterns names the graph's hubs and paths.

References: Graph-PReFLexOR (Buehler 2025, arXiv 2501.08120) for the sections; PRefLexOR (arXiv
2410.12375) Sec. 2.1 for RAG with a knowledge graph. Tests: ``python -m pytest -q tests/test_graph_teacher.py``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations

from ..thinking.graph import Edge, format_graph_thinking
from ..text.words import STOPWORDS, normalize_text, split_sentences
from ..thinking.formats import GRAPH_INSTRUCTION, THINKING_FORMATS
from ..thinking.layout import join_chosen
from ..thinking.tokens import strip_pipeline_tags

__all__ = ["GraphThinking", "GraphWriter", "CorpusSentence"]

FALLBACK_RELATION = "co-occurs with"
MAX_RELATION_WORDS = 5


@dataclass
class CorpusSentence:
    text: str        # as in the chunk (whitespace collapsed)
    chunk_id: str
    norm: str        # text.normalize_text(text)


@dataclass
class GraphThinking:
    thinking: str                   # the <|thinking|>...<|/thinking|> block
    edges: list[Edge]
    nodes: list[str]
    sources: list[dict] = field(default_factory=list)   # {"source", "relation", "target", "sentence", "chunk_id"}

    def chosen(self, answer: str) -> str:
        return join_chosen(self.thinking, answer)


def _find(words: list[str], term: list[str]) -> int:
    n = len(term)
    return next((i for i in range(len(words) - n + 1) if words[i:i + n] == term), -1)


def _relation(sentence_norm: str, a: str, b: str) -> tuple[str, str, str]:
    """(source, relation, target): the concept mentioned first is the source; the relation is the
    words between the two mentions (stopwords kept inside, trimmed at the ends)."""
    words = sentence_norm.split()
    wa, wb = normalize_text(a).split(), normalize_text(b).split()
    ia, ib = _find(words, wa), _find(words, wb)
    if ia > ib:
        a, b, wa, wb, ia, ib = b, a, wb, wa, ib, ia
    between = words[ia + len(wa):ib] if ia >= 0 and ib >= 0 else []
    while between and between[0] in STOPWORDS and between[0] not in ("is", "are", "has"):
        between = between[1:]
    while between and between[-1] in STOPWORDS:
        between = between[:-1]
    rel = " ".join(between)
    if not between or len(between) > MAX_RELATION_WORDS or any(c in rel for c in "[]") or "->" in rel:
        rel = FALLBACK_RELATION
    return a, rel, b


class GraphWriter:
    """Writes graph-format thinking for questions over one retriever (a ``GraphRetriever``); the
    corpus sentence index is built once, on first use."""

    def __init__(self, retriever, max_edges: int = 6, max_nodes: int = 10, max_quotes: int = 2):
        if min(max_edges, max_nodes, max_quotes) < 1:
            raise ValueError(f"GraphWriter: max_edges={max_edges}, max_nodes={max_nodes} and max_quotes={max_quotes} "
                             "must be >= 1")
        self.retriever, self.max_edges, self.max_nodes, self.max_quotes = retriever, max_edges, max_nodes, max_quotes
        self._sentences: list[CorpusSentence] | None = None
        self._postings: dict[str, set[int]] = {}

    def sentences(self) -> list[CorpusSentence]:
        if self._sentences is None:
            out, seen = [], set()
            for c in self.retriever.chunks:
                for s in split_sentences(strip_pipeline_tags(c.text)):     # corpus text: no pipeline tags
                    s = " ".join(s.split())
                    if s and s not in seen:
                        seen.add(s)
                        out.append(CorpusSentence(s, str(c.chunk_id), normalize_text(s)))
            self._sentences = out
            for i, s in enumerate(out):
                for w in s.norm.split():
                    self._postings.setdefault(w, set()).add(i)
        return self._sentences

    def joining(self, a: str, b: str) -> list[CorpusSentence]:
        """Corpus sentences that mention both concepts as whole words, in corpus order."""
        sents = self.sentences()
        wa, wb = normalize_text(a).split(), normalize_text(b).split()
        if not wa or not wb:
            return []
        ids = set.intersection(*(self._postings.get(w, set()) for w in wa + wb))
        return [sents[i] for i in sorted(ids)
                if _find(sents[i].norm.split(), wa) >= 0 and _find(sents[i].norm.split(), wb) >= 0]

    def _is_concept(self, term: str) -> bool:
        return bool(term) and self.retriever.graph.has_concept(term)

    def candidate_nodes(self, context) -> list[str]:
        """The question's concepts, then the concepts on its paths, then its neighbours (corpus concepts only)."""
        terms = list(context.question_concepts) + [c for p in context.paths for c in p] + list(context.neighbours)
        kept: list[str] = []
        for t in dict.fromkeys(str(t) for t in terms):   # a term inside a kept one (or around it) adds nothing
            if self._is_concept(t) and not any(_overlaps(t, k) for k in kept):
                kept.append(t)
        return kept[: self.max_nodes]

    def write(self, question: str, context, answer: str = "") -> GraphThinking:
        """The graph thinking of ``question`` from its retrieval ``context`` (``retrieval.context.Context``);
        sentences of ``answer`` are kept out of Brainstorm / Synthesis (the conclusion). Raises ``ValueError``
        when no two of the context's concepts share a corpus sentence (no edge can be grounded)."""
        nodes = self.candidate_nodes(context)
        qset = set(context.question_concepts)
        pairs = [(a, b) for p in context.paths for a, b in zip(p, p[1:]) if a in nodes and b in nodes]
        pairs += sorted(combinations(nodes, 2), key=lambda ab: (-((ab[0] in qset) + (ab[1] in qset)),
                                                                nodes.index(ab[0]), nodes.index(ab[1])))
        edges, sources, seen = [], [], set()
        for a, b in pairs:
            if len(edges) >= self.max_edges:
                break
            if frozenset((a, b)) in seen or _overlaps(a, b):
                continue
            joined = self.joining(a, b)
            if not joined:
                continue
            seen.add(frozenset((a, b)))
            sent = min(joined, key=lambda s: (_relation(s.norm, a, b)[1] == FALLBACK_RELATION, len(s.norm)))
            s, rel, t = _relation(sent.norm, a, b)
            edges.append(Edge(s, rel, t))
            sources.append({"source": s, "relation": rel, "target": t, "sentence": sent.text, "chunk_id": sent.chunk_id})
        if not edges:
            raise ValueError(f"GraphWriter: no two concepts of the question {question!r} share a corpus sentence "
                             f"(concepts: {', '.join(nodes) or 'none'}); the graph thinking needs at least one edge")
        used = list(dict.fromkeys(n for e in edges for n in (e.source, e.target)))
        quotes = [x["sentence"] for x in sources if x["sentence"] not in answer]
        quotes = list(dict.fromkeys(quotes))
        brainstorm = " ".join(quotes[: self.max_quotes]) or ", ".join(used)
        synthesis = " ".join(quotes[self.max_quotes: 2 * self.max_quotes]) or ", ".join(used)
        thinking = format_graph_thinking(brainstorm, edges, _patterns(edges, context.paths), synthesis, nodes=used)
        return GraphThinking(thinking, edges, used, sources)


def _overlaps(a: str, b: str) -> bool:
    """Whether one term occurs inside the other as whole words ("bone" and "cortical bone")."""
    wa, wb = normalize_text(a).split(), normalize_text(b).split()
    return _find(wa, wb) >= 0 or _find(wb, wa) >= 0


def _patterns(edges: list[Edge], paths) -> str:
    """The hubs (concepts on 2+ edges) and the longest concept path, as text over concept terms."""
    deg = Counter(n for e in edges for n in (e.source, e.target))
    lines = []
    for hub, d in deg.most_common():
        if d < 2:
            break
        nbrs = [e.target if e.source == hub else e.source for e in edges if hub in (e.source, e.target)]
        lines.append(f"{hub} links {', '.join(nbrs)}")
    path = max(paths, key=len) if paths else []
    if len(path) >= 3:
        lines.append(" -> ".join(path))
    return "\n".join(lines) or f"{edges[0].source} -> {edges[0].target}"
