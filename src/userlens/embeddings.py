"""User embeddings: batched inference and the Parquet export serving reads.

Export schema (one row per user): user_id string, embedding list<float32>, model_version
string, event_timestamp timestamp[us, UTC]. Written one row group per batch, so memory stays
bounded by the batch, not the number of users.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from userlens.data import SequenceData
from userlens.faults import fault_point
from userlens.io import atomic_file, list_vectors

EXPORT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("model_version", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
    ]
)


BUCKET_USERS = 65_536  # users sorted by length together; one output array per bucket window
TOKENS_PER_USER = 32  # sorted batches hold up to batch_size x this many positions


@torch.no_grad()
def embed_batches(
    encoder: torch.nn.Module,
    data: SequenceData,
    users: np.ndarray | None = None,
    batch_size: int = 1024,
    by_length: bool = True,
) -> Iterator[np.ndarray]:
    """Embeddings of `users` (default: all, in user_index order), as float32 arrays in that order.

    `by_length`: within each window of BUCKET_USERS users, batches are cut from the users sorted
    by history length, so a batch is padded to about its own users' length, not to the longest
    user in a random thousand (at 10 events a user, most of a mixed batch is padding), and long
    histories come in fewer users per batch (a budget of positions, `_cut`). Padding
    is masked, so the vectors are the same either way up to float rounding. One array per window
    (by_length) or per batch.
    """
    device = next(encoder.parameters()).device
    users = np.arange(data.n_users) if users is None else np.asarray(users)
    was_training = encoder.training
    encoder.eval()
    try:
        window = BUCKET_USERS if by_length else batch_size
        for begin in range(0, len(users), window):
            chosen = users[begin : begin + window]
            lengths = data.lengths[chosen].numpy()
            order = np.argsort(lengths, kind="stable") if by_length else np.arange(len(chosen))
            out = None
            for rows in _cut(order, lengths, batch_size, by_length):
                batch = data.batch(torch.as_tensor(chosen[rows])).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    vectors = encoder(batch).float().cpu().numpy()
                if out is None:
                    out = np.empty((len(chosen), vectors.shape[1]), np.float32)
                out[rows] = vectors
            if out is not None:
                yield out
    finally:
        encoder.train(was_training)


def _cut(order: np.ndarray, lengths: np.ndarray, batch_size: int, by_length: bool) -> Iterator[np.ndarray]:
    """Rows of each batch. Sorted: as many users as fit `batch_size` x TOKENS_PER_USER positions
    at the batch's longest history (so the long tail comes in smaller batches), at most batch_size."""
    if not by_length:
        yield from (order[start : start + batch_size] for start in range(0, len(order), batch_size))
        return
    budget, start = batch_size * TOKENS_PER_USER, 0
    sorted_lengths = np.maximum(lengths[order], 1)
    while start < len(order):
        # the largest n with n * sorted_lengths[start + n - 1] <= budget, at least 1: lengths
        # ascend, so the products do too and the users that fit are a prefix
        ends = np.arange(1, min(batch_size, len(order) - start) + 1)
        n = max(1, int((ends * sorted_lengths[start : start + len(ends)] <= budget).sum()))
        yield order[start : start + n]
        start += n


def embed_users(encoder: torch.nn.Module, data: SequenceData, users: np.ndarray | None = None) -> np.ndarray:
    return np.concatenate(list(embed_batches(encoder, data, users)))


def embed_sequences(
    encoder: torch.nn.Module,
    sequences_dir: Path,
    max_length: int,
    vocabulary=None,
    chunk_users: int = 50_000,
    by_length: bool = True,
) -> Iterator[np.ndarray]:
    """Embeddings of every user of data/sequences/, streamed: memory bounded by one chunk of users."""
    for chunk in SequenceData.chunks(sequences_dir, max_length, vocabulary, chunk_users):
        yield from embed_batches(encoder, chunk, by_length=by_length)


def export_embeddings(
    path: Path,
    user_ids: pl.Series | list[str],
    batches: Iterable[np.ndarray],
    model_version: str,
    event_timestamp: datetime,
) -> int:
    """Write the export Parquet atomically; `batches` follow the order of `user_ids`. Returns rows."""
    ids = pa.array(list(user_ids) if not isinstance(user_ids, pl.Series) else user_ids.to_arrow(), pa.string())
    written = 0
    with atomic_file(path) as tmp:
        with pq.ParquetWriter(tmp, EXPORT_SCHEMA) as writer:
            for vectors in batches:
                n, dim = vectors.shape
                flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
                offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
                table = pa.table(
                    {
                        "user_id": ids.slice(written, n),
                        "embedding": pa.ListArray.from_arrays(offsets, flat),
                        "model_version": pa.array([model_version] * n, pa.string()),
                        "event_timestamp": pa.array([event_timestamp] * n, pa.timestamp("us", tz="UTC")),
                    },
                    schema=EXPORT_SCHEMA,
                )
                writer.write_table(table)
                written += n
                fault_point("export")  # a test seam (faults.py); nothing when unset
        if written != len(ids):
            raise ValueError(f"{written} embeddings for {len(ids)} users")
    return written


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    """(user_ids, [n, d] float32) from an export file."""
    table = pq.read_table(path, columns=["user_id", "embedding"])
    return table["user_id"].to_pylist(), list_vectors(table["embedding"])
