"""Search backends: the exact ones agree to the bit, the approximate ones' recall, identity search."""

import numpy as np
import pytest

from mobilenet_embed.errors import UserError
from mobilenet_embed.search import (BACKENDS, identity_distance_matrix, identity_search, make_backend,
                                    recall_at_k)


def unit(n, d=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(gallery, queries, k):
    d = 2.0 - 2.0 * (queries.astype(np.float64) @ gallery.astype(np.float64).T)
    rows = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, rows, 1), rows


EXACT = ["numpy", "tensorflow", "faiss-flat"]


@pytest.mark.parametrize("name", EXACT)
def test_exact_backends_match_brute_force_to_the_bit(name):
    if name.startswith("faiss"):
        pytest.importorskip("faiss")
    gallery, queries = unit(500), unit(20, seed=1)
    dist, rows = make_backend(name, gallery).search(queries, 7)
    ref_d, ref_rows = brute_force(gallery, queries, 7)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(dist, make_backend("numpy", gallery).search(queries, 7)[0])
    np.testing.assert_allclose(dist, ref_d, atol=1e-12)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_cosine_distance_is_half_the_squared_l2_and_ranks_the_same():
    gallery, queries = unit(100), unit(5, seed=2)
    sq, rows_sq = make_backend("numpy", gallery, "squared-L2").search(queries, 4)
    cos, rows_cos = make_backend("numpy", gallery, "cosine").search(queries, 4)
    np.testing.assert_array_equal(rows_sq, rows_cos)
    np.testing.assert_allclose(cos, sq / 2, atol=1e-12)


def test_k_beyond_the_gallery_pads_with_minus_one():
    dist, rows = make_backend("numpy", unit(3)).search(unit(2, seed=3), 5)
    assert rows.shape == (2, 5) and np.all(rows[:, 3:] == -1) and np.all(np.isinf(dist[:, 3:]))
    assert sorted(rows[0, :3].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("name,options", [("faiss-ivf", {"nlist": 8, "nprobe": 8}),
                                          ("faiss-hnsw", {"m": 16, "ef_search": 128})])
def test_approximate_backends_recall_and_exact_distances(name, options):
    pytest.importorskip("faiss")
    gallery, queries = unit(2000, 32), unit(50, 32, seed=4)
    truth_d, truth = brute_force(gallery, queries, 5)
    backend = make_backend(name, gallery, **options)
    assert not backend.exact
    dist, rows = backend.search(queries, 5)
    # IVF probing every list is exhaustive; HNSW with a wide beam on 2000 points finds nearly all
    assert recall_at_k(rows, truth, 1) >= 0.95
    found = rows[:, 0] == truth[:, 0]
    np.testing.assert_allclose(dist[found, 0], truth_d[found, 0], atol=1e-12)


def test_ivf_with_one_probe_misses_some_and_recall_says_so():
    pytest.importorskip("faiss")
    gallery, queries = unit(4000, 32), unit(200, 32, seed=5)
    truth = brute_force(gallery, queries, 1)[1]
    rows = make_backend("faiss-ivf", gallery, nlist=64, nprobe=1).search(queries, 1)[1]
    recall = recall_at_k(rows, truth, 1)
    assert 0.0 < recall < 1.0


def test_unknown_backend_and_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match="--backend"):
        make_backend("annoy", unit(4))
    with pytest.raises(UserError, match="queries"):
        make_backend("numpy", unit(4)).search(unit(2, d=8), 1)
    assert set(BACKENDS) >= {"numpy", "tensorflow", "faiss-flat", "faiss-ivf", "faiss-hnsw"}


def test_identity_search_returns_each_identity_once_with_its_best_row():
    gallery = unit(60, seed=6)
    labels = np.random.default_rng(7).integers(0, 9, 60)
    queries = unit(10, seed=8)
    dist, found, rows = identity_search(make_backend("numpy", gallery), labels, queries, 4)
    matrix = identity_distance_matrix(gallery, labels, queries, distance="squared-L2")
    for i in range(10):
        assert len(set(found[i].tolist())) == 4
        expected = np.argsort(matrix[i], kind="stable")[:4]
        np.testing.assert_array_equal(found[i], expected)
        np.testing.assert_allclose(dist[i], matrix[i, expected], atol=1e-12)
        assert all(labels[r] == label for r, label in zip(rows[i], found[i]))
