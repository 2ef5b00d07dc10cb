"""The training loop with a tiny model: a budget in steps, exact resume, selection (last or probe) recorded."""

import time

import numpy as np
import pytest
import torch

from userlens.config import PretrainParams
from userlens.train import BEST, CHECKPOINT, CURVES, collapse_stats, epoch_order, fit, pick_device, warmup_cosine

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
    """A validation score that improves every round: the best weights are the last ones."""
    return time.time()


def params(**kw):
    # 64 users at batch 16: 4 steps an epoch; rounds of 4 steps
    return PretrainParams(**{"steps": 16, "eval_every": 4, "batch_size": 16, "lr": 1e-2, "patience": 10, **kw})


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resume_after_a_stop_ends_where_an_uninterrupted_run_ends(tmp_path):
    users = np.arange(N_USERS)
    straight = tiny_model()
    fit(straight, step_loss, embed, rising, users, params(), tmp_path / "a", progress=False)

    resumed = tiny_model()
    first = fit(resumed, step_loss, embed, rising, users, params(), tmp_path / "b", progress=False, stop_after_rounds=2)
    assert first.steps_run == 8
    resumed = tiny_model()  # a fresh process: weights come from the checkpoint
    result = fit(resumed, step_loss, embed, rising, users, params(), tmp_path / "b", progress=False)
    assert result.steps_run == 16 and len(result.history) == 4
    assert torch.equal(weights(straight), weights(resumed))


def test_a_crash_mid_epoch_resumes_from_the_last_checkpoint(tmp_path):
    users = np.arange(N_USERS)
    straight = tiny_model()
    fit(straight, step_loss, embed, rising, users, params(), tmp_path / "a", progress=False)

    calls = {"n": 0}

    def crashing(model, batch_users, generator):
        calls["n"] += 1
        if calls["n"] == 10:  # in the third round (4 steps per round)
            raise RuntimeError("killed")
        return step_loss(model, batch_users, generator)

    with pytest.raises(RuntimeError):
        fit(tiny_model(), crashing, embed, rising, users, params(), tmp_path / "b", progress=False)
    resumed = tiny_model()
    fit(resumed, step_loss, embed, rising, users, params(), tmp_path / "b", progress=False)
    assert torch.equal(weights(straight), weights(resumed))


def test_selection_probe_keeps_the_best_round_and_stops_after_patience(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.6, 0.6, 0.9])
    model = tiny_model()
    result = fit(
        model,
        step_loss,
        embed,
        lambda e: next(scores),
        np.arange(N_USERS),
        params(steps=24, selection="probe", patience=2),
        tmp_path,
        progress=False,
    )
    assert result.stopped_early and result.steps_run == 16 and result.selected_step == 8
    assert result.selection == "probe" and "step 8" in result.reason and "2 rounds" in result.reason
    best = torch.load(tmp_path / BEST, weights_only=True)["model"]
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())
    lines = (tmp_path / CURVES).read_text().splitlines()
    assert lines[0].startswith("step,epoch,sequences_seen,loss,val_score") and len(lines) == 5
    assert (tmp_path / CHECKPOINT).exists()


def test_a_fixed_budget_takes_exactly_its_steps_and_exports_the_last(tmp_path):
    """selection "last": the validation score is monitored, never used; the budget is exact,
    also when it is no multiple of a round or of an epoch."""
    calls = {"n": 0}

    def counting(model, batch_users, generator):
        calls["n"] += 1
        assert len(batch_users) == 16
        return step_loss(model, batch_users, generator)

    scores = iter([0.9, 0.1, 0.1])  # the best probe is the first round: ignored
    model = tiny_model()
    result = fit(model, counting, embed, lambda e: next(scores), np.arange(N_USERS),
                 params(steps=11, eval_every=5), tmp_path, progress=False)  # fmt: skip
    assert calls["n"] == 11 and result.steps_run == 11 and result.selected_step == 11
    assert [row["step"] for row in result.history] == [5, 10, 11]
    assert result.history[-1]["sequences_seen"] == 11 * 16 and not result.stopped_early
    assert result.selection == "last" and "11 steps" in result.reason
    last = torch.load(tmp_path / BEST, weights_only=True)["model"]
    assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())


def test_loss_falls(tmp_path):
    result = fit(
        tiny_model(), step_loss, embed, lambda e: 0.0, np.arange(N_USERS), params(steps=32), tmp_path, progress=False
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


def test_length_buckets_batch_users_of_about_one_length_and_still_cover_the_epoch():
    users = torch.arange(1000)
    lengths = torch.from_numpy(np.random.default_rng(0).integers(1, 200, 1000))
    random = epoch_order(users, seed=3, epoch=2, batch_size=50, lengths=lengths)
    bucketed = epoch_order(users, seed=3, epoch=2, batch_size=50, lengths=lengths, length_buckets=10)
    assert torch.equal(bucketed, epoch_order(users, 3, 2, 50, lengths, 10))  # seeded: resumable
    assert sorted(bucketed.tolist()) == list(range(1000))  # every user once

    def spread(order):  # mean (longest - shortest) within a batch
        return np.mean([float(b.max() - b.min()) for b in lengths[order].split(50)])

    assert spread(bucketed) < spread(random) / 4
    window = set(random[:500].tolist())  # the first window's users, in other batches
    assert set(bucketed[:500].tolist()) == window and not torch.equal(bucketed[:50], random[:50])
    firsts = lengths[bucketed[:500]].split(50)
    assert not all(a.max() <= b.min() for a, b in zip(firsts, firsts[1:], strict=False))  # shuffled, not in order
