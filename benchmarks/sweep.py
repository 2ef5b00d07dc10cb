"""Recipe-sweep throughput: the Dask task runner against the same candidates one after another.

Both in one run, on one scratch project of the synthetic source (params.yaml's data settings,
so the figure is for the `make run` data): first every candidate of `--candidates` trained in
this process, one after another, with all cores for torch; then `userlens sweep` (the Prefect
flow on a local Dask cluster of `sweep.workers` single-threaded worker processes). Candidates
per hour for each and their ratio; the selected recipe must be the same.

    python benchmarks/sweep.py                      # 4 candidates, 2 workers
    python benchmarks/sweep.py --steps 100 --workers 2

With --dataset, the recipe search itself instead: `userlens sweep` with params.yaml's
`sweep.candidates` on that dataset's quality project (benchmarks/quality.py prepares it),
its report copied to benchmarks/out/sweep-<dataset>.{json,md}:

    python benchmarks/sweep.py --dataset ml-100k --steps 300
    python benchmarks/sweep.py --dataset ml-100k --steps 300 --candidates SECOND --tag second
                                   # another set (SECOND below): lr, width, pooling, history length
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, scratch_project, userlens  # noqa: E402

CANDIDATES = {
    "current": {},
    "lambda-0.05": {"pretrain.lambd": 0.05},
    "stronger-masking": {"augment.item_mask_rate": 0.4},
    "category-substitution": {"augment.substitute_rate": 0.2},
}


SECOND = {  # the rest of issue 9's search space, beside params.yaml's candidates
    "current": {},
    "lr-0.002": {"pretrain.lr": 0.002},
    "lr-0.0005": {"pretrain.lr": 0.0005},
    "d-model-128": {"model.d_model": 128},
    "pooling-cls": {"model.pooling": "cls"},
    "max-length-50": {"sequences.max_length": 50},
}
NAMED = {"SECOND": SECOND}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="pretraining steps per candidate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dataset", help="run the recipe search on this dataset (see benchmarks/quality.py)")
    parser.add_argument("--candidates", choices=list(NAMED), help="--dataset: this set instead of params.yaml's")
    parser.add_argument("--tag", help="--dataset: name the outputs sweep-<dataset>-<tag>.{json,md}")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="userlens-sweep-prefect-"))
    if args.dataset:
        return recipe_search(args.dataset, args.steps, args.workers, NAMED.get(args.candidates), args.tag)
    project = scratch_project(OUT / "sweep-project")
    settings = ["--project", str(project), "--set", "dvc.push=false", "--set", f"pretrain.steps={args.steps}"]
    for verb in ("fetch", "ingest", "validate", "sequences"):
        userlens(*settings, verb)

    from userlens import sweep
    from userlens.config import load_params

    params = load_params(project / "params.yaml").with_overrides(
        {"dvc.push": False, "pretrain.steps": args.steps, "sweep.candidates": CANDIDATES, "sweep.workers": args.workers}
    )
    started = time.perf_counter()
    one_by_one = [
        sweep.run_candidate(str(project), name, p, threads=os.cpu_count() or 1)
        for name, p in sweep.candidates(params).items()
    ]
    sequential = time.perf_counter() - started
    for folder in (project / "data" / sweep.SWEEP_DIR).iterdir():  # the Dask run trains from scratch too
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()

    started = time.perf_counter()
    userlens(*settings, "--set", f"sweep.candidates={json.dumps(CANDIDATES)}", "--set", f"sweep.workers={args.workers}",
             "sweep")  # fmt: skip
    parallel = time.perf_counter() - started
    report = json.loads((project / "reports" / "sweep.json").read_text())
    n = len(CANDIDATES)
    result = {
        "machine": machine(),
        "candidates": n,
        "steps": args.steps,
        "workers": args.workers,
        "sequential_seconds": round(sequential, 1),
        "dask_seconds": round(parallel, 1),
        "sequential_per_hour": round(n * 3600 / sequential, 1),
        "dask_per_hour": round(n * 3600 / parallel, 1),
        "speedup": round(sequential / parallel, 2),
        "selected_sequential": sweep.select(one_by_one)["name"],
        "selected_dask": report["selected"],
    }
    (OUT / "sweep.json").write_text(json.dumps(result, indent=2))
    print(f"Machine: {machine()}\n")
    print(f"| runner | {n} candidates x {args.steps} steps | candidates / hour |")
    print("|---|---:|---:|")
    print(f"| one after another (torch on all cores) | {sequential:.0f} s | {result['sequential_per_hour']:.1f} |")
    print(f"| Dask task runner, {args.workers} workers x 1 thread (userlens sweep, incl. cluster start) "
          f"| {parallel:.0f} s | {result['dask_per_hour']:.1f} |")  # fmt: skip
    print(f"\nspeed-up {result['speedup']:.2f}x; selected: {result['selected_dask']} (Dask), "
          f"{result['selected_sequential']} (one after another)")  # fmt: skip


def recipe_search(dataset: str, steps: int, workers: int, candidates: dict | None, tag: str | None) -> None:
    import shutil

    import quality

    project = OUT / f"quality-{dataset}-project"
    data_settings = quality.prepare(project, dataset)
    chosen = ["--set", f"sweep.candidates={json.dumps(candidates)}"] if candidates else []
    started = time.perf_counter()
    userlens("--project", str(project), *data_settings, "--set", f"pretrain.steps={steps}",
             "--set", f"sweep.workers={workers}", *chosen, "sweep")  # fmt: skip
    name = f"sweep-{dataset}" + (f"-{tag}" if tag else "")
    for suffix in ("json", "md"):
        shutil.copy(project / "reports" / f"sweep.{suffix}", OUT / f"{name}.{suffix}")
    print(f"Dataset: {dataset}; {steps} steps per candidate. Machine: {machine()}; "
          f"{time.perf_counter() - started:.0f} s\n")  # fmt: skip
    print((OUT / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
