"""The canonical tables every data source produces (see docs/DATA.md).

interactions  user_id: string, item_id: string, timestamp: int64 (epoch seconds, UTC),
              rating: float32 nullable (null = implicit feedback)
items         item_id: string, title: string nullable, categories: list<string>
users         user_id: string, then optional attributes (e.g. age, gender, occupation)

Ids stay as the source wrote them (as strings), so they remain the business keys that
serving code looks up; the sequences stage maps them to dense indices and saves the map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

INTERACTIONS_SCHEMA = {
    "user_id": pl.String,
    "item_id": pl.String,
    "timestamp": pl.Int64,
    "rating": pl.Float32,
}
ITEMS_SCHEMA = {"item_id": pl.String, "title": pl.String, "categories": pl.List(pl.String)}
USERS_KEY_SCHEMA = {"user_id": pl.String}

TABLES = ("interactions", "items", "users")
# reports/quarantine/interactions.parquet: the rows validation drops, each with its row number in
# the canonical interactions table (read by the sequences stage, which must not import GX)
QUARANTINE_ROW = "row"


def outside_scale(scale: tuple[float, float] | None) -> pl.Expr:
    """True for an interaction whose rating lies outside `scale`; a null rating (implicit
    feedback) and no scale at all are never outside. Float64, like the values GX compares."""
    if scale is None:
        return pl.lit(False)
    rating = pl.col("rating").cast(pl.Float64)
    return rating.is_not_null() & ~rating.is_between(*scale)


@dataclass
class CanonicalTables:
    """The three canonical tables plus what is known about the rating scale."""

    interactions: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame
    # (min, max) of the rating scale, or None for implicit feedback (no ratings at all).
    rating_scale: tuple[float, float] | None = None
    # Where the scale came from: "declared" (params.yaml), "source" (the format defines it)
    # or "inferred" (observed min/max, reported so a person can check it).
    rating_scale_origin: str | None = None
    notes: list[str] = field(default_factory=list)

    def conform(self) -> CanonicalTables:
        """Cast to the canonical dtypes and column order; extra user attributes are kept.

        A NaN rating means "no rating" in most exports: it becomes null (implicit feedback).
        """
        interactions = self.interactions.select(
            [pl.col(name).cast(dtype) for name, dtype in INTERACTIONS_SCHEMA.items()]
        ).with_columns(pl.col("rating").fill_nan(None))
        items = self.items.select([pl.col(name).cast(dtype) for name, dtype in ITEMS_SCHEMA.items()])
        extra = [c for c in self.users.columns if c != "user_id"]
        users = self.users.select([pl.col("user_id").cast(pl.String), *extra])
        return CanonicalTables(
            interactions, items, users, self.rating_scale, self.rating_scale_origin, list(self.notes)
        )
