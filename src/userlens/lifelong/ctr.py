"""The downstream model that consumes `user_interest`, in LIBER's CTR setting.

Examples: every rated event in a user's future window (data/sequences). The label says the
user liked the item: rating >= low + POSITIVE_AT * (high - low) of the rating scale (4 or more
on 1-5, 8 or more on 1-10). Users, not events, are split into train and test by seed, so a
test user's events never train the model; a tenth of the train users choose the epoch
(early stopping on their log loss).

Features, by variant: the item (a learned id embedding and its categories) and the user's
handcrafted history profile are the base, scored by an MLP plus a bilinear user-features x
item-categories term (on MovieLens-100K a full factorisation-machine term over item ids
overfitted: AUC 0.72 -> 0.69); "+bt" adds the served Barlow Twins embedding (frozen);
"+interest" adds the fused `user_interest` (InterestFusion, trained with the model on this
objective, its inputs frozen) through a gate that starts at 0. AUC and log loss on the test
users' events.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import nn

from userlens.config import CTRParams
from userlens.lifelong.fusion import InterestFusion, PartitionInputs

POSITIVE_AT = 0.75  # share of the way up the rating scale from which an event counts as liked
USER_DROPOUT = 0.3  # on the Barlow Twins and user_interest inputs while training
VARIANTS = ("base", "base+bt", "base+interest", "base+bt+interest")


@dataclass
class Examples:
    user: np.ndarray  # [N] user row (user_index)
    item: np.ndarray  # [N] item_index
    label: np.ndarray  # [N] float32, 1 = liked


def examples(sequences: pl.DataFrame, scale: tuple[float, float]) -> Examples:
    """The rated future events of sequences.parquet, labelled by the rule above."""
    rows = sequences.select("user_index", "future_item_index", "future_rating").explode(
        ["future_item_index", "future_rating"]
    )
    rows = rows.filter(pl.col("future_rating").is_not_null() & pl.col("future_item_index").is_not_null())
    low, high = scale
    liked = (rows["future_rating"].to_numpy() >= low + POSITIVE_AT * (high - low)).astype(np.float32)
    users, items = (rows[c].to_numpy().astype(np.int64) for c in ("user_index", "future_item_index"))
    return Examples(users, items, liked)


@dataclass
class UserFeatures:
    base: torch.Tensor  # [U, B] standardised handcrafted profile
    bt: torch.Tensor | None  # [U, D] standardised Barlow Twins embeddings
    partitions: PartitionInputs | None  # the fusion's inputs, one row per user


class CTRModel(nn.Module):
    def __init__(self, n_items: int, item_categories: torch.Tensor, base_dim: int, bt_dim: int | None,
                 fusion: InterestFusion | None, fusion_dim: int, item_dim: int = 16, hidden: int = 64):  # fmt: skip
        super().__init__()
        self.item = nn.Embedding(n_items, item_dim)
        self.register_buffer("item_categories", item_categories.float())
        self.fusion = fusion
        # user_interest enters through a gate that starts at 0 (ReZero): the untrained model is the
        # one without it, so an untrained fusion's noise cannot decide where early stopping stops.
        self.interest_gate = nn.Parameter(torch.zeros(fusion_dim)) if fusion is not None else None
        width = item_dim + item_categories.shape[1] + base_dim + (bt_dim or 0) + (fusion_dim if fusion else 0)
        self.bt = bt_dim is not None
        # A user's features are constant over their examples: dropout keeps a few hundred users
        # from being memorised by their vectors.
        self.user_dropout = nn.Dropout(USER_DROPOUT)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 1))
        # How much the user likes each category, read against the item's categories: a bilinear
        # term (user features x item categories) that an MLP on the concatenation learns only slowly.
        n_categories = item_categories.shape[1]
        self.taste = nn.Linear(width - item_dim - n_categories, n_categories) if n_categories else None

    def forward(self, users: torch.Tensor, items: torch.Tensor, features: UserFeatures) -> torch.Tensor:
        """Logits of (users[i], items[i]); each distinct user's vectors are computed once."""
        distinct, row = torch.unique(users, return_inverse=True)
        extra = []
        if self.bt:
            extra.append(features.bt[distinct])
        if self.fusion is not None:
            extra.append(self.fusion(features.partitions.rows(distinct)) * self.interest_gate)
        user = torch.cat([features.base[distinct], *(self.user_dropout(e) for e in extra)], dim=1)[row]
        categories = self.item_categories[items]
        item = torch.cat([self.item(items), categories], dim=1)
        logits = self.mlp(torch.cat([item, user], dim=1)).squeeze(1)
        return logits + (self.taste(user) * categories).sum(1) if self.taste is not None else logits


def fit_and_score(
    variant: str,
    data: Examples,
    features: UserFeatures,
    item_categories: torch.Tensor,
    train_users: np.ndarray,
    test_users: np.ndarray,
    params: CTRParams,
    fusion_dim: int,
    max_partitions: int,
    seed: int,
) -> tuple[dict[str, float], CTRModel]:
    """Train one variant on the train users' examples; its test AUC and log loss, and the model."""
    from sklearn.metrics import log_loss, roc_auc_score

    model = fit(variant, data, features, item_categories, train_users, params, fusion_dim, max_partitions, seed)
    test = np.flatnonzero(np.isin(data.user, test_users))
    scores = _predict(model, data, test, features)
    labels = data.label[test]
    auc = float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")
    return {"auc": auc, "log_loss": float(log_loss(labels, scores, labels=[0, 1]))}, model


def fit(
    variant: str,
    data: Examples,
    features: UserFeatures,
    item_categories: torch.Tensor,
    train_users: np.ndarray,
    params: CTRParams,
    fusion_dim: int,
    max_partitions: int,
    seed: int,
) -> CTRModel:
    """One variant trained on `train_users`' examples, a tenth of them choosing the epoch."""
    from sklearn.metrics import log_loss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(train_users)
    held = max(1, len(shuffled) // 10)
    check_users, fit_users = shuffled[:held], shuffled[held:]
    fusion = None
    if "interest" in variant:
        inputs = features.partitions
        fusion = InterestFusion(inputs.text.shape[2], inputs.events.shape[2], fusion_dim, max_partitions)
    model = CTRModel(len(item_categories), item_categories, features.base.shape[1],
                     features.bt.shape[1] if "bt" in variant else None, fusion, fusion_dim)  # fmt: skip
    optimiser = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    fit_rows = np.flatnonzero(np.isin(data.user, fit_users))
    check = np.flatnonzero(np.isin(data.user, check_users))
    best, best_loss, waited = copy.deepcopy(model.state_dict()), float("inf"), 0
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.BCEWithLogitsLoss()
    by_user = _rows_by_user(data.user, fit_rows)
    for _ in range(params.epochs):
        model.train()
        for batch in _user_batches(by_user, params.users_per_batch, generator):
            logits = model(torch.from_numpy(data.user)[batch], torch.from_numpy(data.item)[batch], features)
            loss = loss_fn(logits, torch.from_numpy(data.label)[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        checked = log_loss(data.label[check], _predict(model, data, check, features), labels=[0, 1])
        if checked < best_loss - 1e-4:
            best, best_loss, waited = copy.deepcopy(model.state_dict()), checked, 0
        else:
            waited += 1
            if waited >= params.patience:
                break
    model.load_state_dict(best)
    return model


def _rows_by_user(users: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    order = rows[np.argsort(users[rows], kind="stable")]
    _, starts = np.unique(users[order], return_index=True)
    return np.split(order, starts[1:])


def _user_batches(by_user: list[np.ndarray], users_per_batch: int, generator: torch.Generator):
    """Batches of all the examples of `users_per_batch` users, users shuffled: the fusion then
    runs once per user, not once per example."""
    order = torch.randperm(len(by_user), generator=generator).tolist()
    for start in range(0, len(order), users_per_batch):
        yield torch.from_numpy(np.concatenate([by_user[i] for i in order[start : start + users_per_batch]]))


@torch.no_grad()
def _predict(model: CTRModel, data: Examples, rows: np.ndarray, features: UserFeatures) -> np.ndarray:
    model.eval()
    out = []
    for batch in torch.from_numpy(rows).split(4096):
        logits = model(torch.from_numpy(data.user)[batch], torch.from_numpy(data.item)[batch], features)
        out.append(torch.sigmoid(logits).numpy())
    return np.clip(np.concatenate(out) if out else np.empty(0), 1e-6, 1 - 1e-6)


def standardised(x: np.ndarray) -> torch.Tensor:
    """User features scaled as the probes scale theirs (probes.standardise), as a tensor."""
    from userlens.probes import standardise

    return torch.from_numpy(standardise(x)[0])
