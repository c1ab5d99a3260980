"""Knowledge graph over corpus chunks and the concepts they mention (networkx).

What:
- Concept extraction (``extract_concepts``): key terms of a text by simple, deterministic
  heuristics. Runs of content words between stopwords/punctuation give multi-word terms (2-3
  words; bigrams of longer runs); single words are kept when they are capitalised mid-sentence,
  acronyms, repeated in the text, the head (last word) of a multi-word term, or frequent across
  the corpus. Terms are normalised: lowercase, possessive dropped, simple plural stripping
  ("properties" -> "property", "fibers" -> "fiber").
- ``KnowledgeGraph``: an undirected ``networkx.Graph`` with node ids ``"chunk:<chunk_id>"``
  (attrs: kind="chunk", chunk_id, text, source, start) and ``"concept:<term>"`` (attrs:
  kind="concept", term, df = number of chunks mentioning it). Edges carry ``kind`` and a float
  ``weight``: "mentions" (chunk-concept, 1.0, ``rank`` = position in the chunk's concept list), "cooccurs" (concept-concept, weight = ``count`` =
  number of chunks mentioning both), "similar" (chunk-chunk nearest neighbours with cosine >=
  threshold, weight = cosine). There are no self loops.
- GraphML export (all attributes are str/int/float), a node-link JSON dump for persistence, summary
  statistics, and shortest concept paths (material for the "Reasoning Steps" of a scratchpad).

References: PRefLexOR (arXiv 2410.12375) builds its thinking scratchpads from retrieved context;
graph-based reasoning over concept co-occurrence follows Buehler 2024, "Accelerating scientific
discovery with generative knowledge extraction, graph-based representation, and multimodal
intelligent graph reasoning" (arXiv 2403.11996).

Run: ``python -m preflexor_core.retrieval.graph "Some text about spider silk proteins."`` prints
the concepts extracted from the text.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Iterable, Sequence

import networkx as nx
import numpy as np

from ..text.words import _TOKEN, normalize_term, normalize_word  # noqa: F401  (re-exported)
from .chunking import Chunk

STOPWORDS = frozenset("""
a about above across after again against all almost along also although always am among an and
another any anyone anything are around as at be became because become becomes been before being
below between both but by can cannot could did do does doing done down during each either else
enough etc even ever every few for from further get gets given gives go had has have having he her
here hers herself him himself his how however i if in into is it its itself just least less like
made make makes many may me might more most much must my myself near neither never no nor not now
of off often on once one only onto or other others our ours ourselves out over own per perhaps
rather same several shall she should since so some such than that the their theirs them themselves
then there therefore these they this those though through thus to together too toward towards
under until up upon us use used uses using very via was we well were what whatever when where
whether which while who whom whose why will with within without would yet you your yours yourself
yourselves able based called e.g i.e new non first second third two three four five six seven
eight nine ten various various several often usually typically especially particularly mainly
describe described describes explain explains explained example examples question answer however
""".split())

# common verbs that would otherwise glue noun phrases together ("silk come", "fiber spun")
_VERBS = frozenset("""come comes came spun show shows shown give gives gave provide provides allow
allows enable enables include includes contain contains depend depends seen see sees known find
finds found take takes taken remain remains exhibit exhibits obtain obtains achieve achieves lead
leads play plays become becomes makes help helps tend tends consist consists occur occurs arise
arises yield yields reveal reveals suggest suggests explain explains require requires combine
combines hold holds held""".split())

_SENT_END = frozenset(".!?")


def _is_content(word: str) -> bool:
    if not word[0].isalpha():
        return False
    lw = word.lower()
    if lw in STOPWORDS or lw in _VERBS or lw.rstrip("s") in STOPWORDS:
        return False
    if len(lw) >= 6 and lw.endswith("ed") and not word.isupper():  # past participles
        return False
    return len(word) >= 3 or (len(word) >= 2 and word.isupper())


def _runs(text: str) -> list[list[tuple[str, bool]]]:
    """Runs of consecutive content words; each word with a flag 'capitalised mid-sentence or acronym'."""
    runs, cur = [], []
    sentence_start = True
    for tok in _TOKEN.findall(text):
        if _is_content(tok):
            special = (tok.isupper() and len(tok) >= 2) or (tok[0].isupper() and not sentence_start)
            cur.append((normalize_word(tok), special))
            sentence_start = False
            continue
        if cur:
            runs.append(cur)
            cur = []
        if tok in _SENT_END or tok in ("\n", "#", "*", "-", ":"):
            sentence_start = tok != "-"
        elif tok[0].isalnum():
            sentence_start = False
    if cur:
        runs.append(cur)
    return runs


def content_words(text: str) -> set[str]:
    """All normalised content words of a text (for corpus-level term frequencies)."""
    return {w for run in _runs(text) for w, _ in run}


def extract_concepts(text: str, max_concepts: int | None = 12, all_words: bool = False,
                     frequent: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Key terms of ``text``, best first (deterministic).

    ``all_words=True`` keeps every content word as a candidate (used for short queries).
    ``frequent`` is a set of corpus-frequent words that are always kept as single-word concepts.
    Score: occurrences (a multi-word term from a short run counts its number of words per
    occurrence); ties keep first-occurrence order.
    """
    phrases: Counter[str] = Counter()
    words: Counter[str] = Counter()
    keep_words: set[str] = set()
    first_seen: dict[str, int] = {}
    pos = 0
    for run in _runs(text):
        ws = [w for w, _ in run]
        for w, special in run:
            words[w] += 1
            first_seen.setdefault(w, pos)
            pos += 1
            if special or all_words or w in frequent:
                keep_words.add(w)
        # a short run is one term (weight = its length); a long run gives its bigrams (weight 1)
        grams = [ws] if 2 <= len(ws) <= 3 else ([ws[i:i + 2] for i in range(len(ws) - 1)]
                                                 if len(ws) > 3 else [])
        for g in grams:
            t = " ".join(g)
            if len(set(g)) == len(g):
                phrases[t] += len(g) if len(ws) <= 3 else 1
                first_seen.setdefault(t, pos)
                keep_words.add(g[-1])
    cands: dict[str, float] = {t: float(c) for t, c in phrases.items()}
    for w, c in words.items():
        if w in keep_words or c >= 2:
            cands[w] = float(c)
    ranked = sorted(cands, key=lambda t: (-cands[t], first_seen[t], t))
    return ranked if max_concepts is None else ranked[:max_concepts]


def chunk_node(chunk_id: str) -> str:
    return f"chunk:{chunk_id}"


def concept_node(term: str) -> str:
    return f"concept:{term}"


class KnowledgeGraph:
    """Chunks + concepts graph; see the module docstring for the schema."""

    def __init__(self, graph: nx.Graph | None = None):
        self.graph = graph if graph is not None else nx.Graph()
        self._concept_graph: nx.Graph | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, chunks: Sequence[Chunk], embeddings: np.ndarray | None = None, index=None,
              max_concepts: int = 12, sim_threshold: float = 0.6, sim_neighbors: int = 5,
              min_df: int = 2, max_df_ratio: float = 0.5) -> "KnowledgeGraph":
        """Build the graph. ``index`` (with ids = chunk positions) and ``embeddings`` give the
        chunk-chunk similarity edges; leave them out for a concepts-only graph."""
        g = nx.Graph()
        n = len(chunks)
        df = Counter(w for c in chunks for w in content_words(c.text))
        max_df = max(min_df, int(max_df_ratio * n))
        frequent = frozenset(w for w, d in df.items() if min_df <= d <= max_df)
        concept_df: Counter[str] = Counter()
        per_chunk = []
        for c in chunks:
            g.add_node(chunk_node(c.chunk_id), kind="chunk", chunk_id=c.chunk_id, text=c.text,
                       source=c.source, start=int(c.start))
            terms = extract_concepts(c.text, max_concepts, frequent=frequent)
            per_chunk.append(terms)
            concept_df.update(terms)
        for term in sorted(concept_df, key=lambda t: (-concept_df[t], t)):
            g.add_node(concept_node(term), kind="concept", term=term, df=int(concept_df[term]))
        cooc: Counter[tuple[str, str]] = Counter()
        for c, terms in zip(chunks, per_chunk):
            for rank, t in enumerate(terms):
                g.add_edge(chunk_node(c.chunk_id), concept_node(t), kind="mentions", weight=1.0,
                           rank=rank)
            cooc.update(combinations(sorted(terms), 2))
        for (a, b), cnt in sorted(cooc.items()):
            g.add_edge(concept_node(a), concept_node(b), kind="cooccurs", weight=float(cnt),
                       count=int(cnt))
        if index is not None and embeddings is not None and n > 1 and sim_neighbors > 0:
            ids, sims = index.query(embeddings, k=min(sim_neighbors + 1, n))
            for i in range(n):
                for j, s in zip(ids[i], sims[i]):
                    j = int(j)
                    if j != i and s >= sim_threshold:
                        g.add_edge(chunk_node(chunks[i].chunk_id), chunk_node(chunks[j].chunk_id),
                                   kind="similar", weight=float(round(float(s), 6)))
        return cls(g)

    # ------------------------------------------------------------------ queries
    @property
    def concept_graph(self) -> nx.Graph:
        """Concept-only co-occurrence graph (cached). Nodes and edges are inserted in sorted order so
        that path searches give the same answer on a graph loaded from disk."""
        if self._concept_graph is None:
            cg = nx.Graph()
            g = self.graph
            cg.add_nodes_from(sorted((n, d) for n, d in g.nodes(data=True) if d["kind"] == "concept"))
            cg.add_edges_from(sorted((min(u, v), max(u, v), d) for u, v, d in g.edges(data=True)
                                     if d["kind"] == "cooccurs"))
            self._concept_graph = cg
        return self._concept_graph

    def has_concept(self, term: str) -> bool:
        return concept_node(term) in self.graph

    def concepts_of_chunk(self, chunk_id: str) -> list[str]:
        """Concepts mentioned by a chunk, in extraction order (best first)."""
        adj = self.graph[chunk_node(chunk_id)]
        mentioned = [(d["rank"], nb) for nb, d in adj.items() if d["kind"] == "mentions"]
        return [self.graph.nodes[nb]["term"] for _, nb in sorted(mentioned)]

    def concept_neighbors(self, term: str) -> list[tuple[str, int]]:
        """Co-occurring concepts of ``term`` with counts, strongest first."""
        node = concept_node(term)
        if node not in self.graph:
            return []
        out = [(self.graph.nodes[nb]["term"], int(d["count"]))
               for nb, d in self.graph[node].items() if d["kind"] == "cooccurs"]
        return sorted(out, key=lambda x: (-x[1], x[0]))

    def concept_path(self, a: str, b: str, max_len: int = 6) -> list[str] | None:
        """Shortest co-occurrence path of concept terms from ``a`` to ``b`` (None if unlinked)."""
        cg = self.concept_graph
        na, nb = concept_node(a), concept_node(b)
        if na not in cg or nb not in cg or na == nb:
            return None
        try:
            path = nx.bidirectional_shortest_path(cg, na, nb)
        except nx.NetworkXNoPath:
            return None
        if len(path) > max_len:
            return None
        return [cg.nodes[p].get("term", p[len("concept:"):]) for p in path]

    # ------------------------------------------------------------------ export / stats
    def stats(self, top: int = 10) -> dict:
        g = self.graph
        nodes = Counter(k for _, k in g.nodes(data="kind"))
        edges = Counter(k for _, _, k in g.edges(data="kind"))
        comps = list(nx.connected_components(g)) if len(g) else []
        concepts = [(d["term"], g.degree(n)) for n, d in g.nodes(data=True) if d["kind"] == "concept"]
        concepts.sort(key=lambda x: (-x[1], x[0]))
        return {"nodes": dict(sorted(nodes.items())), "edges": dict(sorted(edges.items())),
                "components": len(comps), "largest_component": max(map(len, comps), default=0),
                "top_concepts": concepts[:top]}

    def to_graphml(self, path: str | Path) -> None:
        nx.write_graphml(self.graph, str(path))

    def to_json(self, path: str | Path, include_text: bool = False) -> None:
        """Node-link JSON; chunk texts are left out unless ``include_text`` (they live in chunks.jsonl)."""
        data = nx.node_link_data(self.graph, edges="edges")
        if not include_text:
            for nd in data["nodes"]:
                nd.pop("text", None)
        Path(path).write_text(json.dumps(data, ensure_ascii=False))

    @classmethod
    def from_json(cls, path: str | Path, texts: dict[str, str] | None = None) -> "KnowledgeGraph":
        data = json.loads(Path(path).read_text())
        g = nx.node_link_graph(data, edges="edges")
        if texts is not None:
            for n, d in g.nodes(data=True):
                if d.get("kind") == "chunk" and "text" not in d:
                    d["text"] = texts[d["chunk_id"]]
        return cls(g)


def _main(argv: Iterable[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Print the concepts extracted from a text.")
    ap.add_argument("text", help="text to analyse")
    ap.add_argument("--max", type=int, default=12, help="max concepts")
    a = ap.parse_args(argv)
    for t in extract_concepts(a.text, a.max):
        print(t)


if __name__ == "__main__":
    _main()
