"""Barlow Twins pretraining and the dual-encoder baseline, on the shared training loop.

Both get the same encoder architecture, optimiser settings, batch size and budget in
optimiser steps; the dual encoder's user tower is causal, so each of its steps trains on
every (prefix, next item) pair of the batch (up to `pretrain.max_pairs`). Each round the
loop scores a validation probe: logistic regression, cross-validated, on the labels of every
classification task for a fixed set of validation users; those users are left out of the
downstream evaluation (`validation_users`), so whatever is selected on it (a round with
`selection: probe`, a recipe in the sweep) never sees test labels.

After training, the Barlow Twins encoder's output is centred and whitened on the users'
embeddings (`UserEncoder.fit_whitening`, `pretrain.whiten_shrinkage`): its loss decorrelates
the projector's output, not the encoder's, which left the exported vectors dominated by one
shared direction (random-pair cosine 0.99, effective rank 2.5 of 64).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from userlens import distributed
from userlens.augment import Substitutes, two_views
from userlens.config import Params
from userlens.data import SequenceData
from userlens.embeddings import embed_users
from userlens.model import BarlowTwins, DualEncoder, UserEncoder
from userlens.train import FitResult, fit, pick_device

log = logging.getLogger(__name__)
MONITOR_USERS = 2048  # the collapse monitor's sample: enough for a stable effective rank
WHITEN_USERS = 50_000  # users the output whitening is fitted on (all of them, up to this many)


def validation_users(n_users: int, params: Params) -> np.ndarray:
    """The fixed users whose labels drive selection (rounds, sweep recipes); the same for every method."""
    rng = np.random.default_rng(params.pretrain.seed)
    n = max(2, int(round(n_users * params.pretrain.validation_fraction)))
    return np.sort(rng.choice(n_users, size=min(n, n_users), replace=False))


def probe_score(labels: dict[str, np.ndarray], users: np.ndarray, seed: int):
    """score(embeddings of `users`) -> mean over tasks of the 3-fold CV balanced accuracy of a
    logistic regression. Balanced accuracy, because a dominant class (Drama on MovieLens) makes
    plain accuracy flat whatever the embedding; several tasks, because ~100 users are noisy."""
    # Plain shuffled folds: rare classes with one member must not make stratified CV impossible.
    folds = KFold(n_splits=3, shuffle=True, random_state=seed)
    usable = {}
    for name, task_labels in labels.items():
        keep = task_labels[users] >= 0
        if keep.sum() >= 6 and len(np.unique(task_labels[users][keep])) > 1:
            usable[name] = (keep, task_labels[users][keep])

    def score(embeddings: np.ndarray) -> float:
        if not usable:
            return 0.0  # too few labels to validate: selection "probe" then keeps the first round
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, random_state=seed))
        with warnings.catch_warnings():  # a rare class absent from one fold is expected here
            warnings.simplefilter("ignore", UserWarning)
            scores = [
                cross_val_score(probe, embeddings[keep], y, cv=folds, scoring="balanced_accuracy").mean()
                for keep, y in usable.values()
            ]
        return float(np.mean(scores))

    return score


def _monitor(data: SequenceData, val_users: np.ndarray, seed: int) -> np.ndarray:
    """Validation users first, then a fixed sample of the others for the collapse monitor."""
    others = np.setdiff1d(np.arange(data.n_users), val_users)
    extra = np.random.default_rng(seed).permutation(others)[: max(0, MONITOR_USERS - len(val_users))]
    return np.concatenate([val_users, np.sort(extra)])


def train_barlow_twins(
    data: SequenceData, params: Params, labels: dict[str, np.ndarray], out_dir: Path, progress: bool = True
) -> tuple[UserEncoder, FitResult]:
    device, encoder = _new_encoder(data, params)
    model = BarlowTwins(encoder, params.pretrain.projector, params.pretrain.lambd).to(device)
    substitutes = Substitutes.from_item_categories(data.item_categories) if params.augment.substitute_rate else None

    def step_loss(model: BarlowTwins, users: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        view1, view2 = two_views(data.batch(users), params.augment, generator, substitutes)
        return model(view1.to(device), view2.to(device))

    result = _fit(model, model.encoder, step_loss, data, params, labels, out_dir, "barlow twins", progress)
    if params.pretrain.whiten_shrinkage is not None and distributed.is_main():  # rank 0 exports
        sample = np.random.default_rng(params.pretrain.seed).permutation(data.n_users)[:WHITEN_USERS]
        raw = torch.from_numpy(embed_users(model.encoder, data, np.sort(sample)))
        model.encoder.fit_whitening(raw.to(device), params.pretrain.whiten_shrinkage)
    return model.encoder, result


def train_dual_encoder(
    data: SequenceData, params: Params, labels: dict[str, np.ndarray], out_dir: Path, progress: bool = True
) -> tuple[DualEncoder, FitResult]:
    device, encoder = _new_encoder(data, params, causal=True)
    model = DualEncoder(
        encoder,
        data.n_items,
        data.n_categories,
        data.item_counts,
        params.pretrain.temperature,
        params.pretrain.logq_correction,
        params.pretrain.max_pairs,
    ).to(device)

    def step_loss(model: DualEncoder, users: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return model(data.batch(users).to(device), generator)

    result = _fit(model, model.encoder, step_loss, data, params, labels, out_dir, "dual encoder", progress)
    return model, result


def _new_encoder(data: SequenceData, params: Params, causal: bool = False) -> tuple[torch.device, UserEncoder]:
    """The same seeded encoder for every method: only the objective (and the attention mask) differs."""
    torch.manual_seed(params.pretrain.seed)
    device = distributed.join(pick_device(params.pretrain.device))  # under torchrun: this process's
    return device, UserEncoder.for_data(params.model, data, causal)


def _fit(model, encoder, step_loss, data, params, labels, out_dir, desc, progress) -> FitResult:
    val_users = validation_users(data.n_users, params)
    monitor = _monitor(data, val_users, params.pretrain.seed)
    score = probe_score(labels, val_users, params.pretrain.seed)
    train_users = np.arange(data.n_users)  # self-supervised: every user's history, no labels
    return fit(
        model,
        step_loss,
        embed=lambda m: embed_users(encoder, data, monitor),
        score=lambda emb: score(emb[: len(val_users)]),
        train_users=train_users,
        lengths=data.lengths,
        length_buckets=params.pretrain.length_buckets,
        params=params.pretrain,
        out_dir=out_dir,
        desc=desc,
        progress=progress,
    )
