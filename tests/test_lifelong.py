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
from userlens.lifelong.parts import PartStore
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


def test_compaction_merges_files_but_keeps_rows_and_positions(tmp_path):
    store = PartStore(tmp_path / "parts")
    for k in range(5):
        store.commit(pl.DataFrame({"k": [k, k]}))
    before = store.read()
    assert not store.compact(at=5) and len(store.parts()) == 5
    assert store.compact(at=4)
    assert len(store.parts()) == 1 and sorted(p.name for p in (tmp_path / "parts").glob("*.parquet")) == [
        "compact-000005.parquet"
    ]
    assert store.read().equals(before) and store.appends == 5 and store.read(after=5).is_empty()
    with pytest.raises(ValueError, match="inside the compacted"):
        store.read(after=2)
    store.commit(pl.DataFrame({"k": [9]}))
    assert store.read(after=5)["k"].to_list() == [9] and (tmp_path / "parts/part-000006.parquet").exists()


def test_partitions_read_a_compacted_log_as_they_read_its_appends(tmp_path):
    rows = [("u1", "a", 0), ("u1", "b", 10), ("u2", "a", 20), ("u1", "c", 30), ("u2", "b", 40), ("u1", "d", 50)]
    batch = events(rows)
    rule = PartitionParams(max_events=2, max_gap_days=None)
    log, parts = EventLog(tmp_path / "log"), Partitions(tmp_path / "partitions")
    for k in range(3):
        log.append(batch[2 * k : 2 * k + 2], {})
        if k == 1:
            parts.update(log, rule)
            log.store.compact(at=1)  # what pipeline.partitions does once the log is read
    parts.update(log, rule)
    whole = Partitions(tmp_path / "whole")
    whole_log = EventLog(tmp_path / "whole-log")
    whole_log.append(batch, {})
    whole.update(whole_log, rule)
    columns = ["user_id", "partition", "n_events", "item_ids"]
    assert (
        parts.closed()
        .sort("user_id", "partition")
        .select(columns)
        .equals(whole.closed().sort("user_id", "partition").select(columns))
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


def resummarise(store: Summaries, parts: Partitions, summariser) -> dict:
    return store.update(parts.closed(), parts.rule_hash, summariser, ITEMS, (1.0, 5.0), SummaryParams(), progress=False)


def summarised(tmp_path, summariser, rows, rule=PAIRS):
    log, parts = EventLog(tmp_path / "log"), Partitions(tmp_path / "partitions")
    log.append(events(rows), {})
    parts.update(log, rule)
    store = Summaries(tmp_path / "summaries")
    result = resummarise(store, parts, summariser)
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
    assert resummarise(store, parts, fake)["summarised"] == 0
    assert len(fake.requests) == calls
    newer = CountingSummariser("fake-2")  # a new prompt version is a new identity: new cache keys
    assert resummarise(store, parts, newer)["generated"] == 2


def test_new_events_summarise_only_the_newly_closed_partitions(tmp_path):
    fake = CountingSummariser()
    log, parts, store, _ = summarised(tmp_path, fake, [("a", "1", 1), ("a", "2", 2), ("b", "1", 1), ("b", "2", 2)])
    fake.requests.clear()
    log.append(events([("b", "3", 3), ("b", "4", 4)]), {})
    parts.update(log, PAIRS)
    result = resummarise(store, parts, fake)
    assert result["generated"] == 1 and [p for p, _ in fake.requests] == ["2 events after <None>"]  # b's second


def test_rebuilt_identical_partitions_come_from_the_cache(tmp_path):
    fake = CountingSummariser()
    log, parts, store, _ = summarised(tmp_path, fake, [("a", str(k), k) for k in range(4)])
    parts.update(log, PartitionParams(max_events=2, max_gap_days=365))  # a new rule, the same partitions
    fake.requests.clear()
    result = resummarise(store, parts, fake)
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


# --- fusion and the CTR model ---------------------------------------------------------------------


def test_partition_inputs_put_the_most_recent_partition_last_with_recency_zero():
    import numpy as np

    from userlens.lifelong.fusion import partition_inputs

    closed = pl.DataFrame({"user_id": ["a", "a", "a", "b"], "partition": [0, 1, 2, 0]})
    open_rows = pl.DataFrame({"user_id": ["a", "b", "c"], "partition": [3, 1, 0], "n_events": [2, 0, 0]})
    vec = {(u, p): np.full(2, 10 * p + 1, np.float32) for u, p in [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0)]}
    text = {k: v for k, v in vec.items() if k != ("a", 3)}  # the open cache has no summary
    inputs = partition_inputs(["a", "b", "c"], closed, open_rows, text, vec, max_partitions=3, text_dim=2, event_dim=2)
    assert inputs.events[0, :, 0].tolist() == [11.0, 21.0, 31.0]  # a: partitions 1, 2 and the open cache
    assert inputs.recency[0].tolist() == [2, 1, 0] and inputs.text[0, 2].tolist() == [0.0, 0.0]
    assert inputs.present.tolist() == [[True] * 3, [True, False, False], [True, False, False]]  # c: one empty slot


def test_the_like_rule_is_three_quarters_up_the_rating_scale():
    from userlens.lifelong.ctr import examples

    sequences = pl.DataFrame({"user_index": [0, 1], "future_item_index": [[3, 4], [5]],
                              "future_rating": [[4.0, 3.0], [None]]})  # fmt: skip
    found = examples(sequences, (1.0, 5.0))
    assert found.user.tolist() == [0, 0] and found.item.tolist() == [3, 4] and found.label.tolist() == [1.0, 0.0]


def test_the_fusion_finds_taste_that_only_the_most_recent_partition_shows():
    """Planted drift: whether a user likes item kind 1 is written only in their most recent
    partition; older partitions and the base features carry noise. The fused vector must find it."""
    import numpy as np
    import torch

    from userlens.config import CTRParams
    from userlens.lifelong import ctr
    from userlens.lifelong.fusion import PartitionInputs

    rng = np.random.default_rng(0)
    n_users, n_partitions, per_user = 300, 4, 12
    recent_taste = rng.integers(0, 2, n_users)
    text = rng.normal(size=(n_users, n_partitions, 8)).astype(np.float32)
    text[:, -1, 0] = np.where(recent_taste == 1, 2.0, -2.0)  # only the last partition says it
    recency = torch.arange(n_partitions - 1, -1, -1).repeat(n_users, 1)  # left to right: oldest to newest
    present = torch.ones(n_users, n_partitions, dtype=torch.bool)
    events = torch.zeros(n_users, n_partitions, 4)
    inputs = PartitionInputs([str(u) for u in range(n_users)], torch.from_numpy(text), events, recency, present)
    users = np.repeat(np.arange(n_users), per_user)
    items = rng.integers(0, 2, users.size)
    liked = ((items == recent_taste[users]) ^ (rng.random(users.size) < 0.1)).astype(np.float32)
    data = ctr.Examples(users, items, liked)
    features = ctr.UserFeatures(ctr.standardised(rng.normal(size=(n_users, 3))), None, inputs)
    categories = torch.eye(2)
    train, test = np.arange(200), np.arange(200, n_users)
    params = CTRParams(epochs=40, patience=5, users_per_batch=32, lr=3e-3)
    base, _ = ctr.fit_and_score("base", data, features, categories, train, test, params, 16, n_partitions, seed=0)
    fused, _ = ctr.fit_and_score(
        "base+interest", data, features, categories, train, test, params, 16, n_partitions, seed=0
    )
    assert base["auc"] < 0.6 and fused["auc"] > 0.8, (base, fused)
