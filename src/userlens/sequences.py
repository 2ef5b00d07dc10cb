"""Per-user chronological sequences, split into history and a held-out future window.

Vectorised in polars (no Python loop over users). Ties in time keep the source file's row
order (a stable sort), so the same input always gives the same sequences.
"""

from __future__ import annotations

import polars as pl

from userlens.config import SequenceParams


def dense_index(keys: pl.Series, name: str) -> pl.DataFrame:
    """Map ids to dense indices 0..n-1 in sorted id order: columns (<name>_index, <name>_id)."""
    unique = keys.unique().sort()
    return pl.DataFrame({f"{name}_index": pl.int_range(len(unique), dtype=pl.Int32, eager=True), f"{name}_id": unique})


def split_sequences(events: pl.DataFrame, params: SequenceParams) -> pl.DataFrame:
    """events (user_index, item_index, timestamp, rating) -> one row per user with list columns.

    The future window is the last `holdout_fraction` of a user's events (at least one, never
    all of them) or the last `holdout_last_n`; the history keeps its `max_length` most recent
    events before that window.
    """
    n = pl.len().over("user_index")
    if params.holdout == "fraction":
        n_future = (n.cast(pl.Float64) * params.holdout_fraction).round(0).cast(pl.Int64).clip(1)
    else:
        n_future = pl.lit(params.holdout_last_n, pl.Int64)
    n_future = pl.min_horizontal(n_future, n.cast(pl.Int64) - 1)  # a user keeps >= 1 history event
    position = pl.int_range(pl.len()).over("user_index")
    cut = n.cast(pl.Int64) - n_future
    ordered = events.sort(["user_index", "timestamp"], maintain_order=True).with_columns(
        future=position >= cut,
        keep=position >= cut - params.max_length,
    )
    fields = ("item_index", "timestamp", "rating")
    history = ordered.filter(pl.col("keep") & ~pl.col("future")).group_by("user_index", maintain_order=True).agg(
        [pl.col(f).alias(f"history_{f}") for f in fields]
    )
    future = ordered.filter(pl.col("future")).group_by("user_index", maintain_order=True).agg(
        [pl.col(f).alias(f"future_{f}") for f in fields]
    )
    out = history.join(future, on="user_index", how="left", maintain_order="left")
    # Users with a single event have no future window: empty lists, not nulls.
    return out.with_columns(
        [pl.col(f"future_{f}").fill_null(pl.lit([], dtype=out.schema[f"future_{f}"])) for f in fields]
    ).sort("user_index")
