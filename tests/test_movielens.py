"""MovieLens source: tiny fixtures per layout, the real ml-100k when present, local download server."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import os
import threading
import zipfile
from pathlib import Path

import polars as pl
import pytest

from userlens.errors import DataError
from userlens.sources import movielens as ml
from userlens.sources import movielens_fetch as fetch

GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]  # fmt: skip
CANONICAL = {"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "rating": pl.Float32}
ITEMS = {"item_id": pl.String, "title": pl.String, "categories": pl.List(pl.String)}


def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


def write_100k(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("1\t10\t5\t881250949\n1\t20\t3\t881250950\n2\t10\t4\t881250951\n")
    toy = _flags("Animation", "Children's", "Comedy")
    items = (
        f"10|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/x|{toy}\n"
        f"20|Misérables, Les (1995)|01-Jan-1995||http://us.imdb.com/y|{_flags('Drama', 'Musical')}\n"
        f"30|unknown||||{_flags('unknown')}\n"
    )
    (folder / "u.item").write_bytes(items.encode("latin-1"))
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    (folder / "README").write_text("readme\n")
    (folder / "u.info").write_text("2 users\n")
    (folder / "u1.base").write_text("1\t10\t5\t881250949\n")
    return folder


def write_1m(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    movies = (
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "3::Café au Lait (1993)::Comedy\n"
        "4::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi\n"
    )
    (folder / "movies.dat").write_bytes(movies.encode("latin-1"))
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (folder / "README").write_text("readme\n")
    return folder


def write_10m(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("1::122::0.5::838985046\n1::185::4.5::838983525\n2::122::5::838983392\n")
    (folder / "movies.dat").write_text("122::Boomerang (1992)::Comedy|Romance\n185::Net, The (1995)::Action|Crime\n")
    (folder / "tags.dat").write_text("1::122::fun::838985046\n")
    return folder


def write_csv(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,11,3.5,964981247\n7,131262,0.5,1509838224\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '12,"Great ""Quoted"" Film, A (2000)",Drama\n'
        "131262,Innocence (2014),(no genres listed)\n"
    )
    (folder / "README.txt").write_text("readme\n")
    (folder / "genome-scores.csv").write_text("movieId,tagId,relevance\n")
    return folder


def _check_dtypes(tables) -> None:
    assert dict(tables.interactions.schema) == CANONICAL
    assert dict(tables.items.schema) == ITEMS
    assert tables.users.schema["user_id"] == pl.String


# --- layouts ------------------------------------------------------------------------------


def test_100k_fixture(tmp_path):
    tables = ml.read("ml-100k", write_100k(tmp_path / "ml-100k"))
    _check_dtypes(tables)
    assert tables.interactions.rows() == [
        ("1", "10", 881250949, 5.0),
        ("1", "20", 881250950, 3.0),
        ("2", "10", 881250951, 4.0),
    ]
    items = {r[0]: r[1:] for r in tables.items.rows()}
    assert items == {
        "10": ("Toy Story (1995)", ["Animation", "Children's", "Comedy"]),
        "20": ("Misérables, Les (1995)", ["Drama", "Musical"]),
        "30": ("unknown", ["unknown"]),
    }
    assert tables.users.rows() == [("1", 24, "M", "technician", "85711"), ("2", 53, "F", "other", "T8H1N")]
    assert tables.users.columns == ["user_id", "age", "gender", "occupation", "zip"]
    assert (tables.rating_scale, tables.rating_scale_origin) == ((1.0, 5.0), "source")


def test_1m_fixture_latin1_and_user_codes(tmp_path):
    tables = ml.read("ml-1m", write_1m(tmp_path / "ml-1m"))
    _check_dtypes(tables)
    assert tables.interactions.height == 3
    assert tables.interactions.row(1) == ("1", "661", 978302109, 3.0)
    items = {r[0]: r[1:] for r in tables.items.rows()}
    assert items["3"] == ("Café au Lait (1993)", ["Comedy"])
    assert items["661"] == ("James and the Giant Peach (1996)", ["Animation", "Children's", "Musical"])
    assert items["4"][0] == "Star Wars: Episode IV - A New Hope (1977)"  # a single ':' is not a separator
    assert tables.users.columns == ["user_id", "age", "age_bucket", "gender", "occupation", "zip"]
    assert tables.users.rows() == [
        ("1", 1, "Under 18", "F", "K-12 student", "48067"),
        ("2", 56, "56+", "M", "self-employed", "70072"),
    ]
    assert tables.rating_scale == (1.0, 5.0)


def test_1m_movies_reencoded_as_utf8_still_reads(tmp_path):
    folder = write_1m(tmp_path / "ml-1m")
    (folder / "movies.dat").write_text("3::Café au Lait (1993)::Comedy\n", encoding="utf-8")
    assert ml.read("ml-1m", folder).items["title"].to_list() == ["Café au Lait (1993)"]


def test_10m_fixture_half_stars_and_derived_users(tmp_path):
    tables = ml.read("ml-10m", write_10m(tmp_path / "ml-10M100K"))
    _check_dtypes(tables)
    assert tables.interactions["rating"].to_list() == [0.5, 4.5, 5.0]
    assert tables.users.rows() == [("1",), ("2",)]
    assert tables.items.rows() == [
        ("122", "Boomerang (1992)", ["Comedy", "Romance"]),
        ("185", "Net, The (1995)", ["Action", "Crime"]),
    ]
    assert (tables.rating_scale, tables.rating_scale_origin) == ((0.5, 5.0), "source")


@pytest.mark.parametrize("dataset", ["ml-20m", "ml-25m", "ml-latest-small"])
def test_csv_fixture(tmp_path, dataset):
    tables = ml.read(dataset, write_csv(tmp_path / dataset))
    _check_dtypes(tables)
    assert tables.interactions.rows() == [
        ("1", "1", 964982703, 4.0),
        ("1", "11", 964981247, 3.5),
        ("7", "131262", 1509838224, 0.5),
    ]
    items = {r[0]: r[1:] for r in tables.items.rows()}
    assert len(items) == 4
    assert items["11"] == ("American President, The (1995)", ["Comedy", "Drama", "Romance"])
    assert items["12"] == ('Great "Quoted" Film, A (2000)', ["Drama"])
    assert items["131262"] == ("Innocence (2014)", [])
    assert tables.users.rows() == [("1",), ("7",)]
    assert tables.rating_scale == (0.5, 5.0)


def test_declared_rating_scale(tmp_path):
    tables = ml.read("ml-20m", write_csv(tmp_path / "ml-20m"), rating_scale=(0, 10))
    assert (tables.rating_scale, tables.rating_scale_origin) == ((0.0, 10.0), "declared")


# --- the real ml-100k ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_100k() -> Path:
    candidates = [
        os.environ.get("USERLENS_DATA_DIR"),
        Path(__file__).resolve().parents[2] / "shared" / "data",
    ]
    for candidate in candidates:
        found = fetch.find_local("ml-100k", candidate) if candidate else None
        if found is not None:
            return found
    pytest.skip("real MovieLens-100K not found (set USERLENS_DATA_DIR or provide ../shared/data/ml-100k)")


def test_real_100k(real_100k):
    tables = ml.read("ml-100k", real_100k)
    _check_dtypes(tables)
    assert tables.interactions.height == 100_000
    assert tables.interactions["user_id"].n_unique() == 943
    assert tables.users.height == 943
    assert tables.items.height == 1682
    assert tables.interactions.row(0) == ("196", "242", 881250949, 3.0)
    genres = [line.split("|")[0] for line in (real_100k / "u.genre").read_text().splitlines() if line]
    assert len(genres) == 19
    used = set(tables.items["categories"].explode().drop_nulls())
    assert used <= set(genres) and len(used) <= 19
    titles = dict(tables.items.select("item_id", "title").iter_rows())
    assert titles["1"] == "Toy Story (1995)"
    assert titles["543"] == "Misérables, Les (1995)"
    assert titles["1633"] == "Á köldum klaka (Cold Fever) (1994)"
    assert tables.items.filter(pl.col("item_id") == "1")["categories"].to_list() == [
        ["Animation", "Children's", "Comedy"]
    ]
    assert tables.users.row(0) == ("1", 24, "M", "technician", "85711")
    assert tables.users.schema["age"] == pl.Int64
    assert (tables.rating_scale, tables.rating_scale_origin) == ((1.0, 5.0), "source")
    assert set(tables.interactions["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_real_100k_snapshot_copies_only_needed_files(real_100k, tmp_path):
    info = fetch.snapshot("ml-100k", real_100k.parent, tmp_path / "raw", allow_download=False)
    assert info["origin"] == f"local:{real_100k}"
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [
        "README",
        "u.data",
        "u.genre",
        "u.item",
        "u.user",
    ]


# --- finding and snapshotting ---------------------------------------------------------------


def test_find_local_folder_or_parent(tmp_path):
    folder = write_100k(tmp_path / "ml-100k")
    assert fetch.find_local("ml-100k", folder) == folder
    assert fetch.find_local("ml-100k", tmp_path) == folder
    assert fetch.find_local("ml-100k", str(tmp_path)) == folder
    assert fetch.find_local("ml-100k", None) is None
    assert fetch.find_local("ml-1m", tmp_path) is None
    assert fetch.find_local("ml-100k", tmp_path / "nowhere") is None
    ten = write_10m(tmp_path / "ml-10M100K")
    assert fetch.find_local("ml-10m", tmp_path) == ten
    one = write_1m(tmp_path / "ml-1m")
    assert fetch.find_local("ml-10m", one) is None  # another release's folder is not taken for ml-10m
    assert fetch.find_local("ml-1m", one) == one


def test_snapshot_local_copies_only_needed_files_and_replaces(tmp_path):
    write_100k(tmp_path / "data" / "ml-100k")
    dest = tmp_path / "raw" / "ml-100k"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("old")
    info = fetch.snapshot("ml-100k", tmp_path / "data", dest, allow_download=False)
    assert info["origin"] == f"local:{tmp_path / 'data' / 'ml-100k'}"
    assert sorted(info["files"]) == ["README", "u.data", "u.genre", "u.item", "u.user"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(info["files"])
    assert ml.read("ml-100k", dest).interactions.height == 3


def test_snapshot_csv_copies_readme_not_extras(tmp_path):
    write_csv(tmp_path / "ml-25m")
    info = fetch.snapshot("ml-25m", tmp_path / "ml-25m", tmp_path / "raw", allow_download=False)
    assert sorted(info["files"]) == ["README.txt", "movies.csv", "ratings.csv"]


def test_snapshot_without_local_copy_or_download(tmp_path):
    with pytest.raises(DataError) as err:
        fetch.snapshot("ml-1m", tmp_path, tmp_path / "raw", allow_download=False)
    message = str(err.value)
    assert "--data-dir" in message and "USERLENS_DATA_DIR" in message and "synthetic" in message
    assert not (tmp_path / "raw").exists()


def test_snapshot_incomplete_local_folder(tmp_path):
    folder = write_1m(tmp_path / "ml-1m")
    (folder / "users.dat").unlink()
    with pytest.raises(DataError, match=r"missing users\.dat.*holds: README, movies\.dat, ratings\.dat"):
        fetch.snapshot("ml-1m", tmp_path, tmp_path / "raw", allow_download=True)


# --- downloading from a local server ----------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _zip_release(folder: Path, archive: Path) -> str:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"{folder.name}/{path.name}")
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_verifies_md5_and_extracts(tmp_path, server):
    root, base = server
    md5 = _zip_release(write_100k(tmp_path / "src" / "ml-100k"), root / "ml-100k.zip")
    dest = tmp_path / "downloads"
    folder = fetch.download("ml-100k", dest, url=f"{base}/ml-100k.zip", expected_md5=md5, progress=False)
    assert folder == dest / "ml-100k"
    assert sorted(p.name for p in folder.iterdir()) == ["README", "u.data", "u.genre", "u.item", "u.user"]
    assert sorted(p.name for p in dest.iterdir()) == ["ml-100k"]  # no temp files left
    assert ml.read("ml-100k", folder).items.height == 3


def test_download_wrong_md5_leaves_nothing(tmp_path, server):
    root, base = server
    md5 = _zip_release(write_100k(tmp_path / "src" / "ml-100k"), root / "ml-100k.zip")
    dest = tmp_path / "downloads"
    with pytest.raises(DataError, match=rf"expected md5 0{{32}}, got {md5}"):
        fetch.download("ml-100k", dest, url=f"{base}/ml-100k.zip", expected_md5="0" * 32, progress=False)
    assert not dest.exists() or list(dest.iterdir()) == []


def test_download_pinned_md5_applies_to_mirror_url(tmp_path, server):
    root, base = server
    _zip_release(write_100k(tmp_path / "src" / "ml-100k"), root / "ml-100k.zip")
    with pytest.raises(DataError, match=rf"expected md5 {ml.RELEASES['ml-100k'].md5}"):
        fetch.download("ml-100k", tmp_path / "d", url=f"{base}/ml-100k.zip", progress=False)


def test_download_uses_published_md5_file(tmp_path, server):
    root, base = server
    md5 = _zip_release(write_csv(tmp_path / "src" / "ml-latest-small"), root / "ml-latest-small.zip")
    (root / "ml-latest-small.zip.md5").write_text(f"MD5 (ml-latest-small.zip) = {md5}\n")
    folder = fetch.download("ml-latest-small", tmp_path / "d", url=f"{base}/ml-latest-small.zip", progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["README.txt", "movies.csv", "ratings.csv"]
    (root / "ml-latest-small.zip.md5").write_text(f"MD5 (ml-latest-small.zip) = {'f' * 32}\n")
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch.download("ml-latest-small", tmp_path / "e", url=f"{base}/ml-latest-small.zip", progress=False)


def test_snapshot_downloads_when_allowed(tmp_path, server, monkeypatch):
    root, base = server
    md5 = _zip_release(write_1m(tmp_path / "src" / "ml-1m"), root / "ml-1m.zip")
    release = dataclasses.replace(ml.RELEASES["ml-1m"], url=f"{base}/ml-1m.zip", md5=md5)
    monkeypatch.setitem(ml.RELEASES, "ml-1m", release)
    dest = tmp_path / "raw" / "ml-1m"
    info = fetch.snapshot("ml-1m", None, dest, allow_download=True)
    assert info == {
        "origin": f"download:{base}/ml-1m.zip",
        "files": ["ratings.dat", "movies.dat", "users.dat", "README"],
    }
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ml-1m"]  # scratch folder removed
    assert ml.read("ml-1m", dest).users.height == 2


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.zip", "missing"])
def test_download_failure_names_alternatives(tmp_path, server, url):
    _, base = server
    url = f"{base}/no-such.zip" if url == "missing" else url
    with pytest.raises(DataError) as err:
        fetch.download("ml-100k", tmp_path / "d", url=url, timeout=5, progress=False)
    message = str(err.value)
    assert "download" in message and url in message
    assert "--data-dir" in message and "USERLENS_DATA_DIR" in message and "synthetic" in message
    assert list((tmp_path / "d").iterdir()) == []


def test_download_not_a_release(tmp_path, server):
    root, base = server
    md5 = _zip_release(write_csv(tmp_path / "src" / "ml-20m"), root / "ml-1m.zip")
    with pytest.raises(DataError, match="holds no ratings.dat"):
        fetch.download("ml-1m", tmp_path / "d", url=f"{base}/ml-1m.zip", expected_md5=md5, progress=False)


# --- damaged input ------------------------------------------------------------------------


WRITERS = {"ml-100k": write_100k, "ml-1m": write_1m, "ml-20m": write_csv}
HEAD = "userId,movieId,rating,timestamp\n"
# fmt: off
BAD = {  # case: (release, file, content written over the fixture's file, expected message pattern)
    "empty": ("ml-100k", "u.data", "", r"u\.data: the file is empty"),
    "wrong-delimiter": ("ml-100k", "u.data", "1,10,5,881250949\n2,10,4,881250951\n",
                        r"line 1: expected 4 fields separated by '\\t'.*has 1 field.*separated by ','"),
    "missing-field": ("ml-100k", "u.data", "1\t10\t5\t881250949\n1\t20\t3\n",
                      r"u\.data: line 2: expected 4 fields.*has 3 field\(s\)"),
    "extra-field": ("ml-100k", "u.data", "1\t10\t5\t881250949\n1\t20\t3\t8812509\t9\n",
                    r"line 2: .*has 5 field\(s\)"),
    "non-numeric-rating": ("ml-100k", "u.data", "1\t10\t5\t881250949\n1\t20\tfive\t881250950\n",
                           r"u\.data: line 2: rating 'five' is not a number"),
    "header-in-headerless": ("ml-100k", "u.data", "user\titem\trating\ttime\n1\t10\t5\t881250949\n",
                             r"line 1: user id 'user' is not an integer \(a header line\?"),
    "float-timestamp": ("ml-100k", "u.data", "1\t10\t5\t881250949\n1\t20\t3\t8812.5\n",
                        r"line 2: timestamp '8812.5' is not an integer"),
    "truncated": ("ml-100k", "u.data", "1\t10\t5\t881250949\n1\t2", r"line 2: .*the file looks truncated"),
    "binary": ("ml-100k", "u.data", bytes(range(256)) * 4, r"u\.data: contains NUL bytes: binary"),
    "blank-line": ("ml-100k", "u.data", "1\t10\t5\t881250949\n\n2\t10\t4\t881250951\n",
                   r"line 2: .*it is blank"),
    "item-extra-field": ("ml-100k", "u.item", f"10|Toy|||x|{_flags('Drama')}|1\n",
                         r"u\.item: line 1: expected 24 fields"),
    "item-bad-flags": ("ml-100k", "u.item", "10|Toy|||x|" + "|".join(["2"] * 19) + "\n",
                       r"genre flags must be 0 or 1"),
    "user-bad-age": ("ml-100k", "u.user", "1|24|M|technician|85711\n2|old|F|other|T8H1N\n",
                     r"u\.user: line 2: age 'old' is not an integer"),
    "dat-missing-field": ("ml-1m", "ratings.dat", "1::1193::5::978300760\n1::661::3\n",
                          r"ratings\.dat: line 2: expected 4 fields separated by '::', but it has 3"),
    "dat-tabs": ("ml-1m", "ratings.dat", "1\t1193\t5\t978300760\n", r"looks separated by '\\t'"),
    "dat-age-code": ("ml-1m", "users.dat", "1::F::17::10::48067\n",
                     r"users\.dat: line 1: age code 17 is not one of 1, 18, 25"),
    "dat-occupation-code": ("ml-1m", "users.dat", "1::F::18::21::48067\n",
                            r"occupation code 21 is not one of 0-20"),
    "dat-duplicate-movie": ("ml-1m", "movies.dat", "1::A (1995)::Drama\n1::B (1996)::Comedy\n",
                            r"movies\.dat: item_id '1' appears on more than one line"),
    "csv-header-only": ("ml-20m", "ratings.csv", HEAD, r"ratings\.csv: has a header line but no data rows"),
    "csv-semicolons": ("ml-20m", "ratings.csv", "userId;movieId;rating;timestamp\n1;1;4.0;964982703\n",
                       r"line 1 is 'userId;movieId;rating;timestamp', expected the header"),
    "csv-no-header": ("ml-20m", "ratings.csv", "1,1,4.0,964982703\n",
                      r"expected the header 'userId,movieId,rating,timestamp'"),
    "csv-truncated": ("ml-20m", "ratings.csv", HEAD + "1,1,4.0,964982703\n1,11,3",
                      r"ratings\.csv: line 3: .*truncated"),
    "csv-nan-rating": ("ml-20m", "ratings.csv", HEAD + "1,1,nan,964982703\n",
                       r"line 2: rating 'nan' is not a number"),
    "csv-latin1": ("ml-20m", "movies.csv", "movieId,title,genres\n1,Toy (1995),Comedy\n2,Café (1999),Drama\n",
                   r"movies\.csv: not valid UTF-8 at line 3"),
    "csv-extra-field": ("ml-20m", "movies.csv", 'movieId,title,genres\n11,"A, B (1995)",Comedy,extra\n',
                        r"movies\.csv: line 2: expected 3 fields separated by ',', but it has 4"),
    "csv-utf16": ("ml-20m", "movies.csv", b"\xff\xfe" + "movieId".encode("utf-16-le"),
                  r"movies\.csv: contains NUL bytes"),
}
# fmt: on


@pytest.mark.parametrize(("dataset", "name", "content", "pattern"), list(BAD.values()), ids=list(BAD))
def test_damaged_files_raise_data_error(tmp_path, dataset, name, content, pattern):
    folder = WRITERS[dataset](tmp_path / "release")
    (folder / name).write_bytes(content.encode("latin-1") if isinstance(content, str) else content)
    with pytest.raises(DataError, match=pattern):
        ml.read(dataset, folder)


def test_missing_file_lists_folder(tmp_path):
    folder = write_100k(tmp_path / "ml-100k")
    (folder / "u.user").unlink()
    with pytest.raises(
        DataError,
        match=r"missing u\.user; expected u\.data, u\.item, u\.genre, u\.user, but the folder holds: README",
    ):
        ml.read("ml-100k", folder)
    with pytest.raises(DataError, match="no such folder"):
        ml.read("ml-100k", tmp_path / "nowhere")


def test_unknown_release(tmp_path):
    with pytest.raises(DataError, match="unknown MovieLens release 'ml-5m'"):
        ml.read("ml-5m", tmp_path)
