"""Lifelong users (userlens.lifelong): the event log, partitions and their summaries.

Code behaviour on hand-made streams and property tests over random ones; the summaries on
small fakes of the summariser (counted calls) and with the real template summariser."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from userlens.config import PartitionParams, SummaryParams
from userlens.lifelong.log import EventLog
from userlens.lifelong.partitions import Partitions, partition_events
from userlens.lifelong.prompts import Event, PartitionView
from userlens.lifelong.summaries import Summaries, TemplateSummariser

DAY = 86_400


def events(rows: list[tuple[str, str, int]], rating: float = 4.0) -> pl.DataFrame:
    return pl.DataFrame(
        {"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows], "timestamp": [r[2] for r in rows],
         "rating": [rating] * len(rows)}, schema_overrides={"rating": pl.Float32},
    )  # fmt: skip


def stream(timestamps: list[int], user: str = "u") -> pl.DataFrame:
    frame = events([(user, f"i{k}", t) for k, t in enumerate(timestamps)])
    return frame.with_row_index("seq").with_columns(pl.col("seq").cast(pl.Int64))


def shapes(frame: pl.DataFrame) -> list[tuple]:
    return [(r["partition"], r["n_events"], r["closed_by"]) for r in frame.sort("user_id", "partition").to_dicts()]


# --- closing rules on hand-made streams ---------------------------------------------------------


def test_count_rule_closes_every_n_events_and_keeps_the_rest_open():
    closed, open_ = partition_events(stream([0, 1, 2, 3, 4, 5, 6]), PartitionParams(max_events=3, max_gap_days=None))
    assert shapes(closed) == [(0, 3, "count"), (1, 3, "count")]
    assert open_.select("partition", "n_events", "item_ids").rows() == [(2, 1, ["i6"])]


def test_gap_rule_closes_when_the_next_event_comes_after_the_gap():
    times = [0, DAY, 40 * DAY, 41 * DAY, 100 * DAY]
    closed, open_ = partition_events(stream(times), PartitionParams(max_events=None, max_gap_days=30))
    assert shapes(closed) == [(0, 2, "gap"), (1, 2, "gap")]
    assert closed["closed_at"].to_list() == [DAY, 41 * DAY]  # the last event's time, not the clock's
    assert open_["n_events"].to_list() == [1] and open_["opened_at"].to_list() == [100 * DAY]


def test_both_rules_close_on_whichever_comes_first():
    times = [0, 1, 2, 50 * DAY, 50 * DAY + 1, 50 * DAY + 2]
    closed, open_ = partition_events(stream(times), PartitionParams(max_events=2, max_gap_days=30))
    assert shapes(closed) == [(0, 2, "count"), (1, 1, "gap"), (2, 2, "count")]
    assert open_.select("partition", "n_events").rows() == [(3, 1)]


def test_a_full_last_partition_closes_and_the_user_keeps_an_empty_cache():
    closed, open_ = partition_events(stream([0, 1, 2, 3]), PartitionParams(max_events=2, max_gap_days=None))
    assert shapes(closed) == [(0, 2, "count"), (1, 2, "count")]
    assert open_.select("partition", "n_events").rows() == [(2, 0)]


def test_a_rule_must_close_partitions_somehow():
    with pytest.raises(ValueError, match="max_events, max_gap_days or both"):
        PartitionParams(max_events=None, max_gap_days=None)


# --- the event log and incremental partitions ---------------------------------------------------


def test_the_log_appends_only_what_is_new(tmp_path):
    log = EventLog(tmp_path / "log")
    assert log.append(events([("a", "1", 10), ("a", "2", 20)]), {"batch": 1}) == 2
    assert log.append(events([("a", "2", 20), ("b", "1", 5)]), {"batch": 2}) == 1  # the known event is skipped
    assert log.append(events([("a", "1", 10)]), {"batch": 3}) == 0
    assert (log.n_parts, log.n_events) == (2, 3)
    assert log.read()["seq"].to_list() == [0, 1, 2]
    assert log.read(after_part=1).select("user_id", "item_id").rows() == [("b", "1")]


def test_an_uncommitted_part_is_ignored_and_overwritten(tmp_path):
    """A crash between writing a part and the manifest leaves a stray file; the log never reads it."""
    log = EventLog(tmp_path / "log")
    log.append(events([("a", "1", 10)]), {})
    (tmp_path / "log" / "part-000002.parquet").write_bytes(b"half a file")
    assert log.read().height == 1
    log.append(events([("b", "1", 11)]), {})
    assert log.read()["user_id"].to_list() == ["a", "b"]


RULES = st.tuples(st.one_of(st.none(), st.integers(1, 6)), st.one_of(st.none(), st.sampled_from([0.5, 2.0, 10.0])))
RULES = RULES.filter(lambda r: r != (None, None)).map(lambda r: PartitionParams(max_events=r[0], max_gap_days=r[1]))
STREAMS = st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 3 * DAY)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(rule=RULES, raw=STREAMS, splits=st.lists(st.integers(0, 60), max_size=4), data=st.data())
def test_appending_in_batches_gives_exactly_the_partitions_of_one_build(tmp_path_factory, rule, raw, splits, data):
    # Batches arrive in time order (each batch's events are later than the previous batch's).
    raw = sorted(raw, key=lambda e: e[1])
    rows = [(user, f"i{k}", t) for k, (user, t) in enumerate(raw)]
    cuts = sorted({min(s, len(rows)) for s in splits})
    batches = [rows[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True) if b > a]
    root = tmp_path_factory.mktemp("prop")
    whole_log, stepwise_log = EventLog(root / "whole" / "log"), EventLog(root / "steps" / "log")
    whole, stepwise = Partitions(root / "whole" / "partitions"), Partitions(root / "steps" / "partitions")
    whole_log.append(events(rows), {})
    whole.update(whole_log, rule)
    for batch in batches:
        stepwise_log.append(events(batch), {})
        stepwise.update(stepwise_log, rule)
    columns = ["user_id", "partition", "n_events", "closed_by", "item_ids", "timestamps"]
    assert (
        stepwise.closed()
        .sort("user_id", "partition")
        .select(columns)
        .equals(whole.closed().sort("user_id", "partition").select(columns))
    )
    assert (
        stepwise.open()
        .sort("user_id")
        .select(columns[:3] + ["item_ids"])
        .equals(whole.open().sort("user_id").select(columns[:3] + ["item_ids"]))
    )


def test_an_update_touches_only_users_with_new_events(tmp_path):
    log, parts = EventLog(tmp_path / "log"), Partitions(tmp_path / "partitions")
    rule = PartitionParams(max_events=2, max_gap_days=None)
    log.append(events([("a", "1", 1), ("a", "2", 2), ("a", "3", 3), ("b", "1", 1)]), {})
    parts.update(log, rule)
    before_b = parts.open().filter(pl.col("user_id") == "b")
    log.append(events([("a", "4", 4), ("c", "1", 9)]), {})
    result = parts.update(log, rule)
    assert result["touched"] == ["a", "c"] and result["new_partitions"] == 1  # a's [3, 4] closed
    assert parts.open().filter(pl.col("user_id") == "b").equals(before_b)
    assert shapes(parts.closed().filter(pl.col("user_id") == "a")) == [(0, 2, "count"), (1, 2, "count")]
    assert parts.update(log, rule)["touched_users"] == 0  # nothing new: nothing done


def test_a_changed_rule_rebuilds_the_partitions_from_the_whole_log(tmp_path):
    log, parts = EventLog(tmp_path / "log"), Partitions(tmp_path / "partitions")
    log.append(events([("a", str(k), k) for k in range(6)]), {})
    parts.update(log, PartitionParams(max_events=2, max_gap_days=None))
    result = parts.update(log, PartitionParams(max_events=3, max_gap_days=None))
    assert result["rebuilt"] and shapes(parts.closed()) == [(0, 3, "count"), (1, 3, "count")]


# --- summaries ------------------------------------------------------------------------------------


class CountingSummariser:
    """A fake summariser that records every request it gets (unit tests only)."""

    def __init__(self, identity: str = "fake-1"):
        self.identity, self.requests = identity, []

    def summarise(self, requests, progress=None):
        self.requests += requests
        return [f"{len(view.events)} events after <{previous}>" for previous, view in requests]


ITEMS = pl.DataFrame({"item_id": [str(k) for k in range(10)], "title": [f"Film {k}" for k in range(10)],
                      "categories": [["Drama"] if k < 5 else ["Comedy", "Drama"] for k in range(10)]})  # fmt: skip


PAIRS = PartitionParams(max_events=2, max_gap_days=None)  # partitions of two events


def summarised(tmp_path, summariser, rows, rule=PAIRS):
    log, parts = EventLog(tmp_path / "log"), Partitions(tmp_path / "partitions")
    log.append(events(rows), {})
    parts.update(log, rule)
    store = Summaries(tmp_path / "summaries")
    result = store.update(parts, summariser, ITEMS, (1.0, 5.0), SummaryParams(), progress=False)
    return log, parts, store, result


def test_summaries_cascade_from_the_previous_summary(tmp_path):
    fake = CountingSummariser()
    _, _, store, result = summarised(tmp_path, fake, [("a", str(k), k) for k in range(5)])
    assert result["summarised"] == result["generated"] == 2 and result["rounds"] == 2
    texts = store.records(fake.identity, store_rule(tmp_path)).sort("partition")["text"].to_list()
    assert texts == ["2 events after <None>", "2 events after <2 events after <None>>"]


def store_rule(tmp_path) -> str:
    return Partitions(tmp_path / "partitions").rule_hash


def test_a_second_run_generates_nothing_and_a_new_prompt_version_regenerates(tmp_path):
    fake = CountingSummariser("fake-1")
    log, parts, store, _ = summarised(tmp_path, fake, [("a", str(k), k) for k in range(4)])
    calls = len(fake.requests)
    assert store.update(parts, fake, ITEMS, (1.0, 5.0), SummaryParams(), progress=False)["summarised"] == 0
    assert len(fake.requests) == calls
    newer = CountingSummariser("fake-2")  # a new prompt version is a new identity: new cache keys
    assert store.update(parts, newer, ITEMS, (1.0, 5.0), SummaryParams(), progress=False)["generated"] == 2


def test_new_events_summarise_only_the_newly_closed_partitions(tmp_path):
    fake = CountingSummariser()
    log, parts, store, _ = summarised(tmp_path, fake, [("a", "1", 1), ("a", "2", 2), ("b", "1", 1), ("b", "2", 2)])
    fake.requests.clear()
    log.append(events([("b", "3", 3), ("b", "4", 4)]), {})
    parts.update(log, PAIRS)
    result = store.update(parts, fake, ITEMS, (1.0, 5.0), SummaryParams(), progress=False)
    assert result["generated"] == 1 and [p for p, _ in fake.requests] == ["2 events after <None>"]  # b's second


def test_rebuilt_identical_partitions_come_from_the_cache(tmp_path):
    fake = CountingSummariser()
    log, parts, store, _ = summarised(tmp_path, fake, [("a", str(k), k) for k in range(4)])
    parts.update(log, PartitionParams(max_events=2, max_gap_days=365))  # a new rule, the same partitions
    fake.requests.clear()
    result = store.update(parts, fake, ITEMS, (1.0, 5.0), SummaryParams(), progress=False)
    assert result["summarised"] == 2 and result["generated"] == 0 and not fake.requests


def test_the_template_summary_states_interests_ratings_titles_and_the_shift():
    def view(items, rating):
        return PartitionView(tuple(Event(k * DAY, f"Film {k}", cats, rating) for k, cats in items), (1.0, 5.0))

    template = TemplateSummariser()
    first = template.summarise([(None, view([(0, ("Drama",)), (1, ("Drama",)), (2, ("Comedy",))], 5.0))])[0]
    assert first.startswith("Interests: Drama 67%, Comedy 33%.") and "mostly liked" in first
    assert "Shift: first period on record." in first and "Film 2" in first
    second = template.summarise([(first, view([(3, ("Comedy",)), (4, ("Western",))], 1.0))])[0]
    assert "more Comedy" in second and "new Western" in second and "less Drama" in second
    assert "mostly disliked" in second
