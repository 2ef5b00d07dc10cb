"""The serving commands: materialize, ask, lookup, similar, serve.

They work on the Feast online store: publishing in src/userlens/feature_store.py, reading in src/userlens/serving.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from userlens.cli import Context, cli
from userlens.errors import UserlensError


@cli.command()
@click.option("--version", "model_version", help="Model version the file holds [default: its model_version column].")
@click.option(
    "--embeddings",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Export Parquet to publish [default: the registry's production version].",
)
@click.option("--incremental", is_flag=True, help="Refresh the served version from a re-export instead.")
@click.option(
    "--interest",
    is_flag=True,
    help="Lifelong user_interest instead: the latest interest version (--version: another one).",
)
@click.option(
    "--context",
    is_flag=True,
    help="The user-conditioned LM's user_context latents instead: the latest version (--version: another one).",
)
@click.option(
    "--stage",
    is_flag=True,
    help="With --context, as the pipelines run it (dvc.yaml): exit 0 and say "
    "why when there is nothing to publish (user_llm.enabled off, or no version on the production encoder).",
)
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.pass_obj
def materialize(obj: Context, model_version, embeddings, incremental, interest, context, stage, no_progress):
    """Publish user embeddings to the Feast online store, with a consistent cut-over.

    The version is written into the slot that is not served, checked, then the serving pointer
    (data/feast/serving.json) flips to it; a failure on the way leaves the served version as it
    was. Without --embeddings it (re)publishes the registry's production version, e.g. into a
    new Redis; with --embeddings it serves that file, bypassing the gate (for experiments: the
    registry's production alias does not move). --incremental writes only the users whose rows
    changed in a re-export of the served version (Feast materialize_incremental).

    --interest serves lifelong user_interest vectors (`userlens fuse` trains a version) the
    same way, in their own slots (data/feast/interest.json); with --incremental it brings the
    served interest version up to date with new events: only the users who have them are
    re-summarised, re-fused and re-materialised.

    --context serves the latents of a user-conditioned LM version (`userlens condition` trains
    one) as `user_context` (data/feast/context.json), for `userlens ask`; only a version
    trained on the production encoder is served.

    \b
    Examples:
      userlens materialize
      userlens materialize --embeddings data/embeddings/dual_encoder.parquet
      userlens --set serving.online_store=redis materialize
      userlens materialize --incremental
      userlens materialize --interest
      userlens materialize --interest --incremental
      userlens materialize --context
    """
    from userlens import feature_store
    from userlens.feature_sets import export_version
    from userlens.locking import project_lock
    from userlens.registry import Registry

    params = obj.params()
    if interest and context:
        raise click.UsageError("--interest and --context publish different feature sets: pass one")
    if stage and not context:
        raise click.UsageError("--stage goes with --context")
    if interest:
        _materialize_interest(obj, params, model_version, embeddings, incremental, not no_progress)
        return
    if context:
        _materialize_context(obj, params, model_version, embeddings, incremental, stage, not no_progress)
        return
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
        version = model_version or export_version(embeddings)
        done = feature_store.publish(obj.project, params, version, embeddings, progress=not no_progress)
    click.echo(
        f"serving {done['model_version']} from slot {done['slot']} ({done['users']:,} users, "
        f"{done['users_per_s']:,.0f} users/s, {done['online_store']})"
    )


def _materialize_interest(obj: Context, params, version, embeddings, incremental, progress) -> None:
    from userlens.lifelong import interest
    from userlens.locking import project_lock

    if embeddings is not None:
        raise click.UsageError("--interest publishes an interest version (--version), not an --embeddings file")
    with project_lock(obj.project, "userlens materialize --interest"):
        if incremental:
            done = interest.refresh_interest(obj.project, params, progress)
            click.echo(
                f"refreshed user_interest {done['version']}: {done['new_events']:,} new events, "
                f"{done['users_refused']:,} users re-fused, {done['materialized']:,} rows materialized"
            )
            return
        done = interest.publish_interest(obj.project, params, version, progress)
    click.echo(f"serving user_interest {done['model_version']} from slot {done['slot']} ({done['users']:,} users, "
               f"{done['online_store']})")  # fmt: skip


def _materialize_context(obj: Context, params, version, embeddings, incremental, stage, progress) -> None:
    from userlens.llm import serving as llm_serving
    from userlens.locking import project_lock

    if embeddings is not None or incremental:
        raise click.UsageError("--context publishes a conditioned-LM version (--version), whole")
    if stage:
        reason = "user_llm.enabled is off" if not params.user_llm.enabled else None
        reason = reason or llm_serving.skip_reason(obj.project, version)
        if reason:
            click.echo(f"user_context not published: {reason}")
            return
    with project_lock(obj.project, "userlens materialize --context"):
        done = llm_serving.publish_context(obj.project, params, version, progress)
    click.echo(f"serving user_context {done['model_version']} from slot {done['slot']} ({done['users']:,} users, "
               f"{done['online_store']})")  # fmt: skip


@cli.command()
@click.argument("user_id")
@click.argument("question")
@click.option("--max-new-tokens", type=click.IntRange(1, 512), default=48, show_default=True,
              help="Cap on the answer's length (greedy decoding).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print user, question, answer and version as JSON.")
@click.pass_obj
def ask(obj: Context, user_id, question, max_new_tokens, as_json):
    """Ask the user-conditioned LM a question about a served user.

    The user's latents are read from the online store (user_context, published by
    `userlens materialize --context`); the served conditioned-LM version and its language
    model answer, greedily. An unknown user is an error.

    \b
    Examples:
      userlens ask 42 "Which kind of film would this user enjoy tonight?"
      userlens ask 42 "Which category of items will this user choose most often next?" --json
    """
    from dataclasses import asdict

    from userlens.llm.serving import PersonalLM

    answer = PersonalLM(obj.project, obj.params()).ask(user_id, question, max_new_tokens)
    if as_json:
        click.echo(json.dumps(asdict(answer)))
        return
    click.echo(f"{answer.text}\n(user {answer.user_id}, conditioned LM {answer.version})")


@cli.command()
@click.argument("user_ids", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print version, found flags and full vectors as JSON.")
@click.option("--fallback", type=click.Choice(["mean", "zeros", "none"]), help="Override serving.fallback.")
@click.option("--interest", is_flag=True, help="Read the served lifelong user_interest vectors instead.")
@click.option("--context", is_flag=True, help="Read the served user_context latents (k x d, flattened) instead.")
@click.pass_obj
def lookup(obj: Context, user_ids, as_json, fallback, interest, context):
    """Look users up in the online store (the served model version only).

    Unknown users are flagged (found: false) and get the fallback vector.

    \b
    Examples:
      userlens lookup 42 17
      userlens lookup 42 --json
      userlens lookup 42 --interest
      userlens lookup 42 --context
    """
    from userlens import serving
    from userlens.feature_sets import CONTEXT, EMBEDDINGS, INTEREST

    if interest and context:
        raise click.UsageError("--interest and --context read different feature sets: pass one")
    features = INTEREST if interest else CONTEXT if context else EMBEDDINGS
    store = serving.reader(obj.project, obj.params(), fallback, features)
    vectors, found, version = store.get(user_ids)
    if as_json:
        users = [
            {
                "user_id": uid,
                "found": bool(ok),
                store.layout.features.vector: None if np.isnan(vec).any() else vec.tolist(),
            }
            for uid, ok, vec in zip(user_ids, found, vectors, strict=True)
        ]
        click.echo(json.dumps({"model_version": version, "slot": store.pointer()["slot"], "users": users}))
        return
    kind = "interest" if interest else "context" if context else "model"
    click.echo(f"{kind} version {version} (d={vectors.shape[1]})")
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

    From the similar-users index each publish builds (exact below serving.similar_exact_below
    users, else tuned to serving.similar_recall against the exact scan).

    \b
    Examples:
      userlens similar 42
      userlens similar 42 -k 5 --json
    """
    from userlens import serving

    neighbours, version = serving.similar(obj.project, obj.params(), user_id, k)
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
        '{"feature_service": "user_embeddings", "entities": {"user_id": ["42"]}}'
    (`user_embeddings`, `user_interest`, `user_context`: the served versions, by names that
    never change; a cut-over reaches the server within 5 s)
    """
    import os
    import subprocess

    from userlens import serving

    command, env = serving.serve_command(obj.project, obj.params(), host, port)
    raise SystemExit(subprocess.call(command, env={**os.environ, **env}))
