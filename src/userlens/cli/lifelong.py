"""The lifelong commands (userlens.lifelong): partitions, summarise, profile."""

from __future__ import annotations

import json
from pathlib import Path

import click

from userlens.cli import Context, cli
from userlens.errors import UserlensError


@cli.command()
@click.option("--events", "events_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Append this batch of new events (CSV or Parquet: user_id, item_id, timestamp[, rating]) "
              "instead of reading the validated canonical tables.")  # fmt: skip
@click.pass_obj
def partitions(obj: Context, events_file):
    """Extend the event log with what is new and bring the users' partitions up to date.

    \b
    New events are those of the validated canonical interactions (after fetch, ingest,
    validate) that the log does not hold yet, or those of --events. Only users with new
    events are partitioned again; the closing rule is lifelong.partition in params.yaml.

    \b
    Examples:
      userlens partitions
      userlens partitions --events new_events.csv
      userlens --set lifelong.partition.max_events=50 partitions
    """
    from userlens.lifelong import pipeline

    params = obj.params()
    logged = pipeline.sync_log(obj.project, params, events_file)
    result = pipeline.partitions(obj.project, params)
    where = obj.project.relative(obj.project.lifelong_dir(params.data.dataset))
    click.echo(
        f"event log: {logged['new_events']:,} new events ({logged['events']:,} in {logged['parts']} parts); "
        f"partitions: {result['touched_users']:,} users touched, {result['new_partitions']:,} newly closed "
        f"({'built from the whole log' if result['rebuilt'] else 'incremental'}) in {where}/"
    )


@cli.command()
@click.option("--llm", "use_llm", is_flag=True, help="Use the language model (lifelong.llm.model) this time.")
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def summarise(obj: Context, use_llm, no_progress):
    """Write an interest summary for every closed partition that has none yet.

    \b
    The summary of partition k is written from partition k and the summary of k-1, once:
    results are cached by content, so a rerun generates nothing. The summariser is
    lifelong.summary.summariser: template (deterministic, no language model) or llm.

    \b
    Examples:
      userlens summarise
      userlens summarise --llm
      userlens --set lifelong.llm.model=/models/Qwen2.5-1.5B-Instruct summarise --llm
    """
    from userlens.lifelong import pipeline

    params = obj.params()
    if use_llm:
        params = params.with_overrides({"lifelong.summary.summariser": "llm"})
    result = pipeline.summarise(obj.project, params, progress=not no_progress)
    click.echo(
        f"summaries ({result['summariser']}): {result['summarised']:,} partitions, {result['generated']:,} "
        f"generated, {result['summarised'] - result['generated']:,} from the cache, in {result['seconds']:.1f}s"
    )


@cli.command()
@click.argument("user_id")
@click.option("--llm", "use_llm", is_flag=True, help="Show the language model's summaries.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def profile(obj: Context, user_id, use_llm, as_json):
    """Show one user's lifelong partitions, their interest summaries and the open cache.

    \b
    Examples:
      userlens profile 196
      userlens profile 196 --llm --json
    """
    from userlens.lifelong import pipeline

    params = obj.params()
    if use_llm:
        params = params.with_overrides({"lifelong.summary.summariser": "llm"})
    shown = pipeline.profile(obj.project, params, user_id)
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    click.echo(f"user {user_id}: {len(shown['partitions'])} closed partitions, {shown['open_events']} events open")
    for row in shown["partitions"]:
        click.echo(
            f"\n#{row['partition']}  {row['from']} .. {row['to']}  {row['events']} events "
            f"(closed by {row['closed_by']})"
        )
        click.echo(f"    {row['summary'] or '(no summary yet: run `userlens summarise`)'}")


@cli.command()
@click.option(
    "--evaluate/--no-evaluate",
    default=True,
    show_default=True,
    help="Report what user_interest adds (every CTR variant on the same user splits).",
)
@click.option("--publish", is_flag=True, help="Serve the new interest version from Feast (cut-over).")
@click.option("--stage", is_flag=True, help="As the pipelines run it (dvc.yaml): no version, and exit 0, when "
              "lifelong.serve is off, nothing is in production or the data has no ratings.")  # fmt: skip
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def fuse(obj: Context, evaluate, publish, stage, no_progress):
    """Train the interest fusion on the CTR objective: a report, and a version to serve.

    \b
    Evaluation: from each user's history partitions (the future window left out) and their
    summaries, the fusion and a CTR model learn whether the user likes the items of their
    future window; every variant (base features, + Barlow Twins, + user_interest, + both)
    trains on the same user splits (lifelong.ctr.seeds) -> reports/lifelong.json and .md.
    Version: the fusion trained on every user, on the production encoder's event vectors,
    then `user_interest` for every user over all their partitions ->
    data/lifelong/<dataset>/interest/<version>/ (served by --publish or `materialize --interest`).
    Brings the event log, partitions and summaries up to date first.

    \b
    Examples:
      userlens fuse
      userlens fuse --no-evaluate --publish
      userlens --set lifelong.summary.summariser=llm --set lifelong.fusion.text_encoder=lm fuse
    """
    from userlens.lifelong import interest, pipeline

    params, progress = obj.params(), not no_progress
    if evaluate:
        result = pipeline.fuse(obj.project, params, progress=progress)
        click.echo((obj.project.reports_dir / "lifelong.md").read_text().rstrip())
        click.echo(f"\n({result['seconds']:.0f}s; reports/lifelong.json)")
    # The pipelines (--stage) follow lifelong.serve; a person asking for a version gets one if possible.
    off = stage and not params.lifelong.serve
    reason = "lifelong.serve is off" if off else interest.skip_reason(obj.project, params)
    if reason:
        if publish and not stage:
            raise UserlensError(f"nothing to publish: {reason}")
        click.echo(f"no interest version trained: {reason}")
        return
    trained = interest.train_interest(obj.project, params, progress=progress)
    click.echo(f"interest version {trained['version']}: {trained['users']:,} users, on encoder "
               f"{trained['encoder_version']} ({trained['seconds']:.0f}s)")  # fmt: skip
    if publish:
        done = interest.publish_interest(obj.project, params, trained["version"], progress=progress)
        click.echo(f"serving user_interest {done['model_version']} from slot {done['slot']} ({done['users']:,} users)")
