"""Prefect flows of userlens.

`training_pipeline`: raw data -> DVC version -> GX validation -> sequences -> Barlow Twins
pretraining -> baselines -> downstream evaluation -> gate -> register -> promote (publish to
the online store, then move the production alias).
Then, with lifelong.serve, user_interest: an interest version trained on the production
encoder (lifelong/interest.py) and served beside the embeddings. With user_llm.enabled (off
by default), the user-conditioned LM is trained after the baselines (llm/pipeline.py), and
its latents are served as user_context (llm/serving.py) when the gate promoted its encoder.
`refresh_pipeline`: the faster scheduled job: new raw data -> sequences -> the production
encoder re-embeds the users -> incremental materialization into the online store; the users
with new events get new partitions, summaries and user_interest, materialised incrementally.

Thin by design: every task calls the same stage function that `dvc.yaml` runs through the
CLI (src/userlens/stages.py). Steps are cached on what dvc.yaml says they depend on (DVC
content hashes, file contents, params): an unchanged step ends in the state "Cached". A
blocked gate is a decision, not a crash: the run ends Completed, named "Blocked".

Run it:   userlens run            (or: python flows/training_pipeline.py)
Schedule: userlens deploy         (see flows/deploy.py and prefect.yaml)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from userlens import caching, release, run_report, stages
from userlens.errors import UserlensError, ValidationFailed
from userlens.io import write_text_atomic
from userlens.locking import project_lock
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


def _dvc_stage(stage: str):
    """A task option set that caches on the dvc.yaml stage's dependencies and params."""

    def key(context, parameters) -> str:
        return caching.stage_key(parameters["project"], parameters["params"], stage)

    return {"cache_key_fn": key, "persist_result": True, "task_run_name": stage}


def _run_step(step, stage: str, project: Project, params, *args):
    """Run a cached step, refreshing its cache when one of its outputs is gone from disk."""
    if not caching.outputs_present(project, params, stage):
        step = step.with_options(refresh_cache=True)
    return step(project, params, *args)


RETRY = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": _retry_if_retryable}


@task(**RETRY, cache_policy=NO_CACHE)
def fetch_raw(project: Project, params, progress: bool) -> dict:
    return stages.fetch_raw(project, params, progress=progress)


@task(**RETRY, cache_policy=NO_CACHE)
def version_raw(project: Project, params) -> str:
    return stages.version_raw(project, params)


@task(**_dvc_stage("ingest"))
def ingest(project: Project, params) -> dict:
    return stages.ingest(project, params)


@task(**_dvc_stage("validate"))
def validate(project: Project, params) -> str:
    return stages.validate(project, params).summary()


@task(**_dvc_stage("sequences"))
def build_sequences(project: Project, params) -> dict:
    return stages.build_sequences(project, params)


@task(**_dvc_stage("pretrain"))
def pretrain(project: Project, params, progress: bool) -> dict:
    return stages.pretrain(project, params, progress=progress)


@task(**_dvc_stage("baselines"))
def train_baselines(project: Project, params, progress: bool) -> dict:
    return stages.train_baselines(project, params, progress=progress)


@task(**_dvc_stage("evaluate"))
def evaluate(project: Project, params, progress: bool) -> dict:
    return stages.evaluate(project, params, progress=progress)


@task(cache_policy=NO_CACHE)
def gate(project: Project, params) -> dict:
    return release.gate(project, params)


@task(cache_policy=NO_CACHE)
def register(project: Project, params) -> dict:
    return release.register(project, params)


@task(**RETRY, cache_policy=NO_CACHE)  # a store write: a retry can help
def promote(project: Project, params, progress: bool) -> dict:
    return release.promote(project, params, progress=progress)


@task(cache_policy=NO_CACHE)
def reexport(project: Project, params) -> Path:
    return release.reexport(project, params)


@task(**RETRY, cache_policy=NO_CACHE)  # a store write: a retry can help
def refresh(project: Project, params, embeddings: Path, progress: bool) -> dict:
    from userlens import feature_store

    return feature_store.refresh(project, params, embeddings=embeddings, progress=progress)


@task(**_dvc_stage("condition"))
def condition_lm(project: Project, params, progress: bool) -> dict:
    from userlens.llm.pipeline import condition

    return condition(project, params, progress=progress)


@task(**RETRY, cache_policy=NO_CACHE)  # a store write: a retry can help
def publish_context(project: Project, params, version: str, progress: bool) -> dict:
    from userlens.llm.serving import publish_context

    return publish_context(project, params, version, progress=progress)


@task(cache_policy=NO_CACHE)
def train_interest(project: Project, params, progress: bool) -> dict:
    from userlens.lifelong import interest

    return interest.train_interest(project, params, progress=progress)


@task(**RETRY, cache_policy=NO_CACHE)
def publish_interest(project: Project, params, version: str, progress: bool) -> dict:
    from userlens.lifelong import interest

    return interest.publish_interest(project, params, version, progress=progress)


@task(**RETRY, cache_policy=NO_CACHE)
def refresh_interest(project: Project, params, progress: bool) -> dict:
    from userlens.lifelong import interest

    return interest.refresh_interest(project, params, progress=progress)


def _setup(project_dir: str, overrides: dict | None, params_file: str | None):
    project = Project(Path(project_dir))
    return project, project.load_params(params_file, overrides)


@flow(name="training_pipeline")
def training_pipeline(
    project_dir: str = ".",
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    params_file: str | None = None,
):
    """Run every stage on the project; `params_file` defaults to <project_dir>/params.yaml."""
    logger = get_run_logger()
    project, params = _setup(project_dir, overrides, params_file)
    results: dict[str, Any] = {"dataset": params.data.dataset, "source": params.data.source}
    with project_lock(project, "training_pipeline"):
        _prepare_data(project, params, results, progress, logger)
        results["pretrain"] = _run_step(pretrain, "pretrain", project, params, progress)
        results["baselines"] = _run_step(train_baselines, "baselines", project, params, progress)
        if params.user_llm.enabled:  # the user-conditioned LM (off by default: minutes of CPU)
            results["user_llm"] = _run_step(condition_lm, "condition", project, params, progress)
        _run_step(evaluate, "evaluate", project, params, progress)
        decision = results["gate"] = gate(project, params)
        results["register"] = register(project, params)
        if decision["passed"]:
            results["promote"] = promote(project, params, progress)
        _train_and_publish_interest(project, params, results, progress, logger)
        _publish_context(project, params, results, progress, logger)
        _publish_run_report(project, params, results, logger)
    if not decision["passed"]:  # not a crash: the run did its job and kept production as it was
        logger.warning("%s", decision["summary"])
        return Completed(name="Blocked", message=decision["summary"], data=results)
    return results


@flow(name="refresh_pipeline")
def refresh_pipeline(
    project_dir: str = ".",
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
    params_file: str | None = None,
) -> dict:
    """New raw data -> sequences -> the production encoder re-embeds users -> incremental materialization;
    then, when user_interest is served, the users with new events are re-fused and re-materialised."""
    logger = get_run_logger()
    project, params = _setup(project_dir, overrides, params_file)
    from userlens.lifelong.interest import served_interest

    results: dict[str, Any] = {"dataset": params.data.dataset, "source": params.data.source}
    with project_lock(project, "refresh_pipeline"):
        _prepare_data(project, params, results, progress, logger)
        results["refresh"] = refresh(project, params, reexport(project, params), progress)
        if params.lifelong.serve and served_interest(project, params) is not None:
            results["interest"] = refresh_interest(project, params, progress)
    return results


def _train_and_publish_interest(project: Project, params, results: dict, progress: bool, logger) -> None:
    from userlens.lifelong.interest import skip_reason

    reason = "lifelong.serve is off" if not params.lifelong.serve else skip_reason(project, params)
    if reason:
        logger.info("user_interest not trained: %s", reason)
        return
    trained = results["interest"] = train_interest(project, params, progress)
    trained["published"] = publish_interest(project, params, trained["version"], progress)


def _publish_context(project: Project, params, results: dict, progress: bool, logger) -> None:
    """The conditioned LM's latents, served once the encoder it read is the production one."""
    from userlens.llm.serving import served_context, skip_reason

    if "user_llm" not in results:
        return
    trained = results["user_llm"]
    served = served_context(project, params)
    reason = "already served" if served and served["model_version"] == trained["version"] else None
    if reason := reason or skip_reason(project, trained["version"]):
        logger.info("user_context not published: %s", reason)
        return
    trained["published"] = publish_context(project, params, trained["version"], progress)


def _prepare_data(project: Project, params, results: dict, progress: bool, logger) -> None:
    """fetch -> version -> ingest -> validate -> sequences, publishing the data summary."""
    results["fetch"] = fetch_raw(project, params, progress)
    results["raw_dvc_hash"] = version_raw(project, params)
    results["ingest"] = _run_step(ingest, "ingest", project, params)
    try:
        _run_step(validate, "validate", project, params)
    except ValidationFailed:
        _publish_summary(project, params, results, logger)  # the summary says why; then the run fails
        raise
    results["sequences"] = _run_step(build_sequences, "sequences", project, params)
    _publish_summary(project, params, results, logger)


def _publish_summary(project: Project, params, results: dict, logger) -> None:
    markdown = stages.summary_markdown(project, params, results)
    write_text_atomic(project.data_summary, markdown)
    create_markdown_artifact(key="data-summary", markdown=markdown, description="userlens data summary")
    logger.info("data summary written to %s", project.relative(project.data_summary))


def _publish_run_report(project: Project, params, results: dict, logger) -> None:
    """The run's markdown report and metrics table, as files in reports/ and as Prefect artifacts."""
    metrics = run_report.read_metrics(project)
    markdown = run_report.markdown(project, params, results, metrics)
    write_text_atomic(project.run_report, markdown)
    create_markdown_artifact(key="run-report", markdown=markdown, description="userlens training run")
    create_table_artifact(key="metrics", table=run_report.metrics_rows(metrics, params), description="userlens metrics")
    evaluation = (project.reports_dir / "report.md").read_text()
    create_markdown_artifact(key="evaluation", markdown=evaluation, description="userlens downstream evaluation")
    logger.info("run report written to %s", project.relative(project.run_report))


TRAIN_CRON = "0 3 * * *"  # training_pipeline: daily at 03:00 (UTC)
REFRESH_CRON = "0 * * * *"  # refresh_pipeline: hourly


def deployments(project_dir: str = ".", cron: str | None = None, refresh_cron: str | None = None) -> list:
    """The scheduled deployments that `userlens deploy` serves (the work-pool variants are in prefect.yaml)."""
    parameters = {"project_dir": str(Path(project_dir).resolve()), "progress": False}
    return [
        training_pipeline.to_deployment(name="daily", cron=cron or TRAIN_CRON, parameters=parameters),
        refresh_pipeline.to_deployment(name="refresh", cron=refresh_cron or REFRESH_CRON, parameters=parameters),
    ]


if __name__ == "__main__":
    training_pipeline()
