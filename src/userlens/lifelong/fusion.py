"""User Interest Fusion (LIBER's UIF): a user's partitions -> one `user_interest` vector.

Each partition contributes two frozen vectors: its summary, encoded as text, and its events,
encoded by the userlens user encoder (the trained Barlow Twins encoder, on that partition's
events alone). The open cache counts as the most recent partition, with events but no summary.
`InterestFusion` projects both, adds a recency embedding (0 = the most recent), and attends
over the partitions with a learned query, its attention starting from a learned prior that
recent partitions count more; it is trained on a downstream objective (lifelong.ctr) with
everything upstream frozen.

Text encoders (`lifelong.fusion.text_encoder`): "lm", the language model's last hidden states
mean-pooled (userlens.llm); or "hashing", a hashed bag of words and word pairs (no model: the
CPU default, named for what it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from torch import nn

from userlens.config import LifelongParams

HASHING_DIM = 512  # features of the hashed bag of words
RECENCY_DECAY = 1.0  # initial attention prior: each step back in time weighs e^-1 as much


@dataclass
class PartitionInputs:
    """The fusion's inputs for U users: the most recent P partitions each, left-aligned."""

    user_ids: list[str]
    text: torch.Tensor  # [U, P, T] summary vectors (0 for the open cache and padding)
    events: torch.Tensor  # [U, P, E] event-set vectors
    recency: torch.Tensor  # [U, P] long: 0 = the most recent partition
    present: torch.Tensor  # [U, P] bool

    def rows(self, index: torch.Tensor) -> PartitionInputs:
        return PartitionInputs([self.user_ids[i] for i in index.tolist()], self.text[index], self.events[index],
                               self.recency[index], self.present[index])  # fmt: skip


class InterestFusion(nn.Module):
    def __init__(self, text_dim: int, event_dim: int, dim: int, max_partitions: int, heads: int = 4):
        super().__init__()
        self.text = nn.Linear(text_dim, dim)
        self.events = nn.Linear(event_dim, dim)
        self.recency = nn.Embedding(max_partitions, dim)
        self.query = nn.Parameter(torch.randn(1, 1, dim) / math.sqrt(dim))
        self.heads = heads if dim % heads == 0 else 1
        self.attend = nn.MultiheadAttention(dim, self.heads, batch_first=True)
        # A learned attention bias per recency, starting as a prior that recent partitions count
        # more (weights ~ exp(-RECENCY_DECAY * r)): the attention reads current interests from the
        # first step, instead of having to find recency through the keys on a few hundred users.
        self.recency_bias = nn.Embedding(max_partitions, 1)
        with torch.no_grad():
            self.recency_bias.weight.copy_(-RECENCY_DECAY * torch.arange(max_partitions, dtype=torch.float32)[:, None])
        self.norm = nn.LayerNorm(dim)

    def forward(self, inputs: PartitionInputs) -> torch.Tensor:
        x = self.text(inputs.text) + self.events(inputs.events) + self.recency(inputs.recency)
        query = self.query.expand(len(x), -1, -1)
        bias = self.recency_bias(inputs.recency).squeeze(-1).masked_fill(~inputs.present, float("-inf"))
        mask = bias[:, None, :].repeat_interleave(self.heads, dim=0)  # [U * heads, 1, P]
        fused, _ = self.attend(query, x, x, attn_mask=mask, need_weights=False)
        return self.norm(fused[:, 0])


def hashing_vectors(texts: list[str]) -> np.ndarray:
    """[len(texts), HASHING_DIM] L2-normalised counts of hashed words and word pairs."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vectoriser = HashingVectorizer(n_features=HASHING_DIM, ngram_range=(1, 2), alternate_sign=False, norm="l2")
    return vectoriser.transform(texts).toarray().astype(np.float32)


def text_vectors(texts: list[str], encoder: str, lm_model: str = "smollm2", device: str = "auto") -> np.ndarray:
    if encoder == "hashing":
        return hashing_vectors(texts)
    from userlens.llm import load_language_model

    model = load_language_model(lm_model, device)
    return model.embed(texts) if texts else np.zeros((0, model.hidden_size), np.float32)


def build_inputs(
    user_ids: list[str],
    closed: pl.DataFrame,
    open_rows: pl.DataFrame,
    texts: pl.DataFrame,
    event_encoder: tuple[nn.Module, np.ndarray, int],
    sequences_dir: Path,
    settings: LifelongParams,
) -> PartitionInputs:
    """The fusion's inputs for `user_ids` from their partitions: `texts` (user_id, partition,
    text) holds the summaries of the closed ones; `event_encoder` is (user encoder, its item
    vocabulary, its max_length), run on every partition that holds events."""
    encoder, vocabulary, max_length = event_encoder
    fusion = settings.fusion
    vectors = text_vectors(texts["text"].to_list(), fusion.text_encoder, settings.llm.model, settings.llm.device)
    keys = texts.select("user_id", "partition").iter_rows()
    summary_vectors = dict(zip(keys, vectors, strict=True))
    with_events = pl.concat([closed, open_rows.filter(pl.col("n_events") > 0)])
    event_vectors = event_set_vectors(encoder, sequences_dir, max_length, vocabulary, with_events)
    keys = with_events.select("user_id", "partition").iter_rows()
    event_by_key = dict(zip(keys, event_vectors, strict=True))
    return partition_inputs(user_ids, closed, open_rows, summary_vectors, event_by_key, fusion.max_partitions,
                            vectors.shape[1], event_vectors.shape[1])  # fmt: skip


def event_set_vectors(
    encoder: nn.Module, sequences_dir: Path, max_length: int, vocabulary: np.ndarray, partitions: pl.DataFrame
) -> np.ndarray:
    """[len(partitions), d] the user encoder's embedding of each partition's events alone (each
    partition holds at least one event)."""
    assert (partitions["n_events"] > 0).all(), "an empty partition has no events to encode"
    from userlens.data import SequenceData
    from userlens.embeddings import embed_users
    from userlens.sequences import dense_codes

    items = pl.read_parquet(Path(sequences_dir) / "items.parquet", columns=["item_index", "item_id"]).sort("item_index")
    exploded = partitions.select(pl.int_range(pl.len()).alias("row"), "item_ids", "timestamps", "ratings")
    exploded = exploded.explode(["item_ids", "timestamps", "ratings"])
    exploded = exploded.with_columns(item_index=dense_codes(exploded["item_ids"], items["item_id"]))
    lists = exploded.group_by("row", maintain_order=True).agg("item_index", "timestamps", "ratings")
    empty_int, empty_float = (
        pa.array([[]] * len(lists), pa.list_(pa.int32())),
        pa.array([[]] * len(lists), pa.list_(pa.float32())),
    )
    table = pa.table({
        "user_index": pa.array(np.arange(len(lists), dtype=np.int32)),
        "history_item_index": lists["item_index"].to_arrow(), "history_timestamp": lists["timestamps"].to_arrow(),
        "history_rating": lists["ratings"].to_arrow(), "future_item_index": empty_int,
        "future_timestamp": pa.array([[]] * len(lists), pa.list_(pa.int64())), "future_rating": empty_float,
    })  # fmt: skip
    data = SequenceData.from_table(sequences_dir, table, max_length, vocabulary)
    return embed_users(encoder, data)


def partition_inputs(
    user_ids: list[str],
    closed: pl.DataFrame,
    open_rows: pl.DataFrame,
    summary_vectors: dict[tuple[str, int], np.ndarray],
    event_vectors: dict[tuple[str, int], np.ndarray],
    max_partitions: int,
    text_dim: int,
    event_dim: int,
) -> PartitionInputs:
    """Stack each user's most recent partitions (the open cache last, when it holds events)."""
    n, p = len(user_ids), max_partitions
    text, events = np.zeros((n, p, text_dim), np.float32), np.zeros((n, p, event_dim), np.float32)
    recency, present = np.zeros((n, p), np.int64), np.zeros((n, p), bool)
    slots: dict[str, list[tuple[str, int]]] = {u: [] for u in user_ids}
    for user, index in closed.sort("user_id", "partition").select("user_id", "partition").iter_rows():
        if user in slots:
            slots[user].append((user, index))
    for user, index, size in open_rows.select("user_id", "partition", "n_events").iter_rows():
        if user in slots and size > 0:
            slots[user].append((user, index))
    for row, user in enumerate(user_ids):
        chosen = slots[user][-p:]
        for col, key in enumerate(chosen):
            if key in summary_vectors:
                text[row, col] = summary_vectors[key]
            events[row, col] = event_vectors[key]
            recency[row, col] = len(chosen) - 1 - col
            present[row, col] = True
        if not chosen:  # no events at all: one empty slot, so attention has something to read
            present[row, 0] = True
    return PartitionInputs(list(user_ids), torch.from_numpy(text), torch.from_numpy(events),
                           torch.from_numpy(recency), torch.from_numpy(present))  # fmt: skip
