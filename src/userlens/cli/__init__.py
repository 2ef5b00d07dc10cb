"""The `userlens` command line. Expected failures print one clear message and exit non-zero.

This module holds the `cli` group, its options and error handling, and `load_flow`; the commands
live in data.py, learning.py, release.py and serving.py, imported at the bottom so that they register.
"""

from __future__ import annotations

import importlib.util
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


# The commands, by what they do; importing them registers them on `cli`.
from userlens.cli import data, learning, lifelong, release, serving  # noqa: E402, F401
