"""The recipe sweep as a Prefect flow on a Dask task runner (prefect-dask).

Each candidate of `sweep.candidates` (params.yaml) trains in its own Dask worker process and
is scored on validation users only (src/userlens/sweep.py); the best is written to
reports/sweep.json and reports/sweep.md (also a Prefect artifact). The runner is a local
cluster of `sweep.workers` single-threaded processes by default, or the dask.distributed
scheduler at `sweep.address`, so the same flow scales from 2 cores to a cluster.

Run it:   userlens sweep     (or: python flows/sweep_pipeline.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from userlens import sweep
from userlens.config import Params
from userlens.io import write_json_atomic, write_text_atomic
from userlens.locking import project_lock
from userlens.project import Project


@task(cache_policy=NO_CACHE, task_run_name="candidate {name}")
def sweep_candidate(project_dir: str, name: str, params: Params) -> dict:
    return sweep.run_candidate(project_dir, name, params)


def task_runner(params: Params) -> DaskTaskRunner:
    """The configured scheduler, else a local cluster of single-threaded worker processes."""
    if params.sweep.address:
        return DaskTaskRunner(address=params.sweep.address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": params.sweep.workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }  # fmt: skip
    )


@flow(name="recipe_sweep")
def recipe_sweep(
    project_dir: str = ".", overrides: dict[str, Any] | None = None, params_file: str | None = None
) -> dict:
    """Train every candidate in parallel, select the best on validation users, write the report."""
    import time

    project = Project(Path(project_dir))
    params = project.load_params(params_file, overrides)
    candidates = sweep.candidates(params)  # a bad override fails here, before any training
    started = time.perf_counter()
    with project_lock(project, "recipe_sweep"):
        futures = [sweep_candidate.submit(str(project.root), name, p) for name, p in candidates.items()]
        results = [future.result() for future in futures]
    seconds = time.perf_counter() - started
    selected = sweep.select(results)
    engine = (
        f"Dask at {params.sweep.address}"
        if params.sweep.address
        else f"a local Dask cluster ({params.sweep.workers} workers)"
    )
    markdown = sweep.report_markdown(results, selected, engine, seconds)
    summary = {"selected": selected["name"], "overrides": selected["overrides"], "engine": engine,
               "seconds": round(seconds, 2), "candidates": results}  # fmt: skip
    write_json_atomic(project.reports_dir / "sweep.json", summary)
    write_text_atomic(project.reports_dir / "sweep.md", markdown)
    create_markdown_artifact(key="recipe-sweep", markdown=markdown, description="userlens recipe sweep")
    return summary


def run(project_dir: str = ".", overrides: dict[str, Any] | None = None, params_file: str | None = None) -> dict:
    """The sweep on the runner its settings name (the flow's runner is chosen at call time)."""
    params = Project(Path(project_dir)).load_params(params_file, overrides)
    return recipe_sweep.with_options(task_runner=task_runner(params))(project_dir, overrides, params_file)


if __name__ == "__main__":
    run()
