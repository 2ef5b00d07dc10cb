"""A seeded synthetic interaction log with planted structure, written in the generic format.

The generative story:
- Items: each has a primary category (categories get about equal numbers of items), maybe
  one or two secondary ones, and a Zipf popularity rank within its primary category.
- Users: a taste mixture over categories at the start of their timeline and another at the
  end, both Dirichlet(taste_concentration); at relative time t in [0, 1] the taste is
  (1 - drift*t)*start + drift*t*end. Age, gender and occupation depend on the dominant
  start category, so a model of the history can predict them.
- Events: a heavy-tailed count per user (lognormal, at least 5), strictly increasing
  timestamps inside the user's own span of the [start, start + days) window; each event
  draws a category from the current taste, then an item of that category by popularity,
  and a rating from taste match + the user's rating bias + noise, rounded to 1..5 stars.

truth.parquet keeps the latent variables so tests can check that the structure is found.
Users are generated `chunk_users` at a time (each chunk with its own RNG derived from the
seed and chunk index) and appended to Parquet, so memory stays bounded at any size.
"""

from __future__ import annotations

import logging
import os
import time
from calendar import timegm
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from userlens.config import SyntheticParams

log = logging.getLogger(__name__)

CATEGORY_NAMES = (
    "Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama", "Family",
    "Fantasy", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western", "History", "Sport", "Biography",
)  # fmt: skip
OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
    "healthcare", "homemaker", "lawyer", "librarian", "marketing", "programmer", "retired",
    "salesman", "scientist", "student", "technician", "writer", "other",
)  # fmt: skip
MIN_EVENTS = 5
RATING_SCALE = (1.0, 5.0)  # whole stars
EVENTS_SIGMA = 1.0  # lognormal shape of events per user: a long tail of heavy users
SECONDARY_P = (0.5, 0.35, 0.15)  # P(0, 1, 2 secondary categories) per item
RATING_BASE, RATING_MATCH, RATING_BIAS_SD, RATING_NOISE_SD = 2.7, 2.5, 0.5, 0.7

INTERACTIONS_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()), ("rating", pa.float32())]
)
USERS_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("age", pa.int32()), ("gender", pa.string()), ("occupation", pa.string())]
)


def generate_synthetic(params: SyntheticParams, out_dir: Path, progress: bool = True) -> dict:
    """Write interactions.parquet, items.parquet, users.parquet and truth.parquet into out_dir.
    Returns a small summary dict: n_users, n_items, n_interactions, n_categories, seconds."""
    began = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = _World(params)
    n_chunks = -(-params.n_users // params.chunk_users)
    truth_schema = _truth_schema(world.n_categories)
    n_interactions = 0
    staged: dict[str, Path] = {}
    try:
        for name in ("interactions", "items", "users", "truth"):
            staged[name] = out_dir / f".{name}.parquet.tmp-{os.getpid()}"
        pq.write_table(world.items_table(), staged["items"])
        with (
            pq.ParquetWriter(staged["interactions"], INTERACTIONS_SCHEMA) as events_out,
            pq.ParquetWriter(staged["users"], USERS_SCHEMA) as users_out,
            pq.ParquetWriter(staged["truth"], truth_schema) as truth_out,
        ):
            chunks = tqdm(
                range(n_chunks), total=n_chunks, unit="chunk", desc="synthetic", disable=not progress
            )
            for chunk in chunks:
                first = chunk * params.chunk_users
                stop = min(first + params.chunk_users, params.n_users)
                events, users, truth = world.user_chunk(chunk, first, stop)
                events_out.write_table(events)
                users_out.write_table(users)
                truth_out.write_table(truth)
                n_interactions += events.num_rows
        for name, tmp in staged.items():
            os.replace(tmp, out_dir / f"{name}.parquet")
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    summary = {
        "n_users": params.n_users,
        "n_items": params.n_items,
        "n_interactions": n_interactions,
        "n_categories": world.n_categories,
        "seconds": round(time.perf_counter() - began, 2),
    }
    log.info(
        "synthetic: %(n_interactions)d interactions, %(n_users)d users, %(n_items)d items in %(seconds).1fs",
        summary,
    )
    return summary


class _World:
    """Everything shared by all users: categories, items and their popularity."""

    def __init__(self, params: SyntheticParams):
        self.p = params
        # Every category needs at least one item to draw from.
        k = self.n_categories = min(params.n_categories, params.n_items)
        rng = _rng(params.seed, 0)
        self.category_names = pa.array([_category_name(c) for c in range(k)])
        n = params.n_items
        self.primary = rng.permutation(np.arange(n) % k)
        # Secondary categories: distinct offsets from the primary (at most k - 1 of them).
        n_extra = np.minimum(rng.choice(3, size=n, p=SECONDARY_P), k - 1)
        off1 = rng.integers(1, k, size=n)
        off2 = rng.integers(1, max(k - 1, 2), size=n)
        off2 += off2 >= off1
        cats = (self.primary[:, None] + np.stack([np.zeros(n, int), off1, off2], axis=1)) % k
        self.item_categories = cats[np.arange(3) <= n_extra[:, None]]  # flat, each item's primary first
        self.item_category_counts = 1 + n_extra
        # Popularity: Zipf rank within the primary category, in a random order.
        self.by_category = np.lexsort((rng.random(n), self.primary))
        self.bounds = np.searchsorted(self.primary[self.by_category], np.arange(k + 1))
        rank = np.arange(n) - self.bounds[self.primary[self.by_category]] + 1
        self.item_cdf = _stacked_cdf(rank.astype(float) ** -params.popularity_exponent, self.bounds)
        # Who likes each category, spread evenly so attributes are predictable from taste.
        self.p_female = rng.permutation(np.linspace(0.15, 0.85, k))
        self.mean_age = rng.permutation(np.linspace(22, 50, k))
        self.favourite_job = rng.integers(0, len(OCCUPATIONS), size=k)
        self.item_ids = _ids("i", np.arange(n), _width(n, 5))
        self.t0 = timegm(params.start.timetuple())
        self.window = params.days * 86_400

    def items_table(self) -> pa.Table:
        primary_names = self.category_names.take(self.primary)
        titles = pc.binary_join_element_wise(
            "Item ", pc.cast(pa.array(np.arange(self.p.n_items)), pa.string()), " (", primary_names, ")", ""
        )
        offsets = np.concatenate([[0], np.cumsum(self.item_category_counts)]).astype(np.int32)
        categories = pa.ListArray.from_arrays(offsets, self.category_names.take(self.item_categories))
        return pa.table({"item_id": self.item_ids, "title": titles, "categories": categories})

    def user_chunk(self, chunk: int, first: int, stop: int) -> tuple[pa.Table, pa.Table, pa.Table]:
        p, k, rng = self.p, self.n_categories, _rng(self.p.seed, 1, chunk)
        m = stop - first
        alpha = np.full(k, p.taste_concentration)
        taste = np.stack([rng.dirichlet(alpha, m), rng.dirichlet(alpha, m)], axis=1)  # (m, start|end, k)
        dominant = taste[:, 0].argmax(axis=1)
        bias = rng.normal(0, RATING_BIAS_SD, m)

        # Events per user: MIN_EVENTS plus a lognormal with the rest of the requested mean.
        extra_mean = p.mean_events_per_user - MIN_EVENTS
        extra = (
            rng.lognormal(np.log(extra_mean) - EVENTS_SIGMA**2 / 2, EVENTS_SIGMA, m)
            if extra_mean > 0
            else np.zeros(m)
        )
        n = np.minimum(MIN_EVENTS + np.rint(extra).astype(np.int64), self.window)
        user = np.repeat(np.arange(m), n)
        starts = np.concatenate([[0], np.cumsum(n)])
        k_in_user = np.arange(starts[-1]) - starts[user]

        # Relative time: cumulative exponential gaps scaled to end at 1 for each user.
        gaps = np.concatenate([[0.0], np.cumsum(rng.exponential(size=starts[-1]))])
        t = (gaps[1:] - gaps[starts[user]]) / (gaps[starts[user + 1]] - gaps[starts[user]])
        # Each user's span of the window; adding the event's rank keeps timestamps strictly increasing.
        span = np.clip((self.window * rng.uniform(0.1, 1.0, m)).astype(np.int64), n, self.window)
        offset = rng.integers(0, self.window - span + 1)
        timestamp = self.t0 + offset[user] + np.floor(t * (span - n)[user]).astype(np.int64) + k_in_user

        # Category from the current taste: a mixture of start and end tastes with weight drift*t.
        from_end = rng.random(user.size) < p.drift * t
        rows = 2 * user + from_end  # row of the (m * 2, k) taste table
        row_bounds = np.arange(0, 2 * m * k + 1, k)
        taste_cdf = _stacked_cdf(taste.ravel(), row_bounds)
        category = _draw(taste_cdf, row_bounds, rows, rng.random(user.size)) - rows * k
        item = self.by_category[_draw(self.item_cdf, self.bounds, category, rng.random(user.size))]

        # Rating: how much the user likes the item's (primary) category right now, plus bias and noise.
        match = (1 - p.drift * t) * taste[user, 0, category] + p.drift * t * taste[user, 1, category]
        latent = RATING_BASE + RATING_MATCH * match + bias[user] + rng.normal(0, RATING_NOISE_SD, user.size)
        rating = np.clip(np.rint(latent), *RATING_SCALE).astype(np.float32)

        user_ids = _ids("u", np.arange(first, stop), _width(p.n_users, 7))
        events = pa.table(
            [user_ids.take(user), self.item_ids.take(item), timestamp, rating], schema=INTERACTIONS_SCHEMA
        )
        female = rng.random(m) < self.p_female[dominant]
        age = np.clip(rng.normal(self.mean_age[dominant], 8), 16, 80).astype(np.int32)
        any_job = rng.integers(0, len(OCCUPATIONS), m)
        job = np.where(rng.random(m) < 0.3, self.favourite_job[dominant], any_job)  # weakly tied to taste
        users = pa.table(
            [user_ids, age, np.where(female, "F", "M"), pa.array(OCCUPATIONS).take(job)], schema=USERS_SCHEMA
        )
        truth = pa.table(
            [
                user_ids,
                self.category_names.take(dominant),
                self.category_names.take(taste[:, 1].argmax(axis=1)),
                bias.astype(np.float32),
                n.astype(np.int32),
                pa.FixedSizeListArray.from_arrays(taste[:, 0].astype(np.float32).ravel(), k),
                pa.FixedSizeListArray.from_arrays(taste[:, 1].astype(np.float32).ravel(), k),
            ],
            schema=_truth_schema(k),
        )
        return events, users, truth


def _truth_schema(k: int) -> pa.Schema:
    return pa.schema(
        [
            ("user_id", pa.string()),
            ("dominant_category", pa.string()),  # argmax of the start taste
            ("final_dominant_category", pa.string()),  # argmax of the end taste
            ("rating_bias", pa.float32()),
            ("n_events", pa.int32()),
            ("taste_start", pa.list_(pa.float32(), k)),  # in the order of the category names
            ("taste_end", pa.list_(pa.float32(), k)),
        ]
    )


def _category_name(c: int) -> str:
    """Readable names; past the end of the list they repeat with a suffix ("Action 2")."""
    cycle, base = divmod(c, len(CATEGORY_NAMES))
    return CATEGORY_NAMES[base] + (f" {cycle + 1}" if cycle else "")


def _rng(seed: int, *key: int) -> np.random.Generator:
    # SeedSequence wants a non-negative entropy; spawn_key gives independent streams per key.
    return np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=key))


def _width(count: int, min_width: int) -> int:
    """Digits for zero-padded ids 0..count-1: a fixed width, so ids sort like their numbers."""
    return max(min_width, len(str(count - 1)))


def _ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """String ids such as "u0000042" (prefix + number zero-padded to width)."""
    padded = pc.utf8_lpad(pc.cast(pa.array(numbers), pa.string()), width, "0")
    return pc.binary_join_element_wise(prefix, padded, "")


def _stacked_cdf(weights: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per-segment CDFs laid end to end, segment s shifted into (s, s+1]: one sorted array.

    bounds[s]:bounds[s+1] is segment s (non-empty, positive total weight).
    """
    segment = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))
    cum = np.concatenate([[0.0], np.cumsum(weights)])
    low, high = cum[bounds[:-1]][segment], cum[bounds[1:]][segment]
    return segment + (cum[1:] - low) / (high - low)


def _draw(cdf: np.ndarray, bounds: np.ndarray, segment: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index drawn from each event's segment of a stacked CDF, given uniforms u in [0, 1)."""
    i = np.searchsorted(cdf, segment + u, side="right")
    # segment + u can round up to segment + 1: keep the draw inside its segment.
    return np.clip(i, bounds[segment], bounds[segment + 1] - 1)
