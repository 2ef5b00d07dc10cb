"""data/sequences/ -> padded tensors of every user's history, and batches of them.

Token ids (shared by the model, the augmentations and every consumer of an embedding):

    0 = padding, 1 = mask token (augmentations), 2 = out-of-vocabulary bucket,
    item_index + 3 for an item of the training vocabulary.

Rows are right-padded: position 0 holds the oldest kept event, position length-1 the most
recent; a history longer than `max_length` keeps its `max_length` most recent events.

Only histories are turned into model inputs. Future windows are evaluation labels: the one
thing read from them is `next_item` (the first future item per user, for next-item metrics).
The dual encoder's training pairs come from the history alone (model.DualEncoder).

A user with an empty history (possible only for hand-made or newer data; the sequences
stage keeps at least one history event per user) is an all-padding row; the encoder maps
it to its learned "empty user" embedding (see model.UserEncoder).

Construction is vectorised with Arrow list offsets and numpy: no Python loop over users.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

PAD, MASK, OOV = 0, 1, 2
N_SPECIAL = 3  # item_index i has token id i + N_SPECIAL


def remap_unknown(tokens: torch.Tensor, n_items: int) -> torch.Tensor:
    """Token ids of items outside a vocabulary of `n_items` items become the OOV token.

    For data whose item_index extends the trained vocabulary (new items appended); when the
    indices themselves may have moved, load with `vocabulary=` (maps by item_id) instead.
    """
    return torch.where(tokens >= n_items + N_SPECIAL, torch.full_like(tokens, OOV), tokens)


@dataclass
class Batch:
    """Model inputs for B users, right-padded to a common length L.

    items [B, L] long token ids; ratings [B, L] float in [0, 1] (0 where missing);
    has_rating [B, L] bool; gaps [B, L] float, log1p(seconds since the previous event);
    padding [B, L] bool, True at padded positions (always a suffix of each row).
    """

    items: torch.Tensor
    ratings: torch.Tensor
    has_rating: torch.Tensor
    gaps: torch.Tensor
    padding: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return (~self.padding).sum(1)

    def __len__(self) -> int:
        return self.items.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


@dataclass
class SequenceData:
    """Every user's padded history as tensors, plus the item side table."""

    items: torch.Tensor  # [U, L] long token ids
    ratings: torch.Tensor  # [U, L] float in [0, 1]
    has_rating: torch.Tensor  # [U, L] bool
    gaps: torch.Tensor  # [U, L] float, log1p(seconds since the user's previous event)
    lengths: torch.Tensor  # [U] long, number of kept history events
    next_item: torch.Tensor  # [U] long token id of the first future item, -1 when none
    item_categories: torch.Tensor  # [n_items + 3, C] float multi-hot; special rows are zero
    item_counts: torch.Tensor  # [n_items + 3] float: occurrences in the (full) histories
    item_ids: np.ndarray  # [n_items] item_id of each vocabulary item (index = token - 3)
    categories: list[str]
    rating_scale: tuple[float, float] | None
    max_length: int

    @property
    def n_users(self) -> int:
        return self.items.shape[0]

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_categories(self) -> int:
        return self.item_categories.shape[1]

    @classmethod
    def load(
        cls, sequences_dir: str | Path, max_length: int, vocabulary: Sequence[str] | np.ndarray | None = None
    ) -> SequenceData:
        """Read data/sequences/. `vocabulary`: the item_ids a model was trained on (its
        `item_ids`, in token order); items of this data outside it become the OOV token, and
        the item side table then follows the vocabulary. None: this data's own items."""
        table = pq.read_table(Path(sequences_dir) / "sequences.parquet").sort_by("user_index")
        return cls.from_table(sequences_dir, table, max_length, vocabulary)

    @classmethod
    def chunks(
        cls,
        sequences_dir: str | Path,
        max_length: int,
        vocabulary: Sequence[str] | np.ndarray | None = None,
        chunk_users: int = 50_000,
    ) -> Iterator[SequenceData]:
        """The users in user_index order, `chunk_users` at a time: memory bounded by one chunk."""
        sequences = pq.ParquetFile(Path(sequences_dir) / "sequences.parquet")
        for batch in sequences.iter_batches(batch_size=chunk_users):
            yield cls.from_table(sequences_dir, pa.Table.from_batches([batch]), max_length, vocabulary)

    @classmethod
    def from_table(
        cls,
        sequences_dir: str | Path,
        table: pa.Table,
        max_length: int,
        vocabulary: Sequence[str] | np.ndarray | None = None,
    ) -> SequenceData:
        """Rows of sequences.parquet (in user_index order) with the item table of `sequences_dir`."""
        folder = Path(sequences_dir)
        manifest = json.loads((folder / "manifest.json").read_text())
        categories = list(manifest["categories"])
        scale = tuple(manifest["rating_scale"]) if manifest.get("rating_scale") else None

        item_table = pq.read_table(folder / "items.parquet", columns=["item_index", "item_id", "category_index"])
        item_table = item_table.sort_by("item_index")
        data_ids = np.asarray(item_table["item_id"].to_pylist(), dtype=object)
        if vocabulary is None:
            item_ids, token_of = data_ids, np.arange(len(data_ids), dtype=np.int64) + N_SPECIAL
        else:
            item_ids = np.asarray(list(vocabulary), dtype=object)
            token_of = _lookup(item_ids, data_ids)  # this data's item_index -> token id
        n_items = len(item_ids)

        # Item side table: multi-hot categories, one row per token id.
        cat_lists = item_table["category_index"].combine_chunks()
        cat_offsets = _offsets(cat_lists)
        cat_values = cat_lists.flatten().fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        cat_rows = np.repeat(token_of, np.diff(cat_offsets))
        ok = (cat_rows >= N_SPECIAL) & (cat_values >= 0)
        item_categories = np.zeros((n_items + N_SPECIAL, len(categories)), dtype=np.float32)
        item_categories[cat_rows[ok], cat_values[ok]] = 1.0

        n_users = table.num_rows
        hist_items = table["history_item_index"].combine_chunks()
        offsets = _offsets(hist_items)
        flat_items = token_of[hist_items.flatten().to_numpy(zero_copy_only=False).astype(np.int64)]
        flat_times = table["history_timestamp"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        flat_ratings = table["history_rating"].combine_chunks().flatten()
        rated = pc.invert(pc.is_null(flat_ratings, nan_is_null=True)).to_numpy(zero_copy_only=False)
        values = flat_ratings.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float32)
        values = np.where(rated, values, 0.0)
        counts = np.diff(offsets)

        # Gaps on the full history, so the first kept event of a truncated one keeps its real gap.
        gaps = np.zeros(len(flat_times), dtype=np.float64)
        if len(flat_times) > 1:
            gaps[1:] = np.maximum(np.diff(flat_times), 0)
        gaps[offsets[:-1][counts > 0]] = 0.0  # each user's first event
        gaps = np.log1p(gaps).astype(np.float32)
        ratings = _scale_ratings(values, rated, scale)

        # Keep the most recent `max_length` events of each user, right-padded.
        lengths = np.minimum(counts, max_length)
        row = np.repeat(np.arange(n_users), lengths)
        col = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        src = np.repeat(offsets[1:] - lengths, lengths) + col

        def padded(flat: np.ndarray, dtype: npt.DTypeLike) -> torch.Tensor:
            out = np.zeros((n_users, max_length), dtype=dtype)
            out[row, col] = flat[src]
            return torch.from_numpy(out)

        future = table["future_item_index"].combine_chunks()
        fut_offsets = _offsets(future)
        fut_values = future.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        has_future = np.diff(fut_offsets) > 0
        next_item = np.full(n_users, -1, dtype=np.int64)
        next_item[has_future] = token_of[fut_values[fut_offsets[:-1][has_future]]]

        return cls(
            items=padded(flat_items, np.int64),
            ratings=padded(ratings, np.float32),
            has_rating=padded(rated, np.bool_),
            gaps=padded(gaps, np.float32),
            lengths=torch.from_numpy(lengths.astype(np.int64)),
            next_item=torch.from_numpy(next_item),
            item_categories=torch.from_numpy(item_categories),
            item_counts=torch.from_numpy(np.bincount(flat_items, minlength=n_items + N_SPECIAL).astype(np.float32)),
            item_ids=item_ids,
            categories=categories,
            rating_scale=scale,
            max_length=max_length,
        )

    def batch(self, user_indices: torch.Tensor | Sequence[int]) -> Batch:
        """The histories of these users, trimmed to the longest of them (at least 1 column)."""
        users = torch.as_tensor(user_indices, dtype=torch.long)
        width = max(int(self.lengths[users].max()) if len(users) else 0, 1)
        positions = torch.arange(width)
        return Batch(
            items=self.items[users, :width],
            ratings=self.ratings[users, :width],
            has_rating=self.has_rating[users, :width],
            gaps=self.gaps[users, :width],
            padding=positions[None, :] >= self.lengths[users, None],
        )


def _offsets(lists: pa.Array) -> np.ndarray:
    offsets = lists.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    return offsets - offsets[0]


def _lookup(vocabulary: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Token id of each of `ids` in `vocabulary` (position + 3), OOV when absent."""
    if len(vocabulary) == 0:
        return np.full(len(ids), OOV, dtype=np.int64)
    vocab = vocabulary.astype(str)
    order = np.argsort(vocab, kind="stable")
    pos = np.searchsorted(vocab, ids.astype(str), sorter=order).clip(max=len(vocab) - 1)
    found = vocab[order[pos]] == ids.astype(str)
    return np.where(found, order[pos] + N_SPECIAL, OOV).astype(np.int64)


def _scale_ratings(values: np.ndarray, rated: np.ndarray, scale: tuple[float, float] | None) -> np.ndarray:
    """Ratings mapped to [0, 1] by the rating scale (observed range when none is declared)."""
    if scale is None:
        if not rated.any():
            return np.zeros_like(values)
        scale = (float(values[rated].min()), float(values[rated].max()))
    low, high = scale
    if high <= low:
        return np.where(rated, 1.0, 0.0).astype(np.float32)
    return np.where(rated, np.clip((values - low) / (high - low), 0.0, 1.0), 0.0).astype(np.float32)
