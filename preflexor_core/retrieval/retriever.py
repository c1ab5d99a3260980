"""GraphRetriever: chunked corpus + vector index + knowledge graph, built, queried and saved as one.

What: ``GraphRetriever.build(texts_or_paths)`` chunks the inputs (strings become sources
``"text:<i>"``; ``pathlib.Path`` objects and strings naming an existing file or folder are read as
corpus files), embeds the chunks (``embedder=None`` -> ``default_embedder()``), indexes them
(exact search under ``exact_threshold`` chunks, HNSW above) and builds the chunk/concept graph.

Queries:
- ``search(query, k)`` -> ``list[Hit]`` (cosine similarity, best first);
- ``random_nodes(n, seed)`` -> n distinct random chunks (the seed passages of on-the-fly data
  generation in PRefLexOR), deterministic for a seed;
- ``expand(hits, hops, query=...)`` -> ``Expansion``: graph neighbours of the hits (chunks reached
  through shared concepts or similarity edges within ``hops``; score = sum over links of
  ``1/log(2 + df)`` per shared concept and the cosine per similarity edge, halved per extra hop)
  and the shortest concept paths linking the query's concepts (material for "Reasoning Steps");
- ``concepts_of(text)``, ``neighbors_of_concept(term)``, ``chunks``.

Persistence: ``save(dir)`` writes ``meta.json`` (format version, embedder name/dim, build
parameters, graph stats), ``chunks.jsonl``, ``graph.json`` (networkx node-link) and the index
(``index.*``) into a temporary sibling folder, then renames it into place. ``load(dir)``
re-creates the embedder from ``meta.json`` (or checks the one passed in: name and dim must match).

References: PRefLexOR (arXiv 2410.12375), sections on on-the-fly dataset generation with
retrieval-augmented thinking; see graph.py and index.py for the graph and ANN references.

Run: ``python -m preflexor_core.retrieval.retriever CORPUS_PATH --query "..." [--save DIR]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..infra.errors import writing
from ..infra.io import atomic_dir, read_jsonl
from ..infra.rundir import NotOurFolderError
from .chunking import (SUPPORTED_SUFFIXES, Chunk, CorpusError, Document, Tokenizer, chunk_documents,
                       read_path)
from .embedding import Embedder, HashingEmbedder, default_embedder, embedder_from_name
from .graph import KnowledgeGraph, chunk_node, concept_node, extract_concepts
from ..text.words import normalize_term
from .index import (DEFAULT_EF_CONSTRUCTION, DEFAULT_EF_SEARCH, DEFAULT_M, EXACT_THRESHOLD, load_index,
                    make_index)

FORMAT_VERSION = 1


class EmbedderMismatchError(ValueError):
    """A saved retriever was loaded with an embedder other than the one that built it."""


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk. ``score``: cosine for ``via="search"``, graph score for
    ``via="graph"``, 0.0 for ``via="random"``."""

    text: str
    score: float
    source: str
    chunk_id: str
    via: str = "search"


@dataclass
class Expansion:
    """Result of :meth:`GraphRetriever.expand`."""

    neighbors: list[Hit] = field(default_factory=list)
    concept_paths: list[list[str]] = field(default_factory=list)
    concepts: list[str] = field(default_factory=list)  # the seed concepts the paths link


def _looks_like_path(s: str) -> bool:
    if "\n" in s or len(s) > 1024 or not s.strip():
        return False
    if os.path.exists(s):
        return True
    # an obvious file name that does not exist: treat as a (missing) path, not as text
    return (" " not in s.strip() and s.lower().endswith(SUPPORTED_SUFFIXES + (".json", ".pdf", ".csv")))\
        or s.endswith(("/", os.sep))


def collect_documents(inputs) -> list[Document]:
    """Inputs -> documents: ``Path`` and path-like strings are read, other strings are texts."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    docs: list[Document] = []
    for i, item in enumerate(inputs):
        if isinstance(item, os.PathLike) or (isinstance(item, str) and _looks_like_path(item)):
            p = Path(item)
            if not p.exists():
                raise CorpusError(f"corpus input #{i} {str(p)!r} does not exist; pass an existing "
                                  "file or folder, or the text itself")
            docs.extend(read_path(p))
        elif isinstance(item, str):
            if item.strip():
                docs.append(Document(f"text:{i}", item))
        else:
            raise CorpusError(f"corpus input #{i} has type {type(item).__name__}; expected str "
                              "(text or path) or pathlib.Path")
    return docs


class GraphRetriever:
    """Vector search + knowledge graph over a chunked corpus. Build with :meth:`build`."""

    def __init__(self, chunks: list[Chunk], embeddings: np.ndarray | None, index, graph: KnowledgeGraph,
                 embedder: Embedder, params: dict):
        self._chunks = list(chunks)
        self.embeddings = embeddings
        self.index = index
        self.graph = graph
        self.embedder = embedder
        self.params = dict(params)
        self._pos = {c.chunk_id: i for i, c in enumerate(self._chunks)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, texts_or_paths, embedder: Embedder | None = None, *, chunk_tokens: int = 200,
              overlap: int = 1, overlap_unit: str = "sentences", tokenizer: Tokenizer | None = None,
              exact: bool | None = None, exact_threshold: int = EXACT_THRESHOLD, hnsw_M: int = DEFAULT_M,
              ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef_search: int = DEFAULT_EF_SEARCH,
              sim_threshold: float = 0.6,
              sim_neighbors: int = 5, max_concepts: int = 12, batch_size: int = 64) -> "GraphRetriever":
        """Chunk, embed, index and graph ``texts_or_paths`` (see the module docstring)."""
        if isinstance(texts_or_paths, (str, os.PathLike)):
            texts_or_paths = [texts_or_paths]
        texts_or_paths = list(texts_or_paths)
        docs = collect_documents(texts_or_paths)
        chunks = chunk_documents(docs, max_tokens=chunk_tokens, overlap=overlap,
                                 overlap_unit=overlap_unit, tokenizer=tokenizer)
        if not chunks:
            raise CorpusError(f"empty corpus: the {len(texts_or_paths)} input(s) produced no text chunks (no "
                              f"non-blank text, or folders without {'/'.join(SUPPORTED_SUFFIXES)} "
                              "files); pass texts or files with content")
        ids = [c.chunk_id for c in chunks]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise CorpusError(f"duplicate chunk id {dup!r}: the same source was given twice")
        embedder = embedder if embedder is not None else default_embedder()
        emb = embedder.encode([c.text for c in chunks], batch_size=batch_size)
        index = make_index(embedder.dim, len(chunks), exact=exact, exact_threshold=exact_threshold,
                           M=hnsw_M, ef_construction=ef_construction, ef_search=ef_search)
        index.add(emb, np.arange(len(chunks)))
        graph = KnowledgeGraph.build(chunks, emb, index, max_concepts=max_concepts,
                                     sim_threshold=sim_threshold, sim_neighbors=sim_neighbors)
        params = dict(chunk_tokens=chunk_tokens, overlap=overlap, overlap_unit=overlap_unit,
                      tokenizer=None if tokenizer is None else getattr(tokenizer, "__name__", "custom"),
                      index=index.kind, exact_threshold=exact_threshold, hnsw_M=hnsw_M,
                      ef_construction=ef_construction, ef_search=ef_search,
                      sim_threshold=sim_threshold, sim_neighbors=sim_neighbors,
                      max_concepts=max_concepts)
        return cls(chunks, emb, index, graph, embedder, params)

    # ------------------------------------------------------------------ queries
    @property
    def chunks(self) -> list[Chunk]:
        return list(self._chunks)

    def __len__(self) -> int:
        return len(self._chunks)

    def _hit(self, i: int, score: float, via: str) -> Hit:
        c = self._chunks[i]
        return Hit(text=c.text, score=float(score), source=c.source, chunk_id=c.chunk_id, via=via)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """Top-``k`` chunks by cosine similarity to ``query``."""
        if not isinstance(query, str):
            raise TypeError(f"search() takes a query string, got {type(query).__name__}")
        q = self.embedder.encode([query])
        ids, sims = self.index.query(q, k=k)
        return [self._hit(int(i), s, "search") for i, s in zip(ids[0], sims[0])]

    def random_nodes(self, n: int, seed: int | None = None) -> list[Hit]:
        """``n`` distinct random chunks (all of them if ``n`` >= corpus size), reproducible for ``seed``."""
        rng = random.Random(seed)
        picks = rng.sample(range(len(self._chunks)), min(int(n), len(self._chunks)))
        return [self._hit(i, 0.0, "random") for i in picks]

    def concepts_of(self, text: str, in_graph: bool = False) -> list[str]:
        """Concepts of ``text`` (every content word and phrase, normalised), best first.
        ``in_graph=True`` keeps only concepts that exist in the corpus graph."""
        terms = extract_concepts(text, max_concepts=None, all_words=True)
        return [t for t in terms if self.graph.has_concept(t)] if in_graph else terms

    def neighbors_of_concept(self, term: str, k: int | None = 10) -> list[tuple[str, int]]:
        """Concepts co-occurring with ``term`` as ``(term, count)``, strongest first; [] if unknown."""
        out = self.graph.concept_neighbors(normalize_term(term))
        return out if k is None else out[:k]

    def chunks_of_concept(self, term: str) -> list[Hit]:
        """Chunks mentioning ``term`` (normalised), in corpus order, score 1.0."""
        node = concept_node(normalize_term(term))
        g = self.graph.graph
        if node not in g:
            return []
        idx = sorted(self._pos[g.nodes[nb]["chunk_id"]] for nb in g[node]
                     if g.nodes[nb]["kind"] == "chunk")
        return [self._hit(i, 1.0, "graph") for i in idx]

    def expand(self, hits: Sequence[Hit], hops: int = 1, query: str | None = None,
               max_neighbors: int = 10, max_paths: int = 5, max_concept_fanout: int = 200) -> Expansion:
        """Graph neighbours of ``hits`` within ``hops`` and concept paths between query concepts.

        One hop = chunk -> concept -> chunk (a shared concept) or chunk -> chunk (a similarity
        edge). Concepts mentioned by more than ``max_concept_fanout`` chunks are not followed
        (they link everything). Seed concepts for the paths: the query's concepts found in the
        graph, completed with the first two concepts of each hit when fewer than two.
        """
        g = self.graph.graph
        start = [chunk_node(h.chunk_id) for h in hits]
        for node, h in zip(start, hits):
            if node not in g:
                raise KeyError(f"hit chunk_id {h.chunk_id!r} is not in this retriever's graph")
        seen = set(start)
        frontier = list(dict.fromkeys(start))
        scores: dict[str, float] = {}
        for hop in range(max(0, int(hops))):
            decay = 0.5 ** hop
            # contributions are summed with fsum: exact, so independent of adjacency order
            reached: dict[str, list[float]] = {}
            for node in frontier:
                for nb, d in g[node].items():
                    kind = d["kind"]
                    if kind == "similar":
                        if nb not in seen:
                            reached.setdefault(nb, []).append(decay * d["weight"])
                    elif kind == "mentions":
                        df = g.nodes[nb]["df"]
                        if df > max_concept_fanout:
                            continue
                        w = decay / math.log(2.0 + df)
                        for c in g[nb]:
                            if c not in seen and g.nodes[c]["kind"] == "chunk":
                                reached.setdefault(c, []).append(w)
            for c, parts in reached.items():
                scores[c] = scores.get(c, 0.0) + math.fsum(parts)
            seen.update(reached)
            frontier = sorted(reached)
        ranked = sorted(scores, key=lambda c: (-scores[c], self._pos[g.nodes[c]["chunk_id"]]))
        neighbors = [self._hit(self._pos[g.nodes[c]["chunk_id"]], scores[c], "graph")
                     for c in ranked[:max_neighbors]]

        seeds = self.concepts_of(query, in_graph=True) if query else []
        if len(seeds) < 2:
            for h in hits:
                seeds.extend(self.graph.concepts_of_chunk(h.chunk_id)[:2])
        seeds = list(dict.fromkeys(seeds))
        paths: list[list[str]] = []
        for i in range(len(seeds)):
            for j in range(i + 1, len(seeds)):
                if len(paths) >= max_paths:
                    break
                p = self.graph.concept_path(seeds[i], seeds[j])
                if p and p not in paths:
                    paths.append(p)
        return Expansion(neighbors=neighbors, concept_paths=paths, concepts=seeds)

    def stats(self) -> dict:
        return {"chunks": len(self._chunks), "embedder": self.embedder.name, "dim": self.embedder.dim,
                **self.params, "graph": self.graph.stats()}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the retriever to folder ``path`` atomically (temp folder + rename). Only a new or empty
        folder or an earlier retriever is replaced: any other non-empty folder is refused."""
        path = Path(path)
        if path.is_dir() and any(path.iterdir()) and not (path / "meta.json").is_file():
            raise NotOurFolderError(f"{path} is a non-empty folder that is not a saved retriever (no meta.json); "
                                    f"it is left alone: save the retriever into a new or empty folder")
        with writing("the retriever", path, "an earlier retriever there is intact; free disk space and rerun"):
            return self._save(path)

    def _save(self, path: Path) -> Path:
        meta = {"format_version": FORMAT_VERSION, "embedder": {
                    "name": self.embedder.name, "dim": int(self.embedder.dim),
                    "model_dir": str(getattr(self.embedder, "model_dir", "") or "")},
                "n_chunks": len(self._chunks), "params": self.params,
                "stats": self.graph.stats()}
        with atomic_dir(path) as d:
            tmp = Path(d)
            with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
                for c in self._chunks:
                    f.write(json.dumps(asdict(c), ensure_ascii=False) + "\n")
            self.graph.to_json(tmp / "graph.json")
            self.index.save(tmp / "index")
            if self.embeddings is not None:
                np.save(tmp / "embeddings.npy", self.embeddings)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, embedder: Embedder | None = None) -> "GraphRetriever":
        """Load a folder written by :meth:`save`; ``embedder=None`` re-creates the stored one."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not a saved GraphRetriever (no meta.json); "
                                    "create one with GraphRetriever.build(...).save(dir)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, this code "
                             f"reads {FORMAT_VERSION}; rebuild the retriever")
        want = meta["embedder"]
        if embedder is None:
            embedder = embedder_from_name(want["name"], int(want["dim"]), want.get("model_dir") or None)
        elif embedder.name != want["name"] or int(embedder.dim) != int(want["dim"]):
            raise EmbedderMismatchError(
                f"retriever at {path} was built with embedder {want['name']!r} (dim {want['dim']}), "
                f"but {embedder.name!r} (dim {embedder.dim}) was given; pass embedder=None to "
                "re-create the original one, or rebuild the retriever with the new embedder")
        chunks = [Chunk(**row) for _, row in read_jsonl(path / "chunks.jsonl", what="retriever chunks")]
        graph = KnowledgeGraph.from_json(path / "graph.json", {c.chunk_id: c.text for c in chunks})
        index = load_index(path / "index")
        emb_path = path / "embeddings.npy"
        emb = np.load(emb_path) if emb_path.is_file() else None
        return cls(chunks, emb, index, graph, embedder, meta.get("params", {}))


def _main(argv: Iterable[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build a GraphRetriever over a corpus and query it.")
    ap.add_argument("corpus", nargs="+", help=".txt/.md/.jsonl files or folders")
    ap.add_argument("--query", default=None, help="a query to search for")
    ap.add_argument("-k", type=int, default=5, help="number of hits")
    ap.add_argument("--chunk-tokens", type=int, default=200, help="max whitespace tokens per chunk")
    ap.add_argument("--hashing", action="store_true", help="use the hashing embedder (no weights)")
    ap.add_argument("--save", default=None, help="folder to save the retriever to")
    ap.add_argument("--graphml", default=None, help="write the knowledge graph as GraphML here")
    a = ap.parse_args(argv)
    r = GraphRetriever.build([Path(p) for p in a.corpus], HashingEmbedder() if a.hashing else None,
                             chunk_tokens=a.chunk_tokens)
    print(json.dumps(r.stats(), indent=2, default=str))
    if a.query:
        hits = r.search(a.query, k=a.k)
        for h in hits:
            print(f"{h.score:.3f}  {h.chunk_id}  {h.text[:120]!r}")
        ex = r.expand(hits, query=a.query)
        print("concept paths:", ex.concept_paths)
    if a.save:
        print("saved to", r.save(a.save))
    if a.graphml:
        r.graph.to_graphml(a.graphml)


if __name__ == "__main__":
    _main()
