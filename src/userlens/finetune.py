"""Fine-tuning: the pretrained encoder plus a linear head, trained end to end on the labelled users.

The alternative to the frozen-embedding probes of evaluate.py, for the learned methods only
(those with an encoder). It uses the same splits as the probes (`make_split` with the same
seed and task key), so its results sit beside theirs in metrics.json under the probe name
"finetune" and pair with them seed by seed. The encoder gets a small learning rate, so the
pretrained representation is adjusted rather than overwritten by a few dozen labels.
"""

from __future__ import annotations

import logging
import time
import warnings
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from userlens.config import FinetuneParams, ModelParams
from userlens.data import SequenceData
from userlens.evaluate import Task, accuracy, fraction_key, make_split, summarise
from userlens.model import UserEncoder
from userlens.train import ENCODER, pick_device

log = logging.getLogger(__name__)
PROBE = "finetune"  # its name among the probes in metrics.json and the report
EVAL_BATCH = 256  # users embedded at a time outside training
ABSENT = -30.0  # head bias of a class with no labelled user: never predicted


def load_encoder(model_dir: Path, model: ModelParams, data: SequenceData) -> dict[str, torch.Tensor]:
    """The weights of a trained encoder (<model_dir>/encoder.pt, written with its embeddings export)."""
    from userlens.registry import load_checkpoint  # weights_only; a damaged or code-carrying file: one clear error

    weights = load_checkpoint(Path(model_dir) / ENCODER, "rerun `userlens pretrain`")["model"]
    UserEncoder.for_data(model, data).load_state_dict(weights)  # fails loudly on a mismatched checkpoint
    return weights


def finetune_predict(
    weights: dict[str, torch.Tensor],
    model: ModelParams,
    data: SequenceData,
    users: np.ndarray,
    y: np.ndarray,
    test_users: np.ndarray,
    n_classes: int,
    params: FinetuneParams,
    seed: int,
    device: torch.device,
) -> np.ndarray:
    """Train a copy of the encoder + a linear head on (users, y); predicted classes of test_users.

    Linear probe, then fine-tune (LP-FT, Kumar et al. 2022): the head starts as the logistic
    regression of the probes, on embeddings standardised with the labelled users' statistics.
    A random head would first distort the pretrained features to fit itself; and pretrained
    embeddings can differ between users by little in absolute terms, which the standardisation
    (frozen, part of the network) makes visible to the head, as it does for the probes."""
    torch.manual_seed(seed)
    encoder = UserEncoder.for_data(model, data).to(device)
    encoder.load_state_dict(weights)
    users, test_users = torch.as_tensor(users), torch.as_tensor(test_users)
    features = _embed(encoder, data, users, device)
    mean, std = features.mean(dim=0), features.std(dim=0, correction=0).clamp_min(1e-8)
    head = _probe_head(((features - mean) / std).numpy(), y, n_classes)
    net = torch.nn.Sequential(encoder, _Standardise(mean, std), head).to(device)
    optimizer = torch.optim.AdamW(
        [{"params": encoder.parameters(), "lr": params.lr}, {"params": head.parameters(), "lr": params.head_lr}],
        weight_decay=params.weight_decay,
    )
    generator = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(y, dtype=torch.long)
    net.train()
    for _ in range(params.epochs):
        for batch in torch.randperm(len(users), generator=generator).split(params.batch_size):
            logits = net(data.batch(users[batch]).to(device))
            loss = torch.nn.functional.cross_entropy(logits, targets[batch].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        scores = [net(data.batch(batch).to(device)).cpu() for batch in test_users.split(EVAL_BATCH)]
    return torch.cat(scores).argmax(dim=1).numpy() if scores else np.empty(0, dtype=np.int64)


class _Standardise(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def _embed(encoder: UserEncoder, data: SequenceData, users: torch.Tensor, device: torch.device) -> torch.Tensor:
    encoder.eval()
    out = torch.cat([encoder(data.batch(batch).to(device)).float().cpu() for batch in users.split(EVAL_BATCH)])
    encoder.train()
    return out


def _probe_head(features: np.ndarray, y: np.ndarray, n_classes: int) -> torch.nn.Linear:
    """A linear layer holding the logistic regression fitted on (features, y); classes absent
    from y get a bias far below the others, so they are not predicted (as by the probe)."""
    from sklearn.linear_model import LogisticRegression

    head = torch.nn.Linear(features.shape[1], n_classes)
    weight, bias = np.zeros((n_classes, features.shape[1]), np.float32), np.full(n_classes, ABSENT, np.float32)
    classes = np.unique(y)
    if classes.size == 1:
        bias[classes[0]] = 0.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence and tiny-class warnings, as in probes.fit_predict
            probe = LogisticRegression(C=1.0, max_iter=1000).fit(features, y)
        if classes.size == 2:  # sklearn keeps one weight vector: the logit of the second class
            bias[classes[0]] = 0.0
            weight[classes[1]], bias[classes[1]] = probe.coef_[0], probe.intercept_[0]
        else:
            weight[classes], bias[classes] = probe.coef_, probe.intercept_
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    return head


def finetune_methods(
    encoders: dict[str, dict[str, torch.Tensor]],
    model: ModelParams,
    data: SequenceData,
    tasks: dict[str, Task],
    seeds: int,
    test_fraction: float,
    params: FinetuneParams,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """results[task][method] = {fraction_key: {"mean", "std", "per_seed", "n_labelled", "n_test"}} for
    every classification task, on the splits evaluate_methods uses."""
    began = time.perf_counter()
    fractions = tuple(sorted(float(f) for f in params.label_fractions))
    classification = [task for task in tasks.values() if task.kind == "classification"]
    units = list(product(range(seeds), classification))
    scores: dict = {task.name: {m: {f: [] for f in fractions} for m in encoders} for task in classification}
    sizes: dict = {}
    where = pick_device(device)
    for seed, task in tqdm(units, desc="fine-tune (seed x task)", unit="task", disable=not progress):
        split = make_split(task.labels, seed, test_fraction, fractions, task.name)
        for fraction, labelled in split.labelled.items():
            sizes[task.name, fraction] = (int(labelled.size), int(split.test.size))
            for method, weights in encoders.items():
                if not labelled.size or not split.test.size:
                    scores[task.name][method][fraction].append(float("nan"))
                    continue
                guess = finetune_predict(weights, model, data, labelled, task.labels[labelled], split.test,
                                         task.n_classes, params, seed, where)  # fmt: skip
                scores[task.name][method][fraction].append(accuracy(task.labels[split.test], guess))
    results = {
        name: {
            method: {
                fraction_key(f): {**summarise(values), "n_labelled": sizes[name, f][0], "n_test": sizes[name, f][1]}
                for f, values in by_fraction.items()
            }
            for method, by_fraction in by_method.items()
        }
        for name, by_method in scores.items()
    }
    log.info("fine-tuned %d encoders on %d tasks x %d seeds in %.1fs", len(encoders), len(classification), seeds,
             time.perf_counter() - began)  # fmt: skip
    return results
