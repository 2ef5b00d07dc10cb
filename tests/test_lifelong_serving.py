"""user_interest served from Feast beside the embeddings, and refreshed incrementally: a real
project (synthetic source through the real data stages, a registered production encoder),
the real Feast sqlite online store, read back through Feast's own get_online_features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from conftest import build_sequences_project, promote_candidate
from userlens.cli import cli
from userlens.project import Project

pytestmark = pytest.mark.integration


def invoke(project: Path, *args: str):
    return CliRunner().invoke(cli, ["--project", str(project), *args], catch_exceptions=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Sequences, a 12-step Barlow Twins encoder registered and in production, the lifelong
    log and partitions; nothing served yet."""
    from userlens import stages

    synthetic = {"n_users": 240, "n_items": 200, "n_categories": 6, "mean_events_per_user": 45}
    root = build_sequences_project(tmp_path_factory.mktemp("interest") / "project", synthetic)
    proj = Project(root)
    params = proj.load_params().with_overrides({"pretrain.steps": 12, "lifelong.ctr.epochs": 4})
    stages.pretrain(proj, params, progress=False)
    promote_candidate(proj, params)
    assert invoke(root, "partitions").exit_code == 0
    return root


def feast_read(project: Path, service: str, user_ids: list[str]) -> dict:
    """What a plain Feast client reads: the feature service by name, no userlens code."""
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(project / "feature_repo"))
    return store.get_online_features(features=store.get_feature_service(service),
                                     entity_rows=[{"user_id": u} for u in user_ids]).to_dict()  # fmt: skip


def served_interest(project: Path) -> dict:
    return json.loads((project / "data/feast/interest.json").read_text())


def test_fuse_publishes_a_version_that_feast_serves_beside_the_embeddings(project):
    result = invoke(project, "--set", "lifelong.ctr.epochs=4", "fuse", "--no-evaluate", "--publish", "--no-progress")
    assert result.exit_code == 0, result.output
    pointer = served_interest(project)
    version = pointer["model_version"]
    assert f"interest version {version}" in result.output and f"serving user_interest {version}" in result.output
    folder = project / "data/lifelong/synthetic/interest" / version
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["encoder_version"].startswith("barlow_twins") and manifest["summariser"] == "template-1"
    export = pl.read_parquet(folder / "user_interest.parquet")
    assert export.height == 240 and export["user_interest"].list.len().unique().to_list() == [32]
    assert not (project / "data/feast/serving.json").exists()  # the embeddings' pointer is their own

    ids = export["user_id"].head(5).to_list()
    read = feast_read(project, "user_interest", ids)
    assert read["interest_version"] == [version] * 5
    expected = np.stack(export["user_interest"].head(5).to_numpy())
    assert np.array_equal(np.asarray(read["user_interest"], np.float32), expected)
    assert read["n_partitions"] == export["n_partitions"].head(5).to_list()

    looked_up = json.loads(invoke(project, "lookup", ids[0], "nobody", "--interest", "--json").output)
    assert looked_up["model_version"] == version and [u["found"] for u in looked_up["users"]] == [True, False]
    assert np.array_equal(np.asarray(looked_up["users"][0]["user_interest"], np.float32), expected[0])

    # A second version cuts over to the other slot; readers then see only it.
    again = invoke(project, "--set", "lifelong.ctr.epochs=2", "fuse", "--no-evaluate", "--publish", "--no-progress")
    assert again.exit_code == 0, again.output
    second = served_interest(project)
    assert second["model_version"] != version and second["slot"] != pointer["slot"]
    assert second["history"][0]["model_version"] == version
    answer = json.loads(invoke(project, "lookup", *ids, "--interest", "--json").output)
    assert answer["model_version"] == second["model_version"] and all(u["found"] for u in answer["users"])


def test_a_refresh_refuses_only_users_with_new_events_and_leaves_the_rest_bit_for_bit(project, tmp_path, monkeypatch):
    from userlens.lifelong import fusion

    if not (project / "data/feast/interest.json").exists():
        assert invoke(project, "fuse", "--no-evaluate", "--publish", "--no-progress").exit_code == 0
    pointer = served_interest(project)
    version, slot = pointer["model_version"], pointer["slot"]
    everyone = sorted(pl.read_parquet(project / "data/sequences/users.parquet")["user_id"].to_list())
    before = feast_read(project, f"user_interest_{slot}_service", everyone)

    # New events for two users (one closes a partition, one stays in the open cache) and a newcomer.
    items = pl.read_parquet(project / "data/canonical/items.parquet")["item_id"].to_list()
    late = 2_000_000_000
    rows = [(everyone[0], items[k], late + k) for k in range(25)] + [(everyone[1], items[0], late)]
    rows += [("newcomer", items[k], late + k) for k in range(3)]
    batch = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    batch.with_columns(rating=pl.lit(4.0)).write_csv(tmp_path / "batch.csv")
    assert invoke(project, "partitions", "--events", str(tmp_path / "batch.csv")).exit_code == 0

    encoded = []
    original = fusion.event_set_vectors
    monkeypatch.setattr(fusion, "event_set_vectors", lambda *a: encoded.append(a[-1]) or original(*a))
    result = invoke(project, "materialize", "--interest", "--incremental", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "3 users re-fused, 3 rows materialized" in result.output
    assert len(encoded) == 1 and set(encoded[0]["user_id"]) == {everyone[0], everyone[1], "newcomer"}

    assert served_interest(project)["model_version"] == version  # the same version, brought up to date
    after = feast_read(project, "user_interest", [*everyone, "newcomer"])
    assert after["interest_version"] == [version] * (len(everyone) + 1)
    changed = {u for u, old, new in zip(everyone, before["user_interest"], after["user_interest"], strict=False)
               if np.asarray(old, np.float32).tobytes() != np.asarray(new, np.float32).tobytes()}  # fmt: skip
    assert changed == {everyone[0], everyone[1]}  # every untouched user's served bits are unchanged
    assert after["interest_events"][0] == before["interest_events"][0] + 25

    rerun = invoke(project, "materialize", "--interest", "--incremental", "--no-progress")
    assert rerun.exit_code == 0 and "0 users re-fused, 0 rows materialized" in rerun.output


def test_a_refresh_under_changed_lifelong_settings_is_refused_clearly(project):
    if not (project / "data/feast/interest.json").exists():
        assert invoke(project, "fuse", "--no-evaluate", "--publish", "--no-progress").exit_code == 0
    served = served_interest(project)
    result = invoke(project, "--set", "lifelong.fusion.text_encoder=lm", "materialize", "--interest", "--incremental")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "text_encoder: hashing -> lm" in result.output and "userlens fuse" in result.output
    assert served_interest(project) == served


def test_nothing_is_published_without_a_production_encoder(tmp_path):
    root = build_sequences_project(tmp_path / "bare")
    result = invoke(root, "fuse", "--no-evaluate", "--publish")
    assert result.exit_code != 0 and "nothing is in production" in result.output and "Traceback" not in result.output
    assert not (root / "data/feast/interest.json").exists()
