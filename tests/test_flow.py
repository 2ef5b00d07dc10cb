"""The Prefect flows end to end on a real (temporary) Prefect server, with the real DVC, GX and Feast."""

from __future__ import annotations

import json
import sys

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from conftest import make_project, run, set_params
from userlens.cli import cli, load_flow
from userlens.embeddings import read_embeddings
from userlens.errors import ValidationFailed
from userlens.locking import LockHeld, project_lock
from userlens.project import Project
from userlens.registry import Registry

pytestmark = pytest.mark.integration
CACHED_STEPS = ("ingest", "validate", "sequences", "pretrain", "baselines", "evaluate")


def latest_artifact(key: str) -> str:
    """The data of the newest artifact with this key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
        )
    return found[0].data


def flow_runs_by_state():
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [run.state.type.value for run in client.read_flow_runs()]


def task_states(state) -> dict[str, str]:
    """Task run name -> state name ("Completed", "Cached", ...) of the flow run that ended in `state`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        return {run.name: run.state.name for run in client.read_task_runs(flow_run_filter=flow_run)}


def served(project, user_ids: list[str]):
    from userlens import serving

    params = Project(project).load_params()
    return serving.reader(Project(project), params).get(user_ids)


def test_flow_gates_registers_promotes_caches_and_blocks_a_degraded_candidate(prefect_server, project):
    from test_conditioning import tiny_lm_folder
    from userlens.llm.tasks import QUESTIONS

    # The user-conditioned LM on (off by default), with a tiny local model folder as its LM.
    lm = tiny_lm_folder(project.parent / "tiny-lm", QUESTIONS["favourite_category"].split())
    set_params(project, {"user_llm": {"enabled": True, "llm": {"model": str(lm), "device": "cpu"},
                                      "cross_attention_every": 2, "tasks": ["favourite_category"],
                                      "text_prompt_events": [3], "eval_users": 20,
                                      "train": {"steps": 4, "eval_every": 4, "batch_size": 8}}})  # fmt: skip
    flow = load_flow(Project(project))
    state = flow(project_dir=str(project), progress=False, return_state=True)
    assert state.is_completed() and state.name == "Completed"
    results = state.result()

    # Data and learning, as before.
    rows = results["ingest"]["rows"]
    assert rows["users"] == 200 and results["sequences"]["raw_dvc_hash"] == results["raw_dvc_hash"]
    assert f"{rows['interactions']:,}" in latest_artifact("data-summary")
    assert set(results["baselines"]) == {"dual_encoder", "als", "handcrafted", "random"}
    assert "favourite_category" in latest_artifact("evaluation")

    # Gate -> register -> promote: the candidate is the production version and is served online.
    version = results["pretrain"]["model_version"]
    assert results["gate"]["passed"] and results["gate"]["model_version"] == version
    assert json.loads((project / "reports/gate.json").read_text())["passed"] is True
    registry = Registry(Project(project))
    assert registry.production().version == version and results["promote"]["promoted"]
    ids, exported = read_embeddings(registry.production().embeddings)
    vectors, found, served_version = served(project, ids[:5])
    assert found.all() and served_version == version and np.allclose(vectors, exported[:5])
    report = latest_artifact("run-report")
    assert "PROMOTE" in report and f"userlens lookup {ids[0]}" in report and "data_docs" in report
    table = json.loads(latest_artifact("metrics"))
    assert any(r["task"] == "favourite_category" and r["method"] == "barlow_twins" for r in table)

    # user_interest: trained on the production encoder and served beside the embeddings.
    interest = results["interest"]
    assert interest["encoder_version"] == version and interest["published"]["users"] == interest["users"] == 200
    assert json.loads((project / "data/feast/interest.json").read_text())["model_version"] == interest["version"]
    assert f"user_interest {interest['version']}" in report and f"userlens lookup {ids[0]} --interest" in report

    # The conditioned LM: trained on the candidate, its latents served once the gate promoted it.
    conditioned = results["user_llm"]
    context = json.loads((project / "data/feast/context.json").read_text())
    assert conditioned["encoder"] == version and conditioned["published"]["users"] == 200
    assert context["model_version"] == conditioned["version"]

    # A second run with nothing changed skips every expensive step.
    again = flow(project_dir=str(project), progress=False, return_state=True)
    states = task_states(again)
    assert {step: states[step] for step in CACHED_STEPS} == {step: "Cached" for step in CACHED_STEPS}
    assert states["condition"] == "Cached" and "published" not in again.result()["user_llm"]  # already served
    assert again.result()["pretrain"] == results["pretrain"] and again.result()["gate"]["passed"]
    assert "already in production" in again.result()["promote"]["message"]

    # The scheduled refresh: a batch of new events for one user -> only that user's user_interest
    # is re-fused and re-materialised; the embeddings are re-exported by the same encoder.
    served_interest = again.result()["interest"]["version"]
    user = ids[0]
    items = pl.read_parquet(project / "data/canonical/items.parquet")["item_id"].head(3).to_list()
    batch = pl.DataFrame({"user_id": [user] * 3, "item_id": items, "timestamp": [2_000_000_000 + k for k in range(3)]})
    batch_file = project.parent / "batch.csv"
    batch.write_csv(batch_file)
    added = CliRunner().invoke(cli, ["--project", str(project), "partitions", "--events", str(batch_file)])
    assert added.exit_code == 0, added.output
    refresh = load_flow(Project(project), "refresh_pipeline")(project_dir=str(project), return_state=True)
    assert refresh.is_completed(), refresh.message
    refreshed = refresh.result()
    assert refreshed["refresh"]["model_version"] == version and refreshed["refresh"]["changed"] == 0
    assert refreshed["interest"]["version"] == served_interest
    assert refreshed["interest"]["users_refused"] == 1 and refreshed["interest"]["materialized"] == 1

    # A degraded candidate (it sees only each user's last event) is blocked: a named, non-crash end
    # state; production and the online store stay as they were.
    set_params(project, {"sequences": {"max_length": 1}})
    blocked = flow(project_dir=str(project), progress=False, return_state=True)
    assert blocked.is_completed() and blocked.name == "Blocked"
    assert blocked.message.startswith("gate blocked") and "regression" in blocked.message
    decision = blocked.result()["gate"]
    assert not decision["passed"] and decision["model_version"] != version
    assert any(c["rule"] == "max_regression" and not c["passed"] for c in decision["checks"])
    assert "promote" not in blocked.result()
    assert registry.production().version == version
    assert registry.get(decision["model_version"]).gate_passed is False  # registered, with its decision
    after, found_after, version_after = served(project, ids[:5])
    assert version_after == version and np.array_equal(after, vectors)
    assert "published" not in blocked.result()["user_llm"]  # its encoder is not in production
    assert json.loads((project / "data/feast/context.json").read_text()) == context
    assert "BLOCKED" in latest_artifact("run-report")
    assert "Blocked" in flow_names_of_runs()

    # The CLI tells the same story and exits 0.
    result = CliRunner().invoke(cli, ["--project", str(project), "promote"])
    assert result.exit_code == 0 and "not promoted: the gate blocked" in result.output
    listing = CliRunner().invoke(cli, ["--project", str(project), "models"])
    assert listing.exit_code == 0 and f"*{version}" in listing.output and "blocked" in listing.output

    # `userlens run` (what `make run` calls) ends with the decision and a lookup that works.
    printed = CliRunner().invoke(cli, ["--project", str(project), "run", "--no-progress"])
    assert printed.exit_code == 0 and "production and the online store are unchanged" in printed.output
    try_line = next(line for line in printed.output.splitlines() if line.startswith("try:"))
    *command, verb, user = try_line.split()
    assert verb == "lookup" and command[1].endswith("userlens") and "--project" in command
    looked_up = CliRunner().invoke(cli, ["--project", str(project), "lookup", user, "--json"])
    answer = json.loads(looked_up.output)
    assert answer["model_version"] == version and answer["users"][0]["found"]


def flow_names_of_runs() -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [run.state.name for run in client.read_flow_runs()]


def test_flow_stops_at_failed_validation_and_keeps_sequences(prefect_server, project):
    flow = load_flow(Project(project))
    set_params(project, {"pretrain": {"steps": 3}})
    flow(project_dir=str(project), progress=False)
    sequences_before = (project / "data/sequences/sequences.parquet").read_bytes()

    # Declare a rating scale the data breaks: validation must stop the run before sequences.
    set_params(project, {"data": {"rating_scale": [1, 3]}})
    with pytest.raises(ValidationFailed, match="rating"):
        flow(project_dir=str(project), progress=False)
    assert (project / "data/sequences/sequences.parquet").read_bytes() == sequences_before
    report = json.loads((project / "reports/validation.json").read_text())
    assert report["success"] is False
    assert "FAILED" in (project / "reports/data_summary.md").read_text()
    assert "FAILED" in flow_runs_by_state()
    assert pl.read_parquet(project / "data/sequences/sequences.parquet").height == 200


def test_flow_retries_only_transient_failures(project):
    from userlens.errors import DataError, DownloadError

    retry = load_flow(Project(project)).fn.__globals__["_retry_if_retryable"]

    class Failed:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert retry(None, None, Failed(DownloadError("connection reset"))) is True
    assert retry(None, None, Failed(DataError("bad file"))) is False
    assert retry(None, None, Failed(ConnectionError("dropped"))) is True


def test_userlens_run_reports_expected_failures_without_traceback(prefect_server, project):
    from prefect.settings import PREFECT_API_URL

    set_params(project, {"data": {"rating_scale": [1, 3]}})
    done = run(
        [sys.executable, "-m", "userlens", "--project", str(project), "run", "--no-progress"],
        project,
        check=False,
        env={"PREFECT_API_URL": PREFECT_API_URL.value()},
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "rows outside the rating scale [1, 3]" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (project / "data/sequences").exists()


def test_a_second_run_is_refused_while_one_holds_the_lock(prefect_server, project):
    flow = load_flow(Project(project))
    with project_lock(Project(project), "the first run"):
        with pytest.raises(LockHeld, match=r"another userlens run \(pid \d+, started at .*\) holds the lock"):
            flow(project_dir=str(project), progress=False)
        refused = CliRunner().invoke(cli, ["--project", str(project), "rollback"])
        assert refused.exit_code == 2 and "another userlens run" in refused.output
    assert not (project / "data/raw").exists()  # the refused run touched nothing


def test_scheduled_deployments_are_created_with_their_cron(prefect_server, project):
    from prefect.client.orchestration import get_client

    for deployment in load_flow(Project(project), "deployments")(str(project)):
        deployment.apply()
    with get_client(sync_client=True) as client:
        daily = client.read_deployment_by_name("training_pipeline/daily")
        refresh = client.read_deployment_by_name("refresh_pipeline/refresh")
    assert [s.schedule.cron for s in daily.schedules] == ["0 3 * * *"]
    assert [s.schedule.cron for s in refresh.schedules] == ["0 * * * *"]
    assert daily.parameters["project_dir"] == str(project.resolve())
    assert daily.entrypoint.endswith("flows/training_pipeline.py:training_pipeline")


def test_prefect_yaml_deploys_each_deployment_to_its_work_pool(prefect_server, project):
    import shutil
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    from conftest import REPO

    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    with get_client(sync_client=True) as client:
        for pool in ("cpu", "gpu"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    prefect = str(Path(sys.executable).parent / "prefect")
    env = {"PREFECT_API_URL": PREFECT_API_URL.value(), "USERLENS_PROJECT": str(project)}
    run([prefect, "--no-prompt", "deploy", "--all"], cwd=project, env=env)
    with get_client(sync_client=True) as client:
        deployed = {name: client.read_deployment_by_name(name) for name in (
            "training_pipeline/daily", "training_pipeline/daily-gpu", "refresh_pipeline/refresh")}  # fmt: skip
    pools = {name: d.work_pool_name for name, d in deployed.items()}
    assert pools == {"training_pipeline/daily": "cpu", "training_pipeline/daily-gpu": "gpu",
                     "refresh_pipeline/refresh": "cpu"}  # fmt: skip
    crons = {name: [(s.schedule.cron, s.active) for s in d.schedules] for name, d in deployed.items()}
    assert crons["training_pipeline/daily"] == [("0 3 * * *", True)]
    assert crons["training_pipeline/daily-gpu"] == [("0 3 * * *", False)]  # switched on where a GPU pool runs
    assert crons["refresh_pipeline/refresh"] == [("0 * * * *", True)]


@pytest.mark.slow
def test_dvc_repro_and_the_flow_reach_the_same_decision_and_embeddings(prefect_server, tmp_path):
    flowed = make_project(tmp_path / "flow")
    state = load_flow(Project(flowed))(project_dir=str(flowed), progress=False, return_state=True)
    assert state.is_completed()

    repro = make_project(tmp_path / "repro")
    run([sys.executable, "-m", "userlens", "--project", str(repro), "fetch", "--no-progress"], repro)
    out = run([sys.executable, "-m", "dvc", "repro"], repro).stdout
    for stage in ("gate", "register", "materialize"):
        assert f"Running stage '{stage}'" in out

    decisions = [json.loads((p / "reports/gate.json").read_text()) for p in (flowed, repro)]
    assert decisions[0]["passed"] == decisions[1]["passed"] is True
    assert decisions[0]["model_version"] == decisions[1]["model_version"]
    assert [c["value"] for c in decisions[0]["checks"]] == [c["value"] for c in decisions[1]["checks"]]
    (ids_a, a), (ids_b, b) = (read_embeddings(p / "data/embeddings/barlow_twins.parquet") for p in (flowed, repro))
    # Same model version and metrics; the vectors agree up to float summation order (CPU thread pools).
    assert ids_a == ids_b and np.allclose(a, b, atol=2e-3)
    assert Registry(Project(repro)).production().version == decisions[1]["model_version"]
    # Both serve a user_interest version trained on that production encoder.
    assert "serving user_interest interest-" in out
    for folder in (flowed, repro):
        served = json.loads((folder / "data/feast/interest.json").read_text())
        manifest = Project(folder).lifelong_dir("synthetic") / "interest" / served["model_version"] / "manifest.json"
        assert json.loads(manifest.read_text())["encoder_version"] == decisions[1]["model_version"]
