"""Pretraining under torchrun (DistributedDataParallel, gloo on the CPU) equals one process.

Real processes: `userlens pretrain` / `baselines` with pretrain.processes=2 start torchrun, whose
two CPU processes each train on their share of every global batch. Dropout is 0 here, so the
two runs must agree up to float rounding: the gathers make the Barlow Twins cross-correlation,
the projector's BatchNorm and the dual encoder's negatives span the global batch, and a
per-process loss would differ far more than that.

What is compared is what the model computes (the losses, the exported vectors), not raw
weights: a few parameters get no gradient in exact arithmetic (a bias before BatchNorm, the key
bias of attention), so AdamW turns their rounding noise into steps of about lr without
changing the function.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch

from conftest import build_sequences_project, set_params, userlens
from userlens.io import read_json
from userlens.model import barlow_twins_loss

TOLERANCE = 1e-3  # largest difference of an exported vector's coordinate (their std is about 0.7)
LOSS_TOLERANCE = 1e-5  # relative, each round's mean loss
EXACT = {"model": {"dropout": 0.0}, "pretrain": {"steps": 6, "eval_every": 3, "batch_size": 32}}


@pytest.fixture(scope="module")
def sequences_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp") / "template"
    synthetic = {"n_users": 160, "n_items": 120, "n_categories": 6, "mean_events_per_user": 20}
    project = build_sequences_project(root, synthetic)
    set_params(project, EXACT)
    return project


def _copy(template, tmp_path, name):
    return shutil.copytree(template, tmp_path / name, symlinks=True)


def _vectors(project, method) -> np.ndarray:
    return np.stack(pq.read_table(project / "data/embeddings" / f"{method}.parquet")["embedding"].to_pylist())


def _losses(project, method) -> list[float]:
    checkpoint = torch.load(project / "data/models" / method / "checkpoint.pt", weights_only=True)
    return [row["loss"] for row in checkpoint["history"]]


def assert_trained_alike(one, two, method) -> None:
    assert _losses(two, method) == pytest.approx(_losses(one, method), rel=LOSS_TOLERANCE)
    assert np.abs(_vectors(one, method) - _vectors(two, method)).max() < TOLERANCE


def test_two_processes_pretrain_as_one(sequences_project, tmp_path):
    one, two = _copy(sequences_project, tmp_path, "one"), _copy(sequences_project, tmp_path, "two")
    userlens(one, "pretrain", "--no-progress")
    done = userlens(two, "--set", "pretrain.processes=2", "pretrain", "--no-progress")
    assert "barlow_twins" in done.stdout and "Traceback" not in done.stderr
    assert_trained_alike(one, two, "barlow_twins")
    first, second = (read_json(p / "data/models/barlow_twins/manifest.json") for p in (one, two))
    assert first["model_version"] == second["model_version"]  # processes are not part of the run's identity


def test_two_processes_train_the_dual_encoder_as_one(sequences_project, tmp_path):
    """Its (prefix, next item) pairs and in-batch negatives come from both processes' rows."""
    one, two = _copy(sequences_project, tmp_path, "one"), _copy(sequences_project, tmp_path, "two")
    userlens(one, "baselines", "--no-progress")
    userlens(two, "--set", "pretrain.processes=2", "baselines", "--no-progress")
    assert_trained_alike(one, two, "dual_encoder")
    items = [np.load(p / "data/embeddings/dual_encoder.items.npy") for p in (one, two)]
    np.testing.assert_allclose(items[0], items[1], atol=TOLERANCE)


def test_a_checkpoint_of_two_processes_resumes_in_one(sequences_project, tmp_path):
    """Killed after its first checkpoint, a 2-process run resumes in 1 process and ends where an
    uninterrupted 1-process run ends."""
    whole, resumed = _copy(sequences_project, tmp_path, "whole"), _copy(sequences_project, tmp_path, "resumed")
    for project in (whole, resumed):
        set_params(project, {"pretrain": {"steps": 60, "eval_every": 3}})
    userlens(whole, "pretrain", "--no-progress")
    checkpoint = resumed / "data/models/barlow_twins/checkpoint.pt"
    started = subprocess.Popen(
        [sys.executable, "-m", "userlens", "--project", str(resumed), "--set", "pretrain.processes=2",
         "pretrain", "--no-progress"],  # fmt: skip
        cwd=resumed, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.exists() and started.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpoint.exists(), "no checkpoint was written"
    finally:
        os.killpg(started.pid, signal.SIGKILL)  # the command and its torchrun launcher
        started.wait()
    # torchrun's workers run in sessions of their own: they must die with their launcher, not
    # train on beside the resumed run
    deadline = time.monotonic() + 30
    while _training_in(resumed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _training_in(resumed), "training processes outlived the killed command"
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < step < 60, "the kill came after the run had finished: nothing was resumed"
    userlens(resumed, "pretrain", "--no-progress")
    assert read_json(resumed / "data/models/barlow_twins/manifest.json")["steps_run"] == 60
    assert_trained_alike(whole, resumed, "barlow_twins")


def _training_in(project) -> list:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(project) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_batch_that_does_not_split_evenly_is_refused(sequences_project, tmp_path):
    project = _copy(sequences_project, tmp_path, "uneven")
    done = userlens(project, "--set", "pretrain.processes=3", "pretrain", "--no-progress", check=False)
    assert done.returncode != 0
    assert "does not split evenly over 3 processes" in done.stderr and "Traceback" not in done.stderr


def test_the_cross_correlation_needs_the_global_batch():
    """Why the gather: the mean loss of two half batches (each process's own) misses the loss of the
    whole batch by far more than LOSS_TOLERANCE, so the equality tests above would catch it."""
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(32, 8, generator=generator), torch.randn(32, 8, generator=generator)
    whole = float(barlow_twins_loss(z1, z2, 0.005))
    halves = float(barlow_twins_loss(z1[:16], z2[:16], 0.005) + barlow_twins_loss(z1[16:], z2[16:], 0.005)) / 2
    assert abs(whole - halves) / whole > 100 * LOSS_TOLERANCE
