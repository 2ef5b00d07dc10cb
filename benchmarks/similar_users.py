"""Similar users: the index each publish builds (vector_index.py) against the exact scan.

For each vector set and size: build the index as a publish does (params.yaml's
serving.similar_recall and similar_exact_below), then on other seeded users than the build's
own sample: recall@10 against the exact scan (ties count as found), and single-query latency
p50/p99 of the index and of the exact scan it replaces (numpy over every served vector, as
`userlens similar` did before). Vector sets:

- `trained`: the export of a Barlow Twins encoder (centred, whitened), e.g. of the 1M synthetic
  users of benchmarks/export.py's project after `userlens pretrain`;
- `gaussian`: isotropic Gaussian vectors of the same width, the hard case for any index (no
  structure at all; a whitened export is isotropic in its second moments).

With --serving, also `SimilarUsers.of` end to end (query vector from the Feast online store,
sqlite) after a real publish of the first --serving users of the trained set.

    python benchmarks/similar_users.py --embeddings benchmarks/out/export-project/data/embeddings/barlow_twins.parquet
    python benchmarks/similar_users.py --sizes 100000 --gaussian-only
    python benchmarks/similar_users.py --embeddings ... --sizes 1000000 --serving 0 --hnsw   # + faiss HNSW
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, REPO, machine, peak_rss_mib  # noqa: E402

QUERY_SEED = 12_345  # not the build's seed: recall is measured on other users than the tuning sample


def percentiles(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def exact_scan(matrix: np.ndarray, norms: np.ndarray, vector: np.ndarray, k: int) -> np.ndarray:
    """The scan `userlens similar` ran before the index: every cosine, then the top k."""
    scores = matrix @ vector / np.maximum(norms * np.linalg.norm(vector), 1e-12)
    top = np.argpartition(-scores, k)[: k + 1]
    return top[np.argsort(-scores[top], kind="stable")]


def measure(name: str, ids: pa.Array, vectors: np.ndarray, queries: int, serving) -> dict:
    import faiss

    from userlens.vector_index import RECALL_AT, LoadedIndex, build, recall_at, unit_rows

    n = len(vectors)
    with tempfile.TemporaryDirectory() as folder:
        manifest = build(Path(folder), "bench", ids, vectors, serving.similar_recall, serving.similar_exact_below)
        index = LoadedIndex.load(Path(folder), {**manifest, "model_version": "bench"})
        rows = np.random.default_rng(QUERY_SEED).choice(n, size=min(n, queries), replace=False)
        unit = unit_rows(vectors)
        exact, _ = faiss.knn(unit[rows], unit, RECALL_AT + 1, metric=faiss.METRIC_INNER_PRODUCT)
        found, index_s = [], []
        for row in rows:
            started = time.perf_counter()
            got = index.search(vectors[row], RECALL_AT, exclude=ids[int(row)].as_py())
            index_s.append(time.perf_counter() - started)
            found.append([1.0, *(score for _, score in got)] + [-np.inf] * (RECALL_AT - len(got)))
        recall = recall_at(np.asarray(found), exact)
        norms = np.linalg.norm(vectors, axis=1)
        scan_s = []
        for row in rows[:100]:  # the scan is slow at 1M: 100 queries are enough for its p99
            started = time.perf_counter()
            exact_scan(vectors, norms, vectors[row], RECALL_AT)
            scan_s.append(time.perf_counter() - started)
    index_ms, scan_ms = percentiles(index_s), percentiles(scan_s)
    build_exact = build_exact_options(unit)
    return {"vectors": name, "users": n, "dim": int(vectors.shape[1]), **{k: manifest[k] for k in
            ("kind", "lists", "probes", "build_s")}, "build_recall_at_10": manifest["recall_at_10"],
            "recall_at_10": round(recall, 4), "index": index_ms, "exact_scan": scan_ms,
            "speed_up_p50": round(scan_ms["p50_ms"] / index_ms["p50_ms"], 1), "exact_s": build_exact}  # fmt: skip


def build_exact_options(unit: np.ndarray) -> dict:
    """The exact top-k of the build's recall sample (RECALL_QUERIES users against all), as faiss
    runs it by default (below its BLAS threshold: one query at a time) and as the build runs it
    (vector_index._blas_distances: matrix products); the largest score difference between them."""
    import faiss

    from userlens.vector_index import RECALL_AT, RECALL_QUERIES, _blas_distances

    rows = np.random.default_rng(QUERY_SEED).choice(len(unit), size=min(len(unit), RECALL_QUERIES), replace=False)
    queries = unit[rows]
    timings, scores = {}, {}
    for name in ("one_query_at_a_time", "blas"):
        began = time.perf_counter()
        if name == "blas":
            with _blas_distances(faiss):
                scores[name], _ = faiss.knn(queries, unit, RECALL_AT + 1, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            scores[name], _ = faiss.knn(queries, unit, RECALL_AT + 1, metric=faiss.METRIC_INNER_PRODUCT)
        timings[name] = round(time.perf_counter() - began, 3)
    return {**timings, "max_score_difference": float(np.abs(scores["blas"] - scores["one_query_at_a_time"]).max())}


def measure_hnsw(name: str, vectors: np.ndarray, queries: int, target: float, m: int = 32) -> dict:
    """The alternative index for comparison: faiss HNSW (M, efConstruction 64), efSearch raised
    (16, 32, ...) until the recall@10 of the same query users reaches the target."""
    import faiss

    from userlens.vector_index import RECALL_AT, recall_at, unit_rows

    n = len(vectors)
    unit = unit_rows(vectors)
    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(unit.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 64
    index.add(unit)
    build_s = time.perf_counter() - started
    rows = np.random.default_rng(QUERY_SEED).choice(n, size=min(n, queries), replace=False)
    exact, _ = faiss.knn(unit[rows], unit, RECALL_AT + 1, metric=faiss.METRIC_INNER_PRODUCT)
    ef = 16
    while True:
        index.hnsw.efSearch = ef
        found, samples = [], []
        for row in rows:
            began = time.perf_counter()
            scores, _ = index.search(unit[row : row + 1], RECALL_AT + 1)
            samples.append(time.perf_counter() - began)
            found.append(scores[0])
        recall = recall_at(np.asarray(found), exact)
        if recall >= target or ef >= 1024:
            break
        ef *= 2
    return {"vectors": name, "users": n, "index": f"HNSW M {m}, efSearch {ef}", "build_s": round(build_s, 1),
            "recall_at_10": round(recall, 4), **percentiles(samples)}  # fmt: skip


def end_to_end(ids: pa.Array, vectors: np.ndarray, queries: int) -> dict:
    """A real publish into a scratch sqlite store, then SimilarUsers.of (online read + index)."""
    import shutil
    from datetime import UTC, datetime

    import yaml

    from userlens import feature_store
    from userlens.embeddings import export_embeddings
    from userlens.project import Project
    from userlens.serving import SimilarUsers

    root = OUT / "similar-users-project"
    shutil.rmtree(root, ignore_errors=True)
    (root / "data" / "feast").mkdir(parents=True)
    shutil.copytree(REPO / "feature_repo", root / "feature_repo", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serving"]["retire_grace_s"] = 0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    project = Project(root)
    export = root / "export.parquet"
    export_embeddings(export, ids.to_pylist(), [vectors], "bench", datetime.now(UTC))
    summary = feature_store.publish(project, project.load_params(), "bench", export)
    similar = SimilarUsers(root / "feature_repo", project.load_params().serving)
    rows = np.random.default_rng(QUERY_SEED).choice(len(vectors), size=min(len(vectors), queries), replace=False)
    similar.of(ids[0].as_py())  # warm-up: Feast, the registry, the index file
    samples = []
    for row in rows:
        started = time.perf_counter()
        similar.of(ids[int(row)].as_py(), k=10)
        samples.append(time.perf_counter() - started)
    shutil.rmtree(root, ignore_errors=True)
    return {"users": len(vectors), "publish_s": summary["seconds"], **percentiles(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", type=Path, help="an export Parquet (user_id, embedding): the trained set")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--gaussian-only", action="store_true", help="no trained set")
    parser.add_argument("--serving", type=int, default=100_000, help="end-to-end users (0: skip)")
    parser.add_argument("--hnsw", action="store_true", help="also faiss HNSW at the largest size, for comparison")
    parser.add_argument("--out", default="similar_users", help="JSON name in benchmarks/out (default %(default)s)")
    args = parser.parse_args()

    from userlens.config import load_params
    from userlens.embeddings import read_embeddings

    serving = load_params(REPO / "params.yaml").serving
    sets = {}
    if not args.gaussian_only:
        if args.embeddings is None or not args.embeddings.exists():
            sys.exit(f"--embeddings {args.embeddings}: no such export (or pass --gaussian-only)")
        user_ids, vectors = read_embeddings(args.embeddings)
        sets["trained"] = (pa.array(user_ids, pa.string()), vectors)
    dim = sets["trained"][1].shape[1] if sets else 64
    biggest = max(args.sizes)
    gaussian = np.random.default_rng(0).standard_normal((biggest, dim)).astype(np.float32)
    sets["gaussian"] = (pa.array([f"g{i}" for i in range(biggest)]), gaussian)
    rows = []
    for name, (ids, vectors) in sets.items():
        for n in args.sizes:
            if n > len(vectors):
                print(f"{name}: only {len(vectors):,} vectors, skipping {n:,}", file=sys.stderr)
                continue
            print(f"{name}, {n:,} users ...", file=sys.stderr)
            rows.append(measure(name, ids.slice(0, n), vectors[:n], args.queries, serving))
    hnsw = []
    if args.hnsw:
        for name, (_, vectors) in sets.items():
            print(f"{name}, HNSW at {biggest:,} users ...", file=sys.stderr)
            hnsw.append(measure_hnsw(name, vectors[:biggest], args.queries, serving.similar_recall))
    e2e = None
    if args.serving and "trained" in sets:
        ids, vectors = sets["trained"]
        e2e = end_to_end(ids.slice(0, args.serving), vectors[: args.serving], args.queries)
    result = {"machine": machine(), "similar_recall": serving.similar_recall, "rows": rows, "hnsw": hnsw,
              "end_to_end": e2e, "peak_rss_mib": round(peak_rss_mib())}  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    print(f"Machine: {machine()}; index tuned to recall@10 {serving.similar_recall} at build\n")
    print(
        "| vectors | users | index | build s | recall@10 (build / other users) | index p50 / p99 ms | "
        "exact scan p50 / p99 ms | p50 speed-up | build's exact top-k s (one query at a time / BLAS) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kind = r["kind"] if r["kind"] == "flat" else f"IVF {r['lists']} lists, {r['probes']} probed"
        print(
            f"| {r['vectors']} | {r['users']:,} | {kind} | {r['build_s']:.1f} | {r['build_recall_at_10']:.3f} / "
            f"{r['recall_at_10']:.3f} | {r['index']['p50_ms']:.2f} / {r['index']['p99_ms']:.2f} | "
            f"{r['exact_scan']['p50_ms']:.1f} / {r['exact_scan']['p99_ms']:.1f} | {r['speed_up_p50']:.0f}x | "
            f"{r['exact_s']['one_query_at_a_time']:.2f} / {r['exact_s']['blas']:.2f} |"
        )
    if hnsw:
        print("\n| vectors | users | alternative index | build s | recall@10 | p50 / p99 ms |")
        print("|---|---:|---|---:|---:|---:|")
        for r in hnsw:
            print(
                f"| {r['vectors']} | {r['users']:,} | {r['index']} | {r['build_s']:.1f} | {r['recall_at_10']:.3f} | "
                f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} |"
            )
    if e2e:
        print(
            f"\n`SimilarUsers.of` end to end (sqlite online read + index), {e2e['users']:,} users: "
            f"p50 {e2e['p50_ms']:.2f} ms, p99 {e2e['p99_ms']:.2f} ms (publish incl. index: {e2e['publish_s']:.1f} s)"
        )


if __name__ == "__main__":
    main()
