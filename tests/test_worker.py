"""Scheduled runs on real workers: `prefect deploy` from prefect.yaml, a `process` work pool and a
`prefect worker start` process on the session's temporary Prefect server, runs triggered with
`prefect deployment run` and followed to their final state (README, "Scheduled runs")."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO, make_project, set_params
from userlens.project import Project
from userlens.registry import Registry

pytestmark = pytest.mark.integration
PREFECT = str(Path(sys.executable).parent / "prefect")
DEPLOYMENTS = ("training_pipeline/daily", "training_pipeline/daily-gpu", "refresh_pipeline/refresh")


def prefect(*args: str, cwd: Path, env: dict) -> str:
    """The prefect CLI (non-interactive) with exactly the environment `env`; its stdout."""
    done = subprocess.run([PREFECT, "--no-prompt", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@contextmanager
def worker(pool: str, env: dict, folder: Path):
    """`prefect worker start --pool <pool>` in its own process group, stopped (with any flow run
    it started) on the way out; yields the path of its log."""
    log = folder / "worker.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", pool, "--name", "userlens-test-worker", "--limit", "1"],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield log
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)  # the worker and the flow-run processes it started
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def trigger(deployment: str, cwd: Path, env: dict) -> str:
    """`prefect deployment run <deployment>`: the new flow run's id."""
    printed = prefect("deployment", "run", deployment, cwd=cwd, env=env)
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", printed)
    assert found, printed
    return found.group(1)


def final_state(flow_run_id: str, log: Path, timeout: float = 480):
    """The flow run once its state is final (the worker runs it); fails with the worker's log otherwise."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            time.sleep(2)
    state = flow_run.state.name if flow_run.state else None
    pytest.fail(f"flow run {flow_run_id} still {state} after {timeout:.0f} s; {tail(log)}")


def tail(log: Path) -> str:
    return f"worker log:\n{log.read_text()[-6000:]}"


def task_states(flow_run_id) -> dict[str, str]:
    """Task run name -> state name of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


def test_a_worker_runs_the_deployed_pipeline_and_a_blocked_gate_ends_blocked(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    project = make_project(tmp_path / "project")
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    set_params(project, {"dvc": {"push": False}})
    folder = tmp_path / "worker"  # the worker starts elsewhere: the pull step moves each run into the project
    folder.mkdir()
    # The shell that deploys has no USERLENS_PROJECT: the worker's own value names the project folder.
    env = {name: value for name, value in os.environ.items() if name != "USERLENS_PROJECT"}
    env |= {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    worker_env = env | {
        "USERLENS_PROJECT": str(project),
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # poll every second (default 10) to keep the test short
    }

    # As the README says: the pools, then `prefect deploy --all` from the project folder.
    for pool in ("cpu", "gpu"):
        prefect("work-pool", "create", pool, "--type", "process", "--overwrite", cwd=project, env=env)
    prefect("deploy", "--all", cwd=project, env=env)
    with get_client(sync_client=True) as client:
        deployed = {name: client.read_deployment_by_name(name) for name in DEPLOYMENTS}
        # The project folder is the worker's USERLENS_PROJECT, resolved when a run starts there.
        for deployment in deployed.values():
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $USERLENS_PROJECT }}"}}
            ]
    assert deployed["training_pipeline/daily"].work_pool_name == "cpu"

    # Training moved to the GPU pool as the README says: daily-gpu's schedule on, daily's off. The
    # hourly refresh is paused too, so that the only runs the worker gets are the ones triggered here.
    switch = {
        "resume": ["training_pipeline/daily-gpu"],
        "pause": ["training_pipeline/daily", "refresh_pipeline/refresh"],
    }
    for verb, names in switch.items():
        for name in names:
            (schedule,) = deployed[name].schedules
            prefect("deployment", "schedule", verb, name, str(schedule.id), cwd=project, env=env)
    with get_client(sync_client=True) as client:
        active = {name: [s.active for s in client.read_deployment_by_name(name).schedules] for name in DEPLOYMENTS}
    assert active == {"training_pipeline/daily": [False], "training_pipeline/daily-gpu": [True],
                      "refresh_pipeline/refresh": [False]}  # fmt: skip

    registry = Registry(Project(project))
    with worker("cpu", worker_env, folder) as log:
        passed = final_state(trigger("training_pipeline/daily", folder, env), log)
        assert passed.state.type.value == "COMPLETED" and passed.state.name == "Completed", tail(log)
        assert passed.work_pool_name == "cpu" and passed.deployment_id == deployed["training_pipeline/daily"].id
        assert f"submitting flow run '{passed.id}'" in log.read_text()
        production = registry.production().version
        assert (project / "reports/run_report.md").exists()

        # A threshold no candidate can meet: the gate blocks, the run ends "Blocked" (not a crash).
        set_params(project, {"gate": {"tasks": {"favourite_category": {"min_margin_over_baseline": 1.0}}}})
        blocked = final_state(trigger("training_pipeline/daily", folder, env), log)
        assert blocked.state.type.value == "COMPLETED" and blocked.state.name == "Blocked", tail(log)
        assert blocked.state.message.startswith("gate blocked") and "margin" in blocked.state.message
        assert f"submitting flow run '{blocked.id}'" in log.read_text()
        assert task_states(blocked.id)["pretrain"] == "Cached"  # only the gate's settings changed
    assert registry.production().version == production  # production untouched by the blocked run
