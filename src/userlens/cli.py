"""The `userlens` command line. Expected failures print one clear message and exit non-zero."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
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


@cli.command()
@click.pass_obj
def validate(obj: Context):
    """Check data/canonical with the Great Expectations suites; fail (exit 3) on bad data.

    Writes reports/validation.json and Data Docs in reports/data_docs/.

    \b
    Examples:
      userlens validate
      userlens --set validation.short_users=fail validate
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
        f"and {manifest['n_future_events']:,} future events"
    )


@cli.command()
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def pretrain(obj: Context, no_progress):
    """Train the Barlow Twins user encoder on data/sequences; export its user embeddings.

    Checkpoints every epoch in data/models/barlow_twins/ and resumes from there after a crash
    (same settings and data only). Uses CUDA when present.

    \b
    Examples:
      userlens pretrain
      userlens --set pretrain.epochs=5 --set pretrain.batch_size=64 pretrain
    """
    from userlens import stages

    manifest = stages.pretrain(obj.project, obj.params(), progress=not no_progress)
    click.echo(
        f"barlow_twins {manifest['model_version']}: {manifest['epochs_run']} epochs, best epoch "
        f"{manifest['best_epoch']} (validation probe {manifest['best_validation_score']:.3f}); "
        "embeddings in data/embeddings/barlow_twins.parquet"
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
            "  reports/data_summary.md, reports/data_docs/   data summary and validation (GX Data Docs)"
        )


class _ExpectedErrorFilter(logging.Filter):
    """Prefect logs every failed run with its traceback; for a UserlensError the message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserlensError):
            record.exc_info, record.exc_text = None, None
        return True


def _hide_expected_tracebacks() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_ExpectedErrorFilter())


def load_flow(project: Project):
    """Import <project>/flows/training_pipeline.py, the flow definition Prefect deployments also use."""
    path = project.root / "flows" / "training_pipeline.py"
    if not path.exists():
        raise UserlensError(
            f"{path} not found: run `userlens run` from the userlens project folder (or pass --project)"
        )
    spec = importlib.util.spec_from_file_location("userlens_flows_training_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.training_pipeline


def main() -> None:
    cli(prog_name="userlens")


if __name__ == "__main__":
    main()
