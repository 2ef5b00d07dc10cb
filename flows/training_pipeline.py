"""Prefect flow `training_pipeline`: raw data -> DVC version -> GX validation -> sequences
-> Barlow Twins pretraining -> baselines -> downstream evaluation.

Thin by design: every task calls the same stage function that `dvc.yaml` runs through the
CLI (src/userlens/stages.py). Later stages (gate, register, materialize) extend this flow.

Run it:   userlens run            (or: python flows/training_pipeline.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from userlens import stages
from userlens.config import load_params
from userlens.errors import UserlensError, ValidationFailed
from userlens.io import write_text_atomic
from userlens.project import Project


def _retry_if_retryable(task, task_run, state) -> bool:
    """Retry network and store failures; bad data fails the same way every time, so never retry it."""
    try:
        state.result()
    except UserlensError as exc:
        return exc.retryable
    except Exception:  # an unexpected error may be transient (e.g. a dropped connection)
        return True
    return False


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_retryable, cache_policy=NO_CACHE)
def fetch_raw(project: Project, params, progress: bool) -> dict:
    return stages.fetch_raw(project, params, progress=progress)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_retryable, cache_policy=NO_CACHE)
def version_raw(project: Project, params) -> str:
    return stages.version_raw(project, params)


@task(cache_policy=NO_CACHE)
def ingest(project: Project, params) -> dict:
    return stages.ingest(project, params)


@task(cache_policy=NO_CACHE)
def validate(project: Project, params):
    return stages.validate(project, params)


@task(cache_policy=NO_CACHE)
def build_sequences(project: Project, params) -> dict:
    return stages.build_sequences(project, params)


@task(cache_policy=NO_CACHE)
def pretrain(project: Project, params, progress: bool) -> dict:
    return stages.pretrain(project, params, progress=progress)


@task(cache_policy=NO_CACHE)
def train_baselines(project: Project, params, progress: bool) -> dict:
    return stages.train_baselines(project, params, progress=progress)


@task(cache_policy=NO_CACHE)
def evaluate(project: Project, params, progress: bool) -> dict:
    return stages.evaluate(project, params, progress=progress)


@flow(name="training_pipeline")
def training_pipeline(
    project_dir: str = ".",
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    params_file: str | None = None,
) -> dict:
    """Run every stage on the project; `params_file` defaults to <project_dir>/params.yaml."""
    logger = get_run_logger()
    project = Project(Path(project_dir))
    params = load_params(params_file) if params_file else project.load_params()
    if overrides:
        params = params.with_overrides(overrides)
    results: dict[str, Any] = {"dataset": params.data.dataset, "source": params.data.source}
    results["fetch"] = fetch_raw(project, params, progress)
    results["raw_dvc_hash"] = version_raw(project, params)
    results["ingest"] = ingest(project, params)
    try:
        validate(project, params)
    except ValidationFailed:
        _publish(project, params, results, logger)  # the summary says why; then the run fails
        raise
    results["sequences"] = build_sequences(project, params)
    _publish(project, params, results, logger)
    results["pretrain"] = pretrain(project, params, progress)
    results["baselines"] = train_baselines(project, params, progress)
    evaluate(project, params, progress)
    report = (project.reports_dir / "report.md").read_text()
    create_markdown_artifact(key="evaluation", markdown=report, description="userlens downstream evaluation")
    return results


def _publish(project: Project, params, results: dict, logger) -> None:
    markdown = stages.summary_markdown(project, params, results)
    write_text_atomic(project.data_summary, markdown)
    create_markdown_artifact(key="data-summary", markdown=markdown, description="userlens data summary")
    logger.info("data summary written to %s", project.relative(project.data_summary))


if __name__ == "__main__":
    training_pipeline()
