"""The model registry, and promote / rollback through it (with a stand-in online store)."""

from __future__ import annotations

import multiprocessing
import types
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

import userlens
from userlens import release
from userlens.config import Params
from userlens.embeddings import export_embeddings, read_embeddings
from userlens.io import write_json_atomic
from userlens.locking import LockHeld, project_lock
from userlens.project import Project
from userlens.registry import Registry, RegistryError

PASSED = {"passed": True, "reasons": ["every rule passed"]}
BLOCKED = {"passed": False, "reasons": ["favourite_category: accuracy 0.1 < minimum 0.3"]}


def candidate(root: Path, version: str, seed: int = 0) -> dict:
    """The files the pretrain stage leaves behind for one model version."""
    folder = root / "candidates" / f"{version}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save({"model": torch.nn.Linear(4, 3).state_dict()}, folder / "encoder.pt")
    vectors = np.random.default_rng(seed).normal(size=(5, 3)).astype(np.float32)
    export_embeddings(folder / "e.parquet", [f"u{i}" for i in range(5)], [vectors], version, datetime.now(UTC))
    return {"checkpoint": folder / "encoder.pt", "embeddings": folder / "e.parquet"}


def register(project: Project, version: str, gate: dict | None = PASSED, seed: int = 0):
    metrics = {"favourite_category": {"logreg": {"0.05": {"mean": 0.5 + seed / 100}}}}
    return Registry(project).register(
        version,
        **candidate(project.root, version, seed),
        metrics=metrics,
        params=Params(),
        raw_dvc_hash="abc.dir",
        git_revision="deadbeef",
        extra={"gate": gate, "dataset": "synthetic"},
    )


@pytest.fixture
def proj(tmp_path) -> Project:
    return Project(tmp_path)


def test_register_keeps_files_and_provenance_and_is_idempotent(proj):
    version = register(proj, "bt-1")
    assert version.path == proj.registry_dir / "versions" / "bt-1"
    names = {"encoder.pt", "embeddings.parquet", "metrics.json", "params.yaml", "manifest.json"}
    assert {p.name for p in version.path.iterdir()} == names
    manifest = version.manifest
    assert manifest["raw_dvc_hash"] == "abc.dir" and manifest["git_revision"] == "deadbeef"
    assert manifest["params_hash"] == Params().section_hash() and manifest["created_at"]
    assert version.metrics["favourite_category"]["logreg"]["0.05"]["mean"] == 0.5
    assert Params.model_validate(__import__("yaml").safe_load(version.params_file.read_text())) == Params()
    # Registering the same version again reuses it: same files, same creation time.
    before = version.embeddings.read_bytes()
    again = register(proj, "bt-1", seed=7)
    assert again.created_at == version.created_at and again.embeddings.read_bytes() == before
    assert [v.version for v in Registry(proj).versions()] == ["bt-1"]


def test_checkpoint_loads_with_weights_only(proj):
    version = register(proj, "bt-1")
    weights = torch.load(version.checkpoint, map_location="cpu", weights_only=True)["model"]
    assert set(weights) == {"weight", "bias"} and weights["weight"].shape == (3, 4)
    assert torch.equal(version.load_weights()["bias"], weights["bias"])


def test_checkpoint_that_runs_code_is_refused(proj, tmp_path):
    files = candidate(tmp_path, "bt-evil")
    torch.save({"model": {}, "hook": types.SimpleNamespace(x=1)}, files["checkpoint"])  # needs unpickling code
    with pytest.raises(RegistryError, match="weights_only"):
        Registry(proj).register("bt-evil", **files, metrics={}, params=Params(), raw_dvc_hash=None, git_revision=None)
    assert Registry(proj).versions() == []


def test_embeddings_of_another_version_are_refused(proj, tmp_path):
    files = candidate(tmp_path, "bt-other")
    with pytest.raises(RegistryError, match=r"embeddings of \['bt-other'\], not of bt-2"):
        Registry(proj).register("bt-2", **files, metrics={}, params=Params(), raw_dvc_hash=None, git_revision=None)


def test_production_alias_history_and_rollback(proj):
    registry = Registry(proj)
    for i in (1, 2):
        register(proj, f"bt-{i}", seed=i)
    assert registry.production() is None and registry.previous_production() is None
    with pytest.raises(RegistryError, match="no previous production version"):
        registry.rollback()
    registry.set_production("bt-1", reason="gate passed")
    registry.set_production("bt-2", reason="forced", forced=True)
    assert registry.production().version == "bt-2" and registry.previous_production().version == "bt-1"
    assert registry.rollback().version == "bt-1"
    history = registry.history()
    assert [h["version"] for h in history] == ["bt-1", "bt-2", "bt-1"]
    assert [h["previous"] for h in history] == [None, "bt-1", "bt-2"]
    assert history[1]["forced"] is True and history[2]["reason"] == "rollback from bt-2"
    with pytest.raises(RegistryError, match="no model version 'bt-9'"):
        registry.set_production("bt-9", reason="typo")
    assert registry.production().version == "bt-1"


def _register_in_process(root: str, version: str, seed: int) -> str:
    return register(Project(Path(root)), version, seed=seed).created_at


def test_concurrent_registers_are_safe(proj):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        created = pool.starmap(_register_in_process, [(str(proj.root), "bt-same", i) for i in range(4)])
    assert len(set(created)) == 1  # one of them wrote it; the others reused it
    versions = Registry(proj).versions()
    assert [v.version for v in versions] == ["bt-same"]
    leftovers = [p.name for p in (proj.registry_dir / "versions").iterdir() if p.name != "bt-same"]
    assert leftovers == []
    ids, vectors = read_embeddings(versions[0].embeddings)
    assert ids == [f"u{i}" for i in range(5)] and vectors.shape == (5, 3)


# --- promote and rollback through the online store -------------------------------------------------


class FakeStore:
    """Stands in for userlens.feature_store: records publishes, can be told to fail."""

    def __init__(self) -> None:
        self.served: str | None = None
        self.calls: list[tuple[str, Path]] = []
        self.fail = False

    def publish(self, project, params, model_version, embeddings, progress=False) -> dict:
        self.calls.append((model_version, Path(embeddings)))
        if self.fail:
            raise userlens.errors.UserlensError("online store unreachable")
        self.served = model_version
        return {"model_version": model_version, "rows": 5}

    def serving_state(self, project, params):
        return {"model_version": self.served} if self.served else None


@pytest.fixture
def store(monkeypatch) -> FakeStore:
    fake = FakeStore()
    monkeypatch.setattr(userlens, "feature_store", fake, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "userlens.feature_store", fake)
    return fake


def gate_report(proj: Project, version: str, decision: dict) -> None:
    write_json_atomic(proj.gate_report, {**decision, "model_version": version})


def test_promote_publishes_then_moves_the_alias(proj, store):
    register(proj, "bt-1")
    gate_report(proj, "bt-1", PASSED)
    result = release.promote(proj, Params())
    assert result["promoted"] and store.calls == [("bt-1", Registry(proj).get("bt-1").embeddings)]
    assert Registry(proj).production().version == "bt-1" and store.served == "bt-1"
    assert release.promote(proj, Params())["message"] == "bt-1 is already in production"
    assert len(store.calls) == 1


def test_blocked_candidate_is_not_promoted_unless_forced(proj, store):
    register(proj, "bt-1", gate=BLOCKED)
    gate_report(proj, "bt-1", BLOCKED)
    result = release.promote(proj, Params())
    assert not result["promoted"] and "gate blocked bt-1" in result["message"] and "0.1 < minimum" in result["message"]
    assert store.calls == [] and Registry(proj).production() is None
    assert not release.promote(proj, Params(), "bt-1")["promoted"]  # by name: its recorded decision counts
    forced = release.promote(proj, Params(), "bt-1", force=True)
    assert forced["promoted"] and Registry(proj).history()[-1]["forced"] is True


def test_failed_publish_leaves_alias_and_store_unchanged(proj, store):
    register(proj, "bt-1")
    register(proj, "bt-2", seed=2)
    release.promote(proj, Params(), "bt-1")
    store.fail = True
    with pytest.raises(userlens.errors.UserlensError, match="unreachable"):
        release.promote(proj, Params(), "bt-2")
    assert Registry(proj).production().version == "bt-1" and store.served == "bt-1"


def test_rollback_switches_store_then_alias(proj, store):
    register(proj, "bt-1")
    register(proj, "bt-2", seed=2)
    release.promote(proj, Params(), "bt-1")
    release.promote(proj, Params(), "bt-2")
    result = release.rollback(proj, Params())
    assert result["message"] == "rolled back from bt-2 to bt-1"
    assert store.calls[-1] == ("bt-1", Registry(proj).get("bt-1").embeddings) and store.served == "bt-1"
    assert Registry(proj).production().version == "bt-1"


def test_project_lock_refuses_a_second_holder_with_a_clear_message(proj):
    with project_lock(proj, "first run"):
        with pytest.raises(LockHeld, match=r"another userlens run \(pid \d+, started at 20\d\d-.*holds the lock"):
            with project_lock(proj):
                pass
    with project_lock(proj):  # released
        pass
