"""The Prefect flow end to end on a real (temporary) Prefect server."""

from __future__ import annotations

import json
import sys

import polars as pl
import pytest

from conftest import set_params
from userlens.cli import load_flow
from userlens.errors import ValidationFailed
from userlens.project import Project

pytestmark = pytest.mark.integration


def read_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found


def flow_runs_by_state():
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [run.state.type.value for run in client.read_flow_runs()]


def test_flow_runs_end_to_end_and_publishes_a_summary(prefect_server, project):
    flow = load_flow(Project(project))
    results = flow(project_dir=str(project), progress=False)

    rows = results["ingest"]["rows"]
    assert rows["users"] == 200 and rows["interactions"] > 200 * 5
    assert results["sequences"]["n_users"] == 200
    assert results["sequences"]["raw_dvc_hash"] == results["raw_dvc_hash"]
    summary = (project / "reports/data_summary.md").read_text()
    assert f"{rows['interactions']:,}" in summary and "passed" in summary
    artifacts = read_artifact("data-summary")
    assert artifacts and f"{rows['interactions']:,}" in artifacts[-1].data
    assert results["pretrain"]["model_version"].startswith("barlow_twins-")
    assert set(results["baselines"]) == {"dual_encoder", "als", "handcrafted", "random"}
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics["favourite_category"]) == {"barlow_twins", "dual_encoder", "als", "handcrafted", "random"}
    assert "favourite_category" in read_artifact("evaluation")[-1].data
    assert "COMPLETED" in flow_runs_by_state()


def test_flow_stops_at_failed_validation_and_keeps_sequences(prefect_server, project):
    flow = load_flow(Project(project))
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

    from conftest import run

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
