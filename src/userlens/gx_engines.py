"""Where Great Expectations evaluates the suites: its pandas engine, or its SQL engine on DuckDB.

validation.py builds the suites and reads the results; an engine turns a polars table into
the GX batch the suites run on and names the column types as that engine reports them.

- `pandas`: GX's PandasExecutionEngine on a pandas copy of each table (dtypes chosen so GX
  takes its vectorised paths, see `to_pandas`).
- `duckdb`: GX's SqlAlchemyExecutionEngine on DuckDB (through the duckdb-engine SQLAlchemy
  dialect): each table is loaded once from its Arrow buffers into a DuckDB table of a private
  in-memory database, so every expectation is a SQL query over every row, run by DuckDB's
  vectorised, multi-threaded engine instead of pandas; nothing is converted to pandas.

Two library facts shape the DuckDB path (checked by tests/test_validation.py):
- GX releases its SQLAlchemy connection before it fetches a metric query's rows, except for
  the dialects it lists in `_PERSISTED_CONNECTION_DIALECTS` (sqlite, SQL Server, ...); DuckDB
  drops a result with its connection, so GX would read no rows. `_keep_duckdb_connection`
  adds DuckDB to that list, which makes GX keep one connection open, as it does for sqlite.
- SQLAlchemy 2.1's PostgreSQL reflection (which duckdb-engine builds on) reads
  `pg_catalog.pg_collation`, which DuckDB lacks, so GX could not read column types;
  SQLAlchemy is pinned below 2.1 (pyproject.toml).
"""

from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import great_expectations.expectations as gxe
import pandas as pd
import polars as pl
import pyarrow as pa

from userlens.schema import INTERACTIONS_SCHEMA

_SAME_EVENT = tuple(INTERACTIONS_SCHEMA)  # all four equal: one event
_EVENT = ", ".join(_SAME_EVENT)


class ExpectNoDuplicateEvents(gxe.UnexpectedRowsExpectation):
    """No two interactions are one event (user_id, item_id, timestamp and rating equal): GX's
    custom-SQL expectation, for the SQL engine on DuckDB. One query returns each repeated event
    with its number of copies and, in every row, the copies of all of them: a GROUP BY of every
    row's 64-bit DuckDB hash of the four columns finds the candidates (one integer key, not two
    strings, an integer and a float), and the exact four-column GROUP BY runs on those rows only,
    so a hash collision is never reported as a copy. At 20M rows this query takes 1.7 s, the exact
    GROUP BY alone 2.7 s, and GX's ExpectCompoundColumnsToBeUnique, which decides the same by
    joining every row back to its group's count once per metric, 7.2 s (benchmarks/data_pipeline.py,
    2026-12-03). This expectation needs only GX's rows metric (the first rows of the query), not
    its row count (the same query counted again).

    GROUP BY puts null ratings (implicit feedback) in one group, as pandas compares nulls as
    equal. Its result reads as that of GX's map expectations: every copy in unexpected_count, the
    first events (in id order) as partial_unexpected_list."""

    unexpected_rows_query: str = (
        f"WITH candidates AS (SELECT hash({_EVENT}) AS h FROM {{batch}} GROUP BY h HAVING count(*) > 1) "
        f"SELECT {_EVENT}, count(*) AS copies, sum(count(*)) OVER () AS all_copies FROM {{batch}} "
        f"WHERE hash({_EVENT}) IN (SELECT h FROM candidates) GROUP BY ALL HAVING count(*) > 1 ORDER BY {_EVENT}"
    )
    description: str = "No exact duplicate events (same user_id, item_id, timestamp and rating)"
    metric_dependencies: ClassVar[tuple[str, ...]] = ("unexpected_rows_query.table",)

    def _validate(self, metrics: dict, runtime_configuration: dict | None = None, execution_engine: Any = None) -> dict:
        events = metrics["unexpected_rows_query.table"]
        copies = int(events[0]["all_copies"]) if events else 0
        result_format = self._get_result_format(runtime_configuration=runtime_configuration)
        shown = result_format.get("partial_unexpected_count", 20) if isinstance(result_format, dict) else 20
        partial = [{c: event[c] for c in _SAME_EVENT} for event in events[:shown]]
        return {
            "success": copies == 0,
            "result": {"observed_value": copies, "unexpected_count": copies, "partial_unexpected_list": partial},
        }


@dataclass(frozen=True)
class Dialect:
    """What a suite must say differently on an engine.

    types: polars canonical dtype -> the type names the engine's GX type check accepts.
    duplicate_events: the GX expectation (class, arguments) that no event is repeated.
    """

    types: dict
    duplicate_events: tuple[type, dict]


DIALECTS = {
    # Float32 is widened to float64 for speed (see to_pandas), so a float column may read either.
    # "never": a row with a null rating is still a row; pandas compares nulls as equal
    "pandas": Dialect({pl.String: ["str"], pl.Int64: ["int64"], pl.Float32: ["float32", "float64"]},
                      (gxe.ExpectCompoundColumnsToBeUnique,
                       {"column_list": list(_SAME_EVENT), "ignore_row_if": "never"})),
    # the SQLAlchemy types GX reflects from DuckDB's VARCHAR, BIGINT, FLOAT
    "duckdb": Dialect({pl.String: ["String"], pl.Int64: ["BigInteger"], pl.Float32: ["FLOAT"]},
                      (ExpectNoDuplicateEvents, {})),
}  # fmt: skip

# Arrow type -> pandas dtype for the frames GX sees (others keep pyarrow's numpy default).
_PANDAS_DTYPES = {pa.string(): pd.StringDtype("pyarrow"), pa.large_string(): pd.StringDtype("pyarrow")}


def to_pandas(frame: pl.DataFrame) -> pd.DataFrame:
    """The frame GX's pandas engine sees. Strings become pyarrow-backed (compact, fast to hash
    and compare); Float32 is widened to float64 and an Int64 without nulls stays numpy int64,
    because GX's between-check is vectorised only for numpy int/float columns (else it loops
    in Python). An Int64 column with nulls becomes pandas Int64 so its type still reads int64."""
    wide = [pl.col(c).cast(pl.Float64) for c, t in frame.schema.items() if t == pl.Float32]
    nullable_ints = any(t == pl.Int64 and frame[c].null_count() for c, t in frame.schema.items())
    dtypes = {**_PANDAS_DTYPES, **({pa.int64(): pd.Int64Dtype()} if nullable_ints else {})}
    return frame.with_columns(wide).to_arrow().to_pandas(types_mapper=dtypes.get, split_blocks=True)


class PandasEngine:
    name = "pandas"

    def __init__(self, context: Any, frames: dict[str, pl.DataFrame]):
        self.source, self.frames = context.data_sources.add_pandas("userlens"), frames

    def batch(self, table: str) -> tuple[Any, dict | None]:
        """(GX batch definition, batch parameters of the checkpoint run) for this table; its
        pandas copy is made here, one table at a time."""
        definition = self.source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("whole")
        return definition, {"dataframe": to_pandas(self.frames[table])}

    def close(self) -> None:
        pass


class DuckdbEngine:
    name = "duckdb"

    def __init__(self, context: Any, frames: dict[str, pl.DataFrame]):
        import sqlalchemy as sa

        _keep_duckdb_connection()
        # A named in-memory database: every connection opened with this URL in this process
        # (ours, and GX's through duckdb-engine, with the same settings) shares it.
        url = f"duckdb:///:memory:userlens-{secrets.token_hex(8)}"
        self.owner = sa.create_engine(url)
        self.connection = self.owner.raw_connection()  # held open: the database lives while it does
        try:
            duck = self.connection.driver_connection
            for table, frame in frames.items():
                # Arrow string views: polars hands its own buffers over (no conversion to Arrow's
                # offset strings) and DuckDB scans them; no copy to pandas
                duck.register("incoming", frame.to_arrow(compat_level=pl.CompatLevel.newest()))
                # a table, not a view over the Arrow buffers: each query would convert the strings again
                duck.execute(f'CREATE TABLE "{table}" AS SELECT * FROM incoming')
                duck.unregister("incoming")
            self.source = context.data_sources.add_sql("userlens", connection_string=url)
        except BaseException:
            self.close()
            raise

    def batch(self, table: str) -> tuple[Any, dict | None]:
        return self.source.add_table_asset(table, table_name=table).add_batch_definition_whole_table("whole"), None

    def close(self) -> None:
        if getattr(self, "source", None) is not None:
            self.source.get_engine().dispose()
        self.connection.close()
        self.owner.dispose()


def engine(name: str, context: Any, frames: dict[str, pl.DataFrame]) -> PandasEngine | DuckdbEngine:
    return {"pandas": PandasEngine, "duckdb": DuckdbEngine}[name](context, frames)


class _DuckdbDialect(str):
    """How GX names a dialect in that list: a str (compared with ==) carrying `.value`."""

    value = "duckdb"


def _keep_duckdb_connection() -> None:
    from great_expectations.execution_engine import sqlalchemy_execution_engine as gx_sql

    if not any(str(d) == "duckdb" for d in gx_sql._PERSISTED_CONNECTION_DIALECTS):
        gx_sql._PERSISTED_CONNECTION_DIALECTS = (*gx_sql._PERSISTED_CONNECTION_DIALECTS, _DuckdbDialect("duckdb"))
    # GX warns at every type check that it compares SQLAlchemy's own types for this dialect (as
    # intended), and reflection that it has no SQLAlchemy type for a list column (never type-checked)
    logging.getLogger("great_expectations.expectations.type_comparison").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Did not recognize type 'list'", module="duckdb_engine")
