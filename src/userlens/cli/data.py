"""The data commands: fetch, ingest, validate, sequences (one pipeline stage each)."""

from __future__ import annotations

import click

from userlens.cli import Context, cli


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
