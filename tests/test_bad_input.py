"""The bad-input corpus (issue 13): every reader, every case generated here, through the CLI.

Each case writes its files, then runs `userlens fetch` and `userlens ingest` as a person
would, on a copy of a project that already holds a successful run (canonical tables,
validation, quarantine, sequences). A case is either accepted, and the canonical tables hold
exactly the expected rows, or refused: exit 2 (3 when validation refuses it), one `error:`
line naming the file, the column and example rows, no traceback, and the previous run's
outputs byte for byte as they were (after a validation refusal: the quarantine and the
sequences; the canonical tables then hold what validation refused, as documented).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from conftest import make_project, run, set_params, userlens
from userlens.io import read_json

pytestmark = pytest.mark.integration  # the real CLI, DVC and (for some cases) Great Expectations

DATASET = "shop"
# The good data: 6 users x 6 events on 10 items, whole-star ratings, epoch seconds in 2020.
EVENTS = [
    (f"u{u}", f"i{(3 * u + k) % 10}", 1_600_000_000 + 1000 * u + 60 * k, float(1 + (u + k) % 5))
    for u in range(6)
    for k in range(6)
]
CATEGORIES = ["Drama|Crime", "Comedy", "Sci-Fi|Action|Drama"]
ITEMS = [(f"i{j}", f"Item {j}", CATEGORIES[j % 3]) for j in range(10)]
HEADER = ("user_id", "item_id", "timestamp", "rating")


def table(rows, header=HEADER, sep=",", newline="\n") -> str:
    return "".join(sep.join(map(str, row)) + newline for row in [header, *rows])


def events(rows=EVENTS, **kw) -> bytes:
    """The events as CSV text; whole-number ratings written as integers (4, not 4.0)."""
    return table([(u, i, t, int(r) if isinstance(r, float) else r) for u, i, t, r in rows], **kw).encode()


def items(rows=ITEMS) -> bytes:
    return table(rows, ("item_id", "title", "categories")).encode()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def parquet(**columns) -> bytes:
    import io

    buffer = io.BytesIO()
    pl.DataFrame(columns, strict=False).write_parquet(buffer)
    return buffer.getvalue()


def with_row(rows, index, **changes):
    """`rows` with one event's fields replaced (by position in HEADER)."""
    out = list(rows)
    row = list(out[index])
    for name, value in changes.items():
        row[HEADER.index(name)] = value
    out[index] = tuple(row)
    return out


# --- MovieLens layouts, tiny but official in shape -------------------------------------------

GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]  # fmt: skip
ML_EVENTS = [(str(u), str(10 * ((u + k) % 4 + 1)), 881_250_949 + 100 * u + k, 1 + (u * k) % 5)
             for u in range(1, 4) for k in range(5)]  # fmt: skip
ML_TITLES = {"10": "Toy Story (1995)", "20": "Misérables, Les (1995)", "30": "Café au Lait (1993)",
             "40": "American President, The (1995)"}  # fmt: skip


def ml_100k(data: bytes | None = None) -> dict[str, bytes]:
    flags = "|".join(["0"] * 7 + ["1"] + ["0"] * 11)  # Documentary
    return {
        "u.data": data or "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, t, r in ML_EVENTS).encode(),
        "u.item": "".join(f"{i}|{title}|01-Jan-1995||http://x|{flags}\n" for i, title in ML_TITLES.items()).encode(
            "latin-1"
        ),
        "u.genre": "".join(f"{g}|{n}\n" for n, g in enumerate(GENRES)).encode() + b"\n",
        "u.user": b"1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n",
    }


def ml_1m(movies: bytes | None = None) -> dict[str, bytes]:
    return {
        "ratings.dat": "".join(f"{u}::{i}::{r}::{t}\n" for u, i, t, r in ML_EVENTS).encode(),
        "movies.dat": movies
        or "".join(f"{i}::{title}::Comedy|Drama\n" for i, title in ML_TITLES.items()).encode("latin-1"),
        "users.dat": b"1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n",
    }


ML_CSV_HEADER = "userId,movieId,rating,timestamp\n"


def ml_csv(ratings: bytes | None = None, movies: bytes | None = None, unit: int = 1) -> dict[str, bytes]:
    default = ML_CSV_HEADER + "".join(f"{u},{i},{r}.0,{t * unit}\n" for u, i, t, r in ML_EVENTS)
    titles = "".join(f'{i},"{title}",Comedy|Drama\n' for i, title in ML_TITLES.items())
    return {
        "ratings.csv": ratings or default.encode(),
        "movies.csv": movies or ("movieId,title,genres\n" + titles).encode(),
    }


# --- the cases ----------------------------------------------------------------------------------

Check = Callable[[dict[str, pl.DataFrame], str], None]


@dataclass
class Case:
    files: dict[str, bytes]  # generic: interactions.<ext>, items.<ext>, users.<ext>; MovieLens: the release
    dataset: str = DATASET  # a MovieLens release name reads `files` as that release
    check: Check | None = None  # accepted: assertions on the canonical tables and stderr
    error: tuple[str, ...] = ()  # refused: patterns the message must match (file, column, rows)
    exit_code: int = 2
    validate: bool = False  # accepted: run `userlens validate` too

    def args(self, folder: Path) -> list[str]:
        if self.dataset.startswith("ml-"):
            return ["--source", "movielens", "--dataset", self.dataset, "--data-dir", str(folder),
                    "--set", "data.download=false"]  # fmt: skip
        args = ["--set", f"data.dataset={self.dataset}"]
        for name in sorted(self.files):
            path = folder / name
            if name.startswith("interactions"):
                args = ["--interactions", str(path), *args]
            else:
                args += ["--set", f"data.{name.split('.')[0]}={path}"]
        return args


def rows_are(expected) -> Check:
    def check(tables, stderr):
        assert tables["interactions"].rows() == [(u, i, t, float(r)) for u, i, t, r in expected]

    return check


def base_rows(tables, stderr):
    rows_are(EVENTS)(tables, stderr)
    assert tables["items"].rows() == [(i, t, c.split("|")) for i, t, c in ITEMS]


def noted(pattern: str, then: Check = base_rows) -> Check:
    """`then`, and a warning on stderr that matches `pattern` (it is in the manifest too)."""

    def check(tables, stderr):
        then(tables, stderr)
        assert re.search(pattern, stderr), stderr

    return check


def titles_are(expected: dict[str, str]) -> Check:
    def check(tables, stderr):
        assert dict(tables["items"].select("item_id", "title").rows()) == expected

    return check


def ml_rows(tables, stderr):
    assert tables["interactions"].rows() == [(u, i, t, float(r)) for u, i, t, r in ML_EVENTS]


def ratings_nan_and_empty(tables, stderr):
    ratings = tables["interactions"]["rating"].to_list()
    assert ratings[2] is None and ratings[5] is None and ratings[0] == EVENTS[0][3]
    assert re.search(r"interactions\.csv: column rating: 1 NaN value\(s\): read as missing", stderr)


def iso_zones(tables, stderr):
    assert tables["interactions"]["timestamp"].head(3).to_list() == [1_600_000_000, 1_600_000_000, 1_600_000_000]


def float_ids(tables, stderr):
    assert tables["interactions"]["user_id"].to_list()[:2] == ["1", "1"]
    assert tables["interactions"]["timestamp"].to_list()[:2] == [1_600_000_000, 1_600_000_060]
    assert re.search(r"column user_id has type Float64: read as integer ids", stderr)


def one_item_per_id(tables, stderr):
    base_rows(tables, stderr)
    assert re.search(r"items\.csv: column item_id: 1 identical repeated line\(s\) \(e\.g\. 'i3'\) read once", stderr)


def users_partial(tables, stderr):
    assert tables["users"]["user_id"].to_list() == ["u0", "u1", "u9"]
    expected = (r"users\.csv: column user_id: 4 of the 6 ids in interactions\.csv are missing here "
                r"\(e\.g\. 'u2', 'u3', 'u4'; 24 interactions\): those users have no attributes")  # fmt: skip
    assert re.search(expected, stderr), stderr


MS = [(u, i, t * 1000 + 123, r) for u, i, t, r in EVENTS]
US = [(u, i, t * 1_000_000, r) for u, i, t, r in EVENTS]
QUOTED_ITEMS = [("i0", '"Crime, and Punishment"', "Drama"), ("i1", '"Two\nlines"', "Comedy"),
                ("i2", '"He said ""hi"""', "Drama")] + [(i, t, c) for i, t, c in ITEMS[3:]]  # fmt: skip
LATIN1_ITEMS = table([("i0", "Amélie", "Comedy"), *ITEMS[1:]], ("item_id", "title", "categories"))
UTF16 = table([(u, i, t, int(r)) for u, i, t, r in EVENTS]).encode("utf-16")
UNICODE_TITLES = {i: (f"Amélie {i}" if i == "i0" else t) for i, t, _ in ITEMS}

# fmt: off
CASES: dict[str, Case] = {
    # accepted: text encodings, line ends, compression
    "csv-utf8-bom": Case({"interactions.csv": b"\xef\xbb\xbf" + events(), "items.csv": items()}, check=base_rows),
    "tsv-utf8-bom-crlf": Case({"interactions.tsv": b"\xef\xbb\xbf" + events(sep="\t", newline="\r\n"),
                               "items.csv": items()}, check=base_rows),
    "csv-gzip-crlf": Case({"interactions.csv.gz": gz(events()), "items.csv.gz": gz(items().replace(b"\n", b"\r\n"))},
                          check=base_rows),
    "tsv-gzip-crlf": Case({"interactions.tsv.gz": gz(events(sep="\t", newline="\r\n")), "items.csv": items()},
                          check=base_rows),
    "utf16-with-bom": Case({"interactions.csv": UTF16, "items.csv": table(
        [(i, UNICODE_TITLES[i], c) for i, _, c in ITEMS], ("item_id", "title", "categories")).encode("utf-16")},
        check=noted(r"interactions\.csv: decoded from UTF-16", titles_are(UNICODE_TITLES))),
    "quoted-delimiters-and-newlines": Case({"interactions.csv": events(), "items.csv": items(QUOTED_ITEMS)},
        check=titles_are({"i0": "Crime, and Punishment", "i1": "Two\nlines", "i2": 'He said "hi"',
                          **{i: t for i, t, _ in ITEMS[3:]}})),
    # accepted: timestamp units and formats
    "epoch-milliseconds": Case({"interactions.csv": events(MS), "items.csv": items()},
        check=noted(r"interactions\.csv: column timestamp holds epoch milliseconds \(e\.g\. 1600000000123\); "
                    r"converted to seconds"), validate=True),
    "epoch-microseconds": Case({"interactions.csv": events(US), "items.csv": items()},
        check=noted(r"column timestamp holds epoch microseconds")),
    "epoch-float-seconds": Case({"interactions.csv": events([(u, i, f"{t}.4", r) for u, i, t, r in EVENTS]),
                                 "items.csv": items()}, check=base_rows),
    "iso-8601-with-zones": Case({"interactions.csv": events(with_row(with_row(with_row(
        EVENTS, 0, timestamp="2020-09-13T12:26:40Z"), 1, timestamp="2020-09-13T14:26:40+02:00"),
        2, timestamp="2020-09-13 12:26:40"))}, check=iso_zones),
    # accepted: missing ratings, items and users that repeat or do not cover everyone
    "ratings-nan-and-empty": Case({"interactions.csv": events(with_row(with_row(EVENTS, 2, rating="NaN"), 5,
                                                                       rating=""))}, check=ratings_nan_and_empty),
    "items-identical-duplicate-lines": Case({"interactions.csv": events(), "items.csv": items(
        [*ITEMS[:4], ITEMS[3], *ITEMS[4:]])}, check=one_item_per_id),
    "users-partly-listed": Case({"interactions.csv": events(), "users.csv": b"user_id,age\nu0,31\nu1,42\nu9,50\n"},
                                check=users_partial),
    # accepted: Parquet with loose column types
    "parquet-text-columns": Case({"interactions.parquet": parquet(
        user_id=[e[0] for e in EVENTS], item_id=[e[1] for e in EVENTS], timestamp=[f"{e[2]}.0" for e in EVENTS],
        rating=[str(e[3]) for e in EVENTS]), "items.parquet": parquet(
        item_id=[i for i, _, _ in ITEMS], title=[t for _, t, _ in ITEMS],
        categories=[c.split("|") for _, _, c in ITEMS])},
        check=noted(r"interactions\.parquet: column\(s\) timestamp, rating hold text: read as numbers")),
    "parquet-float-ids-datetime": Case({"interactions.parquet": parquet(
        user_id=[1.0, 1.0, None], item_id=[7, 8, 9],
        timestamp=(pl.Series([1_600_000_000, 1_600_000_060, 1_600_000_120]) * 1000).cast(pl.Datetime("ms")),
        )}, check=float_ids),
    # refused: encodings and compression
    "latin1-items": Case({"interactions.csv": events(), "items.csv": LATIN1_ITEMS.encode("latin-1")},
        error=(r"items\.csv: not valid UTF-8 at line 2, column title", r"re-save it as UTF-8")),
    "utf16-without-bom": Case({"interactions.csv": UTF16[2:]},
                              error=(r"interactions\.csv: looks like UTF-16 .*without a byte-order mark",
                                     r"re-save it as UTF-8")),
    "gzip-truncated": Case({"interactions.csv.gz": gz(events() * 50)[:300]},
                           error=(r"interactions\.csv\.gz: not a complete gzip file", r"compress it again")),
    # refused: values
    "epoch-mixed-units": Case({"interactions.csv": events(with_row(with_row(EVENTS, 4, timestamp=1_600_000_000_000),
                                                                   9, timestamp=1_600_000_001_000))},
        error=(r"interactions\.csv: column timestamp mixes epoch seconds and milliseconds: 2 value\(s\) look like "
               r"milliseconds, e\.g\. 1600000000000 \(line 6\), 1600000001000 \(line 11\)",
               r"write every timestamp in one unit")),
    "rating-inf": Case({"interactions.csv": events(with_row(with_row(EVENTS, 3, rating="inf"), 7, rating="-inf"))},
        error=(r"interactions\.csv: column rating: 2 value\(s\), e\.g\. 'inf' \(line 5\), '-inf' \(line 9\): "
               r"not a finite number",)),
    "header-line-repeated": Case({"interactions.csv": events() + events()},
        error=(r"interactions\.csv: line 38 repeats the header line", r"keep only the first")),
    "quote-never-closed": Case({"interactions.csv": events(), "items.csv": items(
        [*ITEMS[:5], ("i5", '"Open quote', "Drama"), *ITEMS[6:]])},
        error=(r"items\.csv: line 7, column title: a quote opens a value that never closes",)),
    "unquoted-delimiter": Case({"interactions.csv": events(), "items.csv": items(
        [*ITEMS[:2], ("i2", "Crime, and Punishment", "Drama"), *ITEMS[3:]])},
        error=(r"items\.csv: line 4 has 4 fields, the header 3: 'i2,Crime, and Punishment,Drama'",)),
    # refused: tables that disagree
    "items-conflicting-categories": Case({"interactions.csv": events(), "items.csv": items(
        [*ITEMS, ("i3", "Item 3", "Horror")])},
        error=(r"items\.csv: column item_id: 1 id\(s\) on more than one line with different title or categories, "
               r"e\.g\. 'i3' \(line 5, line 12\)",)),
    "users-conflicting-attributes": Case({"interactions.csv": events(),
                                          "users.csv": b"user_id,age\nu0,31\nu1,42\nu0,32\n"},
        error=(r"users\.csv: column user_id: 1 id\(s\) on more than one line with different age, e\.g\. 'u0' "
               r"\(line 2, line 4\)",)),
    "items-of-another-dataset": Case({"interactions.csv": events(),
                                      "items.csv": items([(str(j), t, c) for j, (_, t, c) in enumerate(ITEMS)])},
        error=(r"items\.csv: column item_id: none of the 10 ids in interactions\.csv is in this file \(e\.g\. 'i0' "
               r"there, '0' here\)",)),
    "items-missing-some-ids": Case({"interactions.csv": events(), "items.csv": items(ITEMS[:8])}, exit_code=3,
        error=(r"items\.csv: column item_id: 2 of the 10 ids in interactions\.csv are missing here \(e\.g\. 'i8', "
               r"'i9'; 6 interactions\)", r"reference an item missing from the items table")),
    # refused: Parquet with wrong column types
    "parquet-rating-words": Case({"interactions.parquet": parquet(
        user_id=["u0", "u0"], item_id=["i0", "i1"], timestamp=[1_600_000_000, 1_600_000_001], rating=["4", "good"])},
        error=(r"interactions\.parquet: column rating: 1 value\(s\), e\.g\. 'good' \(row 2\): not a finite",)),
    "parquet-timestamp-boolean": Case({"interactions.parquet": parquet(
        user_id=["u0"], item_id=["i0"], timestamp=[True])},
        error=(r"interactions\.parquet: column timestamp has type Boolean; use integers",)),
    "parquet-fractional-ids": Case({"interactions.parquet": parquet(
        user_id=["u0", "u0"], item_id=[1.0, 1.5], timestamp=[1_600_000_000, 1_600_000_001])},
        error=(r"interactions\.parquet: column item_id: 1 value\(s\), e\.g\. 1\.5 \(row 2\): not a whole number",)),
    "parquet-that-is-csv": Case({"interactions.parquet": events()},
                                error=(r"interactions\.parquet: cannot be read as Parquet",)),
    "unsupported-suffix": Case({"interactions.xlsx": b"PK\x03\x04"},
                               error=(r"interactions\.xlsx: unsupported file type '\.xlsx'; use one of",)),
    # MovieLens layouts
    "ml-100k-bom-crlf": Case(ml_100k(b"\xef\xbb\xbf" + "".join(f"{u}\t{i}\t{r}\t{t}\r\n" for u, i, t, r in ML_EVENTS)
                                     .encode()), dataset="ml-100k", check=ml_rows),
    "ml-1m-latin1-titles": Case(ml_1m(), dataset="ml-1m", check=titles_are(ML_TITLES)),
    "ml-20m-quoted-newline-title": Case(ml_csv(movies=(
        b'movieId,title,genres\n10,"Toy Story,\nThe (1995)",Comedy\n20,"A ""B"" C",Drama\n30,C,Drama\n40,D,Drama\n'
        )), dataset="ml-20m",
        check=titles_are({"10": "Toy Story,\nThe (1995)", "20": 'A "B" C', "30": "C", "40": "D"})),
    "ml-20m-epoch-milliseconds": Case(ml_csv(unit=1000), dataset="ml-20m",
        check=noted(r"ratings\.csv: column timestamp holds epoch milliseconds", ml_rows), validate=True),
    "ml-20m-mixed-units": Case(ml_csv(ratings=(ML_CSV_HEADER + "1,10,4.0,881250949\n1,20,3.0,881250949000\n").encode()),
        dataset="ml-20m", error=(r"ratings\.csv: column timestamp mixes epoch seconds and milliseconds: 1 value\(s\) "
                                 r"look like milliseconds, e\.g\. 881250949000 \(line 3\)",)),
    "ml-100k-utf16": Case(ml_100k("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, t, r in ML_EVENTS).encode("utf-16")),
                          dataset="ml-100k",
                          error=(r"u\.data: contains NUL bytes: UTF-16 text", r"re-save it as UTF-8")),
    "ml-20m-header-repeated": Case(ml_csv(ratings=(ML_CSV_HEADER + "1,10,4.0,881250949\n" + ML_CSV_HEADER
                                                   + "2,10,3.0,881250950\n").encode()), dataset="ml-20m",
        error=(r"ratings\.csv: line 3 repeats the header line 'userId,movieId,rating,timestamp'",)),
    "ml-20m-nan-rating": Case(ml_csv(ratings=(ML_CSV_HEADER + "1,10,4.0,881250949\n1,20,nan,881250950\n").encode()),
                              dataset="ml-20m", error=(r"ratings\.csv: line 3: rating 'nan' is not a number",)),
    "ml-20m-latin1": Case(ml_csv(movies="movieId,title,genres\n10,Toy,Comedy\n20,Café,Drama\n".encode("latin-1")),
                          dataset="ml-20m", error=(r"movies\.csv: not valid UTF-8 at line 3", r"re-save it as UTF-8")),
    "ml-1m-movie-listed-twice": Case(ml_1m(b"10::A (1995)::Drama\n10::B (1996)::Comedy\n"), dataset="ml-1m",
        error=(r"movies\.dat: item_id '10' appears on more than one line \(lines 1, 2\)",)),
    "ml-100k-unknown-movie": Case(ml_100k("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, t, r in [*ML_EVENTS, (
        "1", "99", 881_260_000, 3)]).encode()), dataset="ml-100k", exit_code=3,
        error=(r"u\.item: column item_id: 1 of the 5 ids in u\.data are missing here \(e\.g\. '99'; 1 interactions\)",
               r"reference an item missing from the items table")),
}
# fmt: on


# --- the previous run, and running a case ------------------------------------------------------

KEPT = ("data/canonical", "data/sequences", "reports/quarantine")  # what a refused ingest must leave alone


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A project after a successful fetch -> ingest -> validate -> sequences on the good data."""
    root = tmp_path_factory.mktemp("bad-input")
    project = make_project(root / "project")
    set_params(project, {"dvc": {"push": False}})
    case = Case({"interactions.csv": events(), "items.csv": items()})
    args = case.args(_write(case, root / "good"))
    for verb in ("fetch", "ingest", "validate", "sequences"):
        userlens(project, *args, verb)
    assert hashes(project, "data/sequences") and hashes(project, "reports/quarantine")
    return project


@pytest.fixture
def previous_run(template, tmp_path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(template, project, symlinks=True)
    return project


def _write(case: Case, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in case.files.items():
        (folder / name).write_bytes(content)
    return folder


def hashes(project: Path, *folders: str) -> dict[str, str]:
    return {
        str(path.relative_to(project)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted((project / folder).rglob("*"))
        if path.is_file()
    }


def ingest(project: Path, args: list[str], validate: bool) -> tuple[subprocess.CompletedProcess, str]:
    """fetch, ingest (and validate) until one fails; the last command run and all their stderr."""
    stderr = ""
    for verb in ("fetch", "ingest", "validate")[: 3 if validate else 2]:
        done = userlens(project, *args, verb, check=False)
        stderr += done.stderr
        if done.returncode:
            break
    return done, stderr


def canonical(project: Path) -> dict[str, pl.DataFrame]:
    return {
        name: pl.read_parquet(project / "data" / "canonical" / f"{name}.parquet")
        for name in ("interactions", "items", "users")
    }


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, previous_run, tmp_path):
    case = CASES[name]
    args = case.args(_write(case, tmp_path / "input"))
    before = hashes(previous_run, *KEPT)
    done, stderr = ingest(previous_run, args, validate=case.validate or case.exit_code == 3)
    assert "Traceback" not in stderr, stderr
    if case.check is not None:
        assert done.returncode == 0, stderr
        tables = canonical(previous_run)
        case.check(tables, stderr)
        notes = read_json(previous_run / "data" / "canonical" / "manifest.json")["notes"]
        assert all(note in stderr for note in notes[1:]), (notes, stderr)  # every note is logged
        return
    assert done.returncode == case.exit_code, stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    message = errors[0] if case.exit_code == 2 else stderr
    for pattern in case.error:
        assert re.search(pattern, message), message
    assert len(stderr) < 1500 and len(errors[0]) < 400, stderr  # short: a person reads it whole
    kept = KEPT if case.exit_code == 2 else KEPT[1:]  # validation reads the new canonical tables
    assert hashes(previous_run, *kept) == {k: v for k, v in before.items() if k.startswith(kept)}


def test_corpus_is_broad():
    readers = {".csv", ".tsv", ".parquet", ".gz"}
    suffixes = {Path(n).suffix for c in CASES.values() for n in c.files}
    assert len(CASES) >= 30 and readers <= suffixes
    assert {c.dataset for c in CASES.values()} >= {DATASET, "ml-100k", "ml-1m", "ml-20m"}


# --- a large file ----------------------------------------------------------------------------------

PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_large_file_is_streamed_in_bounded_memory(previous_run, tmp_path):
    """600,000 events with a wide column the canonical tables do not keep (a ~420 MB file):
    ingest's peak memory stays below the file's size, which any read that holds the text
    exceeds (the reader before issue 13 peaked at about 3x its size)."""
    n = 600_000
    path = tmp_path / "events.csv"
    pl.select(
        user_id=pl.format("u{}", pl.int_range(n) // 40),
        item_id=pl.format("i{}", pl.int_range(n) * 7919 % 5003),
        timestamp=pl.int_range(n) + 1_600_000_000,
        rating=pl.int_range(n) % 5 + 1,
        context=pl.format("{}:{}", pl.int_range(n), pl.lit("x" * 680)),
    ).write_csv(path)
    size = path.stat().st_size
    args = ["--interactions", str(path), "--set", f"data.dataset={DATASET}"]
    userlens(previous_run, *args, "fetch")
    command = [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "userlens", "--project", str(previous_run)]
    done = run([*command, *args, "ingest"], cwd=previous_run)
    peak = int(done.stdout.split()[-1]) * 1024
    interactions = canonical(previous_run)["interactions"]
    assert interactions.height == n and interactions["timestamp"][-1] == 1_600_000_000 + n - 1
    assert peak < size, f"peak RSS {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
