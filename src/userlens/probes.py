"""The probes that read frozen embeddings: logistic regression and a small MLP for the
classification tasks, a linear softmax over the catalogue for next item (see evaluate.py for
the protocol that splits users and scores them)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse as sp

MLP_HIDDEN = 64  # units of the MLP probe's hidden layer
MLP_STEPS = 60  # full-batch AdamW steps of the MLP probe
MLP_LR = 0.02
MLP_WEIGHT_DECAY = 1e-2
NEXT_ITEM_STEPS = 30  # full-batch Adam steps of the softmax probe (convex, zero init)
NEXT_ITEM_LR = 0.1
NEXT_ITEM_WEIGHT_DECAY = 1e-3
PROBE_BATCH_CELLS = 1 << 24  # largest [users, items] target block of one probe step


def standardise(x_fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale by the mean and std of x_fit (constant columns left at scale 1), float32."""
    mean = x_fit.mean(axis=0)
    std = x_fit.std(axis=0)
    std[std < 1e-8] = 1.0
    return [((x - mean) / std).astype(np.float32) for x in (x_fit, *others)]


def fit_predict(probe: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int = 0) -> np.ndarray:
    """Fit one probe on (x_train, y_train), standardised on x_train; predicted labels of x_test.

    "logreg": sklearn LogisticRegression (lbfgs, C=1, max_iter 1000). "mlp": one hidden
    layer of 64 ReLU units, full-batch AdamW (MLP_STEPS steps; the few steps are its
    regularisation, the same budget at every label fraction), seeded. A single class in
    y_train predicts that class.
    """
    return fit_predict_many(probe, [x_train], y_train, [x_test], seed)[0]


def fit_predict_many(
    probe: str, x_trains: list[np.ndarray], y_train: np.ndarray, x_tests: list[np.ndarray], seed: int = 0
) -> list[np.ndarray]:
    """`fit_predict` for several representations of the same users (one per method): the
    MLPs are trained side by side in one batched model (independent parameters, so each
    result is what it would be alone, up to float rounding), which removes most overhead."""
    classes = np.unique(y_train)
    if classes.size == 0:
        raise ValueError("no labelled examples to fit a probe on")
    if classes.size == 1:
        return [np.full(len(x_test), classes[0]) for x_test in x_tests]
    scaled = [standardise(x_train, x_test) for x_train, x_test in zip(x_trains, x_tests, strict=True)]
    if probe == "logreg":
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        predictions = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", UserWarning)  # "more classes than half the samples" on tiny sets
            for x_train, x_test in scaled:
                predictions.append(LogisticRegression(C=1.0, max_iter=1000).fit(x_train, y_train).predict(x_test))
        return predictions
    if probe == "mlp":
        codes = np.searchsorted(classes, y_train)
        return [classes[p] for p in _mlp_predict(scaled, codes, classes.size, seed)]
    raise ValueError(f"unknown probe {probe!r}")


def _mlp_predict(
    scaled: list[tuple[np.ndarray, np.ndarray]], y_train: np.ndarray, n_classes: int, seed: int
) -> list[np.ndarray]:
    """M one-hidden-layer MLPs, one per (x_train, x_test) pair, trained together: inputs are
    zero-padded to the widest; padded weights get no gradient and stay exactly zero."""
    import torch

    h, width = MLP_HIDDEN, max(x.shape[1] for x, _ in scaled)
    inits = []
    for x_train, _ in scaled:  # each MLP's init depends on the seed and its own width only
        generator = torch.Generator().manual_seed(int(seed))
        d = x_train.shape[1]

        def uniform(fan_in: int, *shape: int, g: torch.Generator = generator) -> torch.Tensor:
            bound = 1.0 / math.sqrt(fan_in)  # PyTorch's default Linear init
            return (torch.rand(*shape, generator=g) * 2 - 1) * bound

        w1 = torch.zeros(width, h)
        w1[:d] = uniform(d, d, h)
        inits.append((w1, uniform(d, 1, h), uniform(h, h, n_classes), uniform(h, 1, n_classes)))
    w1, b1, w2, b2 = (torch.stack(parts).requires_grad_() for parts in zip(*inits, strict=True))

    def pad(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.pad(x, ((0, 0), (0, width - x.shape[1]))))

    x = torch.stack([pad(x_train) for x_train, _ in scaled])  # [M, n, width]
    y = torch.from_numpy(y_train.astype(np.int64)).repeat(len(scaled))
    optimizer = torch.optim.AdamW([w1, b1, w2, b2], lr=MLP_LR, weight_decay=MLP_WEIGHT_DECAY)
    for _ in range(MLP_STEPS):
        optimizer.zero_grad()
        logits = torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, x, w1)), w2)
        # The sum over models of each model's mean loss: every model gets its own gradient.
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, n_classes), y) * len(scaled)
        loss.backward()
        optimizer.step()
    predictions = []
    with torch.no_grad():
        for m, (_, x_test) in enumerate(scaled):
            hidden = torch.relu(pad(x_test) @ w1[m] + b1[m])
            predictions.append((hidden @ w2[m] + b2[m]).argmax(dim=1).numpy())
    return predictions


def softmax_probe(x_train: np.ndarray, targets: sp.csr_matrix, seed: int = 0):
    """A linear map embedding -> item logits, fitted by Adam on the cross-entropy with each
    train user's target distribution (rows of `targets`, normalised). Zero init and full
    batches, so it is deterministic; the bias starts at the log smoothed target frequency.
    When the [users, items] batch would pass PROBE_BATCH_CELLS, each step takes a seeded
    random batch of users instead (bounded memory and time on large datasets)."""
    import torch

    n_users, n_items = targets.shape
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std < 1e-8] = 1.0
    x_all = torch.from_numpy(((x_train - mean) / std).astype(np.float32))
    totals = np.asarray(targets.sum(axis=1), dtype=np.float64).ravel()
    freq = np.asarray(targets.multiply(1.0 / np.maximum(totals, 1e-12)[:, None]).sum(axis=0)).ravel() + 0.1
    batch = max(1, min(n_users, PROBE_BATCH_CELLS // max(n_items, 1)))
    rng = np.random.default_rng(seed)

    def rows(users: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = targets if users is None else targets[users]
        dense = np.asarray(chosen.todense(), dtype=np.float32)
        dense /= np.maximum(dense.sum(axis=1, keepdims=True), 1e-12)
        return (x_all if users is None else x_all[torch.from_numpy(users)]), torch.from_numpy(dense)

    full = rows(None) if batch >= n_users else None
    weight = torch.zeros(x_all.shape[1], n_items, requires_grad=True)
    bias = torch.tensor(np.log(freq / freq.sum()), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam(
        [{"params": [weight], "weight_decay": NEXT_ITEM_WEIGHT_DECAY}, {"params": [bias], "weight_decay": 0.0}],
        lr=NEXT_ITEM_LR,
    )
    for _ in range(NEXT_ITEM_STEPS):
        x, y = full if full is not None else rows(np.sort(rng.choice(n_users, batch, replace=False)))
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y)
        loss.backward()
        optimizer.step()
    w, b = weight.detach().numpy(), bias.detach().numpy()

    def score(x_test: np.ndarray) -> np.ndarray:
        return ((x_test - mean) / std).astype(np.float32) @ w + b

    return score
