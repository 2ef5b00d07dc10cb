"""validate_tables: the GX suites catch each data problem, name it, and write Data Docs."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date
from typing import NamedTuple

import polars as pl
import pytest

from userlens.config import RepairParams, ValidationParams
from userlens.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, CanonicalTables
from userlens.validation import CheckResult, ValidationReport, epoch_seconds, validate_tables

NOW = 1_700_000_000  # 2023-11-14 22:13:20 UTC
DAY = 86_400
FAIL_ALL = RepairParams(duplicate_events="fail", rating_out_of_scale="fail", unknown_items="fail", null_keys="fail")
# Every repairable check under "fail": each problem fails validation (the drop rules are tested below).
PARAMS = ValidationParams(min_events_per_user=5, short_users="drop", min_timestamp=date(1995, 1, 1), repair=FAIL_ALL)


def _interactions(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=INTERACTIONS_SCHEMA, orient="row")


def _clean_rows() -> list[tuple]:
    """Three users with five events each, on items i1..i5, ratings 1..5, all in the past."""
    return [(f"u{u}", f"i{k}", NOW - DAY * (10 * u + k), float(k)) for u in range(1, 4) for k in range(1, 6)]


def _tables(
    rows: list[tuple] | None = None,
    items: list[str] | None = None,
    users: list[str] | None = None,
    rating_scale: tuple[float, float] | None = (1.0, 5.0),
) -> CanonicalTables:
    item_ids = items if items is not None else [f"i{k}" for k in range(1, 6)]
    return CanonicalTables(
        interactions=_interactions(rows if rows is not None else _clean_rows()),
        items=pl.DataFrame(
            {
                "item_id": item_ids,
                "title": [f"Title {i}" for i in item_ids],
                "categories": [["Drama"]] * len(item_ids),
            },
            schema=ITEMS_SCHEMA,
        ),
        users=pl.DataFrame({"user_id": users if users is not None else ["u1", "u2", "u3"], "age": 30}),
        rating_scale=rating_scale,
        rating_scale_origin="declared",
    )


def _run(tables: CanonicalTables, tmp_path, params: ValidationParams = PARAMS) -> ValidationReport:
    return validate_tables(tables, params, tmp_path / "data_docs", now=NOW)


def _failed(report: ValidationReport) -> dict[str, CheckResult]:
    return {c.where: c for c in report.checks if not c.success}


def test_clean_tables_pass_and_write_data_docs(tmp_path, capsys):
    # within the clock-skew tolerance (3600 s), and a null rating (implicit feedback) is allowed
    rows = _set(8, rating=None)(_set(0, timestamp=NOW + 1800)(_clean_rows()))

    report = _run(_tables(rows), tmp_path)

    assert report.success, report.summary()
    assert report.data_docs_index == (tmp_path / "data_docs" / "index.html").resolve()
    assert report.data_docs_index.is_file()
    assert "<html" in report.data_docs_index.read_text().lower()
    # every suite really ran: one result per expectation, each with its own check name
    assert {c.table for c in report.checks} == {"interactions", "items", "users"}
    assert {c.check for c in report.checks} >= {
        "column_exists", "column_type", "not_null", "rating_in_scale", "timestamp_not_old",
        "timestamp_not_future", "no_duplicate_events", "item_in_items", "unique",
    }  # fmt: skip
    assert all(c.expectation.startswith("expect_") for c in report.checks)
    assert report.short_users == {"count": 0, "users": 3, "examples": [], "min_events": 5, "rule": "drop"}
    assert report.summary().startswith("Validation PASSED")
    # GX stays quiet: no progress bars, nothing printed
    out, err = capsys.readouterr()
    assert out == "" and "Calculating Metrics" not in err


def _set(index: int, **values) -> Callable[[list[tuple]], list[tuple]]:
    def change(rows: list[tuple]) -> list[tuple]:
        row = dict(zip(INTERACTIONS_SCHEMA, rows[index], strict=True)) | values
        return rows[:index] + [tuple(row.values())] + rows[index + 1 :]

    return change


def _duplicate(index: int, **values) -> Callable[[list[tuple]], list[tuple]]:
    def change(rows: list[tuple]) -> list[tuple]:
        rows = _set(index, **values)(rows)
        return [*rows, rows[index]]

    return change


class Case(NamedTuple):
    """A problem planted in clean tables, and the one check that must catch it."""

    where: str  # CheckResult.where of the failing check
    check: str
    count: int  # unexpected_count
    examples: list
    text: str  # must appear in the message (and so in summary())
    rows: Callable[[list[tuple]], list[tuple]] | None = None
    items: list[str] | None = None
    users: list[str] | None = None


EVENTS = "interactions.(user_id, item_id, timestamp, rating)"
OLD = epoch_seconds(date(1990, 6, 1))
FAILURES = {
    "null user id": Case("interactions.user_id", "not_null", 1, [], "1 of 15 rows have a null user_id",
                         rows=_set(0, user_id=None)),
    "rating out of scale": Case("interactions.rating", "rating_in_scale", 1, [7.0],
                                "outside the rating scale [1, 5], e.g. 7.0", rows=_set(1, rating=7.0)),
    "future timestamp": Case("interactions.timestamp", "timestamp_not_future", 1, [NOW + 2 * DAY],
                             "in the future", rows=_set(2, timestamp=NOW + 2 * DAY)),
    "implausibly old timestamp": Case("interactions.timestamp", "timestamp_not_old", 1, [OLD],
                                      "implausibly old (before 1995-01-01", rows=_set(3, timestamp=OLD)),
    "duplicate event": Case(EVENTS, "no_duplicate_events", 2,
                            [{"user_id": "u1", "item_id": "i5", "timestamp": NOW - 15 * DAY, "rating": 5.0}],
                            "exact duplicate events", rows=_duplicate(4)),
    "duplicate event with null rating": Case(
        EVENTS, "no_duplicate_events", 2,
        [{"user_id": "u2", "item_id": "i1", "timestamp": NOW - 21 * DAY, "rating": None}],
        f"e.g. (u2, i1, {NOW - 21 * DAY}, null)", rows=_duplicate(5, rating=None)),
    "item missing from items": Case("interactions.item_id", "item_in_items", 1, ["i999"],
                                    "missing from the items table, e.g. i999", rows=_set(6, item_id="i999")),
    "duplicate item id": Case("items.item_id", "unique", 2, ["i2"], "duplicated item_id, e.g. i2",
                              items=["i1", "i2", "i3", "i4", "i5", "i2"]),
    "duplicate user id": Case("users.user_id", "unique", 2, ["u3"], "duplicated user_id, e.g. u3",
                              users=["u1", "u2", "u3", "u3"]),
}  # fmt: skip


@pytest.mark.parametrize("case", FAILURES.values(), ids=FAILURES.keys())
def test_each_problem_fails_the_right_check(case: Case, tmp_path):
    rows = case.rows(_clean_rows()) if case.rows else None

    report = _run(_tables(rows, items=case.items, users=case.users), tmp_path)

    assert not report.success
    failed = _failed(report)
    assert list(failed) == [case.where], report.summary()
    result = failed[case.where]
    assert (result.check, result.unexpected_count, result.examples) == (case.check, case.count, case.examples)
    assert case.text in result.message
    assert f"{case.where}: {result.message}" in report.summary()


def test_implicit_feedback_without_scale_passes(tmp_path):
    rows = [(u, i, ts, None) for u, i, ts, _ in _clean_rows()]

    report = _run(_tables(rows, rating_scale=None), tmp_path)

    assert report.success, report.summary()
    assert "rating_in_scale" not in {c.check for c in report.checks}
    assert [c.success for c in report.checks if c.columns == ["rating"]] == [True, True]  # exists, type


def _short_user_rows() -> list[tuple]:
    """u3 has only two events (of the five needed); u1 and u2 have five."""
    return [r for r in _clean_rows() if not (r[0] == "u3" and r[1] in ("i1", "i2", "i3"))]


@pytest.mark.parametrize(("rule", "words"), [("drop", "excluded from sequences"), ("keep", "kept")])
def test_short_users_are_counted_but_pass_under_drop_and_keep(rule, words, tmp_path):
    params = PARAMS.model_copy(update={"short_users": rule})

    report = _run(_tables(_short_user_rows()), tmp_path, params)

    assert report.success, report.summary()
    assert report.short_users == {"count": 1, "users": 3, "examples": ["u3"], "min_events": 5, "rule": rule}
    short_line = next(line for line in report.summary().splitlines() if line.startswith("Short users"))
    assert "1 of 3 users" in short_line and "u3" in short_line and f"rule '{rule}': {words}" in short_line


def test_short_users_fail_validation_under_fail(tmp_path):
    params = PARAMS.model_copy(update={"short_users": "fail"})

    report = _run(_tables(_short_user_rows()), tmp_path, params)

    assert not report.success
    failed = _failed(report)
    assert list(failed) == ["interactions_per_user.user_id"], report.summary()
    check = failed["interactions_per_user.user_id"]
    assert (check.check, check.expectation) == ("enough_events", "expect_column_values_to_be_between")
    assert (check.unexpected_count, check.element_count, check.examples) == (1, 3, ["u3"])
    assert "fewer than 5 events" in check.message
    assert report.short_users["count"] == 1


def test_summary_names_failures_and_to_dict_is_json(tmp_path):
    rows = _set(6, item_id="i999")(_set(1, rating=0.0)(_set(0, rating=7.0)(_clean_rows())))

    report = _run(_tables(rows), tmp_path)

    summary = report.summary()
    lines = summary.splitlines()
    assert lines[0].startswith("Validation FAILED")
    assert "  interactions.rating: 2 of 15 rows outside the rating scale [1, 5], e.g. 7.0, 0.0" in lines
    assert any(line.startswith("  interactions.item_id:") and "i999" in line for line in lines)
    assert lines[-1] == f"Data Docs: {report.data_docs_index}"

    loaded = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert loaded["success"] is False
    assert loaded["data_docs_index"] == str(report.data_docs_index)
    rating = next(c for c in loaded["checks"] if c["check"] == "rating_in_scale")
    assert (rating["examples"], rating["unexpected_count"], rating["element_count"]) == ([7.0, 0.0], 2, 15)


# --- repair rules: drop into quarantine, within validation.max_drop_fraction ---------------------

DROP_ALL = RepairParams(duplicate_events="drop", rating_out_of_scale="drop", unknown_items="drop", null_keys="drop")
DROP = PARAMS.model_copy(update={"repair": DROP_ALL, "max_drop_fraction": 0.2})


class Repair(NamedTuple):
    """A repairable problem planted in clean tables: the check GX flags and the rows dropped."""

    where: str
    gx_count: int  # what GX finds on the raw table
    rows: Callable[[list[tuple]], list[tuple]]
    quarantined: list[int]  # row numbers in the canonical table
    short_users: int  # counted on the rows that remain: a user left with 4 events is short


REPAIRS = {
    "null_keys": Repair("interactions.user_id", 1, _set(0, user_id=None), [0], 1),
    # GX counts both copies; the first is kept (u1 keeps its 5 events)
    "duplicate_events": Repair(EVENTS, 2, _duplicate(4), [15], 0),
    "rating_out_of_scale": Repair("interactions.rating", 1, _set(1, rating=7.0), [1], 1),
    "unknown_items": Repair("interactions.item_id", 1, _set(6, item_id="i999"), [6], 1),
}


@pytest.mark.parametrize("rule", REPAIRS)
def test_each_repairable_problem_is_dropped_into_quarantine_under_drop(rule, tmp_path):
    case = REPAIRS[rule]
    rows = case.rows(_clean_rows())
    quarantine_dir = tmp_path / "quarantine"

    report = validate_tables(_tables(rows), DROP, tmp_path / "data_docs", now=NOW, quarantine_dir=quarantine_dir)

    assert report.success, report.summary()
    check = next(c for c in report.checks if c.where == case.where and c.repair == rule)
    assert (check.success, check.unexpected_count, check.quarantined) == (True, case.gx_count, 1)
    assert check.message.startswith("repaired by drop: 1 rows quarantined (")
    written = pl.read_parquet(quarantine_dir / "interactions.parquet")
    assert written.equals(report.quarantined)
    assert written["row"].to_list() == case.quarantined and written["quarantined_by"].to_list() == [rule]
    assert written.drop("row", "quarantined_by").rows() == [rows[i] for i in case.quarantined]
    assert report.quarantine["rows"] == 1 and report.quarantine["by_rule"][rule] == 1
    assert f"Quarantine: 1 of {len(rows)} interactions" in report.summary()
    assert report.short_users["count"] == case.short_users
    # Data Docs tell the truth about the raw table and say what the rule did with the rows
    pages = " ".join(p.read_text() for p in (tmp_path / "data_docs").rglob("*.html"))
    assert f"validation.repair.{rule}" in pages


def test_a_row_failing_several_drop_rules_names_them_all(tmp_path):
    rows = _duplicate(1, rating=7.0)(_clean_rows())  # row 1 out of scale, and its copy at row 15

    report = _run(_tables(rows), tmp_path, DROP)

    assert report.success, report.summary()
    assert report.quarantined.select("row", "quarantined_by").rows() == [
        (1, "rating_out_of_scale"),
        (15, "duplicate_events,rating_out_of_scale"),
    ]
    assert report.quarantine["by_rule"] == {
        "null_keys": 0, "duplicate_events": 1, "rating_out_of_scale": 2, "unknown_items": 0
    }  # fmt: skip


def test_fail_rules_quarantine_nothing(tmp_path):
    report = _run(_tables(_duplicate(4)(_clean_rows())), tmp_path)  # PARAMS: every rule "fail"

    assert not report.success
    assert report.quarantined.height == 0 and "drop_budget" not in {c.check for c in report.checks}


def test_more_than_max_drop_fraction_fails_naming_the_check_and_keeps_the_old_quarantine(tmp_path):
    quarantine_dir, docs = tmp_path / "quarantine", tmp_path / "data_docs"
    params = DROP.model_copy(update={"max_drop_fraction": 0.1})
    first = validate_tables(_tables(_set(1, rating=7.0)(_clean_rows())), params, docs, NOW, quarantine_dir)
    assert first.success, first.summary()
    before = (quarantine_dir / "interactions.parquet").read_bytes()

    rows = _set(2, rating=9.0)(_set(1, rating=7.0)(_clean_rows()))  # 2 of 15 = 13 % > 10 %
    report = validate_tables(_tables(rows), params, docs, NOW, quarantine_dir)

    assert not report.success
    failed = _failed(report)
    assert list(failed) == ["interactions.rating", "interactions.quarantined_by"], report.summary()
    assert (failed["interactions.rating"].unexpected_count, failed["interactions.rating"].examples) == (2, [7.0, 9.0])
    budget = failed["interactions.quarantined_by"]
    assert budget.check == "drop_budget" and budget.message == (
        "2 of 15 rows (13.33%) would be quarantined, more than validation.max_drop_fraction (10.00%): "
        "rating_out_of_scale 2"
    )
    assert "Quarantine: none written (validation failed)" in report.summary()
    assert (quarantine_dir / "interactions.parquet").read_bytes() == before


def _outcome(report: ValidationReport) -> list[tuple]:
    """What a run decided, check by check: the same on every GX engine (examples as a set; a
    type check's message names the engine's own type)."""
    return [(c.where, c.check, c.success, c.unexpected_count, c.element_count, c.quarantined,
             c.message if c.check != "column_type" else None, sorted(map(repr, c.examples)))
            for c in report.checks]  # fmt: skip


CORPUS = {
    **{name: (_tables(c.rows(_clean_rows()) if c.rows else None, items=c.items, users=c.users), PARAMS)
       for name, c in FAILURES.items()},
    **{f"{rule} under drop": (_tables(r.rows(_clean_rows())), DROP) for rule, r in REPAIRS.items()},
    "clean": (_tables(), PARAMS),
    "no rating scale, implicit feedback": (_tables([(u, i, t, None) for u, i, t, _ in _clean_rows()],
                                                   rating_scale=None), PARAMS),
    "several problems at once": (_tables(_duplicate(1, rating=7.0)(_set(0, user_id=None)(_clean_rows())),
                                         items=["i1", "i2", "i2"]), PARAMS),
    "three copies of one event, two of another": (_tables(_duplicate(4)(_duplicate(4)(_duplicate(7)(_clean_rows())))),
                                                   PARAMS),
    "over the drop budget": (_tables(_set(2, rating=9.0)(_set(1, rating=7.0)(_clean_rows()))),
                             DROP.model_copy(update={"max_drop_fraction": 0.1})),
    "short users fail": (_tables(_clean_rows()[:12]), PARAMS.model_copy(update={"short_users": "fail"})),
    "empty interactions": (_tables([]), PARAMS),
}  # fmt: skip


@pytest.mark.parametrize("name", CORPUS)
def test_the_duckdb_engine_decides_as_the_pandas_engine(name, tmp_path):
    """GX's SQL engine on DuckDB and its pandas engine: the same checks fail, with the same counts and messages."""
    tables, params = CORPUS[name]
    pandas = _run(tables, tmp_path / "pandas", params.model_copy(update={"engine": "pandas"}))
    duckdb = _run(tables, tmp_path / "duckdb", params.model_copy(update={"engine": "duckdb"}))
    assert _outcome(duckdb) == _outcome(pandas)
    assert duckdb.success == pandas.success and duckdb.quarantined.equals(pandas.quarantined)
    assert len(duckdb.checks) >= 15  # every expectation evaluated, not skipped
