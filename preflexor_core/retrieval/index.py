"""Cosine-similarity vector indexes: exact (numpy) and approximate (hnswlib HNSW).

What:
- ``ExactIndex``: brute force ``queries @ vectors.T`` + ``argpartition``. Exact; the reference
  for recall tests; the default for small corpora.
- ``HnswIndex``: hnswlib's HNSW graph in the ``cosine`` space. ``M`` (graph degree),
  ``ef_construction`` (build beam) and ``ef_search`` (query beam) trade speed for recall.
- ``make_index(dim, n)``: exact when ``n < EXACT_THRESHOLD`` (5000 vectors; brute force over a few
  thousand 384-d vectors takes well under a millisecond per query and is exact), HNSW above.

Both take integer ids on ``add``, return ``(ids int64 [q, k], cosine similarities float32 [q, k])``
from ``query`` (best first; k is clamped to the number of vectors), and ``save(path)`` /
``load(path)`` to a file prefix. Inputs are L2-normalised on the way in, so any non-zero vectors
work; a zero vector has similarity 0 with everything.

The defaults (M=32, ef_construction=200, ef_search=64) were picked on 100k embedding-like 384-d
vectors (a 24-d latent projected to 384-d plus isotropic noise; tests/benchmarks/
test_bench_retrieval.py) for high recall at well above brute force's throughput; the measured recall
and speed are in docs/benchmarks.md. On i.i.d. Gaussian vectors, which have no low-dimensional
structure, every ANN method degrades, and exact search is the right tool.

Insertion uses ``num_threads=1`` by default so that rebuilding an index from the same vectors
gives the same graph; pass more threads for speed on large builds.

References: Malkov & Yashunin 2018, "Efficient and robust approximate nearest neighbor search
using Hierarchical Navigable Small World graphs" (arXiv 1603.09320); hnswlib.

Run: ``python -m preflexor_core.retrieval.index`` measures recall@10 of HNSW against exact search
on 20k random 384-d vectors.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

EXACT_THRESHOLD = 5000
DEFAULT_M = 32
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_EF_SEARCH = 64
EXACT_BLOCK_ELEMENTS = 1 << 26  # max query x corpus similarities held at once by ExactIndex


def _as_matrix(x, dim: int, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what}: expected shape [n, {dim}], got {list(x.shape)}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def _as_ids(ids, n: int, start: int) -> np.ndarray:
    if ids is None:
        return np.arange(start, start + n, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.shape[0] != n:
        raise ValueError(f"add: got {ids.shape[0]} ids for {n} vectors")
    if (ids < 0).any():
        raise ValueError("add: ids must be non-negative integers")
    return ids


class ExactIndex:
    """Exact cosine search over an in-memory float32 matrix."""

    kind = "exact"

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.vectors = np.zeros((0, self.dim), dtype=np.float32)
        self.ids = np.zeros((0,), dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def add(self, vectors, ids=None) -> None:
        v = _as_matrix(vectors, self.dim, "ExactIndex.add")
        ids = _as_ids(ids, v.shape[0], len(self))
        self.vectors = np.concatenate([self.vectors, v]) if len(self) else v
        self.ids = np.concatenate([self.ids, ids])

    def query(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        q = _as_matrix(queries, self.dim, "ExactIndex.query")
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((q.shape[0], 0), np.int64), np.zeros((q.shape[0], 0), np.float32)
        # queries in blocks so that the (block, N) similarity matrix stays around 256 MB
        block = max(1, min(q.shape[0], EXACT_BLOCK_ELEMENTS // max(1, len(self))))
        ids, sims = zip(*(self._query_block(q[i:i + block], k) for i in range(0, q.shape[0], block)))
        return np.concatenate(ids), np.concatenate(sims)

    def _query_block(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = q @ self.vectors.T  # (Q, N)
        if k < sims.shape[1]:
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(sims.shape[1]), (q.shape[0], sims.shape[1]))
        top = np.take_along_axis(sims, part, axis=1)
        # best first; ties broken by position so results are deterministic
        order = np.lexsort((part, -top), axis=1)
        part = np.take_along_axis(part, order, axis=1)
        return self.ids[part], np.take_along_axis(top, order, axis=1).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        np.save(path.with_suffix(".vectors.npy"), self.vectors)
        np.save(path.with_suffix(".ids.npy"), self.ids)
        path.with_suffix(".json").write_text(json.dumps({"kind": self.kind, "dim": self.dim}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExactIndex":
        path = Path(path)
        idx = cls(json.loads(path.with_suffix(".json").read_text())["dim"])
        idx.vectors = np.load(path.with_suffix(".vectors.npy"))
        idx.ids = np.load(path.with_suffix(".ids.npy"))
        return idx


class HnswIndex:
    """Approximate cosine search with hnswlib (grows its capacity as vectors are added)."""

    kind = "hnsw"

    def __init__(self, dim: int, M: int = DEFAULT_M, ef_construction: int = DEFAULT_EF_CONSTRUCTION,
                 ef_search: int = DEFAULT_EF_SEARCH, capacity: int = 1024, num_threads: int = 1,
                 seed: int = 100):
        import hnswlib  # hnswlib: optional, only the HNSW index needs it

        self.dim, self.M, self.ef_construction = int(dim), int(M), int(ef_construction)
        self.ef_search, self.num_threads, self.seed = int(ef_search), int(num_threads), int(seed)
        self._index = hnswlib.Index(space="cosine", dim=self.dim)
        self._index.init_index(max_elements=max(1, int(capacity)), ef_construction=self.ef_construction,
                               M=self.M, random_seed=self.seed)
        self._index.set_ef(self.ef_search)
        self._ef = self.ef_search

    def __len__(self) -> int:
        return int(self._index.get_current_count())

    def _params(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "M": self.M, "ef_construction": self.ef_construction,
                "ef_search": self.ef_search, "num_threads": self.num_threads, "seed": self.seed}

    def add(self, vectors, ids=None) -> None:
        v = _as_matrix(vectors, self.dim, "HnswIndex.add")
        ids = _as_ids(ids, v.shape[0], len(self))
        need = len(self) + v.shape[0]
        if need > self._index.get_max_elements():
            self._index.resize_index(max(need, 2 * self._index.get_max_elements()))
        self._index.add_items(v, ids, num_threads=self.num_threads)

    def query(self, queries, k: int = 10, num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        # hnswlib's cosine space normalises queries itself: only check the shape here
        q = np.asarray(queries, dtype=np.float32)
        q = q[None, :] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"HnswIndex.query: expected shape [n, {self.dim}], got {list(q.shape)}")
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((q.shape[0], 0), np.int64), np.zeros((q.shape[0], 0), np.float32)
        ef = max(self.ef_search, k)
        if ef != self._ef:
            self._index.set_ef(ef)
            self._ef = ef
        labels, dist = self._index.knn_query(q, k=k, num_threads=num_threads)
        return labels.astype(np.int64), (1.0 - dist).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self._index.save_index(str(path.with_suffix(".hnsw")))
        path.with_suffix(".json").write_text(json.dumps(self._params()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HnswIndex":
        import hnswlib  # hnswlib: optional, only the HNSW index needs it

        path = Path(path)
        p = json.loads(path.with_suffix(".json").read_text())
        idx = cls.__new__(cls)
        for key in ("dim", "M", "ef_construction", "ef_search", "num_threads", "seed"):
            setattr(idx, key, int(p[key]))
        idx._index = hnswlib.Index(space="cosine", dim=idx.dim)
        idx._index.load_index(str(path.with_suffix(".hnsw")))
        idx._index.set_ef(idx.ef_search)
        idx._ef = idx.ef_search
        return idx


VectorIndex = ExactIndex | HnswIndex


def make_index(dim: int, n_expected: int, exact: bool | None = None,
               exact_threshold: int = EXACT_THRESHOLD, **hnsw_params) -> VectorIndex:
    """Exact index for small corpora (``n_expected < exact_threshold``) unless ``exact`` says otherwise."""
    if exact is None:
        exact = n_expected < exact_threshold
    if exact:
        return ExactIndex(dim)
    return HnswIndex(dim, capacity=max(n_expected, 1), **hnsw_params)


def load_index(path: str | os.PathLike) -> VectorIndex:
    """Load an index saved by ``ExactIndex.save`` or ``HnswIndex.save`` (same path prefix)."""
    meta = Path(path).with_suffix(".json")
    if not meta.is_file():
        raise FileNotFoundError(f"no index metadata at {meta}; was the index saved to this prefix?")
    kind = json.loads(meta.read_text()).get("kind")
    if kind == "exact":
        return ExactIndex.load(path)
    if kind == "hnsw":
        return HnswIndex.load(path)
    raise ValueError(f"{meta}: unknown index kind {kind!r} (expected 'exact' or 'hnsw')")


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k ids present in the found top-k ids."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def _main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 384)).astype(np.float32)
    q = rng.standard_normal((200, 384)).astype(np.float32)
    exact = ExactIndex(384)
    exact.add(x)
    t0 = time.perf_counter()
    h = HnswIndex(384, capacity=len(x), num_threads=os.cpu_count() or 1)
    h.add(x)
    print(f"hnsw build {time.perf_counter() - t0:.1f}s")
    truth, _ = exact.query(q, 10)
    found, _ = h.query(q, 10)
    print(f"recall@10 = {recall_at_k(found, truth):.4f}")


if __name__ == "__main__":
    _main()
