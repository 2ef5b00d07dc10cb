"""The model registry: immutable model versions in a folder, and a production alias with its history.

    data/registry/
      versions/<version>/  encoder.pt          encoder weights only (loads with torch.load(weights_only=True))
                           params.yaml         the settings the version was trained and evaluated with
                           metrics.json        its downstream metrics (results[task] of reports/metrics.json)
                           embeddings.parquet  the user embeddings export that the online store serves
                           items.parquet       the item vocabulary the encoder was trained on
                           manifest.json       provenance: raw-data DVC hash, params hash, git revision,
                                               creation time, gate decision (written last: a version is
                                               complete when its manifest exists)
      production.json      {"version", "promoted_at", "history": [{version, previous, promoted_at, reason, forced}]}
      .lock                serialises writers across processes (flock)

A version is written once, through a staging folder renamed into place, and never changed:
registering the same version again returns the existing one. A plain folder (not MLflow or
similar) because everything in it is a file that DVC, `ls` and serving code can read.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from userlens.errors import UserlensError
from userlens.faults import fault_point
from userlens.io import atomic_dir, atomic_file, read_json, utc_now, write_json_atomic, write_text_atomic
from userlens.locking import file_lock

CHECKPOINT = "encoder.pt"
EMBEDDINGS = "embeddings.parquet"
METRICS = "metrics.json"
MANIFEST = "manifest.json"
PARAMS = "params.yaml"


class RegistryError(UserlensError):
    """A registry operation that cannot be done as asked (unknown version, nothing to roll back to)."""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def embeddings(self) -> Path:
        return self.path / EMBEDDINGS

    @property
    def params_file(self) -> Path:
        return self.path / PARAMS

    @property
    def metrics(self) -> dict[str, Any]:
        return _read_json(self.path / METRICS)

    @property
    def created_at(self) -> str:
        return self.manifest["created_at"]

    @property
    def gate_passed(self) -> bool | None:
        gate = self.manifest.get("gate")
        return None if gate is None else bool(gate.get("passed"))

    def load_weights(self) -> dict:
        """The encoder's state dict; weights_only: loading a model file never runs code."""
        return load_checkpoint(self.checkpoint, "restore data/registry/ from a backup")["model"]


class Registry:
    def __init__(self, project) -> None:
        self.root: Path = project.registry_dir
        self.project = project

    @property
    def _versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def _alias(self) -> Path:
        return self.root / "production.json"

    def _lock(self):
        return file_lock(self.root / ".lock")

    # --- versions ------------------------------------------------------------------------------

    def register(
        self,
        version: str,
        *,
        checkpoint: Path,
        embeddings: Path,
        metrics: dict[str, Any],
        params,
        raw_dvc_hash: str | None,
        git_revision: str | None,
        files: dict[str, Path] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Add `version` (copies of its files + manifest); an existing version is returned unchanged."""
        _check_name(version)
        _check_checkpoint(checkpoint)
        _check_embeddings(embeddings, version)
        with self._lock():
            existing = self._read(version)
            if existing is not None:
                return existing
            with atomic_dir(self._versions_dir / version) as staging:
                shutil.copyfile(checkpoint, staging / CHECKPOINT)
                fault_point("registry.register")  # a test seam (faults.py); nothing when unset
                shutil.copyfile(embeddings, staging / EMBEDDINGS)
                for name, source in (files or {}).items():
                    shutil.copyfile(source, staging / name)
                write_json_atomic(staging / METRICS, metrics)
                write_text_atomic(staging / PARAMS, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
                write_json_atomic(
                    staging / MANIFEST,
                    {
                        "version": version,
                        "created_at": utc_now(),
                        "raw_dvc_hash": raw_dvc_hash,
                        "params_hash": params.section_hash(),
                        "git_revision": git_revision,
                        **(extra or {}),
                    },
                )
        return self.get(version)

    def get(self, version: str) -> ModelVersion:
        found = self._read(version)
        if found is None:
            known = ", ".join(v.version for v in self.versions()[-5:]) or "none yet"
            raise RegistryError(
                f"no model version {version!r} in the registry (latest: {known}); see `userlens models`"
            )
        return found

    def versions(self) -> list[ModelVersion]:
        """Every complete version, oldest first."""
        if not self._versions_dir.is_dir():
            return []
        found = [self._read(p.name) for p in self._versions_dir.iterdir() if not p.name.startswith(".")]
        return sorted((v for v in found if v is not None), key=lambda v: (v.created_at, v.version))

    def _read(self, version: str) -> ModelVersion | None:
        path = self._versions_dir / version
        if not (path / MANIFEST).exists():  # the manifest is written last: no manifest, no version
            return None
        return ModelVersion(version, path, _read_json(path / MANIFEST))

    # --- the production alias ------------------------------------------------------------------

    def history(self) -> list[dict[str, Any]]:
        return _read_json(self._alias)["history"] if self._alias.exists() else []

    def production(self) -> ModelVersion | None:
        history = self.history()
        return self.get(history[-1]["version"]) if history else None

    def previous_production(self) -> ModelVersion | None:
        """The version that was in production before the current one (what `rollback` returns to)."""
        history = self.history()
        previous = history[-1]["previous"] if history else None
        return self.get(previous) if previous else None

    def set_production(self, version: str, reason: str, forced: bool = False) -> ModelVersion:
        with self._lock():
            target = self.get(version)
            history = self.history()
            current = history[-1]["version"] if history else None
            entry = {"version": version, "previous": current, "promoted_at": utc_now(), "reason": reason}
            entry["forced"] = forced
            history.append(entry)
            alias = {"version": version, "promoted_at": entry["promoted_at"], "history": history}
            with atomic_file(self._alias) as tmp:
                tmp.write_text(json.dumps(alias, indent=2, sort_keys=True, default=str) + "\n")  # as write_json_atomic
                fault_point("registry.alias")  # a test seam (faults.py); nothing when unset
        return target

    def rollback(self) -> ModelVersion:
        """Point production back at the previous production version."""
        current, previous = self.production(), self.previous_production()
        if previous is None:
            raise RegistryError("no previous production version to roll back to (see `userlens models`)")
        return self.set_production(previous.version, reason=f"rollback from {current.version}")


def _check_name(version: str) -> None:
    if not version or "/" in version or version.startswith("."):
        raise RegistryError(f"{version!r} is not a valid version name")


def _check_checkpoint(path: Path) -> None:
    """Refuse a checkpoint that needs code to load (pickled objects): only tensors and plain data."""
    if not Path(path).exists():
        raise RegistryError(f"no checkpoint at {path}: run `userlens pretrain` first")
    load_checkpoint(path, "rerun `userlens pretrain`")


def load_checkpoint(path: Path, fix: str) -> dict:
    """torch.load(weights_only=True): a file whose unpickling would run code is refused, never run."""
    import pickle

    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise RegistryError(f"{path} does not load with weights_only=True (it holds code, refused): {first}") from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError) as exc:  # what damaged bytes raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegistryError(f"{path} is not a readable checkpoint (damaged or truncated: {first}): {fix}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise RegistryError(f"{path} is not an encoder checkpoint ({{'model': state_dict}})")
    return saved


def _read_json(path: Path) -> Any:
    """A registry file; a damaged one (truncated, not JSON) is named with the fix, not a traceback."""
    try:
        return read_json(path)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise RegistryError(
            f"{path} is damaged (not valid JSON: {exc}): restore it from a backup of data/registry/"
            + (
                ", or remove it and run `userlens promote VERSION --force` with the served version "
                "(`userlens lookup USER_ID` names it; the online store still serves it)"
                if path.name == "production.json"
                else ""
            )
        ) from None


def _check_embeddings(path: Path, version: str) -> None:
    import pyarrow.parquet as pq

    if not Path(path).exists():
        raise RegistryError(f"no embeddings at {path}: run `userlens pretrain` first")
    found = set(pq.read_table(path, columns=["model_version"])["model_version"].unique().to_pylist())
    if found != {version}:
        raise RegistryError(f"{path} holds embeddings of {sorted(found)}, not of {version}: rerun `userlens pretrain`")
