"""The similar-users index (vector_index.py) against the exact scan, on seeded vectors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from userlens.errors import ServingError
from userlens.vector_index import LoadedIndex, build, recall_at, remove_unlisted, unit_rows


def exact_neighbours(vectors: np.ndarray, row: int, k: int) -> list[int]:
    unit = unit_rows(vectors)
    scores = unit @ unit[row]
    scores[row] = -np.inf
    return np.argsort(-scores, kind="stable")[:k].tolist()


def seeded(n: int, dim: int = 16, seed: int = 0) -> tuple[pa.Array, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    vectors = (centres[rng.integers(0, 20, n)] + rng.standard_normal((n, dim))).astype(np.float32)
    return pa.array([f"u{i}" for i in range(n)]), vectors


def load(folder, manifest) -> LoadedIndex:
    return LoadedIndex.load(folder, {**manifest, "model_version": "v1"})


def test_a_small_version_gets_an_exact_index(tmp_path):
    ids, vectors = seeded(500)
    manifest = build(tmp_path, "set-blue", ids, vectors, recall=0.95, exact_below=1000)
    assert manifest["kind"] == "flat" and manifest["recall_at_10"] == 1.0 and manifest["users"] == 500
    index = load(tmp_path, manifest)
    for row in (0, 17, 499):
        got = index.search(vectors[row], 10, exclude=f"u{row}")
        assert [user for user, _ in got] == [f"u{i}" for i in exact_neighbours(vectors, row, 10)]
        unit = unit_rows(vectors)
        np.testing.assert_allclose([s for _, s in got], unit[exact_neighbours(vectors, row, 10)] @ unit[row], rtol=1e-5)


@pytest.mark.parametrize("target", [0.9, 0.99])
def test_the_ivf_index_reaches_the_recall_it_was_tuned_to(tmp_path, target):
    """Measured independently of the build's own sample: 200 other users against the exact scan."""
    ids, vectors = seeded(6000)
    manifest = build(tmp_path, "set-blue", ids, vectors, recall=target, exact_below=0)
    assert manifest["kind"] == "ivf" and manifest["lists"] == 77 and manifest["recall_at_10"] >= target
    index = load(tmp_path, manifest)
    rows = np.random.default_rng(1).choice(6000, 200, replace=False)
    hits = 0
    for row in rows:
        got = {user for user, _ in index.search(vectors[row], 10, exclude=f"u{row}")}
        hits += len(got & {f"u{i}" for i in exact_neighbours(vectors, row, 10)})
    assert hits / (10 * len(rows)) >= target - 0.03  # the build measured 256 users; these are others


def test_fewer_probes_for_a_lower_target(tmp_path):
    ids, vectors = seeded(6000)
    low = build(tmp_path, "a", ids, vectors, recall=0.5, exact_below=0)
    high = build(tmp_path, "b", ids, vectors, recall=0.999, exact_below=0)
    assert low["probes"] < high["probes"]


def test_recall_counts_ties_as_found():
    exact = np.array([[1.0, 0.9, 0.8, 0.8]])  # self, then three neighbours (k = 3)
    assert recall_at(np.array([[1.0, 0.9, 0.8, 0.8]]), exact) == 1.0
    assert recall_at(np.array([[1.0, 0.9, 0.8, 0.7]]), exact) == pytest.approx(2 / 3)
    assert recall_at(np.array([[0.9, 0.8, 0.8, 0.1]]), exact) == pytest.approx(2 / 3)  # self missed: conservative


def test_unreadable_index_is_a_clear_error_and_unlisted_files_go(tmp_path):
    ids, vectors = seeded(100)
    kept = build(tmp_path, "set-blue", ids, vectors, recall=0.9, exact_below=1000)
    gone = build(tmp_path, "set-green", ids, vectors, recall=0.9, exact_below=1000)
    other = build(tmp_path, "other-blue", ids, vectors, recall=0.9, exact_below=1000)
    remove_unlisted(tmp_path, {kept["file"]}, prefix="set")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [kept["file"], kept["file"].replace(".faiss", ".users.parquet"),
         other["file"], other["file"].replace(".faiss", ".users.parquet")]
    )  # fmt: skip
    with pytest.raises(ServingError, match="cannot be read"):
        load(tmp_path, gone)


@pytest.mark.parametrize("target", [0.8, 0.95])
def test_the_build_takes_the_fewest_probes_that_reach_the_target(target):
    """One probe fewer than the build chose falls short on the same sampled users."""
    import faiss

    from userlens.vector_index import RECALL_QUERIES, _tune

    _, vectors = seeded(6000)
    unit = unit_rows(vectors)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 77, faiss.METRIC_INNER_PRODUCT)
    index.train(unit)
    index.add(unit)
    probes, measured = _tune(index, unit, 77, target, np.random.default_rng(3))
    assert 1 < probes < 77 and measured >= target
    queries = unit[np.sort(np.random.default_rng(3).choice(6000, size=RECALL_QUERIES, replace=False))]
    exact, _ = faiss.knn(queries, unit, 11, metric=faiss.METRIC_INNER_PRODUCT)
    index.nprobe = probes - 1
    assert recall_at(index.search(queries, 11)[0], exact) < target


def test_the_builds_exact_search_by_blas_finds_the_same_neighbours_and_restores_faiss():
    """The build's exact top-k runs by matrix products (faiss's setting, process-wide, changed
    only inside the block): same neighbours as faiss's default path, the setting back after,
    also when the block raises."""
    import faiss

    from userlens.vector_index import _blas_distances

    _, vectors = seeded(3000)
    unit = unit_rows(vectors)
    queries = unit[:64]
    before = faiss.cvar.distance_compute_blas_threshold
    default_scores, default_rows = faiss.knn(queries, unit, 11, metric=faiss.METRIC_INNER_PRODUCT)
    with _blas_distances(faiss):
        assert faiss.cvar.distance_compute_blas_threshold <= len(queries)
        scores, rows = faiss.knn(queries, unit, 11, metric=faiss.METRIC_INNER_PRODUCT)
    assert faiss.cvar.distance_compute_blas_threshold == before
    np.testing.assert_allclose(scores, default_scores, atol=1e-5)
    assert (rows[:, 0] == np.arange(64)).all() and recall_at(scores, default_scores) == 1.0
    with pytest.raises(RuntimeError), _blas_distances(faiss):
        raise RuntimeError("interrupted")
    assert faiss.cvar.distance_compute_blas_threshold == before
