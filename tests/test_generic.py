"""The generic reader: your own CSV / TSV / Parquet files."""

import polars as pl
import pytest

from userlens.errors import DataError
from userlens.schema import outside_scale
from userlens.sources import generic


def write(folder, name, text, mode="w"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_string_ids_iso_timestamps_missing_and_half_star_ratings(tmp_path):
    write(
        tmp_path,
        "interactions.csv",
        "user_id,item_id,timestamp,rating\n"
        "007,B-1,2021-03-04T05:06:07Z,4.5\n"
        "alice,B-2,2021-03-04 05:06:08,\n"
        "007,B-2,1614834369,0.5\n",
    )
    write(tmp_path, "items.csv", "item_id,title,categories\nB-1,Book one,Fiction|Crime\nB-2,Book two,\n")
    tables = generic.read(tmp_path)
    inter = tables.interactions
    assert inter.schema == {
        "user_id": pl.String,
        "item_id": pl.String,
        "timestamp": pl.Int64,
        "rating": pl.Float32,
    }
    assert inter["user_id"].to_list() == ["007", "alice", "007"]  # leading zeros kept
    assert inter["timestamp"].to_list() == [1614834367, 1614834368, 1614834369]
    assert inter["rating"].to_list() == [4.5, None, 0.5]
    assert tables.rating_scale == (0.5, 5.0) and tables.rating_scale_origin == "inferred"  # half stars
    assert tables.items["categories"].to_list() == [["Fiction", "Crime"], []]
    assert sorted(tables.users["user_id"].to_list()) == ["007", "alice"]


def test_declared_scale_parquet_and_list_categories(tmp_path):
    pl.DataFrame(
        {"user_id": [1, 2], "item_id": [10, 11], "timestamp": [1600000000, 1600000001], "rating": [3, 8]}
    ).write_parquet(tmp_path / "interactions.parquet")
    pl.DataFrame({"item_id": ["10", "11"], "categories": [["a"], ["b", "c"]]}).write_parquet(tmp_path / "items.parquet")
    pl.DataFrame({"user_id": ["1", "2"], "age": [30, 40]}).write_parquet(tmp_path / "users.parquet")
    tables = generic.read(tmp_path, rating_scale=(0, 10))
    assert tables.rating_scale == (0.0, 10.0) and tables.rating_scale_origin == "declared"
    assert tables.interactions["user_id"].to_list() == ["1", "2"]
    assert tables.items["categories"].to_list() == [["a"], ["b", "c"]]
    assert tables.items["title"].null_count() == 2
    assert tables.users.columns == ["user_id", "age"]


def _scale_of(tmp_path, ratings: list[float]):
    n = len(ratings)
    pl.DataFrame(
        {"user_id": [f"u{i % 7}" for i in range(n)], "item_id": [f"i{i}" for i in range(n)],
         "timestamp": [1_600_000_000 + i for i in range(n)], "rating": ratings}
    ).write_parquet(tmp_path / "interactions.parquet")  # fmt: skip
    tables = generic.read(tmp_path)
    outside = tables.interactions.select(outside_scale(tables.rating_scale).sum()).item()
    return tables.rating_scale, tables.rating_scale_origin, outside


STARS = [1.0, 2.0, 3.0, 4.0, 5.0] * 100  # 500 whole-star ratings
HALF_STARS = [0.5 * k for k in range(2, 11)] * 100  # 1, 1.5, ..., 5: no 0.5 at all


@pytest.mark.parametrize(
    "ratings, scale, outside",
    [
        pytest.param(STARS + [17.0], (1.0, 5.0), 1, id="one stray 17 among stars is out of scale"),
        pytest.param(STARS + [0.0, 0.0], (1.0, 5.0), 2, id="a few 0s among stars (Ciao) are out of scale"),
        pytest.param(STARS + [0.0] * 50, (0.0, 5.0), 0, id="many 0s: a 0-5 scale"),
        pytest.param(HALF_STARS + [0.5], (0.5, 5.0), 0, id="half stars, one 0.5"),
        pytest.param(HALF_STARS, (0.5, 5.0), 0, id="half stars without any 0.5"),
        pytest.param([float(k) for k in range(1, 11)] * 20, (1.0, 10.0), 0, id="1-10"),
        pytest.param([0.1, 0.25, 0.9, 1.0], (0.0, 1.0), 0, id="scores in 0-1"),
        pytest.param([3.0, 250.0, 1200.0], (3.0, 1200.0), 0, id="no standard scale: the observed range"),
    ],
)
def test_rating_scale_is_the_narrowest_standard_scale_holding_nearly_all(tmp_path, ratings, scale, outside):
    assert _scale_of(tmp_path, ratings) == (scale, "inferred", outside)


def test_declared_scale_wins_over_inference(tmp_path):
    pl.DataFrame(
        {"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "timestamp": [1, 2, 3], "rating": [1.0, 2.0, 17.0]}
    ).write_parquet(tmp_path / "interactions.parquet")
    tables = generic.read(tmp_path, rating_scale=(0, 20))
    assert (tables.rating_scale, tables.rating_scale_origin) == ((0.0, 20.0), "declared")


def test_nan_rating_is_a_missing_rating(tmp_path):
    pl.DataFrame(
        {
            "user_id": ["u", "u"],
            "item_id": ["i", "j"],
            "timestamp": [1600000000, 1600000001],
            "rating": [float("nan"), 4.0],
        }
    ).write_parquet(tmp_path / "interactions.parquet")
    assert generic.read(tmp_path).interactions["rating"].to_list() == [None, 4.0]


def test_implicit_feedback_and_derived_tables(tmp_path):
    write(tmp_path, "interactions.tsv", "user_id\titem_id\ttimestamp\nu\ti\t1600000000\nv\ti\t1600000001\n")
    tables = generic.read(tmp_path)
    assert tables.rating_scale is None
    assert tables.interactions["rating"].null_count() == 2
    assert tables.items["item_id"].to_list() == ["i"]
    assert sorted(tables.users["user_id"].to_list()) == ["u", "v"]


GOOD_HEADER = "user_id,item_id,timestamp,rating\n"


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty", b"", "empty"),
        ("header only", GOOD_HEADER, "no rows"),
        ("wrong delimiter", "user_id;item_id;timestamp\nu;i;1\n", "separated by semicolons"),
        ("missing column", "user_id,item_id\nu,i\n", "missing column(s) timestamp"),
        (
            "non-numeric timestamp",
            GOOD_HEADER + "u,i,1600000000,3\nu,j,yesterday,4\n",
            "'yesterday' (line 3)",
        ),
        ("truncated last line", GOOD_HEADER + "u,i,1600000000,3\nu,j", "truncated"),
        ("non-numeric rating", GOOD_HEADER + "u,i,1600000000,good\n", "'good' (line 2)"),
        ("binary garbage", bytes(range(256)) * 8, "binary"),
        (
            "wrong encoding",
            (GOOD_HEADER + "u,Amélie,1600000000,3\n").encode("latin-1"),
            "not valid UTF-8 at line 2",
        ),
    ],
)
def test_bad_files_get_a_clear_message(tmp_path, name, content, expected):
    path = write(tmp_path, "interactions.csv", content)
    with pytest.raises(DataError) as err:
        generic.read(tmp_path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_interactions_file_lists_folder(tmp_path):
    write(tmp_path, "ratings.csv", GOOD_HEADER)
    with pytest.raises(DataError, match="no interactions file.*ratings.csv"):
        generic.read(tmp_path)
