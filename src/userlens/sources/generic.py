"""Your own interaction logs: CSV (comma), TSV or Parquet files.

interactions  user_id, item_id, timestamp (epoch seconds or ISO 8601), rating (optional,
              any numeric scale: declared in params.yaml, else inferred as the narrowest
              standard scale that holds 99.5 % of the ratings, and reported)
items         optional: item_id, title (optional), categories (`|`-separated or a list)
users         optional: user_id plus any attribute columns

Ids are read as strings ("007" stays "007"). A snapshot copies the files into the raw folder
as interactions.<ext>, items.<ext>, users.<ext>; `read` parses that folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import polars as pl

from userlens.config import DataParams
from userlens.errors import DataError
from userlens.schema import CanonicalTables, outside_scale

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")
_ISO_WITH_ZONE = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z")
_ISO_NAIVE = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d")
# Scales a rating column is inferred to be on, narrowest first: (min, max, step), step None =
# continuous. The first that holds SCALE_COVERAGE of the ratings wins (infer_rating_scale).
STANDARD_SCALES = (
    (0.0, 1.0, None),  # binary, or a score in [0, 1]
    (1.0, 5.0, 1.0),  # stars
    (0.5, 5.0, 0.5),  # half stars (MovieLens since 2003)
    (0.0, 5.0, None),
    (1.0, 7.0, 1.0),  # Likert
    (1.0, 10.0, 1.0),
    (0.0, 10.0, None),
    (0.0, 100.0, None),  # percentages
)
SCALE_COVERAGE = 0.995
REQUIRED = {
    "interactions": ("user_id", "item_id", "timestamp"),
    "items": ("item_id",),
    "users": ("user_id",),
}


def snapshot(data: DataParams, dest: Path) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for table in ("interactions", "items", "users"):
        src = getattr(data, table)
        if src is None:
            continue
        src = Path(src)
        if not src.is_file():
            raise DataError(f"data.{table}: {src} does not exist or is not a file")
        if src.suffix.lower() not in SUFFIXES:
            raise DataError(f"{src}: unsupported file type {src.suffix!r}; use one of {', '.join(SUFFIXES)}")
        target = dest / f"{table}{src.suffix.lower()}"
        shutil.copyfile(src, target)
        copied.append(target.name)
    return {"origin": f"files:{data.interactions}", "files": copied}


def read(
    raw_dir: Path,
    rating_scale: tuple[float, float] | None = None,
    source_scale: tuple[float, float] | None = None,
) -> CanonicalTables:
    """Parse a snapshot folder. The rating scale is the declared one, else the one the source
    defines (`source_scale`), else inferred from the data and reported."""
    interactions_path = _find(raw_dir, "interactions")
    if interactions_path is None:
        held = ", ".join(sorted(p.name for p in raw_dir.iterdir())) if raw_dir.is_dir() else "nothing"
        raise DataError(f"{raw_dir}: no interactions file (interactions.csv/.tsv/.parquet); it holds: {held}")
    interactions = _read_table(interactions_path, "interactions")
    interactions = interactions.with_columns(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        _parse_timestamps(interactions, interactions_path),
        _parse_ratings(interactions, interactions_path),
    )
    scale, origin = _rating_scale(interactions, rating_scale, source_scale, interactions_path)

    items_path = _find(raw_dir, "items")
    if items_path is None:
        items = interactions.select(pl.col("item_id").unique(maintain_order=True)).with_columns(
            title=pl.lit(None, pl.String), categories=pl.lit([], pl.List(pl.String))
        )
    else:
        items = _read_items(items_path)

    users_path = _find(raw_dir, "users")
    if users_path is None:
        users = interactions.select(pl.col("user_id").unique(maintain_order=True))
    else:
        users = _read_table(users_path, "users").with_columns(pl.col("user_id").cast(pl.String))

    if "rating" not in interactions.columns:
        interactions = interactions.with_columns(rating=pl.lit(None, pl.Float32))
    notes = [f"rating scale {list(scale)} ({origin})"] if scale else ["no ratings: implicit feedback"]
    return CanonicalTables(interactions, items, users, scale, origin, notes).conform()


def _find(raw_dir: Path, table: str) -> Path | None:
    for suffix in SUFFIXES:
        path = raw_dir / f"{table}{suffix}"
        if path.exists():
            return path
    return None


def _read_table(path: Path, table: str) -> pl.DataFrame:
    """Read one file with every CSV column as a string; casting happens per column, with row examples."""
    try:
        if path.suffix in (".parquet", ".pq"):
            frame = pl.read_parquet(path)
        else:
            frame = _read_csv(path)
    except DataError:
        raise
    except pl.exceptions.NoDataError:
        raise DataError(f"{path}: the file is empty") from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"{path}: cannot be read as {_kind(path)}: {_first_line(exc)}") from None
    missing = [c for c in REQUIRED[table] if c not in frame.columns]
    if missing:
        hint = _delimiter_hint(frame.columns, path)
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns) or 'none'}{hint}"
        )
    if frame.height == 0:
        raise DataError(f"{path}: has a header but no rows")
    return frame


def _read_csv(path: Path) -> pl.DataFrame:
    head = path.read_bytes()[:4096]
    if b"\x00" in head:
        raise DataError(f"{path}: looks like binary data, not {_kind(path)} text")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the 4 KiB boundary
            raise DataError(_encoding_message(path, head, exc.start)) from None
    separator = "\t" if path.suffix == ".tsv" else ","
    try:
        frame = pl.read_csv(path, separator=separator, infer_schema=False, encoding="utf8")
    except pl.exceptions.ComputeError as exc:
        if "utf-8" in str(exc).lower() or "utf8" in str(exc).lower():
            raise DataError(_encoding_message(path, path.read_bytes(), None)) from None
        raise
    if frame.height and not path.read_bytes().endswith(b"\n"):
        last = frame.row(-1, named=True)
        if any(v is None or v == "" for v in last.values()):
            raise DataError(
                f"{path}: the last line (line {frame.height + 1}) is incomplete: {last}; the file looks truncated"
            )
    return frame


def _encoding_message(path: Path, data: bytes, start: int | None) -> str:
    if start is None:
        try:
            data.decode("utf-8")
            start = 0
        except UnicodeDecodeError as exc:
            start = exc.start
    line = data[:start].count(b"\n") + 1
    snippet = data[max(0, start - 20) : start + 10]
    return (
        f"{path}: not valid UTF-8 at line {line} (bytes {snippet!r}); "
        "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def _delimiter_hint(columns: list[str], path: Path) -> str:
    if len(columns) == 1:
        for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "pipes")):
            if sep in columns[0]:
                want = "tabs (.tsv)" if path.suffix == ".tsv" else "commas (.csv)"
                return f"; the header looks separated by {name}, but {path.name} must be separated by {want}"
    return ""


def _parse_timestamps(frame: pl.DataFrame, path: Path) -> pl.Expr:
    """Epoch seconds as int64: integers pass through, ISO 8601 strings are parsed as UTC."""
    column = frame["timestamp"]
    if column.dtype.is_integer():
        return pl.col("timestamp").cast(pl.Int64)
    if column.dtype.is_float():
        return pl.col("timestamp").round(0).cast(pl.Int64)
    text = column.cast(pl.String).str.strip_chars()
    as_int = text.cast(pl.Int64, strict=False)
    if as_int.null_count() == text.null_count():
        return pl.lit(as_int).alias("timestamp")
    attempts = [text.str.to_datetime(fmt, time_zone="UTC", strict=False) for fmt in _ISO_WITH_ZONE]
    attempts += [text.str.to_datetime(fmt, strict=False).dt.replace_time_zone("UTC") for fmt in _ISO_NAIVE]
    parsed = pl.select(pl.coalesce([a.dt.cast_time_unit("us") for a in attempts])).to_series()
    bad = text.is_not_null() & parsed.is_null() & as_int.is_null()
    if bad.any():
        raise DataError(
            f"{path}: column timestamp: {_examples(frame, bad, 'timestamp')} neither epoch seconds nor ISO 8601"
        )
    seconds = as_int.fill_null(parsed.dt.epoch("s"))
    return pl.lit(seconds).alias("timestamp")


def _parse_ratings(frame: pl.DataFrame, path: Path) -> pl.Expr:
    if "rating" not in frame.columns:
        return pl.lit(None, pl.Float32).alias("rating")
    if frame.schema["rating"].is_numeric():
        return pl.col("rating").cast(pl.Float32)
    text = frame["rating"].cast(pl.String).str.strip_chars().replace("", None)
    numbers = text.cast(pl.Float32, strict=False)
    bad = text.is_not_null() & numbers.is_null()
    if bad.any():
        raise DataError(f"{path}: column rating: {_examples(frame, bad, 'rating')} not a number")
    return pl.lit(numbers).alias("rating")


def _rating_scale(
    interactions: pl.DataFrame,
    declared: tuple[float, float] | None,
    source_scale: tuple[float, float] | None,
    path: Path,
) -> tuple[tuple[float, float] | None, str | None]:
    if declared is not None:
        return (float(declared[0]), float(declared[1])), "declared"
    if source_scale is not None:
        return (float(source_scale[0]), float(source_scale[1])), "source"
    ratings = interactions["rating"].fill_nan(None).drop_nulls()
    if ratings.is_empty():
        return None, None
    scale = infer_rating_scale(ratings)
    outside = ratings.to_frame("rating").select(outside_scale(scale).sum()).item()
    log.info("%s: rating scale not declared; inferred %s, %d of %d ratings outside", path, list(scale),
             outside, ratings.len())  # fmt: skip
    return scale, "inferred"


def infer_rating_scale(ratings: pl.Series) -> tuple[float, float]:
    """The narrowest of STANDARD_SCALES that holds SCALE_COVERAGE of the (non-null) ratings, on
    its steps; else the observed range. A stray value (one 17 among 1-5 stars, Ciao's few 0s)
    then lies outside the scale and meets validation.repair.rating_out_of_scale instead of
    stretching the scale; the steps tell half stars (0.5-5) from whole stars (1-5)."""
    values = ratings.cast(pl.Float64)
    for low, high, step in STANDARD_SCALES:
        held = values.is_between(low, high)
        if step is not None:
            steps = (values - low) / step
            held &= (steps - steps.round(0)).abs() < 1e-6
        if held.mean() >= SCALE_COVERAGE:
            return low, high
    return float(values.min()), float(values.max())


def _read_items(path: Path) -> pl.DataFrame:
    items = _read_table(path, "items").with_columns(pl.col("item_id").cast(pl.String))
    if "title" not in items.columns:
        items = items.with_columns(title=pl.lit(None, pl.String))
    if "categories" not in items.columns:
        categories = pl.lit([], pl.List(pl.String))
    elif items.schema["categories"] == pl.List(pl.String):
        categories = pl.col("categories")
    else:
        categories = (
            pl.col("categories")
            .cast(pl.String)
            .fill_null("")
            .str.split("|")
            .list.eval(pl.element().str.strip_chars().filter(pl.element() != ""))
        )
    return items.with_columns(categories=categories)


def _examples(frame: pl.DataFrame, mask: pl.Series, column: str, n: int = 3) -> str:
    """ "2 value(s), e.g. 'abc' (line 5), 'x' (line 9):" with lines counted like a CSV with a header."""
    rows = frame.with_row_index("_row").filter(mask).head(n)
    shown = ", ".join(f"{v!r} (line {i + 2})" for i, v in zip(rows["_row"], rows[column], strict=True))
    return f"{int(mask.sum()):,} value(s), e.g. {shown}:"


def _kind(path: Path) -> str:
    return {".parquet": "Parquet", ".pq": "Parquet", ".tsv": "TSV"}.get(path.suffix, "CSV")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
