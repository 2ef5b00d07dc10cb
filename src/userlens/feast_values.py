"""Feast's online storage format, built and read straight from Arrow and bytes: the rows
`write_to_online_store` would write (without its per-row Python conversion), entity keys, and
float vectors decoded bit for bit. feature_store.py writes with it, serving.py reads with it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userlens.errors import ServingError
from userlens.io import list_vectors


def online_rows(view, table: pa.Table, features) -> list[tuple]:
    """Slot rows of a feature set (feature_store.FeatureSet) as the online store's input: what
    write_to_online_store's conversion makes of them.

    One (EntityKeyProto, {feature: ValueProto}, event time, None) per user, features in the
    view's order: user_id a string entity value, the vector a float_list_val holding the float32
    bits as they are, the version a string_val, the Int64 scalars int64_val, a null an empty
    ValueProto. Equal values share one (read-only) ValueProto. tests/test_feature_store.py
    checks the rows against Feast's own conversion.
    """
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    names = [f.name for f in view.features]
    expected = list(features.features)
    if sorted(names) != sorted(expected) or [c.name for c in view.entity_columns] != ["user_id"]:
        raise ServingError(f"feature view {view.name}: features {names}, expected {expected} keyed by user_id")
    vectors = np.ascontiguousarray(list_vectors(table[features.vector]), dtype="<f4")
    head = _float_list_head(vectors.shape[1])
    encoded = np.empty((table.num_rows, len(head) + vectors.itemsize * vectors.shape[1]), np.uint8)
    encoded[:, : len(head)] = np.frombuffer(head, np.uint8)
    encoded[:, len(head) :] = vectors.view(np.uint8)
    data, width, parse = encoded.tobytes(), encoded.shape[1], ValueProto.FromString
    columns = {
        features.vector: [parse(data[i : i + width]) for i in range(0, len(data), width)],
        features.version: _per_row(table[features.version], _value_maker("string_val")),
        **{name: _per_row(table[name], _value_maker("int64_val")) for name in features.scalars},
    }
    keys = entity_keys(table["user_id"].to_pylist())
    features = [dict(zip(names, values, strict=True)) for values in zip(*(columns[n] for n in names), strict=True)]
    times = _per_row(table["event_timestamp"], lambda t: t)  # tz-aware UTC: the stores convert it as Feast's rows
    return list(zip(keys, features, times, [None] * table.num_rows, strict=True))


def entity_keys(user_ids: Sequence[str]) -> list:
    """EntityKeyProto of each user id (join key user_id, a string value), as Feast builds them."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto

    join_keys, keys = ["user_id"], []
    for uid in user_ids:
        key = EntityKeyProto(join_keys=join_keys)
        key.entity_values.add(string_val=uid)
        keys.append(key)
    return keys


def _per_row(column: pa.ChunkedArray, make) -> list:
    """make(value) for each row, called once per distinct value (None for a null): equal values share one object."""
    encoded = column.combine_chunks().dictionary_encode()
    distinct = [make(value) for value in encoded.dictionary.to_pylist()] + [make(None)]
    return [distinct[i] for i in pc.fill_null(encoded.indices, len(distinct) - 1).to_pylist()]


def _value_maker(field: str):
    """value -> ValueProto with `field` set (what Feast makes of a scalar), empty for a null."""
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    return lambda x: ValueProto() if x is None else ValueProto(**{field: x})


@functools.cache
def _float_list_head(dim: int) -> bytes:
    """The wire bytes before the floats of a serialised ValueProto(float_list_val=FloatList(val=[dim floats]))."""
    from feast.protos.feast.types.Value_pb2 import FloatList
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    template = ValueProto(float_list_val=FloatList(val=[0.0] * dim)).SerializeToString()
    return template[: len(template) - 4 * dim]  # packed floats come last, 4 bytes each (little-endian)


def decode_embeddings(values: list, dim: int) -> np.ndarray:
    """[n, dim] float32 from embedding ValueProtos, bit for bit (their wire bytes, not Python floats)."""
    head = _float_list_head(dim)
    width = len(head) + 4 * dim
    data = [value.SerializeToString() for value in values]
    raw = np.frombuffer(b"".join(data), np.uint8)
    if any(len(b) != width for b in data) or not (raw.reshape(-1, width)[:, : len(head)] == list(head)).all():
        raise ServingError(f"the online store holds embeddings that are not {dim} float32 values")
    return raw.reshape(-1, width)[:, len(head) :].copy().view("<f4").astype(np.float32, copy=False)
