"""Feast's online storage format, built straight from Arrow and read straight from bytes.

What `write_to_online_store` would store for a slot table, without its per-row Python
conversion: each feature's serialised ValueProto per user (`encoded_columns`), the sqlite
`value_text` Feast derives from it, the serialised entity keys, and float vectors decoded bit
for bit from the stored bytes. online_store.py writes and reads them; tests check them against
Feast's own conversion, writer and reader.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userlens.errors import ServingError
from userlens.io import list_vectors


@dataclass
class EncodedRows:
    """A slot table as the online store holds it: per feature, each user's serialised ValueProto
    (b"" for a null, Feast's empty ValueProto) and its sqlite value_text (None where Feast has none)."""

    user_ids: list[str]
    values: dict[str, list[bytes]]
    texts: dict[str, list[str | None]]


def encoded_columns(view, table: pa.Table, features) -> EncodedRows:
    """The rows of a feature set (feature_store.FeatureSet) in the view's feature order: the
    vector a float_list_val holding the float32 bits as they are, the version a string_val,
    the Int64 scalars int64_val. Equal values share one bytes object."""
    names = [f.name for f in view.features]
    expected = list(features.features)
    if sorted(names) != sorted(expected) or [c.name for c in view.entity_columns] != ["user_id"]:
        raise ServingError(f"feature view {view.name}: features {names}, expected {expected} keyed by user_id")
    vectors = np.ascontiguousarray(list_vectors(table[features.vector]), dtype="<f4")
    head = float_list_head(vectors.shape[1])
    encoded = np.empty((table.num_rows, len(head) + vectors.itemsize * vectors.shape[1]), np.uint8)
    encoded[:, : len(head)] = np.frombuffer(head, np.uint8)
    encoded[:, len(head) :] = vectors.view(np.uint8)
    data, width = encoded.tobytes(), encoded.shape[1]
    values = {features.vector: [data[i : i + width] for i in range(0, len(data), width)]}
    texts: dict[str, list[str | None]] = {}
    values[features.version], texts[features.version] = _per_row(table[features.version], "string_val")
    for name in features.scalars:
        values[name], texts[name] = _per_row(table[name], "int64_val")
    return EncodedRows(table["user_id"].to_pylist(), {n: values[n] for n in names}, texts)


def online_rows(rows: EncodedRows, at: datetime) -> list[tuple]:
    """The same rows as online_write_batch's input (EntityKeyProto, {feature: ValueProto}, event
    time, None): what write_to_online_store's conversion makes of the table."""
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    parsed: dict[bytes, object] = {}  # equal bytes, one (read-only) ValueProto

    def parse(data: bytes):
        if data not in parsed:
            parsed[data] = ValueProto.FromString(data)
        return parsed[data]

    names = list(rows.values)
    columns = [[parse(v) for v in rows.values[n]] for n in names]
    features = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
    n = len(rows.user_ids)
    return list(zip(entity_keys(rows.user_ids), features, [at] * n, [None] * n, strict=True))


def entity_keys(user_ids: Sequence[str]) -> list:
    """EntityKeyProto of each user id (join key user_id, a string value), as Feast builds them."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto

    join_keys, keys = ["user_id"], []
    for uid in user_ids:
        key = EntityKeyProto(join_keys=join_keys)
        key.entity_values.add(string_val=uid)
        keys.append(key)
    return keys


def serialized_keys(user_ids: Sequence[str], version: int) -> list[bytes]:
    """Feast's serialize_entity_key of each user's key, built from one template (the bytes up to
    the id's length and UTF-8 bytes, which come last). Tested against Feast's own function."""
    prefix = _key_prefix(version)
    return [prefix + len(b).to_bytes(4, "little") + b for b in (u.encode() for u in user_ids)]


@functools.cache
def _key_prefix(version: int) -> bytes:
    from feast.infra.key_encoding_utils import serialize_entity_key

    empty = serialize_entity_key(entity_keys([""])[0], entity_key_serialization_version=version)
    return empty[:-4]  # the last 4 bytes: the (zero) length of the id


def _per_row(column: pa.ChunkedArray, field: str) -> tuple[list[bytes], list[str | None]]:
    """Serialised ValueProto(field=value) and Feast's value_text for each row, built once per distinct value."""
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    encoded = column.combine_chunks().dictionary_encode()
    distinct = encoded.dictionary.to_pylist()
    values = [ValueProto(**{field: x}).SerializeToString() for x in distinct] + [b""]
    texts = [str(x) for x in distinct] + [None]  # str(): what Feast's extract_text_and_num stores
    index = pc.fill_null(encoded.indices, len(distinct)).to_pylist()
    return [values[i] for i in index], [texts[i] for i in index]


@functools.cache
def float_list_head(dim: int) -> bytes:
    """The wire bytes before the floats of a serialised ValueProto(float_list_val=FloatList(val=[dim floats]))."""
    from feast.protos.feast.types.Value_pb2 import FloatList
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    template = ValueProto(float_list_val=FloatList(val=[0.0] * dim)).SerializeToString()
    return template[: len(template) - 4 * dim]  # packed floats come last, 4 bytes each (little-endian)


def decode_vectors(stored: list[bytes], dim: int) -> np.ndarray:
    """[n, dim] float32 from stored float_list_val bytes, bit for bit."""
    head = float_list_head(dim)
    width = len(head) + 4 * dim
    raw = np.frombuffer(b"".join(stored), np.uint8)
    if any(len(b) != width for b in stored) or not (raw.reshape(-1, width)[:, : len(head)] == list(head)).all():
        raise ServingError(f"the online store holds vectors that are not {dim} float32 values")
    return raw.reshape(-1, width)[:, len(head) :].copy().view("<f4").astype(np.float32, copy=False)


def string_value(text: str) -> bytes:
    """The stored bytes of a string feature (a ValueProto string_val)."""
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    return ValueProto(string_val=text).SerializeToString()
