"""The official MovieLens releases from GroupLens, read from a local folder or downloaded.

Three on-disk layouts, one parser each (ids stay strings, as written):

100k  (ml-100k)         u.data   user<TAB>item<TAB>rating<TAB>timestamp, no header
                        u.item   id|title|release date|video release date|IMDb URL|19 genre flags
                                 (latin-1; flag order given by u.genre, `name|index`)
                        u.user   id|age|gender|occupation|zip
dat   (ml-1m, ml-10m)   ratings.dat  UserID::MovieID::Rating::Timestamp
                        movies.dat   MovieID::Title::Genres (genres `|`-separated; latin-1 in 1m)
                        users.dat    1m only: UserID::Gender::Age::Occupation::Zip-code, where Age
                                     is a bucket code (kept as `age`, named in `age_bucket`) and
                                     Occupation a code 0-20 (mapped to its README name)
csv   (ml-20m, ml-25m,  ratings.csv  userId,movieId,rating,timestamp (with this header line)
       ml-latest,       movies.csv   movieId,title,genres (quoted titles; "(no genres listed)"
       ml-latest-small)              means no categories)

Releases without a users file get a users table of the rating user ids. Text files are read
as UTF-8 when valid (a byte-order mark and CRLF line ends are fine), else latin-1 (100k/dat,
logged) or rejected (csv). Parsing is vectorised: polars reads every field as a string, then
each column is checked and cast, so a damaged file yields a DataError naming the file, the
line and the offending value. Timestamps in epoch milliseconds (or finer) are converted to
seconds with a note (common.epoch_seconds); ratings of movies or users missing from the
movies or users file are reported (common.missing_ids).

`read` parses a snapshot folder, which movielens_fetch.snapshot makes (from a local folder, or
the official zip, downloaded and md5-checked when allowed).
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from userlens.errors import DataError
from userlens.schema import CanonicalTables
from userlens.sources.common import NO_ATTRIBUTES, UNKNOWN_ITEMS, UTF8_FIX, UTF16_BOMS, epoch_seconds, missing_ids

log = logging.getLogger(__name__)

BASE_URL = "https://files.grouplens.org/datasets/movielens"


@dataclass(frozen=True)
class Release:
    url: str
    md5: str | None  # of the official zip; None: use the published `<url>.md5` file
    layout: str  # "100k" | "dat" | "csv"
    files: tuple[str, ...]  # data files the reader needs
    folders: tuple[str, ...]  # names of the release folder (the first is the one in the zip)
    rating_scale: tuple[float, float]


Frames = tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]  # interactions, items, users


def _release(
    name: str,
    md5: str | None,
    layout: str,
    files: tuple[str, ...],
    scale: tuple[float, float],
    folder: str = "",
) -> Release:
    folders = (folder, name) if folder else (name,)
    return Release(f"{BASE_URL}/{name}.zip", md5, layout, files, folders, scale)


_100K = ("u.data", "u.item", "u.genre", "u.user")
_CSV = ("ratings.csv", "movies.csv")
# md5 values published by GroupLens in <url>.md5 (ml-1m also in /work/shared/data/SOURCES.md).
# The ml-latest archives are rebuilt from time to time, so they are checked against the
# companion .md5 file fetched at download time.
RELEASES: dict[str, Release] = {
    "ml-100k": _release("ml-100k", "0e33842e24a9c977be4e0107933c0723", "100k", _100K, (1.0, 5.0)),
    "ml-1m": _release(
        "ml-1m",
        "c4d9eecfca2ab87c1945afe126590906",
        "dat",
        ("ratings.dat", "movies.dat", "users.dat"),
        (1.0, 5.0),
    ),
    "ml-10m": _release(
        "ml-10m",
        "ce571fd55effeba0271552578f2648bd",
        "dat",
        ("ratings.dat", "movies.dat"),
        (0.5, 5.0),
        "ml-10M100K",
    ),
    "ml-20m": _release("ml-20m", "cd245b17a1ae2cc31bb14903e1204af3", "csv", _CSV, (0.5, 5.0)),
    "ml-25m": _release("ml-25m", "6b51fb2759a8657d3bfcbfc42b592ada", "csv", _CSV, (0.5, 5.0)),
    "ml-latest-small": _release("ml-latest-small", None, "csv", _CSV, (0.5, 5.0)),
    "ml-latest": _release("ml-latest", None, "csv", _CSV, (0.5, 5.0)),
}

AGE_BUCKETS = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip
NO_GENRES = "(no genres listed)"
_RATINGS = ("user_id", "item_id", "rating", "timestamp")


def release_of(dataset: str) -> Release:
    if dataset not in RELEASES:
        raise DataError(f"unknown MovieLens release {dataset!r}; use one of {', '.join(RELEASES)}")
    return RELEASES[dataset]


def alternatives(dataset: str) -> str:
    release = release_of(dataset)
    return (
        f"Alternatives: pass --data-dir or set USERLENS_DATA_DIR to a folder holding the official "
        f"{dataset} files ({', '.join(release.files)}, or its parent holding {release.folders[0]}/), "
        "or use the synthetic source (data.source: synthetic)."
    )


def require_files(folder: Path, release: Release) -> None:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (expected the MovieLens files {', '.join(release.files)})")
    missing = [f for f in release.files if not (folder / f).is_file()]
    if missing:
        held = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise DataError(
            f"{folder}: missing {', '.join(missing)}; expected {', '.join(release.files)}, but the folder holds: {held}"
        )


# --- reading ------------------------------------------------------------------------------


def read(dataset: str, raw_dir: Path, rating_scale: tuple[float, float] | None = None) -> CanonicalTables:
    """Parse the official files in raw_dir into the canonical tables."""
    release = release_of(dataset)
    raw_dir = Path(raw_dir)
    require_files(raw_dir, release)
    parser = {"100k": _read_100k, "dat": _read_dat, "csv": _read_csv}[release.layout]
    interactions, items, users = parser(raw_dir)
    if rating_scale is not None:
        scale, origin = (float(rating_scale[0]), float(rating_scale[1])), "declared"
    else:
        scale, origin = release.rating_scale, "source"
    notes = [f"MovieLens {dataset}; rating scale {list(scale)} ({origin})"]
    outside = interactions.filter(~pl.col("rating").is_between(*scale)).height
    if outside:
        notes.append(f"{raw_dir}: {outside} ratings fall outside the rating scale {list(scale)}")
    ratings_path = raw_dir / release.files[0]
    skip = 1 + int(release.layout == "csv")  # row i is line i + 1, after the header line of .csv
    seconds, note = epoch_seconds(interactions["timestamp"], ratings_path, lambda row: f"line {row + skip}")
    interactions = interactions.with_columns(seconds)
    items_path = raw_dir / release.files[1]
    users_path = raw_dir / next((f for f in release.files if f.startswith(("u.user", "users"))), "-")
    notes += [
        note,
        # official releases never miss one; a hand-cut release may miss many: reported, not refused
        missing_ids(interactions, items, "item_id", items_path, ratings_path, UNKNOWN_ITEMS, refuse_disjoint=False),
        missing_ids(interactions, users, "user_id", users_path, ratings_path, NO_ATTRIBUTES, refuse_disjoint=False)
        if users_path.is_file()
        else None,
    ]
    notes = [n for n in notes if n]
    for note in notes[1:]:
        log.warning("%s", note)
    log.info("read %s: %d ratings, %d users, %d items", dataset, interactions.height, users.height, items.height)
    return CanonicalTables(interactions, items, users, scale, origin, notes).conform()


def _read_100k(folder: Path) -> Frames:
    interactions = _ratings(folder / "u.data", "\t")
    genre_path = folder / "u.genre"
    genres = _fields(genre_path, ["name", "index"], "|", required=["name", "index"], latin1=True)
    genres = genres.with_columns(_ints(genres, genre_path, "index", "genre index")).sort("index")
    if genres["index"].to_list() != list(range(genres.height)):
        raise DataError(f"{genre_path}: genre indices must run 0..{genres.height - 1}, got {genres['index'].to_list()}")
    names = genres["name"].to_list()

    item_path = folder / "u.item"
    flags = [f"g{i}" for i in range(len(names))]
    raw = _fields(
        item_path,
        ["item_id", "title", "released", "video_released", "imdb_url", *flags],
        "|",
        required=["item_id", *flags],
        latin1=True,
    )
    _ints(raw, item_path, "item_id", "movie id")
    bad = ~pl.all_horizontal([pl.col(f).is_in(["0", "1"]) for f in flags])
    _fail_first(raw, bad, item_path, lambda row: f"genre flags must be 0 or 1, got {[row[f] for f in flags]}")
    categories = pl.concat_list([pl.when(pl.col(f) == "1").then(pl.lit(n)) for f, n in zip(flags, names, strict=True)])
    items = _unique(
        raw.select("item_id", "title", categories.list.drop_nulls().alias("categories")), item_path, "item_id"
    )

    user_path = folder / "u.user"
    users = _fields(
        user_path,
        ["user_id", "age", "gender", "occupation", "zip"],
        "|",
        required=["user_id", "age", "gender", "occupation"],
        latin1=True,
    )
    _ints(users, user_path, "user_id", "user id")
    users = _unique(users.with_columns(_ints(users, user_path, "age", "age")), user_path, "user_id")
    return interactions, items, users


def _read_dat(folder: Path) -> Frames:
    interactions = _ratings(folder / "ratings.dat", "::")
    items = _movies(folder / "movies.dat", "::")
    path = folder / "users.dat"
    if not path.is_file():  # ml-10m has no users file
        return interactions, items, _users_of(interactions)
    users = _fields(
        path,
        ["user_id", "gender", "age", "occupation", "zip"],
        "::",
        required=["user_id", "gender", "age", "occupation"],
        latin1=True,
    )
    _ints(users, path, "user_id", "user id")
    users = users.with_columns(
        _ints(users, path, "age", "age code"), _ints(users, path, "occupation", "occupation code")
    )
    _fail_first(
        users,
        ~pl.col("age").is_in(list(AGE_BUCKETS)),
        path,
        lambda row: f"age code {row['age']} is not one of {', '.join(map(str, AGE_BUCKETS))}",
    )
    _fail_first(
        users,
        ~pl.col("occupation").is_between(0, len(OCCUPATIONS) - 1),
        path,
        lambda row: f"occupation code {row['occupation']} is not one of 0-{len(OCCUPATIONS) - 1}",
    )
    users = users.select(
        "user_id",
        "age",
        pl.col("age").replace_strict(AGE_BUCKETS, return_dtype=pl.String).alias("age_bucket"),
        "gender",
        pl.col("occupation").replace_strict(dict(enumerate(OCCUPATIONS)), return_dtype=pl.String),
        "zip",
    )
    return interactions, items, _unique(users, path, "user_id")


def _read_csv(folder: Path) -> Frames:
    interactions = _ratings(folder / "ratings.csv", ",", header="userId,movieId,rating,timestamp")
    items = _movies(folder / "movies.csv", ",", header="movieId,title,genres")
    return interactions, items, _users_of(interactions)


def _ratings(path: Path, sep: str, header: str | None = None) -> pl.DataFrame:
    frame = _fields(path, list(_RATINGS), sep, required=list(_RATINGS), header=header)
    _ints(frame, path, "user_id", "user id")
    _ints(frame, path, "item_id", "movie id")
    rating = frame["rating"].cast(pl.Float32, strict=False)
    _fail_first(
        frame,
        pl.lit(rating).is_null() | ~pl.lit(rating).is_finite(),
        path,
        lambda row: f"rating {row['rating']!r} is not a number",
    )
    return frame.with_columns(_ints(frame, path, "timestamp", "timestamp"), pl.lit(rating).alias("rating"))


def _movies(path: Path, sep: str, header: str | None = None) -> pl.DataFrame:
    frame = _fields(
        path,
        ["item_id", "title", "genres"],
        sep,
        required=["item_id", "genres"],
        header=header,
        quoted=header is not None,
        latin1=header is None,
    )
    _ints(frame, path, "item_id", "movie id")
    genres = pl.col("genres").str.split("|").list.eval(pl.element().filter(pl.element() != NO_GENRES))
    return _unique(frame.select("item_id", "title", genres.alias("categories")), path, "item_id")


def _users_of(interactions: pl.DataFrame) -> pl.DataFrame:
    return interactions.select(pl.col("user_id").unique(maintain_order=True))


# --- shared helpers -----------------------------------------------------------------------


def _fields(
    path: Path,
    names: list[str],
    sep: str,
    *,
    required: list[str],
    header: str | None = None,
    quoted: bool = False,
    latin1: bool = False,
) -> pl.DataFrame:
    """Read a delimited text file into string columns `names`; DataError on any damage.

    The returned frame carries one row per line after the header: row i is line i + 1 + (header).
    """
    raw, complete = _load(path, latin1)
    psep = sep
    if sep == "::":  # polars takes a one-byte separator
        if b"\x1f" in raw:
            raise DataError(f"{path}: contains control byte 0x1f; not a MovieLens text file")
        raw, psep = raw.replace(b"::", b"\x1f"), "\x1f"
    skip = 0
    if header is not None:
        end = raw.find(b"\n")
        first = raw[:end]
        if first.decode("utf-8", "replace") != header:
            raise DataError(
                f"{path}: line 1 is {first[:100].decode('utf-8', 'replace')!r}, expected the header "
                f"{header!r} (wrong delimiter, or not the official file?)"
            )
        if len(raw) == end + 1:
            raise DataError(f"{path}: has a header line but no data rows")
        again = raw.find(b"\n" + first + b"\n", end)
        if again >= 0:  # files joined together
            line = raw.count(b"\n", 0, again + 1) + 1
            raise DataError(
                f"{path}: line {line} repeats the header line {header!r} (files joined together?); remove it"
            )
        skip = 1
    try:
        frame = pl.read_csv(
            raw,
            has_header=False,
            skip_rows=skip,
            separator=psep,
            quote_char='"' if quoted else None,
            schema=dict.fromkeys(names, pl.String),
        )
    except pl.exceptions.PolarsError as exc:
        _field_count_error(path, raw, psep, sep, len(names), complete, quoted)
        raise DataError(f"{path}: cannot be parsed as {len(names)} fields separated by {sep!r}: {exc}") from None
    missing = pl.any_horizontal([pl.col(c).is_null() for c in required])
    if frame.select(missing.any()).item():
        _field_count_error(path, raw, psep, sep, len(names), complete, quoted)
        _fail_first(frame, missing, path, lambda row: f"empty field(s) {[c for c in required if row[c] is None]}")
    return frame


def _load(path: Path, latin1: bool) -> tuple[bytes, bool]:
    """The file as UTF-8 bytes with LF line ends and one final newline; and whether it had one."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not raw or raw.isspace():
        raise DataError(f"{path}: the file is empty")
    if b"\x00" in raw:
        what = "UTF-16 text" if raw.startswith(UTF16_BOMS) else "binary data (or UTF-16)"
        raise DataError(f"{path}: contains NUL bytes: {what}, not a MovieLens text file; re-save it as UTF-8")
    raw = raw.removeprefix(codecs.BOM_UTF8)
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not latin1:
                line = raw.count(b"\n", 0, exc.start) + 1
                snippet = raw[max(0, exc.start - 20) : exc.start + 10]
                raise DataError(
                    f"{path}: not valid UTF-8 at line {line} (bytes {snippet!r}); the official file is UTF-8: "
                    f"{UTF8_FIX}"
                ) from None
            log.info("%s: not UTF-8, read as latin-1 (as the official file is written)", path)
            raw = raw.decode("latin-1").encode("utf-8")
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    complete = raw.endswith(b"\n")
    if not complete:
        log.warning("%s: no newline at the end: the last line may be truncated", path)
        raw += b"\n"
    elif raw.endswith(b"\n\n"):  # blank lines at the end (u.genre has one)
        raw = raw.rstrip(b"\n") + b"\n"
    return raw, complete


def _field_count_error(path: Path, raw: bytes, psep: str, sep: str, n: int, complete: bool, quoted: bool) -> None:
    """Raise a DataError naming the first line whose field count is not `n` (if there is one)."""
    if b"\x1e" in raw:
        return
    lines = pl.read_csv(raw, has_header=False, separator="\x1e", quote_char=None, schema={"line": pl.String})
    text = pl.col("line").fill_null("")
    if quoted:  # drop quoted parts, whose separators do not count
        text = text.str.replace_all(r'"(?:[^"]|"")*"', '""')
    count = pl.when(pl.col("line").is_null()).then(0).otherwise(text.str.count_matches(psep, literal=True) + 1)
    bad = lines.with_row_index("i").with_columns(count.alias("n")).filter(pl.col("n") != n)
    if bad.height == 0:
        return
    i, line, got = bad.row(0)
    line = (line or "").replace("\x1f", "::")
    found = "it is blank" if not line else f"it has {got} field(s)"
    hint = ""
    if i + 1 == lines.height and not complete:
        hint = "; the last line is incomplete: the file looks truncated"
    elif line and sep not in line:
        hint = next((f"; it looks separated by {d!r}" for d in ("\t", ",", ";", "|", "::") if d in line), "")
    raise DataError(
        f"{path}: line {i + 1}: expected {n} fields separated by {sep!r}, but {found}: {line[:120]!r}{hint}"
    )


def _ints(frame: pl.DataFrame, path: Path, column: str, label: str) -> pl.Series:
    """Column `column` as Int64, or a DataError naming the first non-integer value."""
    values = frame[column].cast(pl.Int64, strict=False)
    _fail_first(
        frame,
        pl.lit(values).is_null() & pl.col(column).is_not_null(),
        path,
        lambda row: f"{label} {row[column]!r} is not an integer",
    )
    return values


def _fail_first(frame: pl.DataFrame, bad: pl.Expr, path: Path, describe: Callable[[dict], str]) -> None:
    """Raise a DataError for the first row where `bad` holds, with its line number.

    Row i of a frame from `_fields` is line i + 1, plus one for the header of the .csv files.
    """
    hits = frame.with_row_index("_row").filter(bad)
    if hits.height == 0:
        return
    row = hits.row(0, named=True)
    skip = int(path.suffix == ".csv")
    line = row.pop("_row") + 1 + skip
    header_like = all(isinstance(v, str) and not v.replace(".", "", 1).isdigit() for v in row.values())
    hint = " (a header line? the official file has none)" if skip == 0 and header_like else ""
    more = f" ({hits.height - 1} more such lines)" if hits.height > 1 else ""
    raise DataError(f"{path}: line {line}: {describe(row)}{hint}{more}")


def _unique(frame: pl.DataFrame, path: Path, key: str) -> pl.DataFrame:
    dup = frame[key].is_duplicated()
    if dup.any():
        example = frame.filter(dup)[key][0]
        lines = (frame[key] == example).arg_true() + 1 + int(path.suffix == ".csv")  # as in _fail_first
        more = frame.filter(dup)[key].n_unique() - 1
        raise DataError(
            f"{path}: {key} {example!r} appears on more than one line (lines {', '.join(map(str, lines))})"
            + (f"; {more} more such id(s)" if more else "")
        )
    return frame
