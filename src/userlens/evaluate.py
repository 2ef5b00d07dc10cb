"""Downstream evaluation of frozen user embeddings when only a few percent of users are labelled.

Tasks (`build_tasks`) come from data/sequences only. Inputs of every method are built from
the HISTORY; labels come from the FUTURE window or from user attributes, never from the
history, so a representation of the history cannot simply copy its label:

- favourite_category: the majority category of the user's future window; every category of
  every future item counts once per event; ties go to the lowest category index; users
  without future (or whose future items have no category) are unlabelled (-1).
- age_bucket: ML-1M's own age_bucket when users.parquet has it (classes ordered by age code),
  else the integer age in buckets <25, 25-34, 35-44, 45+. Missing age -> -1.
- gender: the distinct non-empty values of users.gender, sorted (ML: F, M). Missing -> -1.
- rating_tendency: 1 if the user's mean future rating is strictly above the median (over
  users) of mean future ratings, else 0; no rated future event -> -1.
- taste_breadth: 1 if the entropy of the future window's category distribution is above the
  median over users (an exploring user), else 0 (a focused one); users with fewer than 5
  future events -> -1. For data without user attributes (Ciao) the third taste task: it needs
  only item categories and asks how wide a user's taste is, not which category it is.
- next_item (kind "ranking"): the first item of the future window that is NOT in the user's
  history ("first new item"; on MovieLens, where a film is rated once, simply the first
  held-out item); users with no such item -> -1. Every item of the catalogue is scored and
  the user's history items are excluded from the ranking (never the target, which is not
  in the history by construction); the same rule for every method.

Attribute and rating tasks are declared only when the dataset has the data (and at least
two classes); favourite_category only when items have categories; next_item always.

Protocol (`evaluate_methods`): for each seed, the users with a label are split into train and
test (disjoint, `test_fraction`, stratified by class); for each label fraction f, a random f
of the train users (nested across fractions; at least two per class when the class has them,
so the actual count can exceed f; recorded as n_labelled) is labelled, each probe is fitted
on the frozen embeddings (standardised on the labelled set) and scored on the test users.
Probes: "logreg" (sklearn LogisticRegression, lbfgs, C=1) and "mlp" (64 ReLU units, a fixed
budget of full-batch AdamW steps in torch; the methods are trained side by side in one
batched model, which gives the same result as one at a time and saves most of the overhead).
Splits depend on (seed, task) only, so all methods see the same splits: comparisons are paired.

next_item uses a random (unstratified) user split. A method given `item_vectors` scores
u . v with no training; any other method gets a linear softmax probe (embedding -> item
logits, torch, a few full-batch Adam steps) trained on ALL train users, with each user's new
future items as a soft target (the first one alone is too little signal for ~1,700 classes:
the probe then falls below plain popularity), and is tested on the test users' first new item.

Metrics (`accuracy`, `hit_rate_at_k`, `ndcg_at_k`) use 0-based ranks: rank = number of items
scored above the target plus other items scored equal to it (ties count against the target,
so a constant scorer gets the worst rank, not the best).

Everything runs single-threaded (BLAS, OpenMP, torch) per (seed, task) unit; `n_jobs` runs
units in parallel processes with identical results. The probes themselves are in probes.py,
the comparison and the report in report.py.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import scipy.sparse as sp
from tqdm import tqdm

from userlens.baselines import (
    item_category_matrix,
    list_column,
    load_manifest,
    load_sequences,
    user_item_matrix,
)
from userlens.config import EvaluateParams
from userlens.probes import fit_predict_many, softmax_probe

log = logging.getLogger(__name__)

AGE_EDGES = (25, 35, 45)
AGE_NAMES = ("<25", "25-34", "35-44", "45+")
BREADTH_MIN_EVENTS = 5  # taste_breadth: future events a user needs to be labelled
SCORE_BLOCK = 2048  # test users scored at a time (bounds the [users, items] score matrix)


# --------------------------------------------------------------------------- metrics


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of positions where y_pred equals y_true (nan for empty input)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shapes differ: {y_true.shape} vs {y_pred.shape}")
    return float(np.mean(y_true == y_pred)) if y_true.size else float("nan")


def hit_rate_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of 0-based ranks below k."""
    ranks = np.asarray(ranks)
    return float(np.mean(ranks < k)) if ranks.size else float("nan")


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean of 1 / log2(rank + 2) where rank < k, else 0 (one relevant item per user)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not ranks.size:
        return float("nan")
    return float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)))


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target: items scored higher + other items scored equal."""
    true = scores[np.arange(len(targets)), targets][:, None]
    return (scores > true).sum(axis=1) + (scores == true).sum(axis=1) - 1


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True, eq=False)
class Task:
    name: str
    kind: Literal["classification", "ranking"]
    labels: np.ndarray  # [U] int64, -1 = no label
    n_classes: int
    description: str
    class_names: tuple[str, ...] = ()
    exclude: sp.csr_matrix | None = field(default=None, repr=False)  # ranking: [U, I] items not ranked
    targets: sp.csr_matrix | None = field(default=None, repr=False)  # ranking: [U, I] probe training targets

    @property
    def labelled(self) -> np.ndarray:
        return np.flatnonzero(self.labels >= 0)


def build_tasks(sequences_dir: str | Path) -> dict[str, Task]:
    """The tasks a data/sequences folder supports, in a fixed order (see the module doc)."""
    sequences_dir = Path(sequences_dir)
    frame = load_sequences(sequences_dir)
    n_users = frame.height
    manifest = load_manifest(sequences_dir)
    item_cats = item_category_matrix(sequences_dir)
    n_items, n_categories = item_cats.shape
    category_names = tuple(manifest.get("categories") or (str(c) for c in range(n_categories)))
    history = user_item_matrix(frame, n_items, "history")
    future = user_item_matrix(frame, n_items, "future")
    tasks: dict[str, Task] = {}

    if n_categories:  # favourite_category: argmax picks the first (lowest) index among ties
        tasks["favourite_category"] = Task(
            "favourite_category", "classification", _favourite(future @ item_cats), n_categories,
            "majority category of the future window (all categories of every future event; ties -> lowest index)",
            category_names,
        )  # fmt: skip

    users = _users_frame(sequences_dir, n_users)
    age = _age_task(users, n_users)
    if age is not None:
        tasks["age_bucket"] = age
    gender = _gender_task(users, n_users)
    if gender is not None:
        tasks["gender"] = gender
    tendency = _rating_tendency_task(frame)
    if tendency is not None:
        tasks["rating_tendency"] = tendency
    breadth = _taste_breadth_task(future, item_cats) if n_categories else None
    if breadth is not None:
        tasks["taste_breadth"] = breadth

    seen = (history > 0).astype(np.float32).tocsr()
    tasks["next_item"] = Task(
        "next_item", "ranking", _first_new_item(frame, history), n_items,
        "first future item not in the history, ranked among all items minus the history items",
        exclude=seen, targets=(future - future.multiply(seen)).tocsr(),
    )  # fmt: skip
    for task in tasks.values():
        log.debug("task %s: %d labelled users", task.name, task.labelled.size)
    return tasks


def history_favourite_category(sequences_dir: str | Path) -> np.ndarray:
    """[U] the majority category of each user's HISTORY (ties -> lowest index; -1 = none)."""
    frame = load_sequences(Path(sequences_dir))
    item_cats = item_category_matrix(Path(sequences_dir))
    return _favourite(user_item_matrix(frame, item_cats.shape[0], "history") @ item_cats)


def _favourite(counts: sp.spmatrix) -> np.ndarray:
    """Row-wise majority column of a [users, categories] count matrix; -1 for empty rows (or no categories)."""
    counts = np.asarray(counts.todense())
    if not counts.shape[1]:
        return np.full(counts.shape[0], -1, np.int64)
    return np.where(counts.sum(axis=1) > 0, counts.argmax(axis=1), -1).astype(np.int64)


def _users_frame(sequences_dir: Path, n_users: int) -> pl.DataFrame | None:
    path = sequences_dir / "users.parquet"
    if not path.exists():
        return None
    users = pl.read_parquet(path)
    keep = (users["user_index"] >= 0) & (users["user_index"] < n_users)
    return users.filter(keep)


def _scatter(users: pl.DataFrame, values: np.ndarray, n_users: int) -> np.ndarray:
    labels = np.full(n_users, -1, np.int64)
    labels[users["user_index"].to_numpy()] = values
    return labels


def _declared(labels: np.ndarray) -> bool:
    return np.unique(labels[labels >= 0]).size >= 2


def _age_task(users: pl.DataFrame | None, n_users: int) -> Task | None:
    if users is None:
        return None
    if "age_bucket" in users.columns:
        names = users["age_bucket"].cast(pl.String)
        present = names.drop_nulls().unique().to_list()
        if "age" in users.columns:  # order the buckets by their age code
            lowest = users.group_by("age_bucket").agg(pl.col("age").min()).drop_nulls("age_bucket")
            order = dict(zip(lowest["age_bucket"].cast(pl.String).to_list(), lowest["age"].to_list(), strict=True))
            present.sort(key=lambda name: (order.get(name) is None, order.get(name) or 0, name))
        else:
            present.sort()
        code = {name: i for i, name in enumerate(present)}
        values = np.array([code.get(name, -1) if name is not None else -1 for name in names.to_list()], np.int64)
        class_names = tuple(present)
        description = "age bucket of the dataset (users.age_bucket)"
    elif "age" in users.columns and users["age"].dtype.is_numeric():
        age = users["age"].cast(pl.Float64).to_numpy()
        values = np.where(np.isnan(age), -1, np.digitize(np.nan_to_num(age), AGE_EDGES)).astype(np.int64)
        class_names = AGE_NAMES
        description = "age bucket " + ", ".join(AGE_NAMES)
    else:
        return None
    labels = _scatter(users, values, n_users)
    if not _declared(labels):
        return None
    return Task("age_bucket", "classification", labels, len(class_names), description, class_names)


def _gender_task(users: pl.DataFrame | None, n_users: int) -> Task | None:
    if users is None or "gender" not in users.columns:
        return None
    raw = users["gender"].cast(pl.String).str.strip_chars()
    names = sorted(v for v in raw.drop_nulls().unique().to_list() if v)
    code = {name: i for i, name in enumerate(names)}
    values = np.array([code.get(v, -1) if v else -1 for v in raw.to_list()], np.int64)
    labels = _scatter(users, values, n_users)
    if not _declared(labels):
        return None
    return Task("gender", "classification", labels, len(names), "users.gender", tuple(names))


def _rating_tendency_task(frame: pl.DataFrame) -> Task | None:
    users, ratings = list_column(frame, "future_rating", np.float64)
    rated = ~np.isnan(ratings)
    if not rated.any():
        return None
    n_users = frame.height
    n_rated = np.bincount(users[rated], minlength=n_users)
    total = np.bincount(users[rated], weights=ratings[rated], minlength=n_users)
    has = n_rated > 0
    mean = np.divide(total, n_rated, out=np.zeros(n_users), where=has)
    median = float(np.median(mean[has]))
    labels = np.where(has, (mean > median).astype(np.int64), -1)
    if not _declared(labels):
        return None
    return Task(
        "rating_tendency", "classification", labels, 2,
        f"1 if the mean future rating is above the median over users ({median:g}), else 0", ("low", "high"),
    )  # fmt: skip


def _taste_breadth_task(future: sp.csr_matrix, item_cats: sp.csr_matrix) -> Task | None:
    """Focused or exploring: 1 if the entropy of the future window's category distribution is
    above the median over users. Only users with at least BREADTH_MIN_EVENTS categorised future
    events are labelled (a breadth of two events says little, and the count must not be the label)."""
    counts = np.asarray((future @ item_cats).todense(), dtype=np.float64)
    events = np.asarray(future.sum(axis=1)).ravel()
    eligible = (events >= BREADTH_MIN_EVENTS) & (counts.sum(axis=1) > 0)
    if eligible.sum() < 2:
        return None
    p = counts[eligible] / counts[eligible].sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    median = float(np.median(entropy))
    labels = np.full(future.shape[0], -1, np.int64)
    labels[eligible] = (entropy > median).astype(np.int64)
    if not _declared(labels):
        return None
    return Task(
        "taste_breadth", "classification", labels, 2,
        f"1 if the category entropy of the future window is above the median over users ({median:.3g} nats); "
        f"users with at least {BREADTH_MIN_EVENTS} future events", ("focused", "broad"),
    )  # fmt: skip


def _first_new_item(frame: pl.DataFrame, history: sp.csr_matrix) -> np.ndarray:
    users, items = list_column(frame, "future_item_index", np.int64)
    n_items = history.shape[1]
    hist = history.tocoo()
    seen = np.isin(users * n_items + items, hist.row.astype(np.int64) * n_items + hist.col)
    new_users, new_items = users[~seen], items[~seen]
    labels = np.full(frame.height, -1, np.int64)
    first_users, first_at = np.unique(new_users, return_index=True)  # events are in time order
    labels[first_users] = new_items[first_at]
    return labels


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True, eq=False)
class Split:
    train: np.ndarray  # user indices
    test: np.ndarray
    labelled: dict[float, np.ndarray]  # label fraction -> labelled train users


def make_split(
    labels: np.ndarray,
    seed: int,
    test_fraction: float,
    label_fractions: tuple[float, ...],
    key: str = "",
    stratify: bool = True,
) -> Split:
    """Disjoint train/test users among those with a label >= 0, and nested labelled subsets.

    Deterministic in (seed, key): `key` (the task name) gives each task its own draw.
    Test gets round(test_fraction * n) users, allocated to classes by largest remainder
    (stratified; a class keeps at least one train user). Labelled subsets are prefixes of
    one random order of the train users that starts with two users of each class (fewer
    if the class has fewer), so the count is max(round(f * n_train), that minimum).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(key.encode())]))
    users = np.flatnonzero(labels >= 0)
    users = users[rng.permutation(users.size)]
    n_test = int(round(test_fraction * users.size))
    if stratify:
        is_test = _stratified_take(labels[users], n_test, rng, keep=1)
    else:
        is_test = np.arange(users.size) < n_test
    test, train = np.sort(users[is_test]), users[~is_test]  # train stays in random order

    if stratify:
        first = _within_class_rank(labels[train]) < 2
        order = np.concatenate([train[first], train[~first]])
        minimum = int(first.sum())
    else:
        order, minimum = train, min(2, train.size)
    labelled = {}
    for fraction in label_fractions:
        count = min(train.size, max(int(round(fraction * train.size)), minimum))
        labelled[float(fraction)] = np.sort(order[:count])
    return Split(np.sort(train), test, labelled)


def _within_class_rank(classes: np.ndarray) -> np.ndarray:
    """Position of each entry among the entries of its class, in array order."""
    order = np.argsort(classes, kind="stable")
    sorted_classes = classes[order]
    starts = np.flatnonzero(np.r_[True, sorted_classes[1:] != sorted_classes[:-1]])
    sizes = np.diff(np.r_[starts, classes.size])
    rank = np.empty(classes.size, np.int64)
    rank[order] = np.arange(classes.size) - np.repeat(starts, sizes)
    return rank


def _stratified_take(classes: np.ndarray, n_take: int, rng: np.random.Generator, keep: int) -> np.ndarray:
    """Mask of n_take entries spread over classes in proportion (largest remainder), taking
    the first ones of each class in array order and leaving at least `keep` per class."""
    values, sizes = np.unique(classes, return_counts=True)
    cap = np.maximum(sizes - keep, 0)
    exact = sizes * (n_take / max(classes.size, 1))
    quota = np.minimum(np.floor(exact).astype(np.int64), cap)
    left = n_take - int(quota.sum())
    if left > 0:
        remainder = exact - quota + rng.random(values.size) * 1e-9  # random tie-break
        for c in np.argsort(-remainder, kind="stable"):
            if left == 0:
                break
            if quota[c] < cap[c]:
                quota[c] += 1
                left -= 1
    return _within_class_rank(classes) < quota[np.searchsorted(values, classes)]


# --------------------------------------------------------------------------- probes (probes.py) and their inputs


def _probe_targets(task: Task, users: np.ndarray) -> sp.csr_matrix:
    """Training targets of the next-item probe: the train users' new future items (all of
    them, a richer signal than the first one alone), else their one label."""
    if task.targets is not None:
        return task.targets[users]
    labels = task.labels[users]
    return sp.csr_matrix((np.ones(users.size, np.float32), (np.arange(users.size), labels)),
                         shape=(users.size, task.n_classes))  # fmt: skip


def _ranks(score, embeddings: np.ndarray, users: np.ndarray, targets: np.ndarray, exclude: sp.csr_matrix | None):
    ranks = []
    for start in range(0, users.size, SCORE_BLOCK):
        block = users[start : start + SCORE_BLOCK]
        scores = np.asarray(score(embeddings[block]), dtype=np.float32)
        if exclude is not None:
            mask = exclude[block].tocoo()
            scores[mask.row, mask.col] = -np.inf
        ranks.append(target_ranks(scores, targets[start : start + SCORE_BLOCK]))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


# --------------------------------------------------------------------------- protocol


def fraction_key(fraction: float) -> str:
    """The key of a label fraction in results: str(float), e.g. '0.01', '1.0'."""
    return str(float(fraction))


def evaluate_methods(
    embeddings: dict[str, np.ndarray],
    tasks: dict[str, Task],
    params: EvaluateParams,
    item_vectors: dict[str, np.ndarray] | None = None,
    progress: bool = True,
    n_jobs: int = 1,
) -> dict[str, Any]:
    """Score frozen embeddings ([U, d] per method, row = user_index) on every task.

    Returns results[task][method]:
    - classification: [probe][fraction_key(f)] = {"mean", "std", "per_seed", "n_labelled", "n_test"}
      (accuracy on the test users; std over seeds, ddof 0);
    - ranking: {"hr@k": {...}, "ndcg@k": {...}, "scorer": "probe" | "item_vectors", "n_train", "n_test"}
      with {"mean", "std", "per_seed"} for each metric.
    Plain Python types only (JSON-serialisable). Each (seed, task) unit runs single-threaded;
    n_jobs > 1 runs that many units at once in worker processes (same results).
    """
    began = time.perf_counter()
    item_vectors = {m: np.asarray(v, dtype=np.float32) for m, v in (item_vectors or {}).items()}
    arrays = _check_inputs(embeddings, tasks, item_vectors)
    fractions = tuple(sorted(float(f) for f in params.label_fractions))
    units = list(product(range(params.seeds), tasks.values()))
    bar = dict(total=len(units), desc="evaluate (seed x task)", unit="task", disable=not progress)
    if n_jobs == 1:
        outputs = (_evaluate_unit(arrays, task, seed, params, item_vectors) for seed, task in units)
    else:
        from joblib import Parallel, delayed

        parallel = Parallel(n_jobs=n_jobs, return_as="generator")
        outputs = parallel(delayed(_evaluate_unit)(arrays, task, seed, params, item_vectors) for seed, task in units)
    per_seed: dict = {name: {method: {} for method in arrays} for name in tasks}
    sizes: dict = {}
    for (_, task), (scores, unit_sizes) in zip(units, tqdm(outputs, **bar), strict=True):
        sizes[task.name] = unit_sizes  # the same for every seed (sizes depend on class counts only)
        for method, by_key in scores.items():
            for key, value in by_key.items():
                per_seed[task.name][method].setdefault(key, []).append(value)

    results: dict[str, Any] = {}
    for name, task in tasks.items():
        results[name] = {}
        for method in arrays:
            scores = per_seed[name][method]
            if task.kind == "ranking":
                entry: dict[str, Any] = {metric: summarise(values) for metric, values in scores.items()}
                entry["scorer"] = "item_vectors" if method in item_vectors else "probe"
                entry.update(sizes[name])
            else:
                entry = {}
                for probe in params.probes:
                    entry[probe] = {}
                    for fraction in fractions:
                        n_labelled, n_test = sizes[name][fraction]
                        summary = summarise(scores[(probe, fraction)])
                        entry[probe][fraction_key(fraction)] = {**summary, "n_labelled": n_labelled, "n_test": n_test}
            results[name][method] = entry
    log.info(
        "evaluated %d methods on %d tasks x %d seeds in %.1fs",
        len(arrays), len(tasks), params.seeds, time.perf_counter() - began,
    )  # fmt: skip
    return results


def _check_inputs(
    embeddings: dict[str, np.ndarray], tasks: dict[str, Task], item_vectors: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    if not embeddings:
        raise ValueError("no embeddings to evaluate")
    if not tasks:
        raise ValueError("no tasks to evaluate on")
    n_users = {task.labels.size for task in tasks.values()}
    if len(n_users) != 1:
        raise ValueError(f"tasks disagree on the number of users: {sorted(n_users)}")
    (n_users,) = n_users
    arrays = {}
    for method, matrix in embeddings.items():
        matrix = np.asarray(matrix, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != n_users:
            raise ValueError(f"embeddings {method!r}: expected shape [{n_users}, d], got {list(matrix.shape)}")
        if not np.isfinite(matrix).all():
            raise ValueError(f"embeddings {method!r}: contains NaN or infinite values")
        arrays[method] = matrix
    for method, vectors in item_vectors.items():
        if method not in arrays:
            raise ValueError(f"item_vectors {method!r}: no user embeddings of that name")
        if vectors.ndim != 2 or vectors.shape[1] != arrays[method].shape[1]:
            raise ValueError(f"item_vectors {method!r}: expected shape [n_items, {arrays[method].shape[1]}]")
    return arrays


def _evaluate_unit(
    arrays: dict[str, np.ndarray],
    task: Task,
    seed: int,
    params: EvaluateParams,
    item_vectors: dict[str, np.ndarray],
) -> tuple[dict, dict]:
    """One (seed, task): scores[method][(probe, fraction) or metric] and the split sizes.

    Runs with one thread for BLAS, OpenMP and torch: the probes are small, and on a busy
    machine thread pools slow them down many-fold (measured 20x on 2 shared cores)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1), _torch_threads(1):
        fractions = tuple(sorted(float(f) for f in params.label_fractions))
        ranking = task.kind == "ranking"
        split = make_split(task.labels, seed, params.test_fraction, fractions, task.name, stratify=not ranking)
        y = task.labels
        scores: dict[str, dict] = {method: {} for method in arrays}
        if ranking:
            k = params.top_k
            for method, x in arrays.items():
                if method in item_vectors:
                    score = lambda u, v=item_vectors[method]: u @ v.T  # noqa: E731
                elif not split.train.size:  # nothing to train the probe on
                    scores[method] = {f"hr@{k}": float("nan"), f"ndcg@{k}": float("nan")}
                    continue
                else:
                    score = softmax_probe(x[split.train], _probe_targets(task, split.train), seed)
                ranks = _ranks(score, x, split.test, y[split.test], task.exclude)
                scores[method] = {f"hr@{k}": hit_rate_at_k(ranks, k), f"ndcg@{k}": ndcg_at_k(ranks, k)}
            return scores, {"n_train": int(split.train.size), "n_test": int(split.test.size)}
        methods, test = list(arrays), split.test
        for probe, (fraction, labelled) in product(params.probes, split.labelled.items()):
            if not labelled.size or not test.size:  # too few labelled users to split
                for method in methods:
                    scores[method][(probe, fraction)] = float("nan")
                continue
            x_trains = [arrays[m][labelled] for m in methods]
            predicted = fit_predict_many(probe, x_trains, y[labelled], [arrays[m][test] for m in methods], seed)
            for method, guess in zip(methods, predicted, strict=True):
                scores[method][(probe, fraction)] = accuracy(y[test], guess)
        sizes = {fraction: (int(labelled.size), int(split.test.size)) for fraction, labelled in split.labelled.items()}
        return scores, sizes


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def summarise(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": finite_or_none(array.mean()),
        "std": finite_or_none(array.std()),
        "per_seed": [finite_or_none(v) for v in array],
    }


def finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
