"""Simple user representations to compare learned embeddings against.

- `als_user_factors`: implicit-feedback matrix factorisation (implicit's ALS) of the
  user x item matrix of HISTORY events (future windows are evaluation labels, never inputs).
- `handcrafted_profile`: no learning at all, a few readable statistics of the history.
- `random_vectors`: the floor; a probe on them measures what the labels alone allow.

All return float32 arrays [U, d] whose row u is the user with user_index u. Everything is
vectorised over events (numpy / scipy.sparse); there is no Python loop over users.

The small readers here (`load_sequences`, `list_column`, `user_item_matrix`,
`item_category_matrix`) are shared with `userlens.evaluate`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from userlens.config import BaselineParams

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400.0


# --------------------------------------------------------------------------- readers


def load_sequences(sequences_dir: str | Path) -> pl.DataFrame:
    """sequences.parquet sorted by user_index; checks that user_index is exactly 0..U-1."""
    frame = pl.read_parquet(Path(sequences_dir) / "sequences.parquet").sort("user_index")
    index = frame["user_index"].to_numpy()
    if not np.array_equal(index, np.arange(index.size)):
        raise ValueError(f"{sequences_dir}: user_index must be exactly 0..{index.size - 1}")
    return frame


def load_manifest(sequences_dir: str | Path) -> dict:
    path = Path(sequences_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def n_items_of(sequences_dir: str | Path) -> int:
    items = pl.read_parquet(Path(sequences_dir) / "items.parquet", columns=["item_index"])
    return int(items["item_index"].max()) + 1 if items.height else 0


def list_column(frame: pl.DataFrame, name: str, dtype: np.dtype | type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (user of each value, flat values), users in row order.

    Null entries inside the lists are kept (as NaN when dtype is a float type); a null list
    counts as empty. Works on the Arrow offsets, so no per-row Python work.
    """
    array = frame[name].to_arrow()
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = array.flatten()  # respects slicing offsets; null lists contribute nothing
    if dtype is not None and np.issubdtype(np.dtype(dtype), np.floating):
        values = pc.cast(values, pa.float64())
    flat = values.to_numpy(zero_copy_only=False)  # nulls -> NaN for floats
    if dtype is not None:
        flat = flat.astype(dtype, copy=False)
    users = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
    return users, flat


def user_item_matrix(frame: pl.DataFrame, n_items: int, window: str = "history") -> sp.csr_matrix:
    """[U, I] event counts of one window ("history" or "future"), float32 CSR."""
    if window not in ("history", "future"):
        raise ValueError(f"window must be 'history' or 'future', got {window!r}")
    users, items = list_column(frame, f"{window}_item_index", np.int64)
    counts = sp.csr_matrix(
        (np.ones(users.size, np.float32), (users, items)), shape=(frame.height, n_items), dtype=np.float32
    )
    counts.sum_duplicates()
    return counts


def item_category_matrix(sequences_dir: str | Path, n_categories: int | None = None) -> sp.csr_matrix:
    """[I, C] 0/1 matrix: item i has category c (items.parquet category_index)."""
    items = pl.read_parquet(Path(sequences_dir) / "items.parquet", columns=["item_index", "category_index"])
    items = items.sort("item_index")
    n_items = int(items["item_index"].max()) + 1 if items.height else 0
    rows, cats = list_column(items, "category_index", np.int64)
    rows = items["item_index"].to_numpy().astype(np.int64)[rows]
    if n_categories is None:
        n_categories = len(load_manifest(sequences_dir).get("categories") or []) or (
            int(cats.max()) + 1 if cats.size else 0
        )
    matrix = sp.csr_matrix(
        (np.ones(rows.size, np.float32), (rows, cats)), shape=(n_items, n_categories), dtype=np.float32
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0  # a category listed twice still counts once
    return matrix


def rating_scale(sequences_dir: str | Path, observed: np.ndarray) -> tuple[float, float] | None:
    """[min, max] from the manifest, else from the observed (non-NaN) ratings; None if none."""
    declared = load_manifest(sequences_dir).get("rating_scale")
    if declared:
        return float(declared[0]), float(declared[1])
    observed = observed[~np.isnan(observed)]
    if not observed.size:
        return None
    return float(observed.min()), float(observed.max())


# --------------------------------------------------------------------------- baselines


def als_factors(sequences_dir: str | Path, params: BaselineParams, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(user factors [U, f], item factors [I, f]) of implicit's CPU ALS on history counts.

    Confidence = the number of history events of (user, item), alpha 1. A fixed random_state
    makes it deterministic: each user's (item's) solve is independent of the others, so the
    factors are the same for any number of threads (checked bit for bit). Users without
    history get zero vectors.
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    began = time.perf_counter()
    frame = load_sequences(sequences_dir)
    counts = user_item_matrix(frame, n_items_of(sequences_dir), "history")
    with threadpool_limits(1, "blas"):  # implicit warns (and slows down) with a multithreaded BLAS
        model = AlternatingLeastSquares(
            factors=params.als_factors,
            regularization=params.als_regularization,
            iterations=params.als_iterations,
            random_state=seed,
            num_threads=0,  # all cores; results do not depend on it
            calculate_training_loss=False,
        )
        model.fit(counts, show_progress=False)
    users = np.ascontiguousarray(model.user_factors, dtype=np.float32)
    items = np.ascontiguousarray(model.item_factors, dtype=np.float32)
    log.info(
        "ALS: %d users x %d items, %d factors, %d iterations in %.2fs",
        counts.shape[0], counts.shape[1], params.als_factors, params.als_iterations, time.perf_counter() - began,
    )  # fmt: skip
    return users, items


def als_user_factors(sequences_dir: str | Path, params: BaselineParams, seed: int = 0) -> np.ndarray:
    """User factors [U, als_factors] of ALS on the history matrix (see `als_factors`)."""
    return als_factors(sequences_dir, params, seed)[0]


def handcrafted_profile(sequences_dir: str | Path) -> np.ndarray:
    """[U, C + 5] statistics of each user's history, no learning:

    - columns 0..C-1: category histogram (every category of every history item counted,
      normalised to sum 1; zeros without history),
    - C: mean rating scaled to [0, 1] by the rating scale (0.5 where no rated events),
    - C+1: rating standard deviation on the same scale (0 with fewer than two ratings),
    - C+2: log(1 + number of history events),
    - C+3: span of the history in days (last - first timestamp),
    - C+4: mean of log(1 + gap in seconds) between consecutive events (0 with < 2 events).
    """
    frame = load_sequences(sequences_dir)
    n_users = frame.height
    item_cats = item_category_matrix(sequences_dir)
    history = user_item_matrix(frame, item_cats.shape[0], "history")

    cat_counts = np.asarray((history @ item_cats).todense(), dtype=np.float64)
    totals = cat_counts.sum(axis=1, keepdims=True)
    histogram = np.divide(cat_counts, totals, out=np.zeros_like(cat_counts), where=totals > 0)

    users, ratings = list_column(frame, "history_rating", np.float64)
    rated = ~np.isnan(ratings)
    n_rated = np.bincount(users[rated], minlength=n_users)
    scale = rating_scale(sequences_dir, ratings)
    mean_rating = np.full(n_users, 0.5)
    std_rating = np.zeros(n_users)
    if scale is not None and rated.any():
        low, high = scale
        width = high - low if high > low else 1.0
        scaled = (ratings[rated] - low) / width
        total = np.bincount(users[rated], weights=scaled, minlength=n_users)
        squares = np.bincount(users[rated], weights=scaled**2, minlength=n_users)
        has = n_rated > 0
        mean_rating[has] = total[has] / n_rated[has]
        variance = np.zeros(n_users)
        variance[has] = squares[has] / n_rated[has] - mean_rating[has] ** 2
        std_rating = np.sqrt(np.clip(variance, 0.0, None))

    ts_users, stamps = list_column(frame, "history_timestamp", np.int64)
    n_events = np.bincount(ts_users, minlength=n_users)
    ends = np.cumsum(n_events)
    starts = ends - n_events
    has = n_events > 0
    span_days = np.zeros(n_users)
    if stamps.size:
        # Lists are oldest first (the contract), but min/max is as cheap and order-proof.
        first = np.minimum.reduceat(stamps, starts[has]) if has.any() else np.zeros(0)
        last = np.maximum.reduceat(stamps, starts[has]) if has.any() else np.zeros(0)
        span_days[has] = (last - first) / SECONDS_PER_DAY
    same_user = ts_users[1:] == ts_users[:-1]
    gaps = np.log1p(np.clip(np.diff(stamps), 0, None).astype(np.float64))[same_user]
    gap_users = ts_users[1:][same_user]
    gap_sum = np.bincount(gap_users, weights=gaps, minlength=n_users)
    gap_count = np.bincount(gap_users, minlength=n_users)
    mean_log_gap = np.divide(gap_sum, gap_count, out=np.zeros(n_users), where=gap_count > 0)

    extra = np.stack([mean_rating, std_rating, np.log1p(n_events), span_days, mean_log_gap], axis=1)
    return np.concatenate([histogram, extra], axis=1).astype(np.float32)


def random_vectors(n_users: int, dim: int, seed: int = 0) -> np.ndarray:
    """[n_users, dim] standard normal vectors, float32, reproducible for a seed."""
    return np.random.default_rng(seed).standard_normal((n_users, dim), dtype=np.float32)
