"""Per-user chronological sequences, split into history and a held-out future window.

Vectorised (no Python loop over users): one stable sort puts each user's events together in
time order, so per-user positions and list columns come from offsets with numpy and Arrow.
Ties in time keep the source file's row order, so the same input gives the same sequences.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from userlens.config import SequenceParams

FIELDS = ("item_index", "timestamp", "rating")


def dense_codes(ids: pl.Series, vocabulary: pl.Series) -> pl.Series:
    """Each id's position in `vocabulary` (unique strings), via an Enum cast: no join needed."""
    return ids.cast(pl.Enum(vocabulary)).to_physical().cast(pl.Int32)


def split_sequences(events: pl.DataFrame, params: SequenceParams) -> pl.DataFrame:
    """events (user_index 0..U-1, item_index, timestamp, rating) -> one row per user with list
    columns history_<field> and future_<field>.

    The future window is the last `holdout_fraction` of a user's events (rounded, at least one,
    never all of them) or the last `holdout_last_n`; the history keeps the `max_length` most
    recent events before that window. A user with a single event has an empty future.
    """
    ordered = events.sort(["user_index", "timestamp"], maintain_order=True)
    user = ordered["user_index"].to_numpy()
    counts = np.bincount(user) if user.size else np.zeros(0, np.int64)
    if params.holdout == "fraction":
        n_future = np.maximum(np.floor(counts * params.holdout_fraction + 0.5), 1).astype(np.int64)
    else:
        n_future = np.full(counts.size, params.holdout_last_n, np.int64)
    n_future = np.minimum(n_future, counts - 1)  # every user keeps at least one history event
    cut = counts - n_future  # position of the first future event
    position = np.arange(user.size) - (np.cumsum(counts) - counts)[user]
    future = position >= cut[user]
    history = ~future & (position >= (cut - params.max_length)[user])

    columns: dict[str, pa.Array] = {"user_index": pa.array(np.arange(counts.size, dtype=np.int32))}
    for window, mask, lengths in (
        ("history", history, np.minimum(cut, params.max_length)),
        ("future", future, n_future),
    ):
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        selected = ordered.filter(pl.Series(mask))
        for field in FIELDS:
            values = selected[field].to_arrow()
            columns[f"{window}_{field}"] = pa.LargeListArray.from_arrays(offsets, values)
    return pl.from_arrow(pa.table(columns))
