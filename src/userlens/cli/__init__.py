"""The `userlens` command line. Expected failures print one clear message and exit non-zero."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import yaml

from userlens.config import MOVIELENS_DATASETS, Params, load_params
from userlens.errors import ConfigError, UserlensError
from userlens.project import Project

log = logging.getLogger("userlens")


@dataclass
class Context:
    project: Project
    params_file: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    debug: bool = False

    def params(self) -> Params:
        params = load_params(self.params_file)
        return params.with_overrides(self.overrides) if self.overrides else params


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserlensError as exc:
            if getattr(ctx.obj, "debug", False):
                raise
            click.secho(f"error: {exc}", err=True, fg="red")
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _parse_set(values: tuple[str, ...]) -> dict[str, Any]:
    overrides = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set sequences.max_length=100")
        overrides[key.strip()] = yaml.safe_load(raw) if raw else None
    return overrides


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--project",
    "project_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="Project folder (holds params.yaml, data/, reports/).",
)
@click.option(
    "--params",
    "params_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Settings file [default: <project>/params.yaml].",
)
@click.option("--source", type=click.Choice(["synthetic", "movielens", "generic"]), help="Override data.source.")
@click.option("--dataset", help="Override data.dataset (for MovieLens: " + ", ".join(MOVIELENS_DATASETS) + ").")
@click.option("--data-dir", help="Folder with the official MovieLens files (else $USERLENS_DATA_DIR, else download).")
@click.option(
    "--interactions",
    type=click.Path(dir_okay=False),
    help="Your interactions file (implies --source generic).",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any setting, e.g. sequences.max_length=100.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
@click.option("--debug", is_flag=True, help="Show tracebacks of expected errors too.")
@click.pass_context
def cli(ctx, project_dir, params_file, source, dataset, data_dir, interactions, sets, verbose, debug):
    """userlens: user embeddings from interaction logs, learned without labels.

    \b
    Pipeline: fetch (raw snapshot, DVC-versioned) -> ingest -> validate -> sequences
    `userlens run` runs it all as a Prefect flow; the other verbs run one stage each
    (they are what `dvc repro` calls).

    \b
    Examples:
      userlens run                                  # synthetic data, no download
      userlens --source movielens --dataset ml-100k --data-dir ~/data/ml-100k run
      userlens --interactions events.csv --set data.dataset=shop run
      userlens --set sequences.max_length=50 sequences
    """
    _configure_logging(verbose)
    project = Project(project_dir)
    overrides = _parse_set(sets)
    if interactions:
        overrides.setdefault("data.source", "generic")
        overrides["data.interactions"] = str(Path(interactions).resolve())
    if source:
        overrides["data.source"] = source
        if source == "movielens" and not dataset:
            overrides.setdefault("data.dataset", "ml-100k")
        elif source == "synthetic" and not dataset:
            overrides.setdefault("data.dataset", "synthetic")
    if dataset:
        overrides["data.dataset"] = dataset
    if data_dir:
        overrides["data.data_dir"] = str(Path(data_dir).expanduser().resolve())
    ctx.obj = Context(project, params_file or project.params_file, overrides, debug)


def _configure_logging(verbose: bool) -> None:
    """Warnings always; userlens' own step-by-step info with --verbose."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO if verbose else logging.WARNING)


@cli.command()
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def fetch(obj: Context, no_progress):
    """Snapshot the raw data into data/raw/<dataset>/ and version it (dvc add + push).

    \b
    Synthetic data is generated; MovieLens is copied from --data-dir or downloaded from
    GroupLens and checked; generic files are copied.

    \b
    Examples:
      userlens fetch
      userlens --source movielens --dataset ml-1m --data-dir ~/data fetch
    """
    from userlens import stages

    params = obj.params()
    info = stages.fetch_raw(obj.project, params, progress=not no_progress)
    digest = stages.version_raw(obj.project, params)
    click.echo(
        f"raw snapshot {obj.project.relative(obj.project.raw_dir(params.data.dataset))} "
        f"({info.get('origin')}), DVC hash {digest}"
    )


@cli.command()
@click.pass_obj
def ingest(obj: Context):
    """Parse the raw snapshot into the canonical Parquet tables in data/canonical/.

    \b
    Examples:
      userlens ingest
      userlens --set data.rating_scale=[0,10] ingest
    """
    from userlens import stages

    manifest = stages.ingest(obj.project, obj.params())
    rows = manifest["rows"]
    click.echo(
        f"data/canonical: {rows['interactions']:,} interactions, {rows['users']:,} users, "
        f"{rows['items']:,} items (raw DVC hash {manifest['raw_dvc_hash']})"
    )
    if manifest["rating_scale"]:
        click.echo(
            f"rating scale {manifest['rating_scale']} ({manifest['rating_scale_origin']}): "
            f"{manifest['rating_scale_outside']:,} rated rows outside it (validation.repair.rating_out_of_scale)"
        )


@cli.command()
@click.pass_obj
def validate(obj: Context):
    """Check data/canonical with the Great Expectations suites; fail (exit 3) on bad data.

    Writes reports/validation.json, Data Docs in reports/data_docs/ and, when it passes,
    reports/quarantine/interactions.parquet: the rows the validation.repair drop rules remove.

    \b
    Examples:
      userlens validate
      userlens --set validation.short_users=fail validate
      userlens --set validation.repair.duplicate_events=fail validate
    """
    from userlens import stages

    report = stages.validate(obj.project, obj.params())
    click.echo(report.summary())


@cli.command()
@click.pass_obj
def sequences(obj: Context):
    """Build per-user history / future sequences in data/sequences/ from validated tables.

    \b
    Examples:
      userlens sequences
      userlens --set sequences.holdout=last_n --set sequences.holdout_last_n=10 sequences
    """
    from userlens import stages

    manifest = stages.build_sequences(obj.project, obj.params())
    click.echo(
        f"data/sequences: {manifest['n_users']:,} users, {manifest['n_history_events']:,} history "
        f"and {manifest['n_future_events']:,} future events ({manifest['quarantined_events']:,} quarantined "
        "events left out)"
    )


@cli.command()
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def pretrain(obj: Context, no_progress):
    """Train the Barlow Twins user encoder on data/sequences; export its user embeddings.

    The budget is `pretrain.steps` optimiser steps of `pretrain.batch_size` users. Checkpoints
    every `pretrain.eval_every` steps in data/models/barlow_twins/ and resumes from there after
    a crash (same settings and data only). Uses CUDA when present.

    \b
    Examples:
      userlens pretrain
      userlens --set pretrain.steps=2000 --set pretrain.batch_size=64 pretrain
      userlens --set pretrain.selection=probe pretrain     # keep the round with the best validation probe
    """
    from userlens import stages

    manifest = stages.pretrain(obj.project, obj.params(), progress=not no_progress)
    selection = manifest["selection"]
    click.echo(
        f"barlow_twins {manifest['model_version']}: {manifest['steps_run']} steps, exported step "
        f"{selection['step']} ({selection['reason']}); embeddings in data/embeddings/barlow_twins.parquet"
    )


@cli.command()
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def baselines(obj: Context, no_progress):
    """Train the comparison methods: dual encoder (same budget as pretrain), ALS, handcrafted, random.

    \b
    Examples:
      userlens baselines
      userlens --set baselines.als_factors=32 baselines
    """
    from userlens import stages

    summary = stages.train_baselines(obj.project, obj.params(), progress=not no_progress)
    click.echo(
        "embeddings in data/embeddings/: " + ", ".join(f"{m} ({s['model_version']})" for m, s in summary.items())
    )


@cli.command()
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def evaluate(obj: Context, no_progress):
    """Probe every method's frozen embeddings on the downstream tasks with 1-100 % labels.

    Writes reports/metrics.json, reports/report.md and reports/label_curves.png.

    \b
    Examples:
      userlens evaluate
      userlens --set evaluate.seeds=10 --set "evaluate.probes=[logreg]" evaluate
    """
    from userlens import stages

    stages.evaluate(obj.project, obj.params(), progress=not no_progress)
    click.echo((obj.project.reports_dir / "report.md").read_text())


@cli.command()
@click.pass_obj
def sweep(obj: Context):
    """Search Barlow Twins recipes on validation users only, in parallel on Dask.

    Trains every entry of `sweep.candidates` (name -> settings overrides, on top of the
    current settings) on data/sequences as the Prefect flow `recipe_sweep`, each in its own
    Dask worker (a local cluster of `sweep.workers` processes, or the scheduler at
    `sweep.address`), scores each on the validation users' labels only (never a test user),
    and writes reports/sweep.json and reports/sweep.md with the selected recipe.

    \b
    Examples:
      userlens sweep
      userlens --set sweep.address=tcp://scheduler:8786 sweep
      userlens --set 'sweep.candidates={"a": {}, "b": {"pretrain.lambd": 0.05}}' sweep
    """
    if not obj.debug:
        _hide_expected_tracebacks()
    run_sweep = load_flow(obj.project, "run", "sweep_pipeline")
    run_sweep(project_dir=str(obj.project.root), overrides=obj.overrides, params_file=str(obj.params_file))
    click.echo((obj.project.reports_dir / "sweep.md").read_text())


@cli.command()
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@click.pass_obj
def run(obj: Context, no_progress, as_json):
    """Run the whole pipeline as the Prefect flow `training_pipeline`.

    With no PREFECT_API_URL set, Prefect starts a temporary local server for the run; with
    one set, the run shows in that server's UI.

    \b
    Examples:
      userlens run
      userlens --source movielens --data-dir ../shared/data/ml-100k run
    """
    flow = load_flow(obj.project)
    if not obj.debug:
        _hide_expected_tracebacks()
    summary = flow(
        project_dir=str(obj.project.root),
        overrides=obj.overrides,
        progress=not no_progress,
        params_file=str(obj.params_file),
    )
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        click.echo(obj.project.data_summary.read_text())
        click.echo(
            f"Results in {obj.project.root}:\n"
            "  reports/report.md, reports/label_curves.png   downstream evaluation of every method\n"
            "  data/embeddings/<method>.parquet              user embeddings\n"
            "  data/models/<method>/curves.csv               training curves\n"
            "  data/sequences/                               training sequences\n"
            "  reports/data_summary.md, reports/data_docs/   data summary and validation (GX Data Docs)\n"
            "  reports/gate.json, reports/run_report.md      gate decision, run report (also Prefect artifacts)\n"
            "  data/registry/                                model versions and the production alias"
        )
        _echo_release(obj.project, summary)


def _echo_release(project: Project, summary: dict) -> None:
    """What the run released: the gate decision, where the report is, and a lookup that works."""
    from userlens.run_report import example_user

    decision = summary["gate"]
    click.secho(decision["summary"], fg="green" if decision["passed"] else "yellow")
    if "promote" in summary:
        click.echo(summary["promote"]["message"])
    else:
        click.echo("production and the online store are unchanged")
    click.echo(f"report: {project.relative(project.run_report)}")
    user = example_user(project)
    if user is not None:
        where = "" if project.root == Path.cwd().resolve() else f" --project {os.path.relpath(project.root)}"
        click.echo(f"try:    {_invocation()}{where} lookup {user}")


def _invocation() -> str:
    """How this shell reaches the CLI: `userlens` when it is on PATH, else the script's path (e.g. .venv/bin)."""
    script = Path(sys.executable).parent / "userlens"
    on_path = shutil.which("userlens")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "userlens"
    return os.path.relpath(script) if script.exists() else f"{os.path.relpath(sys.executable)} -m userlens"


@cli.command()
@click.pass_obj
def gate(obj: Context):
    """Judge the candidate's metrics against the gate rules (params.yaml `gate`) and production.

    Writes reports/gate.json (decision + reasons per rule). A blocked candidate is a decision,
    not an error: the exit code is 0 and the reasons are printed.

    \b
    Examples:
      userlens gate
      userlens --set gate.label_fraction=0.1 gate
    """
    from userlens import release

    decision = release.gate(obj.project, obj.params())
    click.echo(decision["summary"])
    for check in decision["checks"]:
        click.echo(f"  {'pass' if check['passed'] else 'FAIL'}  {check['reason']}")


@cli.command()
@click.pass_obj
def register(obj: Context):
    """Add the trained candidate to the registry (data/registry/versions/<version>/).

    Keeps its encoder weights, settings, metrics, embeddings, provenance and gate decision;
    registering the same version again changes nothing.

    \b
    Examples:
      userlens register
      userlens models
    """
    from userlens import release

    info = release.register(obj.project, obj.params())
    click.echo(f"registered {info['version']} in {info['path']}")


@cli.command()
@click.argument("version", required=False)
@click.option("--force", is_flag=True, help="Promote even though the gate blocked the version.")
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def promote(obj: Context, version, force, no_progress):
    """Publish a registered version to the online store, then make it the production version.

    Without VERSION: the candidate of reports/gate.json, only if its gate passed (otherwise
    prints why and changes nothing). A failed publish leaves production and the store as they were.

    \b
    Examples:
      userlens promote                              # the candidate, if the gate passed
      userlens promote barlow_twins-1a2b3c4d5e      # a registered version (its gate must have passed)
      userlens promote barlow_twins-1a2b3c4d5e --force
    """
    from userlens import release
    from userlens.locking import project_lock

    with project_lock(obj.project, "userlens promote"):
        result = release.promote(obj.project, obj.params(), version, force=force, progress=not no_progress)
    click.echo(result["message"])


@cli.command()
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def rollback(obj: Context, no_progress):
    """Serve the previous production version again (online store first, then the production alias).

    \b
    Examples:
      userlens rollback
      userlens models
    """
    from userlens import release
    from userlens.locking import project_lock

    with project_lock(obj.project, "userlens rollback"):
        result = release.rollback(obj.project, obj.params(), progress=not no_progress)
    click.echo(result["message"])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
@click.pass_obj
def models(obj: Context, as_json):
    """List the registered model versions, their gate metrics and which one is in production.

    \b
    Examples:
      userlens models
      userlens models --json
    """
    from userlens.registry import Registry

    rows = _model_rows(Registry(obj.project), obj.params())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no registered versions yet: run `userlens run` (or `userlens register`)")
        return
    tasks = sorted({task for row in rows for task in row["metrics"]})
    click.echo("  ".join([f"{'version':<26}", f"{'created':<25}", "gate   ", *tasks]))
    for row in rows:
        scores = [f"{row['metrics'].get(t) or float('nan'):<{len(t)}.3f}" for t in tasks]
        gate = {True: "passed", False: "blocked", None: "-"}[row["gate_passed"]]
        star = "*" if row["production"] else " "
        click.echo("  ".join([f"{star}{row['version']:<25}", f"{row['created_at']:<25}", f"{gate:<7}", *scores]))
    click.echo(f"* production; accuracy of the {obj.params().gate.probe} probe at the gate's label fraction")


def _model_rows(registry, params) -> list[dict]:
    from userlens.evaluate import fraction_key

    current = registry.production()
    key, probe = fraction_key(params.gate.label_fraction), params.gate.probe
    rows = []
    for version in registry.versions():
        metrics = {task: e[probe].get(key, {}).get("mean") for task, e in version.metrics.items() if probe in e}
        rows.append(
            {
                "version": version.version,
                "created_at": version.created_at,
                "production": current is not None and current.version == version.version,
                "gate_passed": version.gate_passed,
                "raw_dvc_hash": version.manifest.get("raw_dvc_hash"),
                "git_revision": version.manifest.get("git_revision"),
                "metrics": metrics,
            }
        )
    return rows


@cli.command()
@click.option("--cron", help="Cron schedule of training_pipeline [default: 0 3 * * *, daily at 03:00 UTC].")
@click.option("--refresh-cron", help="Cron schedule of refresh_pipeline [default: 0 * * * *, hourly].")
@click.pass_obj
def deploy(obj: Context, cron, refresh_cron):
    """Serve the scheduled deployments from this process (Ctrl-C stops them).

    Creates `training_pipeline/daily` (cron) and `refresh_pipeline/refresh` on the Prefect server
    of PREFECT_API_URL and runs their flow runs here. Start a server first:
    `prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`.
    For work pools (e.g. a GPU pool) use prefect.yaml: `prefect deploy --all`.

    \b
    Examples:
      userlens deploy
      userlens deploy --cron "30 2 * * *" --refresh-cron "*/15 * * * *"
    """
    from prefect import serve

    serve(*load_flow(obj.project, "deployments")(str(obj.project.root), cron, refresh_cron))


# --- serving: the Feast online store (src/userlens/feature_store.py) ------------------------------


@cli.command()
@click.option("--version", "model_version", help="Model version the file holds [default: its model_version column].")
@click.option(
    "--embeddings",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Export Parquet to publish [default: the registry's production version].",
)
@click.option("--incremental", is_flag=True, help="Refresh the served version from a re-export instead.")
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def materialize(obj: Context, model_version, embeddings, incremental, no_progress):
    """Publish user embeddings to the Feast online store, with a consistent cut-over.

    The version is written into the slot that is not served, checked, then the serving pointer
    (data/feast/serving.json) flips to it; a failure on the way leaves the served version as it
    was. Without --embeddings it (re)publishes the registry's production version, e.g. into a
    new Redis; with --embeddings it serves that file, bypassing the gate (for experiments: the
    registry's production alias does not move). --incremental writes only the users whose rows
    changed in a re-export of the served version (Feast materialize_incremental).

    \b
    Examples:
      userlens materialize
      userlens materialize --embeddings data/embeddings/dual_encoder.parquet
      userlens --set serving.online_store=redis materialize
      userlens materialize --incremental
    """
    from userlens import feature_store
    from userlens.locking import project_lock
    from userlens.registry import Registry

    params = obj.params()
    with project_lock(obj.project, "userlens materialize"):
        if incremental:
            done = feature_store.refresh(obj.project, params, embeddings, progress=not no_progress)
            click.echo(f"refreshed {done['model_version']} in slot {done['slot']}: {done['changed']:,} users changed")
            return
        if embeddings is None:
            production = Registry(obj.project).production()
            if production is None:
                raise UserlensError("no production version in the registry: run `userlens run` or "
                                    "`userlens promote`, or pass --embeddings FILE")  # fmt: skip
            embeddings, model_version = production.embeddings, production.version
        version = model_version or feature_store.export_version(embeddings)
        done = feature_store.publish(obj.project, params, version, embeddings, progress=not no_progress)
    click.echo(
        f"serving {done['model_version']} from slot {done['slot']} ({done['users']:,} users, "
        f"{done['users_per_s']:,.0f} users/s, {done['online_store']})"
    )


@cli.command()
@click.argument("user_ids", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print version, found flags and full vectors as JSON.")
@click.option("--fallback", type=click.Choice(["mean", "zeros", "none"]), help="Override serving.fallback.")
@click.pass_obj
def lookup(obj: Context, user_ids, as_json, fallback):
    """Look users up in the online store (the served model version only).

    Unknown users are flagged (found: false) and get the fallback vector.

    \b
    Examples:
      userlens lookup 42 17
      userlens lookup 42 --json
    """
    from userlens import feature_store

    store = feature_store.reader(obj.project, obj.params(), fallback)
    vectors, found, version = store.get(user_ids)
    if as_json:
        users = [
            {"user_id": uid, "found": bool(ok), "embedding": None if np.isnan(vec).any() else vec.tolist()}
            for uid, ok, vec in zip(user_ids, found, vectors, strict=True)
        ]
        click.echo(json.dumps({"model_version": version, "slot": store.pointer()["slot"], "users": users}))
        return
    click.echo(f"model version {version} (d={vectors.shape[1]})")
    for uid, ok, vec in zip(user_ids, found, vectors, strict=True):
        preview = ", ".join(f"{x:.4f}" for x in vec[:4])
        click.echo(f"{uid}\t{'found' if ok else 'unknown (' + store.fallback + ')'}\t[{preview}, ...]")


@cli.command()
@click.argument("user_id")
@click.option("-k", default=10, show_default=True, type=click.IntRange(min=1), help="How many neighbours.")
@click.option("--json", "as_json", is_flag=True, help="Print the neighbours as JSON.")
@click.pass_obj
def similar(obj: Context, user_id, k, as_json):
    """The k users most similar to USER_ID (cosine of the served embeddings).

    \b
    Examples:
      userlens similar 42
      userlens similar 42 -k 5 --json
    """
    from userlens import feature_store

    params = obj.params()
    neighbours = feature_store.similar(obj.project, params, user_id, k)
    version = feature_store.serving_state(obj.project, params)["model_version"]
    if as_json:
        rows = [{"user_id": uid, "score": score} for uid, score in neighbours]
        click.echo(json.dumps({"user_id": user_id, "model_version": version, "neighbours": rows}))
        return
    click.echo(f"users most similar to {user_id} (model version {version}):")
    for uid, score in neighbours:
        click.echo(f"  {uid}\t{score:.4f}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@click.option("--port", default=6566, show_default=True, type=int)
@click.pass_obj
def serve(obj: Context, host, port):
    """Serve online features over HTTP: `feast serve` on this project's store.

    \b
    Examples:
      userlens serve
      curl -s -X POST http://127.0.0.1:6566/get-online-features -d \\
        '{"feature_service": "user_embeddings_blue_service", "entities": {"user_id": ["42"]}}'
    (the served slot, blue or green, is in data/feast/serving.json and `userlens lookup --json`)
    """
    import os
    import subprocess

    from userlens import feature_store

    command, env = feature_store.serve_command(obj.project, obj.params(), host, port)
    raise SystemExit(subprocess.call(command, env={**os.environ, **env}))


class _ExpectedErrorFilter(logging.Filter):
    """Prefect logs every failed run with its traceback; for a UserlensError the message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserlensError):
            record.exc_info, record.exc_text = None, None
        return True


def _hide_expected_tracebacks() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_ExpectedErrorFilter())


def load_flow(project: Project, name: str = "training_pipeline", file: str = "training_pipeline"):
    """Import <project>/flows/<file>.py, the flow definitions Prefect deployments also use;
    returns its attribute `name` (a flow, `deployments`, or the sweep's `run`)."""
    path = project.root / "flows" / f"{file}.py"
    if not path.exists():
        raise UserlensError(
            f"{path} not found: run `userlens run` from the userlens project folder (or pass --project)"
        )
    spec = importlib.util.spec_from_file_location(f"userlens_flows_{file}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Prefect finds a deployment's entrypoint through the module
    spec.loader.exec_module(module)
    return getattr(module, name)


def main() -> None:
    cli(prog_name="userlens")


if __name__ == "__main__":
    main()
