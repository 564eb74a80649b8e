"""Nearest-neighbour search of unit-length embeddings: one interface, several backends.

    >>> backend = make_backend("numpy", gallery_embeddings)          # float32 [N, D], unit rows
    >>> distances, rows = backend.search(queries, k=5)                 # [Q, 5] each, best first

=============  =======  =========================================================  ==========
name           exact    how                                                        needs
=============  =======  =========================================================  ==========
``numpy``      yes      float32 matrix product, queries in chunks (bounded memory) NumPy
``tensorflow`` yes      ``tf.linalg.matmul`` + ``tf.math.top_k``                   TensorFlow
``faiss-flat`` yes      ``faiss.IndexFlatIP``                                      faiss-cpu
``faiss-ivf``  no       ``faiss.IndexIVFFlat`` (inner product, ``nlist`` k-means   faiss-cpu
                        lists, ``nprobe`` of them searched)
``faiss-hnsw`` no       ``faiss.IndexHNSWFlat`` (inner product, ``M`` links,       faiss-cpu
                        ``ef_search``)
=============  =======  =========================================================  ==========

For unit vectors ``squared-L2 = 2 - 2 cos`` and ``cosine = 1 - cos`` (`distance_from_similarity`),
so every backend ranks by inner product. Each backend proposes `CANDIDATE_MARGIN` more rows than
asked; the proposals are re-scored in float64 by one function (`rescore`) and sorted by (distance,
row). Hence the exact backends return identical rows and bit-identical distances, and an
approximate backend's distances are exact for the rows it finds (its recall is what it misses:
`recall_at_k`).

`identity_search` turns row neighbours into the top-k *identities* (each identity's best row),
which is what `mbembed search` reports when a gallery keeps several images per identity.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import numpy as np

from mobilenet_embed.config import EVAL_DISTANCES
from mobilenet_embed.errors import UserError

#: distances `mbembed eval` uses (``eval.distance``) that search supports
DISTANCES = EVAL_DISTANCES
#: rows proposed beyond k before the exact re-scoring (absorbs float32 rounding between backends)
CANDIDATE_MARGIN = 8
#: working memory of one chunk of the numpy / tensorflow score matrix
CHUNK_BYTES = 256 * 2**20


def distance_from_similarity(similarity: np.ndarray, distance: str = "squared-L2") -> np.ndarray:
    """Distance of unit vectors from their inner product: squared-L2 ``2 - 2s``, cosine ``1 - s``."""
    if distance == "squared-L2":
        return 2.0 - 2.0 * similarity
    if distance == "cosine":
        return 1.0 - similarity
    raise UserError(f"distance: expected one of {', '.join(DISTANCES)}, received {distance!r}")


def _as_matrix(x: np.ndarray, what: str, dim: Optional[int] = None) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"[N, {dim}]" if dim is not None else "[N, D]"
        raise UserError(f"{what}: expected a float matrix {want}, received shape {list(x.shape)}")
    return x


def rescore(gallery: np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int,
            distance: str = "squared-L2") -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of the candidate `rows` [Q, C] (-1: none) of each query, by exact float64
    distance, ties broken by the lower row: (distances [Q, k] float64, rows [Q, k] int64),
    padded with (inf, -1) where fewer than `k` candidates exist."""
    rows = np.asarray(rows, dtype=np.int64)
    q, c = rows.shape
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    sims = np.einsum("qd,qcd->qc", queries.astype(np.float64), gallery[safe].astype(np.float64))
    dist = np.where(valid, distance_from_similarity(sims, distance), np.inf)
    # duplicates (a backend never returns them, but a padded row might repeat): keep the first
    order = np.lexsort((np.where(valid, rows, np.iinfo(np.int64).max), dist), axis=-1)
    dist = np.take_along_axis(dist, order, -1)[:, :k]
    rows = np.take_along_axis(np.where(valid, rows, -1), order, -1)[:, :k]
    if rows.shape[1] < k:
        pad = k - rows.shape[1]
        dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return dist, rows


class SearchBackend:
    """Top-k rows of a gallery [N, D] for queries [Q, D]; subclasses only propose candidates."""

    name = "?"
    exact = True

    def __init__(self, gallery: np.ndarray, distance: str = "squared-L2"):
        if distance not in DISTANCES:
            raise UserError(f"distance: expected one of {', '.join(DISTANCES)}, received {distance!r}")
        self.gallery = _as_matrix(gallery, "gallery")
        self.distance = distance
        self.size, self.dim = self.gallery.shape

    def candidates(self, queries: np.ndarray, c: int) -> np.ndarray:  # pragma: no cover - abstract
        """Candidate rows [Q, c] (-1: none) for each query."""
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances [Q, k] float64, rows [Q, k] int64), best first; (inf, -1) beyond the gallery."""
        queries = _as_matrix(queries, "queries", self.dim)
        if k < 1:
            raise UserError(f"--top-k: expected an integer >= 1, received {k}")
        if self.size == 0 or len(queries) == 0:
            return (np.full((len(queries), k), np.inf), np.full((len(queries), k), -1, np.int64))
        c = min(self.size, k + CANDIDATE_MARGIN)
        return rescore(self.gallery, queries, self.candidates(queries, c), k, self.distance)

    @property
    def nbytes(self) -> int:
        """Bytes the backend holds besides the caller's gallery array (an estimate for faiss)."""
        return 0


def _top_c(scores: np.ndarray, c: int) -> np.ndarray:
    """Columns of the `c` largest scores of each row (any order)."""
    if c >= scores.shape[1]:
        return np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    return np.argpartition(-scores, c - 1, axis=1)[:, :c]


def _query_chunk(n_gallery: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(n_gallery, 1)))


class NumpyBackend(SearchBackend):
    """Exact: float32 ``queries @ gallery.T`` in chunks of queries, `np.argpartition`."""

    name = "numpy"

    def candidates(self, queries: np.ndarray, c: int) -> np.ndarray:
        step = _query_chunk(self.size)
        return np.concatenate([_top_c(queries[i:i + step] @ self.gallery.T, c)
                               for i in range(0, len(queries), step)])


class TensorFlowBackend(SearchBackend):
    """Exact: ``tf.linalg.matmul`` and ``tf.math.top_k`` (on a GPU when TensorFlow sees one)."""

    name = "tensorflow"

    def __init__(self, gallery: np.ndarray, distance: str = "squared-L2"):
        import tensorflow as tf

        super().__init__(gallery, distance)
        self._tf = tf
        self._gallery = tf.constant(self.gallery)

    def candidates(self, queries: np.ndarray, c: int) -> np.ndarray:
        tf = self._tf
        step = _query_chunk(self.size)
        out = []
        for i in range(0, len(queries), step):
            scores = tf.linalg.matmul(tf.constant(queries[i:i + step]), self._gallery, transpose_b=True)
            out.append(tf.math.top_k(scores, k=c, sorted=False).indices.numpy())
        return np.concatenate(out).astype(np.int64)

    @property
    def nbytes(self) -> int:
        return int(self.gallery.nbytes)  # TensorFlow's own copy


def import_faiss():
    """The faiss module, or a UserError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise UserError("--backend faiss-*: faiss is not installed (pip install 'mobilenet-embed[search]' "
                        "or pip install faiss-cpu)") from None
    return faiss


class _FaissBackend(SearchBackend):
    """Shared by the faiss backends: `self.index` holds the gallery."""

    index = None

    def candidates(self, queries: np.ndarray, c: int) -> np.ndarray:
        _, rows = self.index.search(queries, c)
        return rows.astype(np.int64)

    @property
    def nbytes(self) -> int:
        return int(self.size * self.dim * 4)


class FaissFlatBackend(_FaissBackend):
    """Exact: ``faiss.IndexFlatIP`` (brute force, BLAS)."""

    name = "faiss-flat"

    def __init__(self, gallery: np.ndarray, distance: str = "squared-L2"):
        super().__init__(gallery, distance)
        faiss = import_faiss()
        self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(self.gallery)


class FaissIVFBackend(_FaissBackend):
    """Approximate: ``faiss.IndexIVFFlat`` on inner product.

    `nlist` k-means lists (default ``round(sqrt(N))``, at least 1), trained on at most
    `train_points_per_list` x `nlist` rows (seeded) for `niter` iterations; a query scans the
    `nprobe` nearest lists (default ``max(1, nlist // 8)``). More `nprobe`: higher recall, slower.
    """

    name = "faiss-ivf"
    exact = False

    def __init__(self, gallery: np.ndarray, distance: str = "squared-L2", nlist: Optional[int] = None,
                 nprobe: Optional[int] = None, niter: int = 10, train_points_per_list: int = 64,
                 seed: int = 0):
        super().__init__(gallery, distance)
        faiss = import_faiss()
        self.nlist = int(nlist or max(1, round(np.sqrt(self.size))))
        self.nlist = min(self.nlist, max(1, self.size))
        self.nprobe = int(nprobe or max(1, self.nlist // 8))
        quantizer = faiss.IndexFlatIP(self.dim)
        self.index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.niter = niter
        self.index.cp.seed = seed
        self.index.cp.max_points_per_centroid = train_points_per_list
        n_train = min(self.size, train_points_per_list * self.nlist)
        sample = np.random.default_rng(seed).choice(self.size, n_train, replace=False) \
            if n_train < self.size else np.arange(self.size)
        self.index.train(self.gallery[np.sort(sample)])
        self.index.add(self.gallery)
        self.index.nprobe = self.nprobe
        self._quantizer = quantizer  # faiss does not own it from Python

    @property
    def nbytes(self) -> int:
        return int(self.size * (self.dim * 4 + 8) + self.nlist * self.dim * 4)


class FaissHNSWBackend(_FaissBackend):
    """Approximate: ``faiss.IndexHNSWFlat`` on inner product, `m` links per node,
    ``efConstruction`` `ef_construction`, ``efSearch`` `ef_search` (more: higher recall, slower)."""

    name = "faiss-hnsw"
    exact = False

    def __init__(self, gallery: np.ndarray, distance: str = "squared-L2", m: int = 32,
                 ef_construction: int = 64, ef_search: int = 64):
        super().__init__(gallery, distance)
        faiss = import_faiss()
        self.m, self.ef_search = m, ef_search
        self.index = faiss.IndexHNSWFlat(self.dim, m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.add(self.gallery)
        self.index.hnsw.efSearch = ef_search

    def candidates(self, queries: np.ndarray, c: int) -> np.ndarray:
        self.index.hnsw.efSearch = max(self.ef_search, c)
        return super().candidates(queries, c)

    @property
    def nbytes(self) -> int:
        return int(self.size * (self.dim * 4 + self.m * 2 * 4 * 1.1))


#: backend name -> class (a registry, not an if/elif chain)
BACKENDS: dict[str, Callable[..., SearchBackend]] = {
    "numpy": NumpyBackend,
    "tensorflow": TensorFlowBackend,
    "faiss-flat": FaissFlatBackend,
    "faiss-ivf": FaissIVFBackend,
    "faiss-hnsw": FaissHNSWBackend,
}


def make_backend(name: str, gallery: np.ndarray, distance: str = "squared-L2", **options) -> SearchBackend:
    """The search backend `name` (see `BACKENDS`) over `gallery`; `options` go to its constructor."""
    if name not in BACKENDS:
        raise UserError(f"--backend: expected one of {', '.join(BACKENDS)}, received {name!r}")
    return BACKENDS[name](gallery, distance, **options)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 1) -> float:
    """Fraction of the true top-`k` rows (`truth` [Q, >=k]) among the `found` top-`k` rows."""
    found, truth = np.asarray(found)[:, :k], np.asarray(truth)[:, :k]
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / float(truth.size) if truth.size else 1.0


def identity_search(backend: SearchBackend, labels: np.ndarray, queries: np.ndarray, k: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-`k` identities of each query: (distances [Q, k], identity labels [Q, k], rows [Q, k]),
    each identity scored by its best row; padded with (inf, -1, -1) past the last identity.

    `labels[row]` is the identity of each gallery row. With at most m rows per identity, the
    best rows of the top-k identities lie within the top ``k * m`` rows, so one search of that
    many rows is exact for the exact backends.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != backend.size:
        raise ValueError(f"{len(labels)} labels for a gallery of {backend.size} rows")
    per_identity = int(np.bincount(labels).max()) if len(labels) else 1
    dist, rows = backend.search(queries, min(max(backend.size, 1), k * per_identity))
    q = len(dist)
    out_d = np.full((q, k), np.inf)
    out_l = np.full((q, k), -1, np.int64)
    out_r = np.full((q, k), -1, np.int64)
    for i in range(q):
        seen: set[int] = set()
        j = 0
        for d, r in zip(dist[i], rows[i]):
            if r < 0 or j == k:
                break
            label = int(labels[r])
            if label in seen:
                continue
            seen.add(label)
            out_d[i, j], out_l[i, j], out_r[i, j] = d, label, r
            j += 1
    return out_d, out_l, out_r


def identity_distance_matrix(gallery: np.ndarray, labels: np.ndarray, queries: np.ndarray,
                             n_identities: Optional[int] = None, distance: str = "squared-L2") -> np.ndarray:
    """Exact distance [Q, G] of every query to every identity (its best row), float64.

    What the identification metrics take; `identity_search` with an exact backend returns the
    same values, sorted.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = int(n_identities if n_identities is not None else (labels.max() + 1 if len(labels) else 0))
    sims = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
    best = np.full((len(sims), n), -np.inf)
    for label in range(n):
        cols = labels == label
        if np.any(cols):
            best[:, label] = sims[:, cols].max(axis=1)
    return np.where(np.isfinite(best), distance_from_similarity(best, distance), np.inf)
