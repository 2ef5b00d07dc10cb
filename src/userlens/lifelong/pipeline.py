"""The lifelong stages, as the CLI, the flows and dvc.yaml call them.

sync_log        validated canonical interactions (or a batch file of new events) -> the event log
partitions      the log's new parts -> closed partitions + open caches (only users with new events)
summarise       closed partitions without a summary -> summaries (cascade, cached)
profile         one user's partitions, summaries and open cache, for people to read
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl

from userlens.config import Params
from userlens.errors import DataError, UserlensError
from userlens.io import utc_now
from userlens.lifelong.log import KEY, EventLog
from userlens.lifelong.partitions import Partitions
from userlens.lifelong.prompts import day
from userlens.lifelong.summaries import Summaries, make_summariser
from userlens.project import Project

log = logging.getLogger(__name__)


def event_log(project: Project, params: Params) -> EventLog:
    return EventLog(project.lifelong_dir(params.data.dataset) / "log")


def partition_store(project: Project, params: Params) -> Partitions:
    return Partitions(project.lifelong_dir(params.data.dataset) / "partitions")


def summary_store(project: Project, params: Params) -> Summaries:
    return Summaries(project.lifelong_dir(params.data.dataset) / "summaries")


def sync_log(project: Project, params: Params, events_file: Path | None = None) -> dict[str, Any]:
    """Append to the event log what is new: in the validated canonical interactions (the data
    stages' output), or in `events_file` (CSV or Parquet: user_id, item_id, timestamp[, rating])."""
    from userlens import stages

    if events_file is None:
        events, _, canonical = stages.validated_interactions(project)
        source = {"raw_dvc_hash": canonical.get("raw_dvc_hash"), "appended_at": utc_now()}
    else:
        events = _read_events_file(Path(events_file), stages.load_items(project).items)
        source = {"file": str(events_file), "appended_at": utc_now()}
    logged = event_log(project, params)
    new = logged.append(events, source)
    return {"new_events": new, "events": logged.n_events, "parts": logged.n_parts}


def _read_events_file(path: Path, items: pl.DataFrame) -> pl.DataFrame:
    """A batch of new events, checked: the key columns present and never null, items known."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, infer_schema_length=10_000)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"{path}: not a readable CSV or Parquet file: {exc}") from None
    missing = [c for c in KEY if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing} (need {list(KEY)}, and optionally rating)")
    for column in KEY:
        nulls = frame.with_row_index("row").filter(pl.col(column).is_null())["row"]
        if nulls.len():
            raise DataError(
                f"{path}: column {column!r} is empty in {nulls.len()} rows (rows {nulls.head(5).to_list()})"
            )
    if not frame.schema["timestamp"].is_integer():
        raise DataError(f"{path}: column 'timestamp' must hold integer Unix seconds, not {frame.schema['timestamp']}")
    unknown = frame.with_row_index("row").filter(~pl.col("item_id").cast(pl.String).is_in(items["item_id"].implode()))
    if unknown.height:
        raise DataError(
            f"{path}: {unknown.height} events of items not in the catalogue (data/canonical/items.parquet), "
            f"e.g. rows {unknown['row'].head(5).to_list()} items {unknown['item_id'].head(5).to_list()}"
        )
    return frame


def partitions(project: Project, params: Params) -> dict[str, Any]:
    """Bring the partitions up to date with the event log (only users with new events change)."""
    logged, store = event_log(project, params), partition_store(project, params)
    done = store.update(logged, params.lifelong.partition)
    # Every append of the log is now read, so both may merge their files (see lifelong/parts.py).
    logged.store.compact()
    store.store.compact()
    return done


def summarise(project: Project, params: Params, progress: bool = True) -> dict[str, Any]:
    """Summaries for the closed partitions that have none from the configured summariser."""
    from userlens import stages

    store = partition_store(project, params)
    if not store.store.parts():
        raise UserlensError("no closed partitions yet: run `userlens partitions` first")
    tables = stages.load_items(project)
    settings = params.lifelong
    summariser = make_summariser(settings.summary, settings.llm.model, settings.llm.device)
    summaries = summary_store(project, params)
    done = summaries.update(
        store.closed(), store.rule_hash, summariser, tables.items, tables.rating_scale, settings.summary, progress
    )
    summaries.store.compact()
    return done


def fuse(project: Project, params: Params, progress: bool = True) -> dict[str, Any]:
    """The lifelong evaluation (lifelong/evaluate.py) -> reports/lifelong.json and reports/lifelong.md."""
    from userlens.io import write_json_atomic, write_text_atomic
    from userlens.lifelong.evaluate import evaluate_interest, markdown

    sync_log(project, params)  # the history it reads is the log's: bring it up to date first (cheap when it is)
    partitions(project, params)
    result = {**evaluate_interest(project, params, progress), "dataset": params.data.dataset, "created_at": utc_now()}
    write_json_atomic(project.reports_dir / "lifelong.json", result)
    write_text_atomic(project.reports_dir / "lifelong.md", markdown(result))
    return result


def profile(project: Project, params: Params, user_id: str) -> dict[str, Any]:
    """One user's closed partitions (with the configured summariser's summaries) and open cache."""
    from userlens.lifelong.summaries import summariser_identity

    store = partition_store(project, params)
    closed = store.closed([user_id]).sort("partition")
    cache = store.open().filter(pl.col("user_id") == user_id)
    if closed.is_empty() and cache.is_empty():
        raise UserlensError(f"user {user_id!r} has no events in the lifelong log (run `userlens partitions`)")
    identity = summariser_identity(params.lifelong.summary, params.lifelong.llm.model)
    texts = dict(
        summary_store(project, params).records(identity, store.rule_hash)
        .filter(pl.col("user_id") == user_id).select("partition", "text").iter_rows()
    )  # fmt: skip
    rows = [
        {"partition": row["partition"], "from": day(row["opened_at"]), "to": day(row["closed_at"]),
         "events": row["n_events"], "closed_by": row["closed_by"], "summary": texts.get(row["partition"])}
        for row in closed.iter_rows(named=True)
    ]  # fmt: skip
    return {"user_id": user_id, "partitions": rows, "open_events": int(cache["n_events"][0]) if cache.height else 0,
            "summariser": identity}  # fmt: skip
