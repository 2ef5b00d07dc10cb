"""End-to-end wall time of the training pipeline, split by step, and Prefect's overhead.

For each dataset, two fresh projects on the same data, one after the other in this run:
- `flow`: the Prefect flow `training_pipeline`, as `make run` / `userlens run` runs it (no
  PREFECT_API_URL: Prefect starts its temporary local server; that start-up is part of the
  overhead a user pays). Step times are the task runs' own durations, read back from the server.
- `direct`: the same stage functions called one after the other from Python, each timed.
Prefect's overhead = flow wall time / direct wall time - 1.

    python benchmarks/pipeline.py                          # synthetic default (make run) and ML-100K
    python benchmarks/pipeline.py --datasets synthetic

Writes benchmarks/out/pipeline-<dataset>.json and prints the Markdown table for BENCHMARKS.md.
Targets (issue 5): overhead <= 10 % of the total; MovieLens-100K end to end < 5 min on 2 cores.
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
from common import OUT, REPO, emit, machine, run_worker, scratch_project  # noqa: E402

ML100K = REPO.parent / "shared" / "data" / "ml-100k"
DATASETS = {
    "synthetic": {},  # the embedded default of params.yaml: what `make run` runs
    "ml-100k": {"data.source": "movielens", "data.dataset": "ml-100k", "data.data_dir": str(ML100K)},
}
STEPS = ("fetch_raw", "version_raw", "ingest", "validate", "sequences", "pretrain", "baselines", "evaluate",
         "gate", "register", "promote")  # fmt: skip
PUSH_OFF = {"dvc.push": False}  # the local remote is a folder copy: not what is being measured


def direct(root: Path, overrides: dict) -> dict:
    from userlens import release, stages
    from userlens.project import Project

    project = Project(root)
    params = project.load_params().with_overrides(overrides)
    calls = {
        "fetch_raw": lambda: stages.fetch_raw(project, params, progress=False),
        "version_raw": lambda: stages.version_raw(project, params),
        "ingest": lambda: stages.ingest(project, params),
        "validate": lambda: stages.validate(project, params),
        "sequences": lambda: stages.build_sequences(project, params),
        "pretrain": lambda: stages.pretrain(project, params, progress=False),
        "baselines": lambda: stages.train_baselines(project, params, progress=False),
        "evaluate": lambda: stages.evaluate(project, params, progress=False),
        "gate": lambda: release.gate(project, params),
        "register": lambda: release.register(project, params),
        "promote": lambda: release.promote(project, params),
    }
    steps, began = {}, time.perf_counter()
    for name in STEPS:
        start = time.perf_counter()
        calls[name]()
        steps[name] = time.perf_counter() - start
    return {"wall_s": time.perf_counter() - began, "steps": steps}


def flow(root: Path, overrides: dict) -> dict:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from userlens.cli import load_flow
    from userlens.project import Project

    training_pipeline = load_flow(Project(root))
    began = time.perf_counter()
    state = training_pipeline(project_dir=str(root), overrides=overrides, progress=False, return_state=True)
    wall = time.perf_counter() - began

    async def task_runs():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            return {run.name: run.total_run_time.total_seconds() for run in runs}

    times = asyncio.run(task_runs())
    steps = {name: next((s for run, s in times.items() if run.split("-")[0] in _task_names(name)), None)
             for name in STEPS}  # fmt: skip
    return {"wall_s": wall, "steps": steps, "state": state.name}


def _task_names(step: str) -> tuple[str, ...]:
    """A step's task run name prefix (dvc-stage steps are named after their stage)."""
    return {"sequences": ("sequences", "build_sequences"), "baselines": ("baselines", "train_baselines")}.get(
        step, (step,)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "DATASET", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, dataset, root = args.worker
        overrides = {**DATASETS[dataset], **PUSH_OFF}
        emit((direct if mode == "direct" else flow)(Path(root), overrides))
        return

    results = {"machine": machine(), "runs": {}}
    for dataset in args.datasets:
        if dataset == "ml-100k" and not (ML100K / "u.data").exists():
            print(f"skipping ml-100k: not found at {ML100K}", file=sys.stderr)
            continue
        runs = results["runs"][dataset] = {}
        for mode in ("direct", "flow"):
            with tempfile.TemporaryDirectory(prefix=f"userlens-pipeline-{mode}-") as tmp:
                os.environ["PREFECT_HOME"] = str(Path(tmp) / ".prefect")  # a fresh Prefect, as on a new machine
                root = scratch_project(Path(tmp) / "project")
                print(f"{dataset}: {mode} ...", file=sys.stderr)
                runs[mode] = run_worker(Path(__file__), mode, dataset, str(root))
        runs["prefect_overhead"] = runs["flow"]["wall_s"] / runs["direct"]["wall_s"] - 1
        one = {"machine": results["machine"], "runs": {dataset: runs}}
        (OUT / f"pipeline-{dataset}.json").write_text(json.dumps(one, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    for dataset, runs in results["runs"].items():
        lines += [f"**{dataset}** (seconds)", "", "| step | direct | flow |", "|---|---:|---:|"]
        for step in STEPS:
            d, f = runs["direct"]["steps"].get(step), runs["flow"]["steps"].get(step)
            lines.append(f"| {step} | {_s(d)} | {_s(f)} |")
        lines.append(f"| **wall time** | **{_s(runs['direct']['wall_s'])}** | **{_s(runs['flow']['wall_s'])}** |")
        lines += ["", f"Prefect overhead: {runs['prefect_overhead']:+.1%} of the direct wall time; flow state "
                      f"{runs['flow']['state']}.", ""]  # fmt: skip
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
