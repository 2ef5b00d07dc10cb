"""Great Expectations suites for the canonical tables, and `validate_tables` that runs them.

The suites live in code (built per run from `ValidationParams`, the rating scale and "now")
and run on an ephemeral GX context; each run writes Data Docs and returns a
`ValidationReport` that the caller turns into reports/validation.json and, when it failed,
into `ValidationFailed`. Every check below is a GX expectation evaluated by GX:

interactions
  expect_column_to_exist                   user_id, item_id, timestamp, rating
  expect_column_values_to_be_of_type       user_id, item_id: str; timestamp: int64 (the
                                           engine's names for them, gx_engines.DIALECTS)
  expect_column_values_to_be_in_type_list  rating: float32 (or float64 on pandas)
  expect_column_values_to_not_be_null      user_id, item_id, timestamp (a null rating is
                                           implicit feedback)
  expect_column_values_to_be_between       rating within tables.rating_scale (none when the
                                           scale is None); timestamp not before
                                           params.min_timestamp ("implausibly old"); timestamp
                                           not after now + future_tolerance_seconds ("in the
                                           future") - two expectations, two clear messages
  expect_compound_columns_to_be_unique     all four columns: no exact duplicate events; rows
                                           with a null rating count (ignore_row_if="never").
                                           On DuckDB: gx_engines.ExpectNoDuplicateEvents, GX's
                                           custom-SQL expectation (one GROUP BY, 2.4x faster)
  expect_column_values_to_be_null          item_id_missing_from_items, a derived column (the
                                           item_id when items lacks it, else null; a polars
                                           is_in), so the examples are the missing ids
  expect_column_values_to_be_null          quarantined_by, mostly 1 - max_drop_fraction (only
                                           when a repair rule is "drop"; see below)
items
  expect_column_to_exist                   item_id, title, categories
  expect_column_values_to_be_of_type       item_id: str
  expect_column_values_to_not_be_null      item_id
  expect_column_values_to_be_unique        item_id
users
  the same for user_id
interactions_per_user (a per-user counts frame; only when params.short_users == "fail")
  expect_column_values_to_be_between       events >= params.min_events_per_user

Short users (fewer than min_events_per_user interactions, among users that have any) are
always counted for the report; under "drop" or "keep" they are a warning, not a failure.

Repairs and quarantine. Four interaction checks can be repaired: null keys (not_null),
exact duplicate events (no_duplicate_events), ratings outside the scale (rating_in_scale)
and items missing from the items table (item_in_items). `params.repair` gives each a rule:
"fail" (the check fails validation, as any other) or "drop". GX always evaluates every
expectation on the table as ingested, so Data Docs show the raw defects with their true
counts and examples; an expectation under "drop" carries severity "warning" and a note
saying that its rows are quarantined. The rows to drop are one derived column,
`quarantined_by` (the drop rules a row fails, comma-separated; null = kept: for duplicates
every copy but the first), and one more expectation decides whether the repair is allowed:
expect_column_values_to_be_null on it with mostly = 1 - max_drop_fraction ("drop_budget").
When it passes, the failed drop-rule checks are reported as "repaired by drop: N rows
quarantined" and pass; when it fails, they fail with their usual message, and validation
fails. Running GX a second time on the repaired table would only restate that it is clean.
On success the dropped rows (with their row number in the canonical table) are written to
`<quarantine_dir>/interactions.parquet`, replacing the folder in one step; short users are
counted on the rows that remain, which is what the sequences stage keeps.

Each table is validated by its own Checkpoint on the engine `params.engine` names
(gx_engines.py): GX's pandas engine on a pandas copy of the table, or GX's SQL engine on a
DuckDB table loaded from it; the two give the same results (tests/test_validation.py).
Data Docs are built once at the end: UpdateDataDocsAction would re-render the site for every
table. Results use result_format SUMMARY with a few examples; every GX result becomes a
`CheckResult` whose sentence comes from the _MESSAGES table (both in validation_results.py).

A NaN rating never reaches GX: CanonicalTables.conform turns it into null (no rating).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import polars as pl
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.metadata_types import FailureSeverity

from userlens import gx_engines
from userlens.config import ValidationParams
from userlens.io import atomic_dir, file_sha256
from userlens.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    QUARANTINE_ROW,
    USERS_KEY_SCHEMA,
    CanonicalTables,
    outside_scale,
)
from userlens.validation_results import MAX_EXAMPLES, CheckResult, apply_repairs, check_result, drop_counts

logger = logging.getLogger(__name__)

MISSING_ITEM_COLUMN = "item_id_missing_from_items"
QUARANTINE_COLUMN = "quarantined_by"  # the drop rules a row fails, comma-separated; null = kept
# validation.repair key -> the check it repairs (a rule's rows are those that check rejects)
REPAIRS = {
    "null_keys": "not_null",
    "duplicate_events": "no_duplicate_events",
    "rating_out_of_scale": "rating_in_scale",
    "unknown_items": "item_in_items",
}
PER_USER_TABLE = "interactions_per_user"
INTERACTIONS_KEYS = ("user_id", "item_id", "timestamp")  # never null; rating may be
DOCS_SITE = "userlens"
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 10}

_SHORT_USER_RULES = {
    "drop": "excluded from sequences",
    "keep": "kept",
    "fail": "short users fail validation",
}


@dataclass
class ValidationReport:
    """What validate_tables found; `to_dict()` is what reports/validation.json holds."""

    success: bool
    checks: list[CheckResult]
    short_users: dict[str, Any]
    data_docs_index: Path | None
    seconds: float
    # rows, of, share, by_rule, rules, max_drop_fraction; with a quarantine_dir and success: file, sha256
    quarantine: dict[str, Any]
    quarantined: pl.DataFrame = field(repr=False)  # the rows the drop rules remove

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def summary(self) -> str:
        status = "PASSED" if self.success else "FAILED"
        lines = [
            f"Validation {status}: {len(self.checks) - len(self.failed)} of {len(self.checks)} checks "
            f"passed in {self.seconds:.1f} s"
        ]
        lines += [f"  {c.where}: {c.message}" for c in self.failed]
        lines += [f"  {c.where}: {c.message}" for c in self.checks if c.quarantined]
        lines.append(self._quarantine_line())
        short = self.short_users
        rule = f"rule '{short['rule']}': {_SHORT_USER_RULES[short['rule']]}"
        if short["count"]:
            examples = ", ".join(str(u) for u in short["examples"])
            lines.append(
                f"Short users: {short['count']:,} of {short['users']:,} users have fewer than "
                f"{short['min_events']} events (e.g. {examples}); {rule}"
            )
        else:
            lines.append(f"Short users: none with fewer than {short['min_events']} events ({rule})")
        lines.append(f"Data Docs: {self.data_docs_index}")
        return "\n".join(lines)

    def _quarantine_line(self) -> str:
        q = self.quarantine
        if not self.success:
            return "Quarantine: none written (validation failed)"
        if not q["rows"]:
            return f"Quarantine: no rows (drop rules: {', '.join(q['by_rule']) or 'none'})"
        where = f" -> {q['file']}" if "file" in q else ""
        return f"Quarantine: {q['rows']:,} of {q['of']:,} interactions ({q['share']:.2%}): {drop_counts(q)}{where}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "seconds": round(self.seconds, 3),
            "data_docs_index": str(self.data_docs_index) if self.data_docs_index else None,
            "short_users": self.short_users,
            "quarantine": self.quarantine,
            "checks": [asdict(c) for c in self.checks],
        }


def validate_tables(
    tables: CanonicalTables,
    params: ValidationParams,
    data_docs_dir: Path,
    now: int | None = None,
    quarantine_dir: Path | None = None,
) -> ValidationReport:
    """Run the suites on the canonical tables; data problems are reported, never raised.

    With `quarantine_dir`, a passing run replaces that folder with interactions.parquet: the
    rows the drop rules remove (empty when none); a failing run leaves it as it was."""
    started = time.perf_counter()
    now = int(time.time()) if now is None else int(now)
    data_docs_dir = Path(data_docs_dir).resolve()

    interactions = _with_quarantine(_with_missing_items(tables.interactions, tables.items), tables, params)
    quarantined = (
        interactions.with_row_index(QUARANTINE_ROW)
        .filter(pl.col(QUARANTINE_COLUMN).is_not_null())
        .select(pl.exclude(MISSING_ITEM_COLUMN))
    )
    quarantine = _quarantine_counts(quarantined, interactions.height, params)
    per_user = _events_per_user(interactions.filter(pl.col(QUARANTINE_COLUMN).is_null()))
    short = per_user.filter(pl.col("events") < params.min_events_per_user)
    short_users = {
        "count": short.height,
        "users": per_user.height,
        "examples": short["user_id"].head(MAX_EXAMPLES).to_list(),
        "min_events": params.min_events_per_user,
        "rule": params.short_users,
    }

    frames = {
        "interactions": interactions,
        "items": tables.items,
        "users": tables.users,
    }
    dialect = gx_engines.DIALECTS[params.engine]
    suites = {
        "interactions": interactions_expectations(params, tables.rating_scale, now, dialect),
        "items": items_expectations(dialect),
        "users": users_expectations(dialect),
    }
    if params.short_users == "fail":
        frames[PER_USER_TABLE] = per_user
        suites[PER_USER_TABLE] = per_user_expectations(params)

    context = _context(data_docs_dir)
    runner = gx_engines.engine(params.engine, context, frames)
    checks: list[CheckResult] = []
    try:
        for table, expectations in suites.items():
            t0 = time.perf_counter()
            batch, batch_parameters = runner.batch(table)
            logger.debug("%s: %s rows ready for GX in %.2f s", table, f"{frames[table].height:,}",
                         time.perf_counter() - t0)  # fmt: skip
            suite = context.suites.add(gx.ExpectationSuite(name=table, expectations=expectations))
            validation = gx.ValidationDefinition(name=table, data=batch, suite=suite)
            definition = context.validation_definitions.add(validation)
            checkpoint = context.checkpoints.add(
                gx.Checkpoint(
                    name=table,
                    validation_definitions=[definition],
                    result_format=_result_format(table),
                )
            )
            outcome = checkpoint.run(batch_parameters=batch_parameters)
            del batch_parameters
            order = {e.id: i for i, e in enumerate(suite.expectations)}  # GX returns its own order
            for suite_result in outcome.run_results.values():
                results = sorted(suite_result.results, key=lambda r: order[r.expectation_config.id])
                checks += [check_result(table, r, frames[table], quarantine) for r in results]
            logger.debug("%s: validated in %.2f s", table, time.perf_counter() - t0)
    finally:
        runner.close()
    apply_repairs(checks, quarantine)

    context.build_data_docs(site_names=[DOCS_SITE])
    index = data_docs_dir / "index.html"
    report = ValidationReport(
        success=all(c.success for c in checks),
        checks=checks,
        short_users=short_users,
        data_docs_index=index if index.exists() else None,
        seconds=time.perf_counter() - started,
        quarantine=quarantine,
        quarantined=quarantined,
    )
    if report.success and quarantine_dir is not None:
        _write_quarantine(report, Path(quarantine_dir).resolve())
    logger.info(
        "validation %s: %d of %d checks failed, %s short users (rule %s), %.1f s",
        "passed" if report.success else "FAILED",
        len(report.failed),
        len(checks),
        f"{short.height:,}",
        params.short_users,
        report.seconds,
    )
    return report


# --- the suites -----------------------------------------------------------------------


def _expect(
    check: str,
    cls: type[gxe.Expectation],
    label: list[str] | None = None,
    examples_from: str | None = None,
    **kwargs: Any,
) -> gxe.Expectation:
    """An expectation tagged with our check name; `label` names the columns in the report
    when GX checks a derived one, `examples_from` takes examples from an index column."""
    meta: dict[str, Any] = {"check": check}
    if label:
        meta["columns"] = label
    if examples_from:
        meta["examples_from"] = examples_from
    return cls(meta=meta, **kwargs)


def _repairable(exp: gxe.Expectation, params: ValidationParams) -> gxe.Expectation:
    """Tag an interactions expectation with its repair rule; under "drop", say so in Data Docs."""
    rule = next(r for r, check in REPAIRS.items() if check == exp.meta["check"])
    exp.meta["repair"] = rule
    if getattr(params.repair, rule) == "drop":
        exp.severity = FailureSeverity.WARNING
        exp.notes = (
            f"Repair rule `drop` (validation.repair.{rule}): the rows this expectation rejects "
            f"{'(every copy but the first) ' if rule == 'duplicate_events' else ''}are quarantined and "
            f"left out of the sequences; validation still fails when the quarantine would exceed "
            f"validation.max_drop_fraction ({params.max_drop_fraction:g}), the expectation on {QUARANTINE_COLUMN}."
        )
    return exp


def _columns_exist_with_types(columns: dict[str, Any], typed: tuple[str, ...], dialect: gx_engines.Dialect) -> list:
    exps = [_expect("column_exists", gxe.ExpectColumnToExist, column=c) for c in columns]
    for c in typed:
        names = dialect.types[columns[c]]
        if len(names) == 1:
            exp = _expect("column_type", gxe.ExpectColumnValuesToBeOfType, column=c, type_=names[0])
        else:
            exp = _expect("column_type", gxe.ExpectColumnValuesToBeInTypeList, column=c, type_list=names)
        exps.append(exp)
    return exps


def interactions_expectations(
    params: ValidationParams, rating_scale: tuple[float, float] | None, now: int, dialect: gx_engines.Dialect
) -> list[gxe.Expectation]:
    """`dialect`: what the engine needs said its own way (gx_engines.DIALECTS)."""
    between = gxe.ExpectColumnValuesToBeBetween
    exps = _columns_exist_with_types(INTERACTIONS_SCHEMA, tuple(INTERACTIONS_SCHEMA), dialect)
    exps += [
        _repairable(_expect("not_null", gxe.ExpectColumnValuesToNotBeNull, column=c), params) for c in INTERACTIONS_KEYS
    ]
    if rating_scale is not None:
        low, high = rating_scale
        exp = _expect("rating_in_scale", between, column="rating", min_value=low, max_value=high)
        exps.append(_repairable(exp, params))
    oldest = epoch_seconds(params.min_timestamp)
    latest = now + params.future_tolerance_seconds
    exps += [
        _expect("timestamp_not_old", between, column="timestamp", min_value=oldest),
        _expect("timestamp_not_future", between, column="timestamp", max_value=latest),
        _repairable(
            _expect(
                "no_duplicate_events",
                dialect.duplicate_events[0],
                label=list(INTERACTIONS_SCHEMA),
                **dialect.duplicate_events[1],
            ),
            params,
        ),
        _repairable(
            _expect("item_in_items", gxe.ExpectColumnValuesToBeNull, ["item_id"], column=MISSING_ITEM_COLUMN),
            params,
        ),
    ]
    if _drop_rules(params):  # the repair is allowed only while the quarantine stays small
        exps.append(
            _expect(
                "drop_budget",
                gxe.ExpectColumnValuesToBeNull,
                column=QUARANTINE_COLUMN,
                mostly=1 - params.max_drop_fraction,
            )
        )
    return exps


def items_expectations(dialect: gx_engines.Dialect) -> list[gxe.Expectation]:
    return [
        *_columns_exist_with_types(ITEMS_SCHEMA, ("item_id",), dialect),
        _expect("not_null", gxe.ExpectColumnValuesToNotBeNull, column="item_id"),
        _expect("unique", gxe.ExpectColumnValuesToBeUnique, column="item_id"),
    ]


def users_expectations(dialect: gx_engines.Dialect) -> list[gxe.Expectation]:
    return [
        *_columns_exist_with_types(USERS_KEY_SCHEMA, ("user_id",), dialect),
        _expect("not_null", gxe.ExpectColumnValuesToNotBeNull, column="user_id"),
        _expect("unique", gxe.ExpectColumnValuesToBeUnique, column="user_id"),
    ]


def per_user_expectations(params: ValidationParams) -> list[gxe.Expectation]:
    return [
        _expect(
            "enough_events",
            gxe.ExpectColumnValuesToBeBetween,
            label=["user_id"],
            examples_from="user_id",
            column="events",
            min_value=params.min_events_per_user,
        )
    ]


def _result_format(table: str) -> dict[str, Any]:
    if table == PER_USER_TABLE:  # examples are the users, not their counts
        return {**RESULT_FORMAT, "unexpected_index_column_names": ["user_id"]}
    return RESULT_FORMAT


# --- frames ---------------------------------------------------------------------------


def _drop_rules(params: ValidationParams) -> list[str]:
    return [rule for rule in REPAIRS if getattr(params.repair, rule) == "drop"]


def _with_quarantine(frame: pl.DataFrame, tables: CanonicalTables, params: ValidationParams) -> pl.DataFrame:
    """`frame` plus QUARANTINE_COLUMN: the drop rules each row fails, in REPAIRS order (null = kept).
    A table that lacks a canonical column quarantines nothing: its column checks fail it."""
    rules = _drop_rules(params)
    if not rules or not set(INTERACTIONS_SCHEMA) <= set(frame.columns):
        return frame.with_columns(pl.lit(None, pl.String).alias(QUARANTINE_COLUMN))
    rejects = {  # the rows each check rejects; of exact copies, all but the first
        "null_keys": pl.any_horizontal(pl.col(c).is_null() for c in INTERACTIONS_KEYS),
        "duplicate_events": _later_copies(frame),
        "rating_out_of_scale": outside_scale(tables.rating_scale),
        "unknown_items": pl.col(MISSING_ITEM_COLUMN).is_not_null(),
    }
    names = pl.concat_str([pl.when(rejects[r]).then(pl.lit(r)) for r in rules], separator=",", ignore_nulls=True)
    failed = pl.any_horizontal(rejects[r] for r in rules)
    return frame.with_columns(pl.when(failed).then(names).alias(QUARANTINE_COLUMN))


def _later_copies(frame: pl.DataFrame) -> pl.Expr:
    """True for each exact copy of an earlier row. The rows' hashes first: when they all differ
    (the usual case) no row repeats, and the exact check (4x slower at 20M rows) is skipped.
    Sorted, equal hashes are neighbours (2x faster than counting distinct ones, a scratch run)."""
    rows = pl.struct(*INTERACTIONS_SCHEMA)
    hashes = frame.select(rows.hash()).to_series().sort()
    if not (hashes.slice(1) == hashes.slice(0, max(hashes.len() - 1, 0))).any():
        return pl.repeat(False, pl.len())
    return ~rows.is_first_distinct()


def _quarantine_counts(quarantined: pl.DataFrame, total: int, params: ValidationParams) -> dict[str, Any]:
    reasons = quarantined[QUARANTINE_COLUMN].str.split(",").explode()
    return {
        "rows": quarantined.height,
        "of": total,
        "share": quarantined.height / total if total else 0.0,
        "by_rule": {rule: int((reasons == rule).sum()) for rule in _drop_rules(params)},
        "rules": params.repair.model_dump(),
        "max_drop_fraction": params.max_drop_fraction,
    }


def _write_quarantine(report: ValidationReport, folder: Path) -> None:
    """Replace `folder` with the quarantined interactions, in one step; record file and hash."""
    with atomic_dir(folder) as staging:
        report.quarantined.write_parquet(staging / "interactions.parquet")
    path = folder / "interactions.parquet"
    report.quarantine.update(file=str(path), sha256=file_sha256(path))


def _events_per_user(interactions: pl.DataFrame) -> pl.DataFrame:
    if "user_id" not in interactions.columns:
        return pl.DataFrame(schema={"user_id": pl.String, "events": pl.Int64})
    return (
        interactions.lazy()
        .filter(pl.col("user_id").is_not_null())
        .group_by("user_id")
        .agg(pl.len().cast(pl.Int64).alias("events"))
        .sort("events", "user_id")
        .collect()
    )


def _with_missing_items(interactions: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """The canonical columns plus `item_id_missing_from_items` (null where the item is known)."""
    present = [c for c in INTERACTIONS_SCHEMA if c in interactions.columns]
    if "item_id" not in present:
        return interactions.select(present)  # the missing-column check reports it
    known = items["item_id"] if "item_id" in items.columns else pl.Series([], dtype=pl.String)
    known = known.cast(interactions.schema["item_id"]).drop_nulls().unique()
    missing = pl.when(pl.col("item_id").is_in(known.implode())).then(None).otherwise(pl.col("item_id"))
    return interactions.select(*present, missing.alias(MISSING_ITEM_COLUMN))


def _context(data_docs_dir: Path) -> Any:
    """An in-memory GX context: no analytics, no progress bars, one Data Docs site on disk."""
    site = {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(data_docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        data_docs_sites={DOCS_SITE: site},
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def epoch_seconds(day: date) -> int:
    """Midnight UTC of `day`, in epoch seconds."""
    return int(datetime.combine(day, datetime.min.time(), UTC).timestamp())
