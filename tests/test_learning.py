"""The learning stages on the synthetic source: pretrain, baselines, evaluate, with the real files."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from userlens import stages
from userlens.embeddings import EXPORT_SCHEMA, read_embeddings
from userlens.project import Project

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(small_sequences):
    """Barlow Twins for a few CPU seconds on 400 synthetic users with planted taste structure."""
    project = Project(small_sequences.parents[1])
    params = project.load_params().with_overrides(
        {"pretrain.steps": 36, "pretrain.eval_every": 6, "pretrain.batch_size": 64}
    )
    manifest = stages.pretrain(project, params, progress=False)
    return project, params, manifest


def test_pretraining_learns_without_collapse(trained):
    project, params, manifest = trained
    with open(project.root / "data/models/barlow_twins/curves.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert "effective_rank" in rows[0] and len(rows) == 6
    assert float(rows[-1]["loss"]) < 0.8 * float(rows[0]["loss"]), "the Barlow Twins loss did not fall"
    assert float(rows[-1]["effective_rank"]) > 4, "embeddings collapsed"
    assert manifest["steps_run"] == 36 and manifest["users"] == 400
    assert manifest["selection"]["rule"] == "last" and manifest["selection"]["step"] == 36
    assert "36 steps of 64 users" in manifest["selection"]["reason"]


def test_exported_barlow_twins_vectors_meet_the_serving_geometry_bar(trained):
    """Effective rank >= half the dimension, random-pair cosine < 0.3: fit for cosine consumers."""
    from userlens.geometry import geometry

    project, params, _ = trained
    shape = geometry(read_embeddings(project.root / "data/embeddings/barlow_twins.parquet")[1])
    assert shape["effective_rank"] >= 0.5 * params.model.d_model, shape
    assert shape["random_pair_cosine"] < 0.3, shape


def test_export_has_the_serving_schema(trained):
    project, params, manifest = trained
    path = project.root / "data/embeddings/barlow_twins.parquet"
    assert pq.read_schema(path).equals(EXPORT_SCHEMA)
    ids, vectors = read_embeddings(path)
    users = pq.read_table(project.sequences_dir / "users.parquet")["user_id"].to_pylist()
    assert ids == users and vectors.shape == (400, params.model.d_model) and vectors.dtype == np.float32
    assert set(pq.read_table(path)["model_version"].to_pylist()) == {manifest["model_version"]}


def test_baselines_and_evaluation_find_the_planted_structure(trained):
    project, params, _ = trained
    summary = stages.train_baselines(project, params, progress=False)
    assert set(summary) == {"dual_encoder", "als", "handcrafted", "random"}
    params = params.with_overrides({"evaluate.label_fractions": [0.25, 1.0], "evaluate.seeds": 3})
    results = stages.evaluate(project, params, progress=False)
    metrics = json.loads((project.reports_dir / "metrics.json").read_text())
    assert metrics.keys() == results.keys() and {"favourite_category", "gender", "next_item"} <= set(metrics)
    favourite = metrics["favourite_category"]
    chance = 1 / 8
    assert favourite["barlow_twins"]["logreg"]["1.0"]["mean"] > 2.5 * chance
    assert favourite["random"]["logreg"]["1.0"]["mean"] < 2 * chance
    assert (project.reports_dir / "label_curves.png").stat().st_size > 10_000
    assert "barlow_twins" in (project.reports_dir / "report.md").read_text()


def test_finetuning_is_reported_beside_the_probes_on_the_same_splits(trained):  # after the baselines test
    project, params, _ = trained
    params = params.with_overrides(
        {"evaluate.label_fractions": [0.25, 1.0], "evaluate.seeds": 2, "evaluate.probes": ["logreg"],
         "evaluate.finetune": {"enabled": True, "label_fractions": [1.0], "epochs": 3}}
    )  # fmt: skip
    stages.evaluate(project, params, progress=False)
    favourite = json.loads((project.reports_dir / "metrics.json").read_text())["favourite_category"]
    for method in ("barlow_twins", "dual_encoder"):
        tuned, probed = favourite[method]["finetune"]["1.0"], favourite[method]["logreg"]["1.0"]
        assert (tuned["n_labelled"], tuned["n_test"]) == (probed["n_labelled"], probed["n_test"])
        assert len(tuned["per_seed"]) == 2
    assert "finetune" not in favourite["als"]  # no encoder to fine-tune
    assert favourite["dual_encoder"]["finetune"]["1.0"]["mean"] > 2.5 / 8  # far above chance (8 classes)
    # Barlow Twins fine-tuned stays above chance but falls below its own probe here (0.26 vs 0.43,
    # 2026-12-01). Measured: the LP start equals the probe exactly and an encoder lr of 0 keeps
    # it, but the export whitening gains 5-245x along the raw output's directions, so AdamW's
    # fixed-size steps at lr 1e-5 are large in whitened units (0.45 -> 0.30 in 3 epochs).
    # Open: see BENCHMARKS.md, issue 9.
    assert favourite["barlow_twins"]["finetune"]["1.0"]["mean"] > 1.5 / 8
    assert "favourite_category · finetune" in (project.reports_dir / "report.md").read_text()


def test_rerun_with_same_settings_reuses_the_finished_run(trained):  # last: it retrains
    project, params, manifest = trained
    before = read_embeddings(project.root / "data/embeddings/barlow_twins.parquet")[1]
    again = stages.pretrain(project, params, progress=False)
    assert again["model_version"] == manifest["model_version"]
    np.testing.assert_array_equal(read_embeddings(project.root / "data/embeddings/barlow_twins.parquet")[1], before)
    changed = stages.pretrain(project, params.with_overrides({"pretrain.steps": 6}), progress=False)
    assert changed["model_version"] != manifest["model_version"] and changed["steps_run"] == 6


def test_barlow_twins_resume_after_a_kill_matches_an_uninterrupted_run(small_sequences, tmp_path):
    import torch

    from userlens.augment import two_views
    from userlens.config import Params
    from userlens.data import SequenceData
    from userlens.embeddings import embed_users
    from userlens.model import BarlowTwins, UserEncoder
    from userlens.train import fit

    data = SequenceData.load(small_sequences, max_length=50)
    params = Params().with_overrides(
        {
            "model.d_model": 32,
            "model.n_layers": 1,
            "model.n_heads": 2,
            "pretrain.steps": 18,
            "pretrain.eval_every": 6,
            "pretrain.batch_size": 64,
        }
    )

    def train(out_dir, stop_after_rounds=None):
        torch.manual_seed(0)
        encoder = UserEncoder.for_data(params.model, data)
        model = BarlowTwins(encoder, (64, 64), params.pretrain.lambd)

        def step(model, users, generator):
            return model(*two_views(data.batch(users), params.augment, generator))

        # a rising score: the best round is the last, so the final weights are the resumed ones
        fit(model, step, lambda m: embed_users(encoder, data), lambda e: time.time(), np.arange(data.n_users),
            params.pretrain, out_dir, progress=False, stop_after_rounds=stop_after_rounds)  # fmt: skip
        return model.state_dict()

    straight = train(tmp_path / "straight")
    train(tmp_path / "killed", stop_after_rounds=1)  # the process dies after round 1's checkpoint
    resumed = train(tmp_path / "killed")  # a new process picks the checkpoint up
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_a_model_is_retrained_only_when_its_own_settings_change(tmp_path):
    from userlens.config import Params

    project, sequences = Project(tmp_path), {"raw_dvc_hash": "raw", "params_hash": "seq"}
    params = Params()
    other_views = params.with_overrides({"augment.crop_prob": 0.1})

    def run_key(method, p):
        return (stages.model_dir(project, method, p, sequences) / stages.RUN_KEY).read_text()

    assert run_key("dual_encoder", params) == run_key("dual_encoder", other_views)  # no augmentation in its loss
    assert run_key("barlow_twins", params) != run_key("barlow_twins", other_views)
    assert run_key("dual_encoder", params) != run_key("dual_encoder", params.with_overrides({"pretrain.lr": 0.01}))


def test_pretraining_killed_mid_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path):
    """A real SIGKILL of `userlens pretrain` after its first checkpoint; the next run picks it up."""
    import shutil
    import signal
    import subprocess
    import sys

    from conftest import build_sequences_project, userlens

    killed = build_sequences_project(tmp_path / "killed")
    straight = tmp_path / "straight"
    shutil.copytree(killed, straight, symlinks=True)
    settings = ["--set", "pretrain.steps=48", "--set", "pretrain.eval_every=6"]
    checkpoint = killed / "data/models/barlow_twins/checkpoint.pt"
    process = subprocess.Popen([sys.executable, "-m", "userlens", *settings, "pretrain", "--no-progress"],
                               cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "pretraining ended before it could be killed"
    assert not (killed / "data/embeddings/barlow_twins.parquet").exists()

    resumed = userlens(killed, "-v", *settings, "pretrain", "--no-progress")
    assert "resuming after step" in resumed.stderr
    userlens(straight, *settings, "pretrain", "--no-progress")
    a = read_embeddings(killed / "data/embeddings/barlow_twins.parquet")[1]
    b = read_embeddings(straight / "data/embeddings/barlow_twins.parquet")[1]
    np.testing.assert_array_equal(a, b)
