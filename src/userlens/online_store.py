"""Feast's sqlite and Redis online stores, written and read in bulk in Feast's own format.

Feast's `online_write_batch` upserts one row per user per feature in a Python loop (sqlite), or
reads every user's previous timestamp before one HSET per user (Redis); its `online_read`
parses every stored ValueProto. Here the same bytes (feast_values.encoded_columns) go in with
one statement per chunk doing Feast's upsert in sqlite itself (sqlite), or one pipeline of the
HSETs Feast's `skip_dedup` path sends (Redis: a publish always writes the newest rows), and
come back as the stored bytes, which feast_values decodes with numpy. The connections are
Feast's own. A plain Feast client reads what this writes: tests compare the stored rows with
Feast's writer's, byte for byte, and read them back through `get_online_features`.

Other online stores, and sqlite tables with Feast's optional columns (vector search,
`value_num`), go through Feast's provider interface instead (`FeastTable`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userlens.feast_values import EncodedRows, entity_keys, online_rows, serialized_keys

SQLITE_KEYS = 10_000  # keys per SELECT (sqlite caps the parameters of one statement)


def table_for(store, view):
    """The fastest faithful reader/writer of `view` in this store's online store."""
    kind = store.config.online_store.type
    if kind == "sqlite" and not _sqlite_extras(store.config):
        return SqliteTable(store, view)
    if kind == "redis":
        return RedisTable(store, view)
    return FeastTable(store, view)


def _sqlite_extras(config) -> bool:
    online = config.online_store
    return bool(getattr(online, "vector_enabled", False) or getattr(online, "enable_openai_compatible_store", False))


class FeastTable:
    """Through Feast's provider: online_write_batch and online_read, for any online store."""

    def __init__(self, store, view):
        self.store, self.view = store, view
        self.config = store.config
        self.online = store._get_provider().online_store

    def keys(self, user_ids: Sequence[str]) -> list[bytes]:
        return serialized_keys(user_ids, self.config.entity_key_serialization_version)

    def write_order(self, user_ids: pa.ChunkedArray) -> pa.Array | None:
        """The order in which to write users (positions in `user_ids`); None: as they come."""
        return None

    def write(self, rows: EncodedRows, at: datetime) -> None:
        """Each user's row (every feature of the view), stamped `at`."""
        self.online.online_write_batch(self.config, self.view, online_rows(rows, at), None)

    def read(self, user_ids: Sequence[str], features: Sequence[str]) -> dict[str, list[bytes | None]]:
        """The stored bytes of these features for each user (None: not stored)."""
        rows = self.online.online_read(self.config, self.view, entity_keys(user_ids), list(features))
        return {f: [values[f].SerializeToString() if values and f in values else None for _, values in rows]
                for f in features}  # fmt: skip


class SqliteTable(FeastTable):
    """Feast's sqlite table `<project>_<view>`: (entity_key, feature_name, value, value_text, ...)."""

    def __init__(self, store, view):
        super().__init__(store, view)
        from feast.infra.online_stores.sqlite import _quote_id, _table_id

        self.conn = self.online._get_conn(self.config)
        self.table = _quote_id(_table_id(self.config.project, view,
                                         self.config.registry.enable_online_feature_view_versioning))  # fmt: skip

    # Feast's upsert: a user written again (a retried chunk, a slot rewritten) gets the new row
    UPSERT = ("ON CONFLICT(entity_key, feature_name) DO UPDATE SET value = excluded.value, value_text = "
              "excluded.value_text, event_ts = excluded.event_ts, created_ts = excluded.created_ts")  # fmt: skip

    def write_order(self, user_ids: pa.ChunkedArray) -> pa.Array | None:
        """Users in about the order of their stored keys (the id's byte length, then its bytes),
        so each B-tree insert lands beside the last one: ids in export order write several times
        slower (BENCHMARKS.md, publish). Any order stores the same rows. None: already in order."""
        ids = user_ids.cast(pa.binary())
        order = pc.sort_indices(pa.table({"length": pc.binary_length(ids), "id": ids}),
                                sort_keys=[("length", "ascending"), ("id", "ascending")])  # fmt: skip
        in_place = pc.all(pc.equal(order, pa.array(range(len(order)), order.type))).as_py()
        return None if in_place or len(order) == 0 else order

    def write(self, rows: EncodedRows, at: datetime) -> None:
        """Feast's rows (value_text as Feast derives it, no created_ts) upserted in one statement.

        Python's sqlite3 binds parameters one at a time, about 1 us each: 6 per row, 4 rows per
        user, several times what sqlite's own insert of the same rows takes. So the chunk goes in
        as two parameters, every piece's bytes end to end and a fixed-width table of where each
        piece starts and how long it is, and sqlite cuts the rows out itself (`_bulk_insert`)."""
        from feast.infra.online_stores.sqlite import adapt_datetime_epoch

        # Feast stores naive UTC (to_naive_utc) through its registered sqlite adapter; applied once here
        stamp = adapt_datetime_epoch(at.astimezone(UTC).replace(tzinfo=None))
        names = tuple(rows.values)
        texts = [rows.texts.get(name) or [None] * len(rows.user_ids) for name in names]
        # per user: its key, each feature's value, each feature's text (None: stored as NULL)
        columns = [self.keys(rows.user_ids), *(rows.values[name] for name in names),
                   *([b"" if t is None else t.encode() for t in column] for column in texts)]  # fmt: skip
        lengths = np.stack([np.fromiter(map(len, column), np.int64, len(column)) for column in columns], axis=1)
        starts = np.cumsum(lengths, axis=None).reshape(lengths.shape) - lengths + 1  # sqlite counts from 1
        for j, column in enumerate(texts, start=1 + len(names)):  # a text's length + 1; 0 for NULL
            lengths[:, j] += np.fromiter((t is not None for t in column), bool, len(column))
        pieces = b"".join(itertools.chain.from_iterable(zip(*columns, strict=True)))
        table = _fixed_width(np.stack([starts, lengths], axis=2))
        with self.conn:
            self.conn.execute(_bulk_insert(self.table, names, self.UPSERT), (pieces, table, len(rows.user_ids), stamp))

    def read(self, user_ids: Sequence[str], features: Sequence[str]) -> dict[str, list[bytes | None]]:
        """Feast's select, restricted to the asked features, SQLITE_KEYS users per statement."""
        keys = self.keys(user_ids)
        out: dict[str, list[bytes | None]] = {f: [None] * len(keys) for f in features}
        position = {key: i for i, key in enumerate(keys)}
        names = ",".join("?" * len(features))
        for start in range(0, len(keys), SQLITE_KEYS):
            part = keys[start : start + SQLITE_KEYS]
            sql = (f"SELECT entity_key, feature_name, value FROM {self.table} "
                   f"WHERE entity_key IN ({','.join('?' * len(part))}) AND feature_name IN ({names})")  # fmt: skip
            for key, name, value in self.conn.execute(sql, [*part, *features]):
                out[name][position[key]] = value
        return out


DIGITS = 10  # each start and length in _bulk_insert's table: 10 decimal digits (a chunk < 10 GB)


def _fixed_width(numbers: np.ndarray) -> bytes:
    """Non-negative integers as DIGITS-wide zero-padded ASCII decimals, end to end."""
    powers = 10 ** np.arange(DIGITS - 1, -1, -1, dtype=np.int64)
    return ((numbers.reshape(-1, 1) // powers) % 10 + ord("0")).astype(np.uint8).tobytes()


@functools.cache
def _bulk_insert(table: str, features: tuple[str, ...], upsert: str) -> str:
    """One INSERT of ?3 users' rows, in Feast's columns, from ?1 (the pieces' bytes) and ?2 (per
    user, (start, length) of its key, its values, its texts: `_fixed_width`), stamped ?4.

    A recursive CTE counts the users; per user and feature (the feature's position f.j),
    substr() on the blob cuts out the bytes and CAST(... AS INTEGER) reads a number of the
    table. A text's stored length is its length + 1, 0 for NULL (substr with a NULL length is NULL)."""
    n = 1 + 2 * len(features)  # pieces per user

    def number(k: str) -> str:  # the k-th number of user u.i's row of ?2
        return f"CAST(substr(?2, (u.i * {2 * n} + {k}) * {DIGITS} + 1, {DIGITS}) AS INTEGER)"

    def piece(k: str) -> str:
        return f"substr(?1, {number(f'2 * ({k})')}, {number(f'2 * ({k}) + 1')})"

    quoted = ("'" + name.replace("'", "''") + "'" for name in features)
    names = " UNION ALL ".join(f"SELECT {j}, {name}" for j, name in enumerate(quoted))
    first_text = 1 + len(features)
    text = (f"CAST(substr(?1, {number(f'2 * (f.j + {first_text})')}, "
            f"NULLIF({number(f'2 * (f.j + {first_text}) + 1')}, 0) - 1) AS TEXT)")  # fmt: skip
    return (
        f"WITH RECURSIVE u(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM u WHERE i + 1 < ?3), f(j, name) AS "
        f"({names}) INSERT INTO {table} (entity_key, feature_name, value, value_text, event_ts, created_ts) "
        f"SELECT {piece('0')}, f.name, {piece('1 + f.j')}, {text}, ?4, NULL FROM u CROSS JOIN f "
        f"WHERE ?3 > 0 {upsert}"
    )  # WHERE: how sqlite tells a SELECT's end from ON CONFLICT


class RedisTable(FeastTable):
    """Feast's Redis layout: one hash per entity (key: entity key + project), a field per
    view:feature (murmur3), and `_ts:<view>` holding the row's Timestamp proto."""

    def __init__(self, store, view):
        super().__init__(store, view)
        self.client = self.online._get_client(self.config.online_store)
        self.project = self.config.project.encode()
        self.ttl = self.config.online_store.key_ttl_seconds

    @functools.cached_property
    def fields(self) -> dict[str, bytes]:
        from feast.infra.online_stores.helpers import _mmh3

        return {f.name: _mmh3(f"{self.view.name}:{f.name}") for f in self.view.features}

    def write(self, rows: EncodedRows, at: datetime) -> None:
        from google.protobuf.timestamp_pb2 import Timestamp

        stamp = Timestamp()
        stamp.FromDatetime(at.astimezone(UTC))
        ts_field, ts = f"_ts:{self.view.name}", stamp.SerializeToString()
        columns = [(self.fields[name], values) for name, values in rows.values.items()]
        with self.client.pipeline(transaction=False) as pipe:
            for i, key in enumerate(self.keys(rows.user_ids)):
                redis_key = key + self.project
                pipe.hset(redis_key, mapping={ts_field: ts, **{field: values[i] for field, values in columns}})
                if self.ttl:
                    pipe.expire(redis_key, self.ttl)
            pipe.execute()

    def read(self, user_ids: Sequence[str], features: Sequence[str]) -> dict[str, list[bytes | None]]:
        fields = [self.fields[f] for f in features]
        with self.client.pipeline(transaction=False) as pipe:
            for key in self.keys(user_ids):
                pipe.hmget(key + self.project, fields)
            rows = pipe.execute()
        return {f: [row[j] for row in rows] for j, f in enumerate(features)}
