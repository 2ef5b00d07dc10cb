import polars as pl

from userlens.config import SequenceParams
from userlens.sequences import dense_codes, split_sequences


def events(rows):
    return pl.DataFrame(
        rows,
        schema={"user_index": pl.Int32, "item_index": pl.Int32, "timestamp": pl.Int64, "rating": pl.Float32},
        orient="row",
    )


def test_chronological_with_stable_ties_and_fraction_holdout():
    # user 0: 10 events given out of order; items 100..109 at times 9..0; two events share t=5
    rows = [(0, 100 + i, 9 - i, 1.0) for i in range(10)]
    rows.append((0, 555, 5, 2.0))  # tie with item 104 at t=5: comes after it (file order)
    out = split_sequences(events(rows), SequenceParams(holdout_fraction=0.2)).row(0, named=True)
    full = [109, 108, 107, 106, 105, 104, 555, 103, 102, 101, 100]
    assert out["history_item_index"] + out["future_item_index"] == full
    assert len(out["future_item_index"]) == 2  # round(11 * 0.2)
    assert out["history_timestamp"] == sorted(out["history_timestamp"])


def test_max_length_keeps_most_recent_history_and_last_n():
    rows = [(0, i, i, None) for i in range(20)]
    params = SequenceParams(max_length=5, holdout="last_n", holdout_last_n=3)
    out = split_sequences(events(rows), params).row(0, named=True)
    assert out["future_item_index"] == [17, 18, 19]
    assert out["history_item_index"] == [12, 13, 14, 15, 16]


def test_every_user_keeps_history_and_single_event_users_have_empty_future():
    rows = [(0, 1, 1, 3.0), (1, 2, 1, 4.0), (1, 3, 2, 5.0)]
    out = split_sequences(events(rows), SequenceParams(holdout="last_n", holdout_last_n=5))
    assert out["user_index"].to_list() == [0, 1]
    assert out["history_item_index"].to_list() == [[1], [2]]
    assert out["future_item_index"].to_list() == [[], [3]]


def test_dense_codes_are_positions_in_the_vocabulary():
    codes = dense_codes(pl.Series(["b", "a", "c", "a"]), pl.Series(["a", "b", "c"]))
    assert codes.dtype == pl.Int32 and codes.to_list() == [1, 0, 2, 0]


def test_nulls_in_ratings_survive_the_split():
    rows = [(0, 1, 1, None), (0, 2, 2, 4.0), (0, 3, 3, None)]
    out = split_sequences(events(rows), SequenceParams(holdout="last_n", holdout_last_n=1)).row(0, named=True)
    assert out["history_rating"] == [None, 4.0] and out["future_rating"] == [None]
