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
from userlens.io import atomic_file, list_vectors

EXPORT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("model_version", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
    ]
)


@torch.no_grad()
def embed_batches(
    encoder: torch.nn.Module, data: SequenceData, users: np.ndarray | None = None, batch_size: int = 1024
) -> Iterator[np.ndarray]:
    """Embeddings of `users` (default: all, in user_index order), one float32 array per batch."""
    device = next(encoder.parameters()).device
    users = np.arange(data.n_users) if users is None else np.asarray(users)
    was_training = encoder.training
    encoder.eval()
    try:
        for start in range(0, len(users), batch_size):
            batch = data.batch(torch.as_tensor(users[start : start + batch_size])).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = encoder(batch)
            yield out.float().cpu().numpy()
    finally:
        encoder.train(was_training)


def embed_users(encoder: torch.nn.Module, data: SequenceData, users: np.ndarray | None = None) -> np.ndarray:
    return np.concatenate(list(embed_batches(encoder, data, users)))


def embed_sequences(
    encoder: torch.nn.Module, sequences_dir: Path, max_length: int, vocabulary=None, chunk_users: int = 50_000
) -> Iterator[np.ndarray]:
    """Embeddings of every user of data/sequences/, streamed: memory bounded by one chunk of users."""
    for chunk in SequenceData.chunks(sequences_dir, max_length, vocabulary, chunk_users):
        yield from embed_batches(encoder, chunk)


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
        if written != len(ids):
            raise ValueError(f"{written} embeddings for {len(ids)} users")
    return written


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    """(user_ids, [n, d] float32) from an export file."""
    table = pq.read_table(path, columns=["user_id", "embedding"])
    return table["user_id"].to_pylist(), list_vectors(table["embedding"])
