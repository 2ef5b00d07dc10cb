"""The append-only event log of a dataset: data/lifelong/<dataset>/log/.

Each append adds the events that are not in the log yet (exactly: by the key user_id, item_id,
timestamp) as one immutable part, numbered in arrival order (`seq`). A refresh appends what a
new raw version (`userlens fetch` + DVC, then ingest and validate) brought, or a batch of new
events; so what is new since the last run is exactly the parts the partitions have not consumed.
Events that a new raw version no longer has stay in the log: it is append-only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl

from userlens.lifelong.parts import PartStore

log = logging.getLogger(__name__)
KEY = ("user_id", "item_id", "timestamp")
SCHEMA = {"seq": pl.Int64, "user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "rating": pl.Float32}


class EventLog:
    def __init__(self, folder: Path):
        self.store = PartStore(folder)

    @property
    def n_parts(self) -> int:
        """Appends so far: what a reader's `read(after_part)` counts."""
        return self.store.appends

    @property
    def n_events(self) -> int:
        return int(self.store.manifest.get("rows", 0))

    def read(self, after_part: int = 0) -> pl.DataFrame:
        """The events of the parts after the first `after_part`, in arrival order (`seq`)."""
        return self.store.read(after_part, SCHEMA)

    def append(self, events: pl.DataFrame, source: dict[str, Any]) -> int:
        """Add the events not yet in the log as one part (`source` says where they came from);
        returns how many were new. Within a part, events are ordered by time."""
        events = _normalised(events)
        known = self.store.scan()
        if known is not None:
            events = events.join(known.select(KEY).collect(), on=list(KEY), how="anti")
        events = events.unique(subset=list(KEY), keep="first", maintain_order=True)
        if events.is_empty():
            log.info("event log: nothing new (%d events on record)", self.n_events)
            return 0
        start = self.n_events
        part = events.sort(["timestamp", "user_id", "item_id"]).with_columns(
            seq=pl.int_range(start, start + events.height, dtype=pl.Int64)
        )
        self.store.commit(part.select(SCHEMA.keys()), sources=[*self.store.manifest.get("sources", []), source])
        log.info("event log: %d new events appended as part %d", events.height, self.n_parts)
        return events.height


def _normalised(events: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in KEY if c not in events.columns]
    if missing:
        raise ValueError(f"events lack the columns {missing}")
    rating = pl.col("rating").cast(pl.Float32) if "rating" in events.columns else pl.lit(None, pl.Float32)
    return events.select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String),
        pl.col("timestamp").cast(pl.Int64), rating.alias("rating"),
    )  # fmt: skip
