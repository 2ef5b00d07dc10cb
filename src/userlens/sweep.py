"""The recipe search: Barlow Twins candidates scored on validation users only.

A candidate is a name and a set of settings overrides (`sweep.candidates` in params.yaml, on
top of the project's own settings). Each is trained on data/sequences into its own folder
(data/sweep/<name>/, resumable like any training run) and scored by `validation_score`: the
validation probe of pretraining (pretraining.probe_score: cross-validated logistic
regression, balanced accuracy, mean over the classification tasks) on the embeddings and
labels of the VALIDATION users alone. Those users are left out of the downstream evaluation,
so the selected recipe has never seen a test user: the score takes the validation rows
before it looks at anything (tests poison every other user's labels and get the same score).

The flow that runs candidates in parallel on a Dask cluster is flows/sweep_pipeline.py; this
module is the part that runs inside each worker, and the selection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from userlens.config import Params
from userlens.project import Project

log = logging.getLogger(__name__)
SWEEP_DIR = "sweep"  # data/sweep/<candidate>/


def validation_score(embeddings: np.ndarray, labels: dict[str, np.ndarray], val_users: np.ndarray, seed: int) -> float:
    """The selection score of one candidate, computed from the validation users' rows only."""
    from userlens.pretraining import probe_score

    val_users = np.asarray(val_users)
    val_labels = {name: task_labels[val_users] for name, task_labels in labels.items()}
    local = np.arange(val_users.size)
    return probe_score(val_labels, local, seed)(np.asarray(embeddings)[val_users])


def candidates(params: Params) -> dict[str, Params]:
    """name -> the project's settings with that candidate's overrides (a bad key names itself)."""
    from userlens.errors import ConfigError

    out = {}
    for name, overrides in params.sweep.candidates.items():
        try:
            out[name] = params.with_overrides(dict(overrides))
        except ConfigError as exc:
            raise ConfigError(f"sweep.candidates.{name}: {exc}") from None
    if not out:
        raise ConfigError("sweep.candidates is empty: name at least one candidate (e.g. current: {})")
    return out


def run_candidate(project_root: str, name: str, params: Params, threads: int = 1) -> dict[str, Any]:
    """Train one candidate on the project's sequences and score it on validation users only.

    Runs in a worker process with `threads` torch threads (one per core the worker owns)."""
    import torch

    from userlens.embeddings import embed_users
    from userlens.geometry import geometry
    from userlens.pretraining import train_barlow_twins, validation_users
    from userlens.stages import model_dir, training_inputs

    torch.set_num_threads(threads)
    project = Project(Path(project_root))
    overrides = dict(params.sweep.candidates.get(name, {}))
    started = time.perf_counter()
    data, labels, sequences = training_inputs(project, params)
    folder = model_dir(
        project, "barlow_twins", params, sequences, project.root / "data" / SWEEP_DIR / _folder(name, overrides)
    )
    encoder, result = train_barlow_twins(data, params, labels, folder, progress=False)
    embeddings = embed_users(encoder, data)
    val_users = validation_users(data.n_users, params)
    log.info("sweep candidate %s: %d steps in %.0f s", name, result.steps_run, time.perf_counter() - started)
    return {
        "name": name,
        "overrides": overrides,
        "validation_score": validation_score(embeddings, labels, val_users, params.pretrain.seed),
        "validation_users": int(val_users.size),
        "steps": result.steps_run,
        "seconds": round(time.perf_counter() - started, 2),
        "geometry": geometry(embeddings, params.pretrain.seed),
    }


def select(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the highest validation score (ties: the first listed)."""
    if not results:
        raise ValueError("no sweep candidates to select from")
    return max(results, key=lambda r: r["validation_score"])


def report_markdown(results: list[dict[str, Any]], selected: dict[str, Any], engine: str, seconds: float) -> str:
    lines = ["# Recipe sweep (Barlow Twins, scored on validation users only)", ""]
    lines.append(f"{len(results)} candidates on {engine} in {seconds:.0f} s; selected: **{selected['name']}**.")
    lines.append("")
    lines.append("| candidate | overrides | validation score | effective rank | random-pair cosine | seconds |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for r in sorted(results, key=lambda r: -r["validation_score"]):
        g = r["geometry"]
        lines.append(
            f"| {r['name']} | `{json.dumps(r['overrides'])}` | {r['validation_score']:.4f} | "
            f"{g['effective_rank']:.1f} / {g['dim']} | {g['random_pair_cosine']:.3f} | {r['seconds']:.0f} |"
        )
    flags = " ".join(f"--set {k}={json.dumps(v)}" for k, v in selected["overrides"].items())
    lines += ["", f"To use it: put its overrides in params.yaml, or `userlens {flags} run`." if flags else ""]
    return "\n".join(lines).rstrip() + "\n"


def _folder(name: str, overrides: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{safe}-{digest}"
