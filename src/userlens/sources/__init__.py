"""Data sources: each puts raw files into a snapshot folder and reads them into canonical tables.

- synthetic: a seeded generator writing files in the generic format (the embedded default)
- movielens: the official GroupLens releases, from a local folder or downloaded and checked
- generic:   your own CSV or Parquet files
"""

from __future__ import annotations

from pathlib import Path

from userlens.config import DataParams
from userlens.schema import CanonicalTables


def snapshot_source(data: DataParams, dest: Path, progress: bool = True) -> dict:
    """Put the raw files of the configured source into `dest` (the folder DVC versions)."""
    if data.source == "synthetic":
        from userlens.sources.synthetic import generate_synthetic

        return {"origin": "synthetic", **generate_synthetic(data.synthetic, dest, progress=progress)}
    if data.source == "movielens":
        from userlens.sources import movielens_fetch

        return movielens_fetch.snapshot(data.dataset, data.movielens_dir(), dest, allow_download=data.download)
    from userlens.sources import generic

    return generic.snapshot(data, dest)


def read_source(data: DataParams, raw_dir: Path) -> CanonicalTables:
    """Parse a snapshot folder into the canonical tables."""
    if data.source == "movielens":
        from userlens.sources import movielens

        return movielens.read(data.dataset, raw_dir, rating_scale=data.rating_scale)
    from userlens.sources import generic  # synthetic snapshots are written in the generic format

    source_scale = None
    if data.source == "synthetic":
        from userlens.sources.synthetic import RATING_SCALE as source_scale
    return generic.read(raw_dir, rating_scale=data.rating_scale, source_scale=source_scale)
