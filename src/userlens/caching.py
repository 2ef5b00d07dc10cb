"""Cache keys for the Prefect flow's steps, from what dvc.yaml says each stage depends on.

A step's key hashes the project folder, the stage name, the content of every dependency that
dvc.yaml lists for the stage (a raw snapshot by its DVC hash, other files and folders by their
bytes) and the values of the params it lists. Same inputs, same key: the flow skips a step
(Prefect state "Cached") when `dvc repro` would skip the stage, and dvc.yaml stays the one
place that says what a stage reads. A step whose outputs are missing is never skipped.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from userlens.config import Params
from userlens.errors import UserlensError
from userlens.io import file_sha256
from userlens.versioning import dvc_hash


def stage_key(project, params: Params, stage: str) -> str:
    spec = _stage(project.root, stage)
    dumped = params.model_dump(mode="json")
    digest = hashlib.sha256(f"{project.root}|{stage}".encode())
    for dep in spec.get("deps", []):
        path = project.root / _resolve(dep, dumped)
        digest.update(f"|{path.relative_to(project.root)}={_content_hash(path)}".encode())
    for name in spec.get("params", []):
        digest.update(f"|{name}={json.dumps(_lookup(dumped, name), sort_keys=True)}".encode())
    return digest.hexdigest()


def outputs_present(project, params: Params, stage: str) -> bool:
    spec, dumped = _stage(project.root, stage), params.model_dump(mode="json")
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", []) + spec.get("metrics", [])]
    return all((project.root / _resolve(out, dumped)).exists() for out in outs)


@cache
def _stages(dvc_yaml: Path, mtime: float) -> dict[str, Any]:
    return yaml.safe_load(dvc_yaml.read_text())["stages"]


def _stage(root: Path, stage: str) -> dict[str, Any]:
    path = root / "dvc.yaml"
    if not path.exists():
        raise UserlensError(f"{path} not found: the flow's cache keys come from dvc.yaml")
    return _stages(path, path.stat().st_mtime)[stage]


def _resolve(text: str, dumped: dict) -> str:
    """dvc.yaml's ${section.key} templating."""
    return re.sub(r"\$\{([\w.]+)\}", lambda m: str(_lookup(dumped, m.group(1))), text)


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _content_hash(path: Path) -> str:
    if path.with_name(path.name + ".dvc").exists():
        return dvc_hash(path)  # a DVC-tracked snapshot: its content hash, checked against the folder
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        return hashlib.sha256("".join(f"{p.relative_to(path)}:{file_sha256(p)}|" for p in files).encode()).hexdigest()
    return "missing"
