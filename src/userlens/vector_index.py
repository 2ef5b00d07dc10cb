"""The similar-users index: a faiss index over one served version's vectors, built at publish.

Cosine similarity is the inner product of unit vectors, so the index holds the normalised
vectors. Below `exact_below` users it is a flat (exact) index; above, an inverted-file index
(IVF-Flat: k-means lists, each query scans the `probes` nearest lists). IVF rather than HNSW
because it builds 1M x 64 vectors in seconds on 2 cores where HNSW takes minutes, and `probes`
is a dial: each build sets it to the fewest lists whose recall@10 against the exact scan, on a
seeded sample of the version's own users, reaches the target, and records what it measured.

An index is two immutable files named by a fresh build id (`<set>-<slot>-<id>.faiss` and
`.users.parquet`: row i of the index is user i), so a reader never sees one half-replaced; the
serving pointer names the live one (feature_store.publish_set), which is how it switches with
the slot and why a failed publish leaves the old one serving.
"""

from __future__ import annotations

import math
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from userlens.errors import ServingError
from userlens.io import atomic_file

RECALL_AT = 10  # what the build measures: recall@10 of similar users (the user itself excluded)
RECALL_QUERIES = 256  # users of the version whose neighbours the build checks against the exact scan
TIE_TOLERANCE = 1e-5  # a neighbour scoring as high as the exact 10th counts as found (ties)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def build(
    folder: Path, stem: str, user_ids: pa.Array, vectors: np.ndarray, recall: float, exact_below: int, seed: int = 0
) -> dict:
    """Write the index of these users' vectors into `folder`; return its manifest (for the pointer).

    The manifest: file, users, kind (flat | ivf), lists, probes, recall_at_10 (measured), build_s."""
    import faiss

    started = time.perf_counter()
    unit = unit_rows(vectors)
    n, dim = unit.shape
    rng = np.random.default_rng(seed)
    if n < exact_below:
        index, lists = faiss.IndexFlatIP(dim), None
        index.add(unit)
    else:
        # ~sqrt(n) lists of ~sqrt(n) users; k-means on 64 users per list (faiss's own advice: >= 39)
        lists = max(1, round(math.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        # 10 k-means rounds, not faiss's 25: a third of the training time for the same probes and
        # recall at 1M users, trained and Gaussian (scratch run, 2026-12-03); _tune measures anyway
        index.cp.niter = 10
        sample = rng.choice(n, size=min(n, 64 * lists), replace=False)
        index.train(unit[np.sort(sample)])
        index.add(unit)
    probes, measured = _tune(index, unit, lists, recall, rng)
    name = f"{stem}-{secrets.token_hex(4)}"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / f"{name}.users.parquet") as tmp:
        pq.write_table(pa.table({"user_id": user_ids}), tmp)
    with atomic_file(folder / f"{name}.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    return {"file": f"{name}.faiss", "users": n, "kind": "flat" if lists is None else "ivf", "lists": lists,
            "probes": probes, "recall_at_10": round(measured, 4),
            "build_s": round(time.perf_counter() - started, 3)}  # fmt: skip


def _tune(index, unit: np.ndarray, lists: int | None, target: float, rng) -> tuple[int | None, float]:
    """The fewest probes whose recall@10 on sampled users reaches `target`, and that recall, measured.

    An IVF-Flat search with p probes finds a true neighbour exactly when the neighbour's list is
    among the query's p nearest lists, so one ranking of all lists per query predicts the recall
    of every p at once (searching p = 1, 2, 4, ... took 12 of an 18 s build at 1M users). The
    predicted p is then measured by a real search, doubled while that falls short (ties between
    equally similar users are what the prediction cannot see)."""
    import faiss

    n = unit.shape[0]
    if lists is None:  # a flat index is the exact scan
        return None, 1.0
    if n <= 1:
        return 1, 1.0
    queries = unit[np.sort(rng.choice(n, size=min(n, RECALL_QUERIES), replace=False))]
    k = min(RECALL_AT + 1, n)  # +1: the user itself comes back first
    with _blas_distances(faiss):
        exact, rows = faiss.knn(queries, unit, k, metric=faiss.METRIC_INNER_PRODUCT)
    _, nearest_lists = index.quantizer.search(queries, lists)  # [query, every list, nearest first]
    rank = np.empty_like(nearest_lists)
    rank[np.arange(len(queries))[:, None], nearest_lists] = np.arange(lists)
    _, home = index.quantizer.search(unit[rows[:, 1:].ravel()], 1)  # the list each neighbour was added to
    needed = np.sort(np.take_along_axis(rank, home.reshape(len(queries), -1), axis=1).ravel()) + 1
    probes = int(needed[min(max(math.ceil(target * len(needed)) - 1, 0), len(needed) - 1)])
    while True:
        index.nprobe = probes
        found, _ = index.search(queries, k)
        measured = recall_at(found, exact)
        if measured >= target or probes >= lists:
            return probes, measured
        probes = min(lists, probes * 2)


@contextmanager
def _blas_distances(faiss):
    """faiss's exact search computes distances by BLAS matrix products only from
    `distance_compute_blas_threshold` queries on (128,000 in faiss 1.15), else one query at a
    time: the 256 recall queries against 1M users take 1.8 s that way and 0.24 s by BLAS, same
    scores within 3e-7 (benchmarks/similar_users.py, "exact_s"). A process-wide setting, restored
    after; it changes how fast an exact search runs, not what it finds."""
    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = before


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k that the index found, from scores [queries, k+1] (the user itself
    among them, scoring 1): a neighbour scoring at least the exact k-th (within TIE_TOLERANCE)
    counts as found, so ties between equally similar users do not count as misses."""
    k = exact.shape[1] - 1
    hits = (found >= exact[:, -1:] - TIE_TOLERANCE).sum(axis=1)
    return float((np.minimum(hits, k + 1) - 1).clip(0).mean() / k)


@dataclass
class LoadedIndex:
    manifest: dict
    index: object
    user_ids: pa.Array

    @classmethod
    def load(cls, folder: Path, manifest: dict) -> LoadedIndex:
        import faiss

        path = folder / manifest["file"]
        try:
            index = faiss.read_index(str(path))
            users = pq.read_table(path.with_suffix(".users.parquet"))["user_id"].combine_chunks()
        except (RuntimeError, OSError) as exc:
            raise ServingError(f"{path}: the similar-users index cannot be read ({exc}); publish again") from None
        if manifest["probes"]:
            index.nprobe = manifest["probes"]
        return cls(manifest, index, users)

    def search(self, vector: np.ndarray, k: int, exclude: str | None = None) -> list[tuple[str, float]]:
        """The k users nearest to `vector` by cosine, best first (never `exclude`)."""
        wanted = min(k + (exclude is not None), self.index.ntotal)
        if wanted <= 0:
            return []
        scores, rows = self.index.search(unit_rows(vector[None, :]), wanted)
        found = [(self.user_ids[int(r)].as_py(), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
        return [(user, score) for user, score in found if user != exclude][:k]


def remove_unlisted(folder: Path, keep: set[str], prefix: str) -> None:
    """Delete this set's index files that nothing names any more (open readers keep theirs until closed)."""
    for path in folder.glob(f"{prefix}-*.faiss"):
        if path.name not in keep:
            path.with_suffix(".users.parquet").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
