"""Corpus rewards: is the completion's graph grounded in the corpus graph, and does it cover the
answer? ``CorpusConcepts`` (the corpus graph's concepts and sentences), ``groundedness_reward``,
``graph_utility_reward``.

A concept is a ``kind="concept"`` node of the retriever's knowledge graph (``retrieval.graph``);
terms and sentences are compared after ``text.normalize_text`` (lowercase, plurals stripped), so
"Spider Silks" is the concept "spider silk". Sentences are those of the graph's chunk texts
(``text.split_sentences``, the retriever's splitter).

References: Graph-PReFLexOR (arXiv 2501.08120) rewards graph use; grounding in the user's corpus
graph replaces its LLM judge. Tests: ``python -m pytest -q tests/test_rewards.py``.
"""
from __future__ import annotations

from typing import Iterable

import networkx as nx

from ..thinking.graph import ParsedGraphThinking
from ..retrieval.graph import extract_concepts
from ..text.words import mentions, normalize_text, split_sentences
from .structure import Reward
from ..thinking.graph_io import as_parsed, completion_graph

__all__ = ["CorpusConcepts", "groundedness_reward", "graph_utility_reward", "answer_concepts"]


class CorpusConcepts:
    """The concept terms and the normalised sentences of a corpus, with a word index for
    "which sentences mention this term" (cached per term)."""

    def __init__(self, concepts: Iterable[str], sentences: Iterable[str]):
        self.concepts = frozenset(filter(None, (normalize_text(c) for c in concepts)))
        self.sentences = list(dict.fromkeys(filter(None, (normalize_text(s) for s in sentences))))
        self._postings: dict[str, set[int]] = {}
        for i, s in enumerate(self.sentences):
            for w in s.split():
                self._postings.setdefault(w, set()).add(i)
        self._cache: dict[str, frozenset[int]] = {}

    @classmethod
    def from_graph(cls, graph) -> "CorpusConcepts":
        """From a ``GraphRetriever``, a ``KnowledgeGraph`` or its ``networkx`` graph; chunk nodes
        must carry their ``text`` (as after ``build`` or ``GraphRetriever.load``)."""
        g = graph
        for _ in range(3):  # GraphRetriever -> KnowledgeGraph -> nx.Graph
            if isinstance(g, nx.Graph):
                break
            g = getattr(g, "graph", None)
        if not isinstance(g, nx.Graph):
            raise TypeError(f"CorpusConcepts.from_graph needs a GraphRetriever, a KnowledgeGraph or a networkx "
                            f"graph, got {type(graph).__name__}")
        concepts = [d.get("term", "") for _, d in g.nodes(data=True) if d.get("kind") == "concept"]
        chunks = [d for _, d in g.nodes(data=True) if d.get("kind") == "chunk"]
        if not concepts or not chunks:
            raise ValueError(f"CorpusConcepts.from_graph: the graph has {len(concepts)} concept and {len(chunks)} "
                             "chunk nodes; build it with GraphRetriever.build(corpus) or load a saved retriever")
        if any("text" not in d for d in chunks):
            raise ValueError("CorpusConcepts.from_graph: chunk nodes have no text (a graph.json read without "
                             "texts); load it with KnowledgeGraph.from_json(path, texts) or GraphRetriever.load(dir)")
        return cls(concepts, (s for d in chunks for s in split_sentences(d["text"])))

    def has_concept(self, term: str) -> bool:
        return normalize_text(term) in self.concepts

    def sentences_with(self, term: str) -> frozenset[int]:
        """Indices of the corpus sentences that mention ``term`` as whole words."""
        t = normalize_text(term)
        if t not in self._cache:
            words = t.split()
            ids = set.intersection(*(self._postings.get(w, set()) for w in words)) if words else set()
            self._cache[t] = frozenset(i for i in ids if mentions(self.sentences[i], t))
        return self._cache[t]

    def cooccur(self, a: str, b: str) -> bool:
        """Whether one corpus sentence mentions both terms."""
        return bool(self.sentences_with(a) & self.sentences_with(b))


def _corpus(corpus) -> CorpusConcepts:
    return corpus if isinstance(corpus, CorpusConcepts) else CorpusConcepts.from_graph(corpus)


def groundedness_reward(completion: str | ParsedGraphThinking, corpus) -> Reward:
    """Mean of ``nodes`` (share of the graph's nodes that are corpus concepts) and ``edges`` (share
    of its edges whose two endpoints co-occur in one corpus sentence). The graph is the Graph
    JSON when valid, else the Graph section's edge lines (:func:`completion_graph`); an empty
    graph scores 0. ``corpus``: a :class:`CorpusConcepts` or what ``CorpusConcepts.from_graph`` takes."""
    cc = _corpus(corpus)
    nodes, edges, source = completion_graph(completion)
    if not nodes:
        return Reward(0.0, {"nodes": 0.0, "edges": 0.0}, "no graph")
    node_share = sum(cc.has_concept(n) for n in nodes) / len(nodes)
    edge_share = sum(cc.cooccur(e.source, e.target) for e in edges) / len(edges) if edges else 0.0
    comps = {"nodes": node_share, "edges": edge_share}
    note = ("no edges" if not edges else "nodes that are not corpus concepts" if node_share < 1
            else "edges whose endpoints share no corpus sentence" if edge_share < 1 else "ok")
    if source == "text":
        note = f"{note} (graph from the Graph section: Graph JSON invalid)"
    return Reward((node_share + edge_share) / 2, comps, note)


def answer_concepts(answer: str, corpus: CorpusConcepts | None = None) -> list[str]:
    """The answer's concepts: with a corpus, every term of the answer that is a corpus concept
    (``retrieval.graph.extract_concepts`` with ``all_words=True``, as ``GraphRetriever.concepts_of``);
    without one, the answer's key terms (``extract_concepts``)."""
    if corpus is None:
        return extract_concepts(answer, max_concepts=None)
    return [t for t in extract_concepts(answer, max_concepts=None, all_words=True) if corpus.has_concept(t)]


def graph_utility_reward(completion: str | ParsedGraphThinking, corpus=None) -> Reward:
    """``covered``: mean over the answer's concepts (:func:`answer_concepts`) of 1 when some graph
    node names the concept (the normalised node contains it as whole words: node "spider silk"
    covers "silk"), else the share of the concept's words found in node names ("nacre deflect
    crack" with a node "nacre": 1/3). 0 when the answer has no concepts or there is no graph."""
    p = as_parsed(completion)
    cc = None if corpus is None else _corpus(corpus)
    nodes, _, _ = completion_graph(p)
    wanted = answer_concepts(p.answer, cc)
    if not nodes or not wanted:
        return Reward(0.0, {"covered": 0.0}, "no graph" if not nodes else "answer has no concepts")
    norm_nodes = [normalize_text(n) for n in nodes]
    node_words = {w for n in norm_nodes for w in n.split()}
    scores = {}
    for c in wanted:
        words = c.split()
        scores[c] = 1.0 if any(mentions(n, c) for n in norm_nodes) else sum(w in node_words for w in words) / len(words)
    share = sum(scores.values()) / len(scores)
    missing = [c for c, v in scores.items() if v < 1]
    return Reward(share, {"covered": share}, "ok" if not missing else f"not in the graph: {', '.join(missing[:5])}")
