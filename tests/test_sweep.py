"""The recipe sweep: scored on validation users only, run by a Prefect flow on a Dask task runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import build_sequences_project, set_params
from userlens import sweep
from userlens.errors import ConfigError
from userlens.project import Project


def test_the_validation_score_never_reads_a_test_user():
    """Every other user's labels and embeddings poisoned: the same score. A validation user's
    label changed: a different score (the assertion can fail)."""
    rng = np.random.default_rng(0)
    n, val = 300, np.arange(0, 300, 3)
    labels = {"a": rng.integers(0, 3, n), "b": rng.integers(0, 2, n)}
    embeddings = rng.normal(size=(n, 8)) + labels["a"][:, None] * 0.8
    score = sweep.validation_score(embeddings, labels, val, seed=0)

    others = np.setdiff1d(np.arange(n), val)
    poisoned = {name: y.copy() for name, y in labels.items()}
    for y in poisoned.values():
        y[others] = rng.permutation(y[others])
    noisy = embeddings.copy()
    noisy[others] = rng.normal(size=(others.size, 8)) * 100
    assert sweep.validation_score(noisy, poisoned, val, seed=0) == score

    flipped = {name: y.copy() for name, y in labels.items()}
    flipped["a"][val[:20]] = (flipped["a"][val[:20]] + 1) % 3
    assert sweep.validation_score(embeddings, flipped, val, seed=0) != score


def test_a_bad_candidate_override_names_the_candidate():
    from userlens.config import Params

    params = Params().with_overrides({"sweep.candidates": {"ok": {}, "typo": {"pretrain.lamda": 0.1}}})
    with pytest.raises(ConfigError, match="sweep.candidates.typo: unknown setting 'pretrain.lamda'"):
        sweep.candidates(params)


@pytest.mark.integration
def test_sweep_flow_runs_candidates_on_a_local_dask_cluster_and_selects_on_validation_users(prefect_server, tmp_path):
    from userlens.cli import load_flow

    root = build_sequences_project(tmp_path / "project")
    # Two tiny candidates: the planted taste is learnable in a few steps; an untrained encoder is not.
    candidates = {"trained": {"pretrain.steps": 12}, "untrained": {"pretrain.steps": 0}}
    set_params(root, {"sweep": {"workers": 2, "candidates": None}})  # replace, not merge, the defaults
    set_params(root, {"sweep": {"candidates": candidates}})
    project = Project(root)
    summary = load_flow(project, "run", "sweep_pipeline")(project_dir=str(root))

    by_name = {r["name"]: r for r in summary["candidates"]}
    assert set(by_name) == {"trained", "untrained"} and "local Dask cluster (2 workers)" in summary["engine"]
    assert summary["selected"] == max(by_name, key=lambda n: by_name[n]["validation_score"])
    assert by_name["trained"]["steps"] == 12 and by_name["untrained"]["steps"] == 0
    from userlens.pretraining import validation_users

    n_users = pq.read_metadata(project.sequences_dir / "users.parquet").num_rows
    expected = validation_users(n_users, project.load_params()).size
    assert all(r["validation_users"] == expected for r in by_name.values())
    saved = json.loads((project.reports_dir / "sweep.json").read_text())
    assert saved["selected"] == summary["selected"]
    assert "scored on validation users only" in (project.reports_dir / "sweep.md").read_text()
    assert not (root / "data/models/barlow_twins").exists()  # the pipeline's own model is untouched


@pytest.fixture
def dask_scheduler(tmp_path):
    """A dask.distributed scheduler and one single-threaded worker, each its own process on
    127.0.0.1 (`dask scheduler`, `dask worker`); yields a client connected to the scheduler."""
    from distributed import Client

    dask = str(Path(sys.executable).parent / "dask")
    file = tmp_path / "scheduler.json"
    logs = (tmp_path / "scheduler.log").open("w"), (tmp_path / "dask-worker.log").open("w")
    commands = (
        [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(file)],
        [dask, "worker", "--scheduler-file", str(file), "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
    )
    processes = []
    try:
        for command, log in zip(commands, logs, strict=True):
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            deadline = time.monotonic() + 60
            while not file.exists() and time.monotonic() < deadline:  # the worker needs the scheduler's file
                time.sleep(0.2)
        with Client(scheduler_file=str(file), timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            yield client
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=30)
        for log in logs:
            log.close()


@pytest.mark.integration
def test_sweep_runs_on_the_dask_scheduler_at_sweep_address(prefect_server, dask_scheduler, tmp_path):
    from click.testing import CliRunner

    from userlens.cli import cli

    address = dask_scheduler.scheduler.address
    assert address.startswith("tcp://127.0.0.1:")
    root = build_sequences_project(tmp_path / "project")
    set_params(root, {"sweep": {"candidates": None}})
    set_params(root, {"sweep": {"candidates": {"short": {"pretrain.steps": 4}, "none": {"pretrain.steps": 0}}}})
    # As the README and `userlens sweep --help` say: the scheduler's address as a setting.
    done = CliRunner().invoke(cli, ["--project", str(root), "--set", f"sweep.address={address}", "sweep"])
    assert done.exit_code == 0, done.output

    summary = json.loads((Project(root).reports_dir / "sweep.json").read_text())
    assert summary["engine"] == f"Dask at {address}"
    assert {r["name"] for r in summary["candidates"]} == {"short", "none"}
    assert summary["selected"] in done.output
    # The scheduler ran both candidates (task prefix = the Prefect task's name) ...
    seen = dask_scheduler.run_on_scheduler(
        lambda dask_scheduler: {name: dict(p.state_counts) for name, p in dask_scheduler.task_prefixes.items()}
    )
    assert seen["sweep_candidate"]["memory"] == 2, seen
    # ... and its worker process reported them to the Prefect server as completed task runs.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    names = TaskRunFilter(name=TaskRunFilterName(any_=["candidate short", "candidate none"]))
    with get_client(sync_client=True) as client:
        states = [run.state.name for run in client.read_task_runs(task_run_filter=names)]
    assert states == ["Completed", "Completed"]
