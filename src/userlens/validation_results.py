"""How a GX validation result reads: `CheckResult`, the sentence for each check, and the helpers
that turn one GX expectation result into a `CheckResult` (used by validation.validate_tables)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import polars as pl

MAX_EXAMPLES = 5

# check name -> (sentence when it failed, sentence when it passed). Fields: n, total,
# column, eg (", e.g. a, b" or ""), min_value, max_value, min_date, max_date, types, observed.
_MESSAGES: dict[str, tuple[str, str]] = {
    "column_exists": ("column {column} is missing", "column {column} is present"),
    "column_type": ("{column} has type {observed}, expected {types}", "{column} has type {observed}"),
    "not_null": ("{n} of {total} rows have a null {column}", "no null {column} in {total} rows"),
    "rating_in_scale": (
        "{n} of {total} rows outside the rating scale [{min_value}, {max_value}]{eg}",
        "all ratings within the rating scale [{min_value}, {max_value}]",
    ),
    "timestamp_not_old": (
        "{n} of {total} rows are implausibly old (before {min_date}){eg}",
        "no timestamp before {min_date}",
    ),
    "timestamp_not_future": (
        "{n} of {total} rows are in the future (after {max_date}){eg}",
        "no timestamp after {max_date}",
    ),
    "no_duplicate_events": (
        "{n} of {total} rows are exact duplicate events (same user_id, item_id, timestamp and rating){eg}",
        "no exact duplicate events in {total} rows",
    ),
    "item_in_items": (
        "{n} of {total} interactions reference an item missing from the items table{eg}",
        "every interaction's item is in the items table",
    ),
    "unique": ("{n} of {total} rows share a duplicated {column}{eg}", "{column} is unique"),
    "enough_events": (
        "{n} of {total} users have fewer than {min_value} events (rule 'fail'){eg}",
        "every user has at least {min_value} events",
    ),
    "drop_budget": (
        "{n} of {total} rows ({share}) would be quarantined, more than validation.max_drop_fraction "
        "({limit}): {by_rule}",
        "{n} of {total} rows ({share}) quarantined, within validation.max_drop_fraction ({limit})",
    ),
}


@dataclass
class CheckResult:
    """One expectation's outcome, in words a person can act on."""

    table: str
    check: str  # our name for it, a key of _MESSAGES
    expectation: str  # the GX expectation type
    columns: list[str]
    success: bool
    unexpected_count: int | None
    element_count: int | None
    examples: list[Any]
    message: str
    repair: str | None = None  # the validation.repair rule of a repairable check
    quarantined: int | None = None  # rows that rule quarantined, when it repaired this check

    @property
    def where(self) -> str:
        """`table.column`, or `table.(a, b)` for a check on several columns."""
        cols = self.columns[0] if len(self.columns) == 1 else f"({', '.join(self.columns)})"
        return f"{self.table}.{cols}"


def drop_counts(quarantine: dict[str, Any]) -> str:
    """A quarantine's rows per rule in words: "duplicate_events 196, rating_out_of_scale 17"."""
    return ", ".join(f"{rule} {n:,}" for rule, n in quarantine["by_rule"].items() if n) or "none"


def apply_repairs(checks: list[CheckResult], quarantine: dict[str, Any]) -> None:
    """While the drop budget holds, a check that failed under a drop rule is repaired."""
    if not all(c.success for c in checks if c.check == "drop_budget"):
        return
    for check in checks:
        if check.repair in quarantine["by_rule"] and not check.success and check.unexpected_count:
            check.success = True
            check.quarantined = quarantine["by_rule"][check.repair]
            check.message = f"repaired by drop: {check.quarantined:,} rows quarantined ({check.message})"


def check_result(table: str, result: Any, frame: pl.DataFrame, quarantine: dict[str, Any]) -> CheckResult:
    config = result.expectation_config
    kwargs, meta, res = config.kwargs, config.meta or {}, result.result or {}
    check = meta.get("check", config.type)
    columns = list(meta.get("columns") or kwargs.get("column_list") or [kwargs.get("column")])
    unexpected = None if res.get("unexpected_count") is None else int(res["unexpected_count"])
    total = int(res.get("element_count", frame.height))
    if unexpected is None and "element_count" in res and total == 0:
        unexpected = 0  # GX's SQL engine reports no count on an empty table; pandas says 0
    examples = [_relabel(e, columns) for e in _examples(res, meta.get("examples_from"))]
    fields = {
        "n": f"{unexpected or 0:,}",
        "total": f"{total:,}",
        "column": ", ".join(columns),
        "eg": ", e.g. " + ", ".join(_show(check, e) for e in examples) if examples else "",
        "observed": res.get("observed_value"),
        **{k: _number(kwargs.get(k)) for k in ("min_value", "max_value")},
        "types": " or ".join(kwargs.get("type_list") or [str(kwargs.get("type_"))]),
        "min_date": _iso(kwargs.get("min_value")),
        "max_date": _iso(kwargs.get("max_value")),
        "share": f"{quarantine['share']:.2%}",
        "limit": f"{quarantine['max_drop_fraction']:.2%}",
        "by_rule": drop_counts(quarantine),
    }
    error = _exception_message(result)
    absent = [c for c in columns if c not in frame.columns]
    if error and check != "column_exists":
        message = f"could not be checked: {f'column {absent[0]} is missing' if absent else error}"
    else:
        failed, passed = _MESSAGES.get(check, ("failed", "passed"))
        message = (passed if result.success else failed).format(**fields)
    return CheckResult(
        table=table,
        check=check,
        expectation=config.type,
        columns=columns,
        success=bool(result.success),
        unexpected_count=unexpected,
        element_count=total,
        examples=examples,
        message=message,
        repair=meta.get("repair"),
    )


def _examples(res: dict[str, Any], key: str | None) -> list[Any]:
    """Up to MAX_EXAMPLES distinct unexpected values; with `key`, that index column's values."""
    if key:
        raw = [row.get(key) for row in res.get("partial_unexpected_index_list") or []]
    else:
        raw = res.get("partial_unexpected_list") or []
    seen, examples = set(), []
    for value in map(_jsonable, raw):
        if value is not None and repr(value) not in seen:  # a null is no example
            seen.add(repr(value))
            examples.append(value)
        if len(examples) == MAX_EXAMPLES:
            break
    return examples


def _relabel(example: Any, columns: list[str]) -> Any:
    """A row example under the reported column names (a check may read a derived column)."""
    if isinstance(example, dict) and len(example) == len(columns):
        return dict(zip(columns, example.values(), strict=True))
    return example


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def _show(check: str, value: Any) -> str:
    if isinstance(value, dict):
        return "(" + ", ".join("null" if v is None else str(v) for v in value.values()) + ")"
    if check.startswith("timestamp") and isinstance(value, (int, float)):
        return f"{value} ({_iso(value)})"
    return "null" if value is None else str(value)


def _number(value: Any) -> Any:
    """1.0 -> 1 for messages (GX stores bounds as floats); other values unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _iso(value: Any) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(value)


def _exception_message(result: Any) -> str | None:
    info = result.exception_info or {}
    infos = [info] if "raised_exception" in info else list(info.values())
    for item in infos:
        if isinstance(item, dict) and item.get("raised_exception"):
            return str(item.get("exception_message") or "error").splitlines()[0]
    return None
