"""Feast's sqlite and Redis online stores, written and read in bulk in Feast's own format.

Feast's `online_write_batch` upserts one row per user per feature in a Python loop (sqlite), or
reads every user's previous timestamp before one HSET per user (Redis); its `online_read`
parses every stored ValueProto. Here the same bytes (feast_values.encoded_columns) go in with
one statement per chunk doing Feast's upsert in sqlite itself (sqlite), or the HSETs Feast's
`skip_dedup` path sends, packed per chunk into one write on the socket (Redis: a publish always
writes the newest rows), and come back as the stored bytes, which feast_values decodes with
numpy. The connections are Feast's own. A plain Feast client reads what this writes: tests compare the stored rows with
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
        user, several times what sqlite's own insert of the same rows takes. So each column of
        the chunk (the users' keys, each feature's values, each feature's texts) goes in as one
        or two parameters (`_packed`) and sqlite cuts the rows out itself (`_bulk_insert`)."""
        from feast.infra.online_stores.sqlite import adapt_datetime_epoch

        # Feast stores naive UTC (to_naive_utc) through its registered sqlite adapter; applied once here
        stamp = adapt_datetime_epoch(at.astimezone(UTC).replace(tzinfo=None))
        names = tuple(rows.values)
        n = len(rows.user_ids)
        texts = [rows.texts.get(name) or [None] * n for name in names]
        columns = [_packed(column) for column in (self.keys(rows.user_ids), *(rows.values[n] for n in names), *texts)]
        sql = _bulk_insert(self.table, names, tuple(kind for kind, _ in columns), self.UPSERT)
        with self.conn:
            self.conn.execute(sql, [n, stamp, *itertools.chain.from_iterable(p for _, p in columns)])

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


DIGITS = 10  # each start and length in a "cut" column's table: 10 decimal digits (a chunk < 10 GB)


def _packed(pieces: Sequence[bytes | str | None]) -> tuple[str, list]:
    """One column of a chunk (bytes, or texts: str | None) as `_bulk_insert`'s parameters, by kind:

    - "same": every row holds one value (a chunk's model version; an unset text), bound once;
    - "fixed": bytes of one length (vectors; keys of equal-length ids), end to end, and the length;
    - "cut": the rest, end to end, and per row its (start, length + 1), 0 for NULL (`_fixed_width`).

    The first two cost sqlite one substr() per row or none, the last three: what the statement
    evaluates per row, more than the B-tree insert itself (BENCHMARKS.md, publish)."""
    if len(pieces) == 0 or pieces.count(pieces[0]) == len(pieces):
        return "same", [pieces[0] if pieces else None]
    data = [p.encode() if isinstance(p, str) else (p or b"") for p in pieces]
    lengths = np.fromiter(map(len, data), np.int64, len(data))
    nulls = None in pieces
    if not nulls and lengths.min() == lengths.max():
        return "fixed", [b"".join(data), int(lengths[0])]
    starts = np.cumsum(lengths) - lengths + 1  # sqlite counts from 1
    stored = lengths + 1
    if nulls:
        stored[np.fromiter((p is None for p in pieces), bool, len(pieces))] = 0
    # never an empty blob: sqlite's substr() of a zero-length blob is NULL, not an empty piece
    return "cut", [b"".join(data) or b"\0", _fixed_width(np.stack([starts, stored], axis=1))]


@functools.cache
def _five_digits() -> np.ndarray:
    """Row i: the ASCII bytes of i as five decimal digits, 00000 .. 99999."""
    powers = 10 ** np.arange(4, -1, -1)
    return ((np.arange(100_000)[:, None] // powers) % 10 + ord("0")).astype(np.uint8)


def _fixed_width(numbers: np.ndarray) -> bytes:
    """Non-negative integers below 10**DIGITS as DIGITS-wide zero-padded ASCII decimals, end to end."""
    flat, digits = numbers.reshape(-1).astype(np.int64), _five_digits()
    return np.concatenate([digits[flat // 100_000], digits[flat % 100_000]], axis=1).tobytes()


@functools.cache
def _bulk_insert(table: str, features: tuple[str, ...], kinds: tuple[str, ...], upsert: str) -> str:
    """One INSERT of ?1 users' rows in Feast's columns, stamped ?2, from the parameters after them:
    per column (the users' keys, each feature's values, each feature's texts) those of `_packed`.

    A recursive CTE counts the users (u.i); each is crossed with the features (f.j), and CASE
    picks the feature's column, cut out of its parameters with substr()."""
    assert len(kinds) == 1 + 2 * len(features)
    expressions, at = [], 3
    for c, kind in enumerate(kinds):
        if kind == "same":
            expression, at = f"?{at}", at + 1
        elif kind == "fixed":
            expression, at = f"substr(?{at}, u.i * ?{at + 1} + 1, ?{at + 1})", at + 2
        else:

            def number(k: int, table: int = at + 1) -> str:  # the k-th number of u.i's row
                return f"CAST(substr(?{table}, (u.i * 2 + {k}) * {DIGITS} + 1, {DIGITS}) AS INTEGER)"

            expression, at = f"substr(?{at}, {number(0)}, NULLIF({number(1)}, 0) - 1)", at + 2
        texts = c > len(features)
        expressions.append(f"CAST({expression} AS TEXT)" if texts and kind != "same" else expression)
    key, values, texts = expressions[0], expressions[1 : 1 + len(features)], expressions[1 + len(features) :]

    def per_feature(column: list[str]) -> str:
        return "CASE f.j " + " ".join(f"WHEN {j} THEN {e}" for j, e in enumerate(column)) + " END"

    quoted = ("'" + name.replace("'", "''") + "'" for name in features)
    names = " UNION ALL ".join(f"SELECT {j}, {name}" for j, name in enumerate(quoted))
    return (
        f"WITH RECURSIVE u(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM u WHERE i + 1 < ?1), f(j, name) AS "
        f"({names}) INSERT INTO {table} (entity_key, feature_name, value, value_text, event_ts, created_ts) "
        f"SELECT {key}, f.name, {per_feature(values)}, {per_feature(texts)}, ?2, NULL FROM u CROSS JOIN f "
        f"WHERE ?1 > 0 {upsert}"
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
        import redis
        from google.protobuf.timestamp_pb2 import Timestamp

        stamp = Timestamp()
        stamp.FromDatetime(at.astimezone(UTC))
        fields = {f"_ts:{self.view.name}".encode(): [stamp.SerializeToString()] * len(rows.user_ids)}
        fields |= {self.fields[name]: values for name, values in rows.values.items()}
        keys = [key + self.project for key in self.keys(rows.user_ids)]
        if not keys:
            return
        if type(self.client) is not redis.Redis:  # a cluster routes each key to its node: redis-py's pipeline
            with self.client.pipeline(transaction=False) as pipe:
                for i, key in enumerate(keys):
                    pipe.hset(key, mapping={field: values[i] for field, values in fields.items()})
                    if self.ttl:
                        pipe.expire(key, self.ttl)
                pipe.execute()
            return
        commands = _resp_hsets(keys, fields, self.ttl)
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([commands])
            for _ in range(len(keys) * (2 if self.ttl else 1)):
                conn.read_response()  # raises the first error reply
        except BaseException:
            conn.disconnect()  # replies may be left unread on it
            raise
        finally:
            pool.release(conn)

    def read(self, user_ids: Sequence[str], features: Sequence[str]) -> dict[str, list[bytes | None]]:
        fields = [self.fields[f] for f in features]
        with self.client.pipeline(transaction=False) as pipe:
            for key in self.keys(user_ids):
                pipe.hmget(key + self.project, fields)
            rows = pipe.execute()
        return {f: [row[j] for row in rows] for j, f in enumerate(features)}


def _resp_hsets(keys: list[bytes], fields: dict[bytes, list[bytes]], ttl: int | None) -> bytes:
    """One HSET key field value .. per key (and EXPIRE key ttl) in Redis's wire protocol, RESP2:
    what redis-py's pipeline sends, packed column by column here: redis-py's encoding of each
    argument took most of the write's time."""

    def bulk(args: Sequence[bytes]) -> list[bytes]:
        return [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args]

    def same(arg: bytes) -> itertools.repeat:  # one argument for every key
        return itertools.repeat(arg, len(keys))

    packed_keys = bulk(keys)
    columns = [same(b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * len(fields))), packed_keys]
    for name, values in fields.items():
        columns += (same(bulk([name])[0]), bulk(values))
    if ttl:
        columns += (same(b"*3\r\n$6\r\nEXPIRE\r\n"), packed_keys, same(bulk([b"%d" % ttl])[0]))
    return b"".join(itertools.chain.from_iterable(zip(*columns, strict=True)))
