"""The synthetic generator: deterministic, valid generic-format files, and detectable planted structure."""

from __future__ import annotations

from calendar import timegm

import numpy as np
import polars as pl
import pytest

from userlens.config import SyntheticParams
from userlens.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA
from userlens.sources import synthetic
from userlens.sources.synthetic import generate_synthetic

TABLES = ("interactions", "items", "users", "truth")
# Several chunks, so every test also exercises chunked generation.
PARAMS = SyntheticParams(seed=3, n_users=1500, n_items=600, n_categories=8, chunk_users=400)


def _generate(tmp_path_factory: pytest.TempPathFactory, params: SyntheticParams) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    summary = generate_synthetic(params, out, progress=False)
    return summary, {name: pl.read_parquet(out / f"{name}.parquet") for name in TABLES}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    return _generate(tmp_path_factory, PARAMS)


def _with_primary(tables: dict) -> pl.DataFrame:
    primary = tables["items"].select("item_id", pl.col("categories").list.first().alias("category"))
    return tables["interactions"].join(primary, on="item_id", how="left")


def _top_category(events: pl.DataFrame) -> pl.DataFrame:
    """Each user's most frequent category (ties broken by name, so the result is stable)."""
    counts = events.group_by("user_id", "category").len()
    return (
        counts.sort(["user_id", "len", "category"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .first()
        .select("user_id", "category")
    )


def _history_future_agreement(tables: dict) -> float:
    """Share of users whose top category in the first 80% of events is the top one of the last 20%."""
    events = _with_primary(tables).sort("user_id", "timestamp")
    events = events.with_columns(
        (pl.int_range(pl.len()).over("user_id") < (0.8 * pl.len().over("user_id")).floor()).alias("history")
    )
    history = _top_category(events.filter(pl.col("history")))
    future = _top_category(events.filter(~pl.col("history")))
    joined = history.join(future, on="user_id", suffix="_future")
    assert joined.height == tables["users"].height
    return (joined["category"] == joined["category_future"]).mean()


def test_same_seed_same_tables_other_seed_differs(tmp_path_factory, generated):
    _, again = _generate(tmp_path_factory, PARAMS)
    for name in TABLES:
        assert generated[1][name].equals(again[name]), name
    _, other = _generate(tmp_path_factory, PARAMS.model_copy(update={"seed": 4}))
    assert not generated[1]["interactions"].equals(other["interactions"])
    assert not generated[1]["items"].equals(other["items"])


def test_files_have_the_generic_schema(generated):
    _, tables = generated
    assert dict(tables["interactions"].schema) == INTERACTIONS_SCHEMA
    assert dict(tables["items"].schema) == ITEMS_SCHEMA
    assert dict(tables["users"].schema) == {
        "user_id": pl.String, "age": pl.Int32, "gender": pl.String, "occupation": pl.String
    }  # fmt: skip
    truth = tables["truth"].schema
    assert [truth["user_id"], truth["dominant_category"], truth["rating_bias"]] == [
        pl.String,
        pl.String,
        pl.Float32,
    ]
    assert tables["interactions"]["user_id"][0] == "u0000000"
    assert tables["items"]["item_id"].str.len_chars().unique().to_list() == [6]  # "i" + 5 digits


def test_tables_are_valid_input(generated):
    summary, tables = generated
    events, items, users = tables["interactions"], tables["items"], tables["users"]
    assert summary["n_interactions"] == events.height
    assert (summary["n_users"], summary["n_items"], summary["n_categories"]) == (1500, 600, 8)

    assert events["item_id"].is_in(items["item_id"].implode()).all()
    assert events.is_duplicated().sum() == 0
    # Strictly increasing timestamps per user: no two events of a user share a second.
    assert events.select(pl.col("timestamp").diff().over("user_id").min())[0, 0] > 0
    t0 = timegm(PARAMS.start.timetuple())
    assert events["timestamp"].min() >= t0 and events["timestamp"].max() < t0 + PARAMS.days * 86_400
    assert set(events["rating"].unique().to_list()) <= {1.0, 2.0, 3.0, 4.0, 5.0}

    per_user = events.group_by("user_id").len()["len"]
    assert per_user.min() >= 5
    assert abs(per_user.mean() / PARAMS.mean_events_per_user - 1) < 0.1
    assert per_user.max() > 4 * PARAMS.mean_events_per_user  # heavy tail

    counts = items["categories"].list.len()
    assert counts.min() >= 1 and counts.max() <= 3
    assert items["categories"].list.eval(pl.element().is_duplicated().any()).explode().not_().all()
    # The title names the primary category, which is the first of the list.
    assert (items["title"].str.extract(r"\((.*)\)$") == items["categories"].list.first()).all()
    assert items["categories"].list.first().n_unique() == 8

    assert users["user_id"].sort().equals(events["user_id"].unique().sort())
    assert set(users["gender"].unique()) <= {"F", "M"}


def test_history_predicts_future_category(generated):
    agreement = _history_future_agreement(generated[1])
    assert agreement > 3 / PARAMS.n_categories


def test_gender_predictable_from_dominant_category(generated):
    _, tables = generated
    users = (
        tables["users"]
        .join(_top_category(_with_primary(tables)), on="user_id")
        .with_columns((pl.col("gender") == "F").alias("female"))
    )
    fit, test = users[: users.height // 2], users[users.height // 2 :]
    p_female = fit.group_by("category").agg(pl.col("female").mean().alias("p"))
    predicted = test.join(p_female, on="category", how="left").with_columns(pl.col("p").fill_null(0.5) > 0.5)
    accuracy = (predicted["p"] == predicted["female"]).mean()
    base_rate = max(test["female"].mean(), 1 - test["female"].mean())
    assert accuracy > base_rate + 0.05


def test_mean_rating_tracks_rating_bias(generated):
    _, tables = generated
    means = tables["interactions"].group_by("user_id").agg(pl.col("rating").mean())
    joined = means.join(tables["truth"], on="user_id")
    assert np.corrcoef(joined["rating"], joined["rating_bias"])[0, 1] > 0.3


def test_chunks_add_up_to_distinct_users(tmp_path_factory):
    params = SyntheticParams(seed=1, n_users=303, n_items=50, chunk_users=100, mean_events_per_user=8)
    summary, tables = _generate(tmp_path_factory, params)
    assert summary["n_users"] == 303
    for name in ("users", "truth"):
        assert tables[name].height == 303 and tables[name]["user_id"].n_unique() == 303
    assert tables["interactions"]["user_id"].n_unique() == 303


def test_drift_weakens_history_future_agreement(tmp_path_factory):
    base = PARAMS.model_copy(update={"n_users": 800})
    _, steady = _generate(tmp_path_factory, base.model_copy(update={"drift": 0.0}))
    _, drifting = _generate(tmp_path_factory, base.model_copy(update={"drift": 1.0}))
    assert _history_future_agreement(steady) > _history_future_agreement(drifting) + 0.1


def test_crash_leaves_no_partial_files(tmp_path, monkeypatch):
    real_chunk = synthetic._World.user_chunk

    def failing_chunk(self, chunk, first, stop):
        if chunk == 1:
            raise RuntimeError("disk full")
        return real_chunk(self, chunk, first, stop)

    monkeypatch.setattr(synthetic._World, "user_chunk", failing_chunk)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_synthetic(PARAMS.model_copy(update={"n_users": 900}), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ratings_higher_in_the_users_dominant_category(generated):
    _, tables = generated
    events = _with_primary(tables).join(tables["truth"].select("user_id", "dominant_category"), on="user_id")
    liked = events.filter(pl.col("category") == pl.col("dominant_category"))["rating"].mean()
    other = events.filter(pl.col("category") != pl.col("dominant_category"))["rating"].mean()
    assert liked > other + 0.2


def test_more_categories_than_names_or_items(tmp_path):
    params = SyntheticParams(n_users=50, n_items=30, n_categories=40, chunk_users=20)
    summary = generate_synthetic(params, tmp_path, progress=False)
    items = pl.read_parquet(tmp_path / "items.parquet")
    names = items["categories"].explode().unique()
    assert summary["n_categories"] == 30  # every category needs an item
    assert names.n_unique() == 30 and "Action 2" in names.to_list()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.parquet" for name in sorted(TABLES)]
