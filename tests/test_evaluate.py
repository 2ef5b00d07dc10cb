"""Downstream evaluation: metrics, splits, task labels, the protocol and the report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from userlens.baselines import als_factors, handcrafted_profile, random_vectors
from userlens.config import BaselineParams, EvaluateParams
from userlens.evaluate import (
    accuracy,
    build_tasks,
    evaluate_methods,
    fraction_key,
    hit_rate_at_k,
    make_split,
    ndcg_at_k,
    target_ranks,
)
from userlens.probes import fit_predict, fit_predict_many
from userlens.report import GEOMETRY, paired_comparison, task_results, write_report

DAY = 86_400
CATEGORIES = ["A", "B", "C"]
ITEM_CATEGORIES = [[0], [1], [0, 2], [2]]  # item 2 is both A and C

# (history items, history ratings, future items, future ratings) per user; history one day apart.
TINY_USERS = [
    ([0, 1], [4.0, 2.0], [1, 3], [5.0, 3.0]),  # future B + C: a tie -> B (1); mean 4 > median
    ([0], [5.0], [2, 3], [2.0, None]),  # future A, C, C -> C (2); mean 2 (one rated)
    ([2, 3, 3], [None, None, None], [], []),  # no future -> -1 everywhere
    ([0, 2], [1.0, 1.0], [0], [None]),  # future A -> 0; no rated future -> -1; only a repeat -> no next item
    ([1], [3.0], [3], [3.0]),  # future C -> 2; mean 3 = median -> 0
]


def write_sequences(
    folder: Path,
    users: list = TINY_USERS,
    item_categories: list = ITEM_CATEGORIES,
    categories: list = CATEGORIES,
    attributes: dict | None = None,
    rating_scale: list | None = (1.0, 5.0),
) -> Path:
    """A data/sequences/ folder following the contract, from per-user lists."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for u, (h_items, h_ratings, f_items, f_ratings) in enumerate(users):
        h_ts = [1_600_000_000 + DAY * i for i in range(len(h_items))]
        f_ts = [h_ts[-1] + DAY * (i + 1) for i in range(len(f_items))]
        rows.append(
            {
                "user_index": u,
                "history_item_index": h_items,
                "history_timestamp": h_ts,
                "history_rating": h_ratings,
                "future_item_index": f_items,
                "future_timestamp": f_ts,
                "future_rating": f_ratings,
            }
        )
    schema = {
        "user_index": pl.Int32,
        "history_item_index": pl.List(pl.Int32),
        "history_timestamp": pl.List(pl.Int64),
        "history_rating": pl.List(pl.Float32),
        "future_item_index": pl.List(pl.Int32),
        "future_timestamp": pl.List(pl.Int64),
        "future_rating": pl.List(pl.Float32),
    }
    pl.DataFrame(rows, schema=schema).write_parquet(folder / "sequences.parquet")
    pl.DataFrame(
        {
            "item_index": list(range(len(item_categories))),
            "item_id": [f"i{i}" for i in range(len(item_categories))],
            "title": [f"Item {i}" for i in range(len(item_categories))],
            "categories": [[categories[c] for c in cats] for cats in item_categories],
            "category_index": item_categories,
        },
        schema_overrides={"item_index": pl.Int32, "category_index": pl.List(pl.Int32)},
    ).write_parquet(folder / "items.parquet")
    users_table = {
        "user_index": pl.Series(range(len(users)), dtype=pl.Int32),
        "user_id": [f"u{u}" for u in range(len(users))],
        **(attributes or {}),
        "n_history": pl.Series([len(u[0]) for u in users], dtype=pl.UInt32),
        "n_future": pl.Series([len(u[2]) for u in users], dtype=pl.UInt32),
    }
    pl.DataFrame(users_table).write_parquet(folder / "users.parquet")
    manifest = {"categories": categories, "rating_scale": list(rating_scale) if rating_scale else None}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    attributes = {
        "age": pl.Series([20, 30, 40, 50, None], dtype=pl.Int32),
        "gender": ["F", "M", "M", "F", None],
    }
    return write_sequences(tmp_path / "sequences", attributes=attributes)


# --------------------------------------------------------------------------- metrics


def test_metrics_on_hand_made_cases():
    assert hit_rate_at_k(np.array([0, 3, 12]), 10) == pytest.approx(2 / 3)
    assert ndcg_at_k(np.array([0, 3, 12]), 10) == pytest.approx((1 + 1 / math.log2(5) + 0) / 3)
    assert ndcg_at_k(np.array([9, 10]), 10) == pytest.approx((1 / math.log2(11)) / 2)
    assert hit_rate_at_k(np.array([9, 10]), 10) == 0.5
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    assert math.isnan(accuracy(np.array([]), np.array([])))


def test_target_ranks_count_ties_against_the_target():
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ranks = target_ranks(scores, np.array([1, 0, 2]))
    assert ranks.tolist() == [1, 0, 3]  # a tie costs one place; a constant scorer gets the worst rank
    masked = scores[1:2].copy()
    masked[0, 0] = -np.inf  # an excluded item drops below everything
    assert target_ranks(masked, np.array([1])).tolist() == [0]


# --------------------------------------------------------------------------- splits


def _labels(n: int = 600, n_classes: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = rng.choice(n_classes, size=n, p=np.linspace(1, 3, n_classes) / np.linspace(1, 3, n_classes).sum())
    labels[rng.random(n) < 0.2] = -1  # unlabelled users
    return labels


def test_split_is_disjoint_nested_and_never_uses_unlabelled_users():
    labels = _labels()
    fractions = (0.01, 0.05, 0.1, 0.25, 1.0)
    for seed in range(4):
        split = make_split(labels, seed, 0.2, fractions, "task")
        assert not np.intersect1d(split.train, split.test).size
        assert np.all(labels[split.train] >= 0) and np.all(labels[split.test] >= 0)
        assert split.train.size + split.test.size == np.sum(labels >= 0)
        assert split.test.size == round(0.2 * np.sum(labels >= 0))
        counts = [split.labelled[f].size for f in fractions]
        assert counts == sorted(counts) and counts[-1] == split.train.size
        for small, large in zip(fractions, fractions[1:], strict=False):
            assert np.isin(split.labelled[small], split.labelled[large]).all()  # nested
        for f in fractions:
            labelled = split.labelled[f]
            assert np.isin(labelled, split.train).all()
            assert not np.intersect1d(labelled, split.test).size
            assert labelled.size >= round(f * split.train.size)
            assert np.bincount(labels[labelled], minlength=5).min() >= 2  # two per class
        # stratified: every class is in the test set about in proportion
        share = np.bincount(labels[split.test], minlength=5) / split.test.size
        overall = np.bincount(labels[labels >= 0], minlength=5) / np.sum(labels >= 0)
        assert np.abs(share - overall).max() < 0.02


def test_split_is_reproducible_per_seed_and_task():
    labels = _labels()
    a = make_split(labels, 3, 0.2, (0.1, 1.0), "task")
    b = make_split(labels, 3, 0.2, (0.1, 1.0), "task")
    c = make_split(labels, 4, 0.2, (0.1, 1.0), "task")
    d = make_split(labels, 3, 0.2, (0.1, 1.0), "other task")
    assert np.array_equal(a.test, b.test) and np.array_equal(a.labelled[0.1], b.labelled[0.1])
    assert not np.array_equal(a.test, c.test)
    assert not np.array_equal(a.test, d.test)


def test_split_keeps_singleton_classes_in_train_and_records_the_minimum():
    labels = np.array([0] * 50 + [1] * 50 + [2] + [-1] * 10)
    split = make_split(labels, 0, 0.2, (0.01,), "t")
    assert 100 in split.train  # the only user of class 2 is never a test user
    assert split.labelled[0.01].size == 5  # 2 + 2 + 1, not round(0.01 * 81) = 1
    unstratified = make_split(np.arange(40), 0, 0.25, (0.5,), "t", stratify=False)
    assert unstratified.test.size == 10 and unstratified.labelled[0.5].size == 15


# --------------------------------------------------------------------------- tasks


def test_tasks_on_a_hand_made_folder(tiny: Path):
    tasks = build_tasks(tiny)
    assert list(tasks) == ["favourite_category", "age_bucket", "gender", "rating_tendency", "next_item"]
    assert tasks["favourite_category"].labels.tolist() == [1, 2, -1, 0, 2]  # tie B/C -> B; no future -> -1
    assert tasks["favourite_category"].n_classes == 3
    assert tasks["favourite_category"].class_names == ("A", "B", "C")
    assert tasks["rating_tendency"].labels.tolist() == [1, 0, -1, -1, 0]  # means 4, 2, -, -, 3; median 3
    assert tasks["age_bucket"].labels.tolist() == [0, 1, 2, 3, -1]
    assert tasks["age_bucket"].class_names == ("<25", "25-34", "35-44", "45+")
    assert tasks["gender"].labels.tolist() == [0, 1, 1, 0, -1]
    assert tasks["gender"].class_names == ("F", "M")
    # next item: first future item not in the history; user 3's only future item is a repeat
    next_item = tasks["next_item"]
    assert next_item.kind == "ranking" and next_item.n_classes == 4
    assert next_item.labels.tolist() == [3, 2, -1, -1, 3]
    assert next_item.exclude.toarray().astype(int).tolist() == [
        [1, 1, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 1, 1],
        [1, 0, 1, 0],
        [0, 1, 0, 0],
    ]
    assert next_item.targets.toarray().tolist()[0] == [0, 0, 0, 1]  # item 1 is in the history


def test_tasks_follow_the_data_that_exists(tmp_path: Path):
    no_ratings = [(h, [None] * len(h), f, [None] * len(f)) for h, _, f, _ in TINY_USERS]
    folder = write_sequences(tmp_path / "bare", users=no_ratings, rating_scale=None)
    assert list(build_tasks(folder)) == ["favourite_category", "next_item"]
    # ML-1M style: age is a bucket code, age_bucket its name; classes ordered by the code
    attributes = {
        "age": pl.Series([1, 18, 25, 56, 18], dtype=pl.Int32),
        "age_bucket": ["Under 18", "18-24", "25-34", "56+", "18-24"],
        "gender": ["M", "M", "M", "M", "M"],  # a single class: no gender task
    }
    tasks = build_tasks(write_sequences(tmp_path / "ml1m", attributes=attributes))
    assert tasks["age_bucket"].class_names == ("Under 18", "18-24", "25-34", "56+")
    assert tasks["age_bucket"].labels.tolist() == [0, 1, 2, 3, 1]
    assert "gender" not in tasks


def test_evaluate_rejects_bad_inputs(tiny: Path):
    tasks = build_tasks(tiny)
    params = EvaluateParams(seeds=1, label_fractions=(1.0,))
    with pytest.raises(ValueError, match="expected shape"):
        evaluate_methods({"bad": np.zeros((4, 3))}, tasks, params, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_methods({"bad": np.full((5, 3), np.nan)}, tasks, params, progress=False)
    with pytest.raises(ValueError, match="no user embeddings"):
        evaluate_methods({"a": np.zeros((5, 3))}, tasks, params, item_vectors={"b": np.zeros((4, 3))}, progress=False)


def test_batched_mlp_matches_one_at_a_time():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    xs = [rng.standard_normal((120, d)).astype(np.float32) + 2 * np.eye(d, dtype=np.float32)[y] for d in (4, 9)]
    tests = [x[:40] for x in xs]
    together = fit_predict_many("mlp", [x[40:] for x in xs], y[40:], tests, seed=1)
    for x, x_test, joint in zip(xs, tests, together, strict=True):
        alone = fit_predict("mlp", x[40:], y[40:], x_test, seed=1)
        assert np.mean(alone == joint) >= 0.97  # the same model, up to float rounding
    assert accuracy(y[:40], together[0]) > 0.6
    assert fit_predict("logreg", xs[0][:5], np.full(5, 2), xs[0][:3]).tolist() == [2, 2, 2]


# --------------------------------------------------------------------------- on small_sequences


@pytest.fixture(scope="module")
def evaluated(small_sequences: Path):
    tasks = build_tasks(small_sequences)
    n_users = tasks["favourite_category"].labels.size
    als_users, als_items = als_factors(small_sequences, BaselineParams(als_factors=32), seed=0)
    embeddings = {
        "handcrafted": handcrafted_profile(small_sequences),
        "als": als_users,
        "random": random_vectors(n_users, 32, seed=0),
    }
    params = EvaluateParams(seeds=3, label_fractions=(0.1, 1.0))
    began = time.perf_counter()
    results = evaluate_methods(embeddings, tasks, params, item_vectors={"als": als_items}, progress=False)
    return tasks, results, time.perf_counter() - began


def test_taste_breadth_by_hand():
    """Future category entropy above the median = broad (1); too few future events = unlabelled."""
    import scipy.sparse as sp

    from userlens.evaluate import _taste_breadth_task

    item_cats = sp.csr_matrix(np.eye(3, dtype=np.float32))  # item i has category i
    future = sp.csr_matrix(np.array([
        [5, 0, 0],  # focused: entropy 0
        [2, 2, 2],  # broad: log 3
        [4, 1, 0],  # in between
        [1, 1, 0],  # two events: unlabelled
    ], dtype=np.float32))  # fmt: skip
    task = _taste_breadth_task(future, item_cats)
    assert task.labels.tolist() == [0, 1, 0, -1]  # median of (0, 0.50, 1.10) nats is 0.50: only above it is broad
    assert _taste_breadth_task(future[3:], item_cats) is None  # nobody labelled: no task


def test_planted_structure_is_found_and_random_stays_at_chance(evaluated):
    tasks, results, seconds = evaluated
    assert set(tasks) == {"favourite_category", "age_bucket", "gender", "rating_tendency", "taste_breadth", "next_item"}
    fav = results["favourite_category"]
    full = fraction_key(1.0)
    handcrafted, random = fav["handcrafted"]["logreg"][full]["mean"], fav["random"]["logreg"][full]["mean"]
    chance = 1 / 8
    assert handcrafted > 0.35 > chance
    assert handcrafted > random + 0.15
    assert random < 0.3  # chance 1/8, majority class about 0.2
    assert fav["als"]["logreg"][full]["mean"] > random
    # rating tendency: the profile carries the user's rating bias
    assert results["rating_tendency"]["handcrafted"]["logreg"][full]["mean"] > 0.65
    entry = fav["handcrafted"]["mlp"][fraction_key(0.1)]
    assert len(entry["per_seed"]) == 3 and entry["n_labelled"] >= 16 and entry["n_test"] == 80
    assert fav["handcrafted"]["logreg"][full]["n_labelled"] == 320
    nxt = results["next_item"]
    assert nxt["als"]["scorer"] == "item_vectors" and nxt["random"]["scorer"] == "probe"
    assert set(nxt["als"]) >= {"hr@10", "ndcg@10", "n_train", "n_test"}
    assert 0 <= nxt["als"]["ndcg@10"]["mean"] <= nxt["als"]["hr@10"]["mean"] <= 1
    assert seconds < 60


def test_results_are_json_and_reproducible(evaluated, small_sequences: Path):
    tasks, results, _ = evaluated
    json.loads(json.dumps(results, allow_nan=False))
    again = evaluate_methods(
        {"random": random_vectors(tasks["gender"].labels.size, 32, seed=0)},
        {"gender": tasks["gender"]},
        EvaluateParams(seeds=3, label_fractions=(0.1, 1.0)),
        progress=False,
    )
    assert again["gender"]["random"] == results["gender"]["random"]  # same splits, same probes


def test_paired_comparison(evaluated):
    _, results, _ = evaluated
    compared = paired_comparison(results, "handcrafted", "random")
    assert set(compared) == set(results)
    cell = compared["favourite_category"][fraction_key(1.0)]
    a = results["favourite_category"]["handcrafted"]["logreg"][fraction_key(1.0)]
    b = results["favourite_category"]["random"]["logreg"][fraction_key(1.0)]
    assert cell["n_pairs"] == 3
    assert cell["mean_diff"] == pytest.approx(a["mean"] - b["mean"])
    assert cell["relative_gain"] == pytest.approx(a["mean"] / b["mean"] - 1)
    assert 0 <= cell["t_pvalue"] <= 1 and cell["wilcoxon_pvalue"] is None  # < 6 pairs
    assert set(compared["next_item"]) == {"hr@10", "ndcg@10"}
    assert paired_comparison(results, "handcrafted", "missing") == {}


def test_paired_comparison_statistics_by_hand():
    per_seed = {"a": [0.6, 0.7, 0.8, 0.65, 0.75, 0.7], "b": [0.5, 0.6, 0.65, 0.6, 0.6, 0.62]}
    results = {"t": {m: {"logreg": {"1.0": {"per_seed": v}}} for m, v in per_seed.items()}}
    cell = paired_comparison(results, "a", "b")["t"]["1.0"]
    from scipy import stats

    assert cell["t_pvalue"] == pytest.approx(stats.ttest_rel(per_seed["a"], per_seed["b"]).pvalue)
    assert cell["wilcoxon_pvalue"] == pytest.approx(stats.wilcoxon(per_seed["a"], per_seed["b"]).pvalue)
    same = paired_comparison({"t": {m: results["t"]["a"] for m in "ab"}}, "a", "b")["t"]["1.0"]
    assert same["mean_diff"] == 0 and same["t_pvalue"] == 1.0 and same["relative_gain"] == 0


def test_write_report(evaluated, tmp_path: Path):
    tasks, results, _ = evaluated
    paths = write_report(results, tmp_path / "report", reference="handcrafted", baseline="random", tasks=tasks)
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"metrics.json", "report.md", "label_curves.png"}
    assert json.loads(paths["metrics"].read_text()) == json.loads(json.dumps(results))
    report = paths["report"].read_text()
    assert "| method | 10% | 100% |" in report
    assert "### favourite_category · logreg" in report and "### gender · mlp" in report
    assert "Gain of handcrafted over random" in report
    assert "| method | scorer | HR@10 | NDCG@10 |" in report
    row = next(line for line in report.splitlines() if line.startswith("| handcrafted | 0."))
    assert " ± " in row
    assert paths["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the default reference and baseline are absent here: no gain tables, no error
    write_report(results, tmp_path / "plain")
    assert "Gain of" not in (tmp_path / "plain" / "report.md").read_text()


def test_report_shows_the_geometry_of_every_method_and_tasks_ignore_it(evaluated, small_sequences, tmp_path: Path):
    from userlens.evaluate import history_favourite_category
    from userlens.geometry import geometry, neighbour_taste

    tasks, results, _ = evaluated
    n_users = tasks["favourite_category"].labels.size
    embeddings = {"handcrafted": handcrafted_profile(small_sequences), "random": random_vectors(n_users, 32, seed=0)}
    favourite = history_favourite_category(small_sequences)
    with_geometry = {**results, GEOMETRY: {m: {**geometry(x), **neighbour_taste(x, favourite)}
                                           for m, x in embeddings.items()}}  # fmt: skip
    assert task_results(with_geometry) == results
    report = write_report(with_geometry, tmp_path, tasks=tasks)["report"].read_text()
    assert "## Geometry of the exported vectors" in report
    assert all(f"| {method} | " in report.split("## Geometry")[1] for method in embeddings)
    assert "## geometry" not in report  # not mistaken for a task


def test_geometry_tells_a_shared_direction_from_a_spread_and_neighbours_from_chance():
    from userlens.geometry import geometry, neighbour_taste

    rng = np.random.default_rng(0)
    taste = rng.integers(0, 4, 2000)
    spread = rng.normal(size=(2000, 16)) + np.eye(16)[taste] * 3  # users cluster by taste
    shared = spread * 0.01 + 5.0  # the same users along one big common direction
    a, b = geometry(spread), geometry(shared)
    assert a["effective_rank"] > 8 and a["random_pair_cosine"] < 0.3
    assert b["random_pair_cosine"] > 0.99 and a["first_direction_share"] < 0.5
    found = neighbour_taste(spread, taste, k=10)
    assert found["neighbour_same_favourite"] > 0.9 and 0.2 < found["random_same_favourite"] < 0.3
    assert found["lift"] > 3
    blind = neighbour_taste(rng.normal(size=(2000, 16)), taste, k=10)
    assert 0.6 < blind["lift"] < 1.4


# --------------------------------------------------------------------------- MovieLens-100K


def test_movielens_100k_full_protocol(tmp_path: Path):
    from conftest import build_sequences_project, ml100k_dir

    data = {"source": "movielens", "dataset": "ml-100k", "data_dir": str(ml100k_dir())}
    sequences = build_sequences_project(tmp_path / "ml100k", data=data) / "data" / "sequences"
    tasks = build_tasks(sequences)
    assert list(tasks) == ["favourite_category", "age_bucket", "gender", "rating_tendency", "taste_breadth",
                           "next_item"]  # fmt: skip
    assert tasks["gender"].labels.size == 943 and tasks["favourite_category"].n_classes == 19
    als_users, als_items = als_factors(sequences, BaselineParams(), seed=0)
    embeddings = {
        "handcrafted": handcrafted_profile(sequences),
        "als": als_users,
        "random": random_vectors(943, 64, seed=0),
    }
    began = time.perf_counter()
    results = evaluate_methods(embeddings, tasks, EvaluateParams(), item_vectors={"als": als_items}, progress=False)
    seconds = time.perf_counter() - began
    full = fraction_key(1.0)
    for task in ("favourite_category", "age_bucket", "gender", "rating_tendency"):
        assert results[task]["handcrafted"]["logreg"][full]["mean"] > results[task]["random"]["logreg"][full]["mean"]
    nxt = results["next_item"]
    assert nxt["als"]["hr@10"]["mean"] > nxt["random"]["hr@10"]["mean"]
    assert nxt["handcrafted"]["hr@10"]["mean"] > nxt["random"]["hr@10"]["mean"]
    assert seconds < 120  # about 15 s on 2 busy cores
