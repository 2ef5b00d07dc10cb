"""User Behavior Streaming Partition (LIBER's UBSP): lifelong histories as short partitions.

A user's events go, in arrival order, into an open cache. The cache closes into a partition
when it holds `max_events` events, or when the user's next event comes more than
`max_gap_days` after the cache's last one (either rule may be switched off). A closed
partition never changes; the open cache waits for more events.

Closing is decided by the events alone, never by the clock, so maintaining partitions
incrementally (`Partitions.update` with the log's new parts) gives exactly what one build
over the whole log gives. An update touches only users with new events: their open cache plus
the new events are partitioned again; everyone else's rows are left as they are.

Storage, data/lifelong/<dataset>/partitions/: the closed partitions as append-only parts, and
the open caches (one row per user ever seen, with the index their next partition gets) in
open-<n>.parquet, which the manifest names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import polars as pl

from userlens.config import PartitionParams
from userlens.lifelong.log import SCHEMA as EVENT_SCHEMA
from userlens.lifelong.log import EventLog
from userlens.lifelong.parts import PartStore

log = logging.getLogger(__name__)
DAY = 86_400
PARTITION_SCHEMA = {
    "user_id": pl.String,
    "partition": pl.Int32,  # 0, 1, 2, ... per user, in time order
    "n_events": pl.Int32,
    "opened_at": pl.Int64,  # timestamp of its first event
    "closed_at": pl.Int64,  # timestamp of its last event (null while open)
    "closed_by": pl.String,  # "count" | "gap" (null while open)
    "seqs": pl.List(pl.Int64),  # the events, in order: their place in the log, item, time, rating
    "item_ids": pl.List(pl.String),
    "timestamps": pl.List(pl.Int64),
    "ratings": pl.List(pl.Float32),
}
LISTS = ("seqs", "item_ids", "timestamps", "ratings")


def partition_events(events: pl.DataFrame, rule: PartitionParams, next_index: pl.DataFrame | None = None):
    """Partition event streams: (closed, open) frames of PARTITION_SCHEMA.

    `events` (EVENT_SCHEMA) hold each user's open cache followed by their new events; `seq` gives
    the order. `next_index` (user_id, partition) says which index each user's next partition gets
    (0 when absent). `open` has one row per user in `events` (n_events 0 when nothing is left)."""
    if events.is_empty():
        return pl.DataFrame(schema=PARTITION_SCHEMA), pl.DataFrame(schema=PARTITION_SCHEMA)
    gap = None if rule.max_gap_days is None else rule.max_gap_days * DAY
    size = rule.max_events
    frame = events.sort(["user_id", "seq"]).with_columns(
        segment=(
            (pl.col("timestamp").diff().over("user_id").fill_null(0) > gap).cum_sum().over("user_id")
            if gap is not None
            else pl.lit(0, pl.UInt32)
        )
    )
    frame = frame.with_columns(position=pl.int_range(pl.len()).over(["user_id", "segment"]))
    frame = frame.with_columns(chunk=(pl.col("position") // size) if size else pl.lit(0, pl.Int64))
    groups = frame.group_by(["user_id", "segment", "chunk"], maintain_order=True).agg(
        pl.col("seq").alias("seqs"), pl.col("item_id").alias("item_ids"),
        pl.col("timestamp").alias("timestamps"), pl.col("rating").alias("ratings"),
        n_events=pl.len().cast(pl.Int32),
    )  # fmt: skip
    last_segment = pl.col("segment") == pl.col("segment").max().over("user_id")
    full = (pl.col("n_events") == size) if size else pl.lit(False)
    groups = groups.with_columns(closed=full | ~last_segment, closed_by=pl.when(full).then(pl.lit("count"))
                                 .otherwise(pl.lit("gap")))  # fmt: skip
    start = next_index if next_index is not None else pl.DataFrame(schema={"user_id": pl.String, "partition": pl.Int32})
    closed = (
        groups.filter("closed")
        .join(start.rename({"partition": "start"}), on="user_id", how="left", maintain_order="left")
        .with_columns(partition=(pl.col("start").fill_null(0) + pl.int_range(pl.len()).over("user_id")).cast(pl.Int32))
    )
    closed = closed.with_columns(
        opened_at=pl.col("timestamps").list.first(), closed_at=pl.col("timestamps").list.last()
    )
    counts = closed.group_by("user_id").agg(n_closed=pl.len().cast(pl.Int32))
    users = frame.select("user_id").unique(maintain_order=True)
    open_rows = (
        users.join(groups.filter(~pl.col("closed")), on="user_id", how="left", maintain_order="left")
        .join(start.rename({"partition": "start"}), on="user_id", how="left", maintain_order="left")
        .join(counts, on="user_id", how="left", maintain_order="left")
        .with_columns(
            partition=(pl.col("start").fill_null(0) + pl.col("n_closed").fill_null(0)).cast(pl.Int32),
            n_events=pl.col("n_events").fill_null(0),
            opened_at=pl.col("timestamps").list.first(),
            closed_at=pl.lit(None, pl.Int64),
            closed_by=pl.lit(None, pl.String),
            **{c: pl.col(c).fill_null(pl.lit([], dtype=PARTITION_SCHEMA[c])) for c in LISTS},
        )
    )
    return closed.select(PARTITION_SCHEMA.keys()), open_rows.select(PARTITION_SCHEMA.keys())


def cache_events(open_rows: pl.DataFrame) -> pl.DataFrame:
    """The events held in open caches, one row each (EVENT_SCHEMA)."""
    rows = open_rows.filter(pl.col("n_events") > 0).select("user_id", *LISTS).explode(list(LISTS))
    return rows.rename({"seqs": "seq", "item_ids": "item_id", "timestamps": "timestamp", "ratings": "rating"}).select(
        EVENT_SCHEMA.keys()
    )


def rule_of(rule: PartitionParams) -> dict[str, Any]:
    return rule.model_dump(mode="json")


def rule_hash(rule: dict[str, Any] | None) -> str:
    """A short name for a closing rule: summaries record which partitioning they summarise."""
    return hashlib.sha256(json.dumps(rule, sort_keys=True).encode()).hexdigest()[:12]


class Partitions:
    """The partitions of one dataset's event log, kept in step with it."""

    def __init__(self, folder: Path):
        self.store = PartStore(folder)

    def closed(self, users: list[str] | None = None) -> pl.DataFrame:
        lazy = self.store.scan()
        if lazy is None:
            return pl.DataFrame(schema=PARTITION_SCHEMA)
        if users is not None:
            lazy = lazy.filter(pl.col("user_id").is_in(users))
        return lazy.collect()

    @property
    def rule_hash(self) -> str:
        return rule_hash(self.store.manifest.get("rule"))

    def open(self) -> pl.DataFrame:
        name = self.store.manifest.get("open")
        return pl.read_parquet(self.store.folder / name) if name else pl.DataFrame(schema=PARTITION_SCHEMA)

    def update(self, event_log: EventLog, rule: PartitionParams) -> dict[str, Any]:
        """Consume the log parts not seen yet; rebuilds from the first part when the rule changed.
        Returns what changed: users touched, partitions closed, seconds."""
        started = time.perf_counter()
        manifest = self.store.manifest
        if manifest["parts"] and manifest.get("rule") != rule_of(rule):
            log.info("partition rule changed (%s -> %s): rebuilding from the whole log", manifest.get("rule"),
                     rule_of(rule))  # fmt: skip
            self._reset()
            manifest = self.store.manifest
        consumed = int(manifest.get("log_parts", 0))
        new = event_log.read(consumed)
        if new.is_empty():
            return {"touched_users": 0, "new_partitions": 0, "new_events": 0, "seconds": 0.0, "rebuilt": False,
                    "touched": []}  # fmt: skip
        touched = new["user_id"].unique()
        open_rows = self.open()
        carried = open_rows.filter(pl.col("user_id").is_in(touched.implode()))
        events = pl.concat([cache_events(carried), new.select(EVENT_SCHEMA.keys())])
        closed, reopened = partition_events(events, rule, carried.select("user_id", "partition"))
        kept = open_rows.filter(~pl.col("user_id").is_in(touched.implode()))
        update = int(manifest.get("updates", 0)) + 1
        name = f"open-{update:06d}.parquet"
        self.store.write_file(name, pl.concat([kept, reopened]).select(PARTITION_SCHEMA.keys()))
        self.store.commit(closed, rule=rule_of(rule), log_parts=event_log.n_parts, open=name, updates=update)
        if manifest.get("open") and manifest["open"] != name:
            (self.store.folder / manifest["open"]).unlink(missing_ok=True)
        summary = {"touched_users": touched.len(), "new_partitions": closed.height, "new_events": new.height,
                   "seconds": round(time.perf_counter() - started, 3), "rebuilt": consumed == 0,
                   "touched": sorted(touched.to_list())}  # fmt: skip
        log.info("partitions: %d new events of %d users -> %d closed partitions", new.height, touched.len(),
                 closed.height)  # fmt: skip
        return summary

    def _reset(self) -> None:
        import shutil

        shutil.rmtree(self.store.folder, ignore_errors=True)
