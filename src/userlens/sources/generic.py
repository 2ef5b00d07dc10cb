"""Your own interaction logs: CSV (comma), TSV or Parquet files; CSV and TSV may be gzipped.

interactions  user_id, item_id, timestamp (epoch seconds or ISO 8601), rating (optional,
              any numeric scale: declared in params.yaml, else inferred as the narrowest
              standard scale that holds 99.5 % of the ratings, and reported)
items         optional: item_id, title (optional), categories (`|`-separated or a list)
users         optional: user_id plus any attribute columns

Ids are read as strings ("007" stays "007"). A snapshot copies the files into the raw folder
as interactions.<ext>, items.<ext>, users.<ext>; `read` parses that folder.

Text is UTF-8 (a byte-order mark and CRLF line ends are fine) or UTF-16 with a byte-order
mark (decoded, with a note); anything else is refused with the line, column and fix. Text is
parsed one block of whole records at a time, only the columns kept, and Parquet is streamed
by polars, so memory follows the canonical tables, not the size of the file. A value that
cannot be read is refused with its column and a few example lines (rows for Parquet); epoch
milliseconds, microseconds and nanoseconds are converted to seconds with a note
(common.epoch_seconds), NaN ratings are missing ratings, infinity is refused. A line that
repeats the header (files joined together) is refused; items or users listed on identical
lines are read once (with a note), on lines that differ refused.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from userlens.config import DataParams
from userlens.errors import DataError
from userlens.schema import CanonicalTables, outside_scale
from userlens.sources.common import (
    BLOCK,
    HEAD_BYTES,
    NO_ATTRIBUTES,
    UNKNOWN_ITEMS,
    UTF8_FIX,
    epoch_seconds,
    field_at,
    invalid_utf8,
    missing_ids,
    plain_text,
    record_blocks,
)

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".csv.gz", ".tsv.gz")
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
SAMPLE_ROWS = 1000  # rows looked at to choose the timestamp parser
Query = Callable[[pl.LazyFrame], pl.LazyFrame]
VALUE, BAD = "_value_", "_bad_"  # prefixes of a column's parsed value and its flag of unreadable values


@dataclass(frozen=True)
class Parsed:
    """How one column is read: its value, and which values cannot be read and why. `bad` is a
    function of the parsed value, so that the text is parsed once per row."""

    value: pl.Expr
    bad: Callable[[pl.Expr], pl.Expr] | None = None
    problem: str = ""

    def flag(self) -> pl.Expr:
        """`bad` over the file's own columns: for a sample, or for the examples of an error."""
        return self.bad(self.value)


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
        suffix = _suffix(src)
        if suffix is None:
            raise DataError(f"{src}: unsupported file type {src.suffix!r}; use one of {', '.join(SUFFIXES)}")
        target = dest / f"{table}{suffix}"
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
        names = ", ".join(f"interactions{s}" for s in SUFFIXES)
        raise DataError(f"{raw_dir}: no interactions file ({names}); it holds: {held}")
    notes: list[str] = []
    interactions = _read_interactions(interactions_path, notes)
    scale, origin = _rating_scale(interactions, rating_scale, source_scale, interactions_path)

    items_path = _find(raw_dir, "items")
    if items_path is None:
        items = interactions.select(pl.col("item_id").unique(maintain_order=True)).with_columns(
            title=pl.lit(None, pl.String), categories=pl.lit([], pl.List(pl.String))
        )
    else:
        items = _read_items(items_path, notes)
        notes.append(missing_ids(interactions, items, "item_id", items_path, interactions_path, UNKNOWN_ITEMS))

    users_path = _find(raw_dir, "users")
    if users_path is None:
        users = interactions.select(pl.col("user_id").unique(maintain_order=True))
    else:
        users = _read_keyed(users_path, "users", "user_id", notes)
        notes.append(missing_ids(interactions, users, "user_id", users_path, interactions_path, NO_ATTRIBUTES))

    notes = [n for n in notes if n]
    for note in notes:
        log.warning("%s", note)
    if "rating" not in interactions.columns:
        interactions = interactions.with_columns(rating=pl.lit(None, pl.Float32))
    scale_note = f"rating scale {list(scale)} ({origin})" if scale else "no ratings: implicit feedback"
    return CanonicalTables(interactions, items, users, scale, origin, [scale_note, *notes]).conform()


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _is_text(path: Path) -> bool:
    return _suffix(path) not in (".parquet", ".pq")


def _plain(path: Path, notes: list[str]) -> AbstractContextManager[Path]:
    """A text file as plain UTF-8 (decompressed, decoded: common.plain_text); Parquet as it is."""
    return plain_text(path, notes, _kind(path)) if _is_text(path) else nullcontext(path)


def _find(raw_dir: Path, table: str) -> Path | None:
    for suffix in SUFFIXES:
        path = raw_dir / f"{table}{suffix}"
        if path.exists():
            return path
    return None


# --- scanning ----------------------------------------------------------------------------


class _Scan:
    """One input file as a polars LazyFrame (every CSV column a string), with what its
    messages need: the file's name, and how to name a row (a line of text, a Parquet row)."""

    def __init__(self, path: Path, source: Path, table: str):
        self.path, self.source, self.table = path, source, table
        self.schema: pl.Schema | dict = {}
        self.text = _is_text(path)
        self.separator = "\t" if ".tsv" in path.name.lower() else ","
        try:
            if self.text:
                self.lazy = pl.scan_csv(source, separator=self.separator, infer_schema=False, encoding="utf8")
            else:
                self.lazy = pl.scan_parquet(source)
            self.schema = self.lazy.collect_schema()
        except pl.exceptions.PolarsError as exc:
            raise self.error(exc) from None
        missing = [c for c in REQUIRED[table] if c not in self.schema]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(self.schema) or 'none'}"
                f"{self._delimiter_hint()}"
            )

    def collect(self, query: Query, columns: list[str], head: int | None = None) -> pl.DataFrame:
        """`query` over every row of the file, or over its first `head` rows (maybe none).
        Text is parsed one block of records at a time (only `columns`), Parquet streamed by
        polars, so the text is never held whole."""
        try:
            if not self.text:
                lazy = self.lazy if head is None else self.lazy.head(head)
                frame = query(lazy).collect(engine="streaming")
            else:
                blocks = record_blocks(self.source, BLOCK if head is None else HEAD_BYTES)
                if head is not None:  # the first block is enough
                    blocks = [next(blocks, b"")]
                parts = [query(self._parse(block, columns).lazy()).collect() for block in blocks if block]
                frame = pl.concat(parts, rechunk=False) if parts else query(self.lazy.head(0)).collect()
        except pl.exceptions.PolarsError as exc:
            raise self.error(exc) from None
        if head is not None:
            return frame.head(head)
        if frame.height == 0:
            raise DataError(f"{self.path}: has a header but no rows")
        return frame

    def _parse(self, block: bytes, columns: list[str]) -> pl.DataFrame:
        """`columns` of a block of whole records, as strings."""
        return pl.read_csv(
            block,
            has_header=False,
            schema=dict.fromkeys(self.schema, pl.String),
            columns=[list(self.schema).index(c) for c in columns],
            separator=self.separator,
            encoding="utf8",
            missing_columns="insert",  # a block may start with a short line (the file's last)
        )

    def error(self, exc: pl.exceptions.PolarsError) -> DataError:
        """The polars error, explained: the first bad byte, line or quote when it is one of those."""
        text = str(exc).lower()
        if isinstance(exc, pl.exceptions.NoDataError):
            return DataError(f"{self.path}: the file is empty")
        if self.text and "utf-8" in text and (found := invalid_utf8(self.source)):
            line, content, offset = found
            column = "the header" if line == 1 else f"column {self._header(field_at(content, offset, self.separator))}"
            return DataError(
                f"{self.path}: not valid UTF-8 at line {line}, {column} (bytes "
                f"{content[max(0, offset - 20) : offset + 10]!r}); {UTF8_FIX}"
            )
        if self.text and "more fields" in text and (found := _or_none(self._ragged_line)):
            return DataError(
                f"{self.path}: line {found[0]} has {found[1]} fields, the header {len(self.schema)}: "
                f"{found[2][:120]!r} (an unquoted {self._separator_name()} inside a value?)"
            )
        if self.text and "could not parse" in text and (found := _or_none(self._open_quote)):
            return DataError(
                f"{self.path}: line {found[0]}, column {self._header(found[1])}: a quote opens a value that "
                'never closes (a quote inside a quoted value must be doubled: "")'
            )
        return DataError(f"{self.path}: cannot be read as {_kind(self.path)}: {_first_line(exc)}")

    def where(self, row: int, line: int | None = None) -> str:
        return f"line {line if line is not None else row + 2}" if self.text else f"row {row + 1}"

    def examples(self, bad: pl.Expr, column: str, n: int = 3) -> str:
        """ "2 value(s), e.g. 'abc' (line 5), 'x' (line 9):" for the rows where `bad` holds."""
        count = self.lazy.select(bad.sum()).collect(engine="streaming").item()
        rows = self.rows(bad, column, n)
        shown = ", ".join(f"{v!r} ({self.where(r, line)})" for r, line, v in rows)
        return f"{int(count):,} value(s), e.g. {shown}:"

    def rows(self, bad: pl.Expr, column: str, n: int = 3) -> list[tuple[int, int | None, object]]:
        """(row, line, value of `column`) of the first `n` rows where `bad` holds; a CSV row's
        line counts the newlines inside quoted values of the rows before it."""
        lazy = self.lazy.with_row_index("_row")
        if self.text:
            strings = [c for c, t in self.schema.items() if t == pl.String]
            inside = pl.sum_horizontal([pl.col(c).str.count_matches("\n").fill_null(0) for c in strings])
            lazy = lazy.with_columns(_line=pl.col("_row") + 2 + inside.cum_sum() - inside)
        else:
            lazy = lazy.with_columns(_line=pl.lit(None, pl.Int64))
        hits = lazy.filter(bad).select("_row", "_line", column).head(n).collect(engine="streaming")
        return hits.rows()

    def header_repeated(self) -> pl.Expr | None:
        """True on a CSV row that repeats the header (files joined together)."""
        names = REQUIRED[self.table]
        if not self.text:
            return None
        return pl.all_horizontal([pl.col(c) == c for c in names])

    def _header(self, index: int) -> str:
        names = list(self.schema)
        return names[index] if index < len(names) else f"{index + 1} (past the header's {len(names)} columns)"

    def _separator_name(self) -> str:
        return "tab" if self.separator == "\t" else "comma"

    def _delimiter_hint(self) -> str:
        columns = list(self.schema)
        if self.text and len(columns) == 1:
            for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "pipes"), (",", "commas")):
                if sep != self.separator and sep in columns[0]:
                    want = "tabs (.tsv)" if self.separator == "\t" else "commas (.csv)"
                    return f"; the header looks separated by {name}, but {self.path.name} must be separated by {want}"
        return ""

    def _ragged_line(self) -> tuple[int, int, str] | None:
        """(line, fields, text) of the first line with more fields than the header."""
        lines = pl.scan_csv(
            self.source, has_header=False, separator="\x1e", quote_char=None, schema={"line": pl.String}
        )
        text = pl.col("line").fill_null("").str.replace_all(r'"(?:[^"]|"")*"', '""')  # quoted parts do not count
        fields = (text.str.count_matches(self.separator, literal=True) + 1).alias("fields")
        found = (
            lines.with_row_index("i").filter(fields > len(self.schema)).select("i", fields, "line").head(1).collect()
        )
        return (found[0, 0] + 1, found[0, 1], found[0, 2]) if found.height else None

    def _open_quote(self) -> tuple[int, int] | None:
        """(line, field index) of a quote that no later quote closes."""
        quoted, opened = False, None
        with open(self.source, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if line.count(b'"') % 2:
                    quoted = not quoted
                    opened = (number, field_at(line, line.rfind(b'"'), self.separator)) if quoted else None
        return opened


def _read_interactions(path: Path, notes: list[str]) -> pl.DataFrame:
    with _plain(path, notes) as source:
        scan = _Scan(path, source, "interactions")
        numeric = _timestamp(scan, iso=False)
        if numeric.bad is None:
            iso = False
        else:
            sample = scan.collect(lambda lazy: lazy.select(numeric.flag()), ["timestamp"], head=SAMPLE_ROWS)
            iso = bool(sample.to_series().any())
        columns: dict[str, Parsed] = {
            "user_id": _id(scan, "user_id", notes),
            "item_id": _id(scan, "item_id", notes),
            "timestamp": _timestamp(scan, iso),
        }
        if "rating" in scan.schema:
            columns["rating"] = _rating(scan)
        if texts := [c for c in ("timestamp", "rating") if not scan.text and scan.schema.get(c) == pl.String]:
            notes.append(
                f"{path}: column(s) {', '.join(texts)} hold text: read as numbers (timestamps also as ISO 8601)"
            )
        frame = _collect(scan, columns)
        if not iso and frame.get_column(f"{BAD}timestamp", default=pl.Series([False])).any():
            # text that is not a number past the first rows: parse ISO 8601 too
            columns["timestamp"] = _timestamp(scan, iso=True)
            frame = _collect(scan, columns)
        _refuse_flagged(scan, frame, columns)
        if scan.text:
            _check_last_line(scan, frame.height)
        if "rating" in columns and (nan := int(frame["rating"].is_nan().sum())):
            notes.append(f"{path}: column rating: {nan:,} NaN value(s): read as missing ratings (implicit feedback)")
        frame = frame.select(list(columns))
        seconds, note = epoch_seconds(frame["timestamp"], path, scan.where)
        notes.append(note)
        return frame.with_columns(seconds)


def _collect(scan: _Scan, columns: dict[str, Parsed], raw: tuple[str, ...] = ()) -> pl.DataFrame:
    """The parsed columns, each with its flag of unreadable values, the repeated-header flag,
    and the `raw` columns as they are."""
    exprs = [pl.col(VALUE + name).alias(name) for name in columns] + list(raw)
    exprs += [p.bad(pl.col(VALUE + name)).alias(BAD + name) for name, p in columns.items() if p.bad is not None]
    if (header := scan.header_repeated()) is not None:
        exprs.append(header.alias(f"{BAD}header"))

    def query(lazy: pl.LazyFrame) -> pl.LazyFrame:
        return lazy.with_columns(p.value.alias(VALUE + name) for name, p in columns.items()).select(exprs)

    return scan.collect(query, [*columns, *raw])


def _refuse_flagged(scan: _Scan, frame: pl.DataFrame, columns: dict[str, Parsed]) -> None:
    """DataError for the first flagged problem: a repeated header, then a column's values."""
    if f"{BAD}header" in frame.columns and frame[f"{BAD}header"].any():
        rows = scan.rows(scan.header_repeated(), REQUIRED[scan.table][0])
        lines = ", ".join(scan.where(r, line) for r, line, _ in rows)
        repeat = "repeats" if len(rows) == 1 else "repeat"
        raise DataError(f"{scan.path}: {lines} {repeat} the header line (files joined together?); keep only the first")
    for name, p in columns.items():
        if p.bad is not None and frame[BAD + name].any():
            raise DataError(f"{scan.path}: column {name}: {scan.examples(p.flag(), name)} {p.problem}")


def _check_last_line(scan: _Scan, height: int) -> None:
    with open(scan.source, "rb") as fh:
        fh.seek(0, 2)
        if fh.tell() == 0:
            return
        fh.seek(-1, 2)
        if fh.read(1) == b"\n":
            return
    last = scan.lazy.tail(1).collect().row(0, named=True)
    if any(v is None or v == "" for v in last.values()):
        raise DataError(
            f"{scan.path}: the last line (line {height + 1}) is incomplete: {last}; the file looks truncated"
        )


# --- column parsers ------------------------------------------------------------------------


def _text(column: str) -> pl.Expr:
    """The stripped text of a column, null when empty (polars' `replace` does not stream)."""
    text = pl.col(column).str.strip_chars()
    return pl.when(text != "").then(text)


def _id(scan: _Scan, column: str, notes: list[str]) -> Parsed:
    """Ids as strings: text as written, integers in decimal; floats (pandas writes integer ids
    with gaps as float64) only when whole, read as integers with a note."""
    dtype, col = scan.schema[column], pl.col(column)
    if dtype == pl.String:
        return Parsed(col)
    if dtype.is_integer() or dtype.is_decimal() or dtype in (pl.Null, pl.Categorical) or isinstance(dtype, pl.Enum):
        return Parsed(col.cast(pl.String))
    if dtype.is_float():
        notes.append(f"{scan.path}: column {column} has type {dtype}: read as integer ids (1.0 -> '1')")
        whole = col.is_nan() | (col.is_finite() & (col == col.round(0)))
        return Parsed(col.cast(pl.Int64, strict=False).cast(pl.String), lambda _: col.is_not_null() & ~whole,
                      "not a whole number")  # fmt: skip
    raise DataError(f"{scan.path}: column {column} has type {dtype}; ids must be strings or integers")


def _timestamp(scan: _Scan, iso: bool) -> Parsed:
    """Epoch (Int64, unit not yet checked): integers pass, floats are rounded, timestamp types
    converted (naive = UTC); text is numbers, or with `iso` also ISO 8601 (naive = UTC)."""
    dtype, col = scan.schema["timestamp"], pl.col("timestamp")
    if dtype.is_integer():
        return Parsed(col.cast(pl.Int64))
    if dtype.is_float():
        return Parsed(col.round(0).cast(pl.Int64, strict=False), lambda _: col.is_infinite(), "not a finite number")
    if dtype == pl.Date:
        return Parsed(col.cast(pl.Datetime("us")).dt.epoch("s"))
    if isinstance(dtype, pl.Datetime):
        return Parsed(col.dt.epoch("s"))
    if dtype != pl.String:
        raise DataError(
            f"{scan.path}: column timestamp has type {dtype}; use integers (epoch seconds), ISO 8601 text "
            "or a timestamp type"
        )
    text = _text("timestamp")
    value = pl.coalesce(
        text.cast(pl.Int64, strict=False), text.cast(pl.Float64, strict=False).round(0).cast(pl.Int64, strict=False)
    )
    if iso:
        attempts = [text.str.to_datetime(fmt, time_zone="UTC", strict=False) for fmt in _ISO_WITH_ZONE]
        attempts += [text.str.to_datetime(fmt, strict=False).dt.replace_time_zone("UTC") for fmt in _ISO_NAIVE]
        value = pl.coalesce(value, pl.coalesce([a.dt.cast_time_unit("us") for a in attempts]).dt.epoch("s"))
    return Parsed(value, lambda v: text.is_not_null() & v.is_null(), "neither epoch seconds nor ISO 8601")


FLOAT32_MAX = 3.4028234663852886e38


def _rating(scan: _Scan) -> Parsed:
    """Float64 (Float32 in the canonical table); empty text and NaN are a missing rating
    (implicit feedback), infinity or a number beyond Float32 is refused."""
    dtype = scan.schema["rating"]
    if dtype.is_numeric() or dtype == pl.Null:
        raw, value = pl.col("rating"), pl.col("rating").cast(pl.Float64)
    elif dtype == pl.String:
        raw = _text("rating")
        value = raw.cast(pl.Float64, strict=False)
    else:
        raise DataError(f"{scan.path}: column rating has type {dtype}; ratings must be numbers")
    return Parsed(
        value,
        lambda v: raw.is_not_null() & (v.is_null() | (~v.is_nan() & (v.abs() > FLOAT32_MAX))),
        "not a finite number",
    )


# --- items and users -------------------------------------------------------------------------


def _read_items(path: Path, notes: list[str]) -> pl.DataFrame:
    items = _read_keyed(path, "items", "item_id", notes, ("title", "categories"))
    if "title" not in items.columns:
        items = items.with_columns(title=pl.lit(None, pl.String))
    if "categories" not in items.columns:
        categories = pl.lit([], pl.List(pl.String))
    elif isinstance(items.schema["categories"], pl.List):
        categories = pl.col("categories").cast(pl.List(pl.String))
    else:
        categories = (
            pl.col("categories")
            .cast(pl.String)
            .fill_null("")
            .str.split("|")
            .list.eval(pl.element().str.strip_chars().filter(pl.element() != ""))
        )
    return items.with_columns(title=pl.col("title").cast(pl.String), categories=categories)


def _read_keyed(
    path: Path, table: str, key: str, notes: list[str], columns: tuple[str, ...] | None = None
) -> pl.DataFrame:
    """An items or users file, one row per id: identical repeated lines collapse (with a note),
    lines that disagree about an id are refused."""
    with _plain(path, notes) as source:
        scan = _Scan(path, source, table)
        others = [c for c in scan.schema if c != key and (columns is None or c in columns)]
        parsed = {key: _id(scan, key, notes)}
        frame = _collect(scan, parsed, tuple(others))
        _refuse_flagged(scan, frame, parsed)
        frame = frame.select(key, *others)
        repeated = frame.filter(pl.col(key).is_not_null() & pl.col(key).is_duplicated())  # null: validation's
        if repeated.is_empty():
            return frame
        conflicting = repeated.unique().filter(pl.col(key).is_duplicated())[key].unique(maintain_order=True)
        if not conflicting.is_empty():
            first = conflicting[0]
            where = ", ".join(scan.where(r, line) for r, line, _ in scan.rows(parsed[key].value == first, key, 5))
            raise DataError(
                f"{path}: column {key}: {conflicting.len():,} id(s) on more than one line with different "
                f"{' or '.join(others)}, e.g. {first!r} ({where}); keep one line per id"
            )
        notes.append(
            f"{path}: column {key}: {repeated.height - repeated[key].n_unique():,} identical repeated line(s) "
            f"(e.g. {repeated[key][0]!r}) read once"
        )
        return frame.filter(pl.col(key).is_null() | pl.col(key).is_first_distinct())


# --- rating scale ------------------------------------------------------------------------------


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
    if "rating" not in interactions.columns:
        return None, None
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


def _or_none(find):
    """What a diagnosis helper finds, or None when the file defeats it too."""
    try:
        return find()
    except (pl.exceptions.PolarsError, OSError):
        return None


def _kind(path: Path) -> str:
    suffix = _suffix(path) or ""
    kind = "Parquet" if suffix in (".parquet", ".pq") else "TSV" if ".tsv" in suffix else "CSV"
    return f"gzip-compressed {kind}" if suffix.endswith(".gz") else kind


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
