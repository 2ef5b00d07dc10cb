"""The training loop with a tiny model: resume is exact, early stopping keeps the best weights."""

import time

import numpy as np
import pytest
import torch

from userlens.config import PretrainParams
from userlens.train import BEST, CHECKPOINT, CURVES, collapse_stats, fit, pick_device, warmup_cosine

N_USERS, DIM = 64, 8
FEATURES = torch.randn(N_USERS, DIM, generator=torch.Generator().manual_seed(0))


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4))


def step_loss(model, users, generator):
    noise = torch.randn(len(users), DIM, generator=generator)  # like an augmentation: drawn from the epoch RNG
    return (model(FEATURES[users] + 0.1 * noise) - FEATURES[users, :4]).pow(2).mean()


def embed(model):
    with torch.no_grad():
        return model(FEATURES).numpy()


def rising(embeddings):
    """A validation score that improves every epoch: the best weights are the last ones."""
    return time.time()


def params(**kw):
    return PretrainParams(**{"epochs": 4, "batch_size": 16, "lr": 1e-2, "patience": 10, **kw})


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resume_after_a_stop_ends_where_an_uninterrupted_run_ends(tmp_path):
    users = np.arange(N_USERS)
    straight = tiny_model()
    fit(straight, step_loss, embed, rising, users, params(), tmp_path / "a", progress=False)

    resumed = tiny_model()
    first = fit(resumed, step_loss, embed, rising, users, params(), tmp_path / "b", progress=False, stop_after_epochs=2)
    assert first.epochs_run == 2
    resumed = tiny_model()  # a fresh process: weights come from the checkpoint
    result = fit(resumed, step_loss, embed, rising, users, params(), tmp_path / "b", progress=False)
    assert result.epochs_run == 4 and len(result.history) == 4
    assert torch.equal(weights(straight), weights(resumed))


def test_a_crash_mid_epoch_resumes_from_the_last_checkpoint(tmp_path):
    users = np.arange(N_USERS)
    straight = tiny_model()
    fit(straight, step_loss, embed, rising, users, params(), tmp_path / "a", progress=False)

    calls = {"n": 0}

    def crashing(model, batch_users, generator):
        calls["n"] += 1
        if calls["n"] == 10:  # in the third epoch (4 steps per epoch)
            raise RuntimeError("killed")
        return step_loss(model, batch_users, generator)

    with pytest.raises(RuntimeError):
        fit(tiny_model(), crashing, embed, rising, users, params(), tmp_path / "b", progress=False)
    resumed = tiny_model()
    fit(resumed, step_loss, embed, rising, users, params(), tmp_path / "b", progress=False)
    assert torch.equal(weights(straight), weights(resumed))


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.6, 0.6, 0.9])
    model = tiny_model()
    result = fit(
        model,
        step_loss,
        embed,
        lambda e: next(scores),
        np.arange(N_USERS),
        params(epochs=6, patience=2),
        tmp_path,
        progress=False,
    )
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 2
    best = torch.load(tmp_path / BEST, weights_only=True)["model"]
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())
    lines = (tmp_path / CURVES).read_text().splitlines()
    assert lines[0].startswith("epoch,loss,val_score") and len(lines) == 5
    assert (tmp_path / CHECKPOINT).exists()


def test_loss_falls(tmp_path):
    result = fit(
        tiny_model(), step_loss, embed, lambda e: 0.0, np.arange(N_USERS), params(epochs=8), tmp_path, progress=False
    )
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]


def test_warmup_then_cosine():
    factor = warmup_cosine(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5, abs=0.02) and factor(99) < 0.01


def test_collapse_monitor_tells_collapse_from_spread():
    rng = np.random.default_rng(0)
    spread = collapse_stats(rng.normal(size=(500, 16)))
    collapsed = collapse_stats(np.outer(rng.normal(size=500), np.ones(16)))
    assert spread["effective_rank"] > 14 and collapsed["effective_rank"] < 1.5
    assert collapse_stats(np.ones((10, 4)))["embedding_std"] == 0.0


def test_device_is_cpu_here_unless_asked():
    assert pick_device("cpu").type == "cpu"
    assert pick_device().type in ("cpu", "cuda", "mps")
