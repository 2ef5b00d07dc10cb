"""The release commands: gate, register, promote, rollback, models, deploy."""

from __future__ import annotations

import json

import click

from userlens.cli import Context, cli, load_flow


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
