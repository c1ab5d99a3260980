"""The retrieval-augmented context of one question, shared by every teacher and by ``datagen``.

``gather_context(retriever, question)`` -> :class:`Context`: the question's source chunks, the
top-k search hits and graph-neighbour chunks (``GraphRetriever.expand``), the concept paths linking
the question's concepts and the concepts that co-occur with them. ``concepts_of`` /
``chunk_concepts`` give the concept terms of a text / of one chunk.

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.1: RAG over the whole corpus, with a
knowledge graph, feeds the teacher's thinking scratchpad.

Tests: ``python -m pytest -q tests/test_teachers.py tests/test_datagen.py``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from ..text.words import STOPWORDS, WORD, is_prose, normalize_text, split_sentences


@dataclass
class Sentence:
    text: str
    chunk_id: str
    rank: int       # rank of its chunk in the retrieval (0 = best)
    position: int   # index of the sentence inside its chunk
    norm: str = ""  # normalize_text(text)

    def __post_init__(self):
        if not self.norm:
            self.norm = normalize_text(self.text)


@dataclass
class Context:
    """What a teacher sees for one question: retrieved chunks, graph neighbours, concept paths."""

    question: str
    hits: list = field(default_factory=list)            # retriever Hits, best first
    neighbours: list[str] = field(default_factory=list)  # concept terms next to the question's concepts
    paths: list[list[str]] = field(default_factory=list)  # shortest concept paths between them
    question_concepts: list[str] = field(default_factory=list)

    @property
    def chunk_ids(self) -> list[str]:
        return [str(getattr(h, "chunk_id", "")) for h in self.hits]

    def sentences(self, min_words: int = 5) -> list[Sentence]:
        """The context's sentences, de-duplicated; headings (``#``) and fragments shorter than
        ``min_words`` words are left out unless nothing else is there."""
        out, seen = [], set()
        for r, h in enumerate(self.hits):
            for p, s in enumerate(split_sentences(getattr(h, "text", str(h)))):
                if s in seen:  # overlapping chunks repeat sentences
                    continue
                seen.add(s)
                out.append(Sentence(s, str(getattr(h, "chunk_id", r)), r, p))
        good = [s for s in out if is_prose(s.text, min_words)]
        return good or out

    def render(self, max_chars: int = 6000) -> str:
        """Plain-text context for LLM prompts."""
        parts = []
        for i, h in enumerate(self.hits):
            parts.append(f"[{i + 1}] {' '.join(getattr(h, 'text', str(h)).split())}")
        if self.neighbours:
            parts.append("Related concepts: " + ", ".join(self.neighbours))
        for p in self.paths:
            parts.append("Concept path: " + " -> ".join(p))
        text = "\n\n".join(parts)
        return text[:max_chars]

    @classmethod
    def from_text(cls, question: str, text: str) -> "Context":
        """A context from raw text (no retriever): one pseudo-hit per paragraph."""
        paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()] or [text]
        return cls(question=question, hits=[_TextHit(p, f"context@{i}") for i, p in enumerate(paras)])


@dataclass
class _TextHit:
    text: str
    chunk_id: str
    score: float = 0.0
    source: str = "context"


def concepts_of(retriever, text: str) -> list[str]:
    """Concept terms of ``text``, best first: the ones in the retriever's graph when there are
    any, else all of its terms, else its longer (5+ letters) non-stopwords (at most 8)."""
    found = retriever.concepts_of(text, in_graph=True) or retriever.concepts_of(text)
    if found:
        return [str(c) for c in found]
    seen, out = set(), []
    for w in WORD.findall(text):
        lw = w.lower()
        if len(lw) < 5 or lw in STOPWORDS or lw in seen:
            continue
        seen.add(lw)
        out.append(lw)
    return out[:8]


def chunk_concepts(retriever, hit) -> list[str]:
    """Concepts of one chunk: its graph concepts (ranked as the graph stored them) when the graph
    knows the chunk and it has any, else the concepts of its text."""
    try:
        found = retriever.graph.concepts_of_chunk(hit.chunk_id)
    except KeyError:  # not a corpus chunk (e.g. a Context.from_text paragraph)
        found = []
    return found or concepts_of(retriever, hit.text)


def gather_context(retriever, question: str, k: int = 5, seed_hits: Sequence = (),
                   use_rag: bool = True, k_graph: int = 3, k_concepts: int = 8) -> Context:
    """RAG context for ``question``: ``seed_hits`` (the chunks it came from), the top-``k``
    search hits and up to ``k_graph`` graph-neighbour chunks (``retriever.expand``), de-duplicated
    in that order; the concept paths linking the question's concepts; and the concepts that
    co-occur with them in the graph. ``use_rag=False`` keeps only ``seed_hits``."""
    qc = concepts_of(retriever, question)
    candidates = list(seed_hits)
    neighbours: list[str] = []
    paths: list[list[str]] = []
    if use_rag:
        candidates += list(retriever.search(question, k=k))
        seeds = _dedupe(candidates)
        if seeds:
            expansion = retriever.expand(seeds, hops=1, query=question)
            candidates += list(expansion.neighbors)[:k_graph]
            paths = [[str(c) for c in p] for p in expansion.concept_paths if len(p) >= 2]
        for c in qc[:3]:
            neighbours += [t for t, _ in retriever.neighbors_of_concept(c, k=k_concepts)]
    neighbours = [t for t in dict.fromkeys(neighbours) if t not in qc][:k_concepts]
    return Context(question=question, hits=_dedupe(candidates), neighbours=neighbours, paths=paths,
                   question_concepts=qc)


def _dedupe(hits: Sequence) -> list:
    out, seen = [], set()
    for h in hits:
        cid = getattr(h, "chunk_id", id(h))
        if cid not in seen:
            seen.add(cid)
            out.append(h)
    return out
