"""Baselines: ALS on history only, the handcrafted profile, random vectors."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from userlens.baselines import als_factors, als_user_factors, handcrafted_profile, random_vectors
from userlens.config import BaselineParams

PARAMS = BaselineParams(als_factors=16, als_iterations=5)


def test_handcrafted_profile_by_hand(tmp_path: Path):
    from test_evaluate import write_sequences

    profile = handcrafted_profile(write_sequences(tmp_path / "sequences"))
    assert profile.shape == (5, 3 + 5) and profile.dtype == np.float32
    # user 0: items 0 (A) and 1 (B), ratings 4 and 2 on 1..5, one day apart
    expected = [0.5, 0.5, 0.0, 0.5, 0.25, math.log(3), 1.0, math.log1p(86_400)]
    assert profile[0] == pytest.approx(expected, rel=1e-5)
    # user 2: items 2 (A, C), 3 (C), 3 (C) -> A 1, C 3; no ratings -> 0.5 and 0; two days
    assert profile[2] == pytest.approx([0.25, 0.0, 0.75, 0.5, 0.0, math.log(4), 2.0, math.log1p(86_400)], rel=1e-5)
    # user 4: a single event: no span, no gaps; rating 3 -> 0.5
    assert profile[4] == pytest.approx([0.0, 1.0, 0.0, 0.5, 0.0, math.log(2), 0.0, 0.0], rel=1e-5)


def test_handcrafted_profile_ignores_the_future(tmp_path: Path):
    from test_evaluate import TINY_USERS, write_sequences

    before = handcrafted_profile(write_sequences(tmp_path / "a"))
    changed = [(h, hr, [0, 0, 0], [1.0, 1.0, 1.0]) for h, hr, _, _ in TINY_USERS]
    after = handcrafted_profile(write_sequences(tmp_path / "b", users=changed))
    assert np.array_equal(before, after)


def test_als_gives_user_factors_and_is_deterministic(small_sequences: Path):
    users, items = als_factors(small_sequences, PARAMS, seed=0)
    n_users = pl.read_parquet(small_sequences / "sequences.parquet").height
    n_items = pl.read_parquet(small_sequences / "items.parquet").height
    assert users.shape == (n_users, 16) and items.shape == (n_items, 16)
    assert users.dtype == np.float32 and np.isfinite(users).all() and np.abs(users).sum() > 0
    assert np.array_equal(als_user_factors(small_sequences, PARAMS, seed=0), users)
    assert not np.array_equal(als_user_factors(small_sequences, PARAMS, seed=1), users)


def test_als_uses_history_only(small_sequences: Path, tmp_path: Path):
    copy = tmp_path / "sequences"
    shutil.copytree(small_sequences, copy)
    frame = pl.read_parquet(copy / "sequences.parquet")
    # Rewrite every future window: other items, other lengths, other ratings.
    future = [[int((i * 7 + u) % 300) for i in range(3 + u % 5)] for u in range(frame.height)]
    frame = frame.with_columns(
        pl.Series("future_item_index", future, dtype=pl.List(pl.Int32)),
        pl.Series("future_timestamp", [[2_000_000_000 + i for i in range(len(f))] for f in future],
                  dtype=pl.List(pl.Int64)),
        pl.Series("future_rating", [[1.0] * len(f) for f in future], dtype=pl.List(pl.Float32)),
    )  # fmt: skip
    frame.write_parquet(copy / "sequences.parquet")
    assert np.array_equal(als_user_factors(copy, PARAMS, seed=0), als_user_factors(small_sequences, PARAMS, seed=0))
    assert np.array_equal(handcrafted_profile(copy), handcrafted_profile(small_sequences))
    # ...while a change to one user's history does change the factors
    history = frame["history_item_index"].to_list()
    history[0] = [(i + 1) % 300 for i in history[0]]
    frame.with_columns(pl.Series("history_item_index", history, dtype=pl.List(pl.Int32))).write_parquet(
        copy / "sequences.parquet"
    )
    assert not np.array_equal(als_user_factors(copy, PARAMS, seed=0), als_user_factors(small_sequences, PARAMS, seed=0))


def test_random_vectors():
    a = random_vectors(10, 4, seed=3)
    assert a.shape == (10, 4) and a.dtype == np.float32
    assert np.array_equal(a, random_vectors(10, 4, seed=3))
    assert not np.array_equal(a, random_vectors(10, 4, seed=4))
