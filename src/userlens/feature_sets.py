"""What is served: the feature sets (user embeddings, lifelong interest, LM context) and their rows.

A `FeatureSet` names a set's Feast feature views, columns, pointer and slot files; the functions
below turn an export (or a stored version's Parquet) into the rows of a slot, checked, every row
stamped with the time it entered the slot. feature_store.py publishes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userlens.errors import DataError


@dataclass(frozen=True)
class FeatureSet:
    """One served set of user features: a float32 vector, the version that wrote it, int64 scalars.

    Its Feast views are `<name>_blue` / `<name>_green`; its pointer and slot files live beside the
    registry. The feature names differ between sets, so one Feast request can read several."""

    name: str
    vector: str
    version: str
    scalars: tuple[str, ...]
    pointer_file: str
    slot_stem: str  # slot files: slots/<slot_stem><slot>.parquet (and .json)
    publish_command: str  # what publishes it, for messages
    indexed: bool = False  # a similar-users index is built for each published version (vector_index.py)

    @property
    def features(self) -> tuple[str, ...]:
        return (self.vector, self.version, *self.scalars)

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            [("user_id", pa.string()), (self.vector, pa.list_(pa.float32())), (self.version, pa.string())]
            + [(name, pa.int64()) for name in self.scalars]
            + [("event_timestamp", pa.timestamp("us", tz="UTC"))]  # when the row entered the slot
        )

    def view(self, slot: str) -> str:
        return f"{self.name}_{slot}"


# n_events: history + future events in data/sequences; last_event_at: epoch seconds, UTC.
EMBEDDINGS = FeatureSet("user_embeddings", "embedding", "model_version", ("n_events", "last_event_at"),
                        "serving.json", "", "userlens materialize", indexed=True)  # fmt: skip
# n_partitions: closed partitions fused; interest_events: events the vector has seen (closed + open cache).
INTEREST = FeatureSet("user_interest", "user_interest", "interest_version", ("n_partitions", "interest_events"),
                      "interest.json", "interest-", "userlens materialize --interest")  # fmt: skip
# user_context: a user-conditioned LM's k latents of width d, flattened (k x d floats); context_latents: k.
CONTEXT = FeatureSet("user_context", "user_context", "context_version", ("context_latents",), "context.json",
                     "context-", "userlens materialize --context")  # fmt: skip


def version_table(export: Path, features: FeatureSet, at: datetime) -> pa.Table:
    """A stored version's rows (a Parquet file with the set's columns, e.g. user_interest.parquet)
    as a slot table, every row stamped `at`."""
    frame = pl.read_parquet(export).with_columns(event_timestamp=pl.lit(at).cast(pl.Datetime("us", "UTC")))
    return frame.select(features.schema.names).to_arrow().cast(features.schema)


def slot_table(embeddings: Path, model_version: str, sequences_dir: Path, at: datetime) -> pa.Table:
    """An export Parquet of `model_version` as slot rows (scalars from data/sequences where present)."""
    try:
        export = pq.read_table(embeddings, columns=["user_id", "embedding", "model_version"])
    except FileNotFoundError:
        raise DataError(f"{embeddings}: no such embeddings file") from None
    except (pa.ArrowInvalid, KeyError) as exc:
        raise DataError(f"{embeddings}: not an embeddings export (user_id, embedding, model_version): {exc}") from None
    if export.num_rows == 0:
        raise DataError(f"{embeddings}: no users")
    versions = set(export["model_version"].unique().to_pylist())
    if versions != {model_version}:
        raise DataError(f"{embeddings}: holds model version(s) {sorted(map(str, versions))}, not {model_version!r}")
    if pc.count_distinct(export["user_id"]).as_py() != export.num_rows or export["user_id"].null_count:
        raise DataError(f"{embeddings}: user_id has duplicates or nulls")
    if export["embedding"].null_count:
        raise DataError(f"{embeddings}: {export['embedding'].null_count} users have no embedding")
    lengths = pc.list_value_length(export["embedding"])
    if pc.min_max(lengths)["min"] != pc.min_max(lengths)["max"]:
        raise DataError(f"{embeddings}: embeddings of different lengths")
    frame = pl.from_arrow(export).with_columns(pl.col("embedding").cast(pl.List(pl.Float32)))
    scalars = user_scalars(sequences_dir)
    if scalars is not None:
        frame = frame.join(scalars, on="user_id", how="left", maintain_order="left")
    else:
        frame = frame.with_columns(n_events=pl.lit(None, pl.Int64), last_event_at=pl.lit(None, pl.Int64))
    frame = frame.with_columns(event_timestamp=pl.lit(at).cast(pl.Datetime("us", "UTC")))
    return frame.select(EMBEDDINGS.schema.names).to_arrow().cast(EMBEDDINGS.schema)


def user_scalars(sequences_dir: Path) -> pl.DataFrame | None:
    """user_id, n_events (history + future), last_event_at (epoch s) from data/sequences, if built."""
    users, sequences = sequences_dir / "users.parquet", sequences_dir / "sequences.parquet"
    if not (users.exists() and sequences.exists()):
        return None
    counts = pl.read_parquet(users, columns=["user_index", "user_id", "n_history", "n_future"])
    last = pl.read_parquet(sequences, columns=["user_index", "history_timestamp", "future_timestamp"]).select(
        "user_index",
        last_event_at=pl.max_horizontal(pl.col("history_timestamp").list.max(), pl.col("future_timestamp").list.max()),
    )
    return counts.join(last, on="user_index", how="left").select(
        "user_id",
        n_events=(pl.col("n_history") + pl.col("n_future")).cast(pl.Int64),
        last_event_at=pl.col("last_event_at").cast(pl.Int64),
    )


def export_version(path: Path) -> str:
    """The model version an export Parquet holds (its first row's)."""
    try:
        first = pq.ParquetFile(path)
        if first.metadata.num_rows == 0:
            raise DataError(f"{path}: no users")
        return first.read_row_group(0, columns=["model_version"])["model_version"][0].as_py()
    except FileNotFoundError:
        raise DataError(f"{path}: no such embeddings file") from None
    except (pa.ArrowInvalid, KeyError) as exc:
        raise DataError(f"{path}: not an embeddings export: {exc}") from None
