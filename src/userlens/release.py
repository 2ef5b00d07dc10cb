"""The release stages: gate the candidate, register it, promote it (publish, then the
production alias), roll back, and re-export users with the production encoder (refresh).

Like stages.py, each is a plain function with explicit inputs and outputs that `dvc.yaml`
calls through the CLI and the Prefect flows call as tasks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from userlens.config import Params
from userlens.errors import UserlensError
from userlens.gate import REFERENCE  # the candidate the pipeline releases
from userlens.io import file_sha256, git_revision, read_json, utc_now, write_json_atomic
from userlens.project import Project
from userlens.stages import MANIFEST, write_embeddings

log = logging.getLogger(__name__)


def gate(project: Project, params: Params) -> dict:
    """reports/metrics.json against params.gate and the production version -> reports/gate.json.

    A blocked candidate is a decision, not an error: the stage returns it (`passed` False)."""
    from userlens import gate as gating
    from userlens.registry import Registry

    metrics_path = project.reports_dir / "metrics.json"
    model_manifest = project.model_dir(REFERENCE) / MANIFEST
    if not metrics_path.exists() or not model_manifest.exists():
        raise UserlensError("nothing to gate: run `userlens pretrain`, `baselines` and `evaluate` first")
    production = Registry(project).production()
    decision = gating.decide(
        read_json(metrics_path),
        params.gate,
        production.metrics if production and _same_dataset(production, params) else None,
        production.version if production else None,
    )
    decision.update(
        model_version=read_json(model_manifest)["model_version"],
        metrics_sha256=file_sha256(metrics_path),
        params_hash=params.section_hash("gate"),
        created_at=utc_now(),
    )
    decision["summary"] = gating.summary(decision)
    write_json_atomic(project.gate_report, decision)
    log.info("%s", decision["summary"])
    return decision


def _same_dataset(version, params: Params) -> bool:
    """Accuracy on another dataset says nothing about a regression on this one."""
    return version.manifest.get("dataset") == params.data.dataset


def register(project: Project, params: Params) -> dict:
    """Add the Barlow Twins candidate (data/models/barlow_twins, its embeddings, its metrics and gate
    decision) to the registry as an immutable version; an already registered version is reused."""
    from userlens.registry import Registry
    from userlens.train import ENCODER

    model_dir = project.model_dir(REFERENCE)
    if not (model_dir / MANIFEST).exists():
        raise UserlensError("no trained candidate in data/models/barlow_twins: run `userlens pretrain` first")
    manifest = read_json(model_dir / MANIFEST)
    decision = _gate_decision(project, manifest["model_version"])
    results = read_json(project.reports_dir / "metrics.json")
    version = Registry(project).register(
        manifest["model_version"],
        checkpoint=model_dir / ENCODER,
        embeddings=project.embeddings_dir / f"{REFERENCE}.parquet",
        metrics={task: by_method[REFERENCE] for task, by_method in results.items() if REFERENCE in by_method},
        params=params,
        raw_dvc_hash=manifest["raw_dvc_hash"],
        git_revision=git_revision(project.root),
        files={"items.parquet": project.sequences_dir / "items.parquet"},
        extra={"dataset": params.data.dataset, "method": REFERENCE, "training": manifest, "gate": decision},
    )
    log.info("registered %s in %s", version.version, project.relative(version.path))
    return {"version": version.version, "path": project.relative(version.path), "gate_passed": version.gate_passed}


def _gate_report(project: Project, alternative: str = "") -> dict:
    if not project.gate_report.exists():
        raise UserlensError(f"no gate decision (reports/gate.json): run `userlens gate` first{alternative}")
    return read_json(project.gate_report)


def _gate_decision(project: Project, model_version: str) -> dict:
    decision = _gate_report(project)
    if decision.get("model_version") != model_version:
        raise UserlensError(
            f"reports/gate.json is for {decision.get('model_version')}, not the trained candidate {model_version}: "
            "run `userlens evaluate` and `userlens gate` first"
        )
    return decision


def promote(
    project: Project, params: Params, version: str | None = None, force: bool = False, progress: bool = False
) -> dict:
    """Publish a registered version to the online store, THEN point the production alias at it.

    No `version`: the candidate of reports/gate.json. Without `force`, only a version whose gate
    passed is promoted; otherwise the result says why not (`promoted` False) and nothing changes.
    A failed publish raises before the alias moves, so alias and store stay on the old version."""
    from userlens import feature_store
    from userlens.registry import Registry

    registry = Registry(project)
    if version is None:  # the latest candidate, judged by the latest gate decision
        decision = _gate_report(project, alternative=", or name a VERSION")
        version = decision["model_version"]
        target = registry.get(version)
    else:  # a registered version, judged by the decision recorded when it was registered
        target = registry.get(version)
        decision = target.manifest.get("gate") or {"passed": False, "reasons": ["it has no gate decision"]}
    if not force and not decision["passed"]:
        why = "; ".join(decision["reasons"])
        return {"promoted": False, "version": version, "message": f"not promoted: the gate blocked {version} ({why})"}
    current = registry.production()
    serving = feature_store.serving_state(project, params)
    if current and current.version == version and serving and serving.get("model_version") == version:
        return {"promoted": False, "version": version, "message": f"{version} is already in production"}
    published = feature_store.publish(project, params, version, target.embeddings, progress=progress)
    registry.set_production(version, reason="forced" if force else "gate passed", forced=force)
    return {
        "promoted": True,
        "version": version,
        "previous": current.version if current else None,
        "published": published,
        "message": f"{version} is in production and served online",
    }


def rollback(project: Project, params: Params, progress: bool = False) -> dict:
    """Serve the previous production version again: online store first, then the alias."""
    from userlens import feature_store
    from userlens.registry import Registry, RegistryError

    registry = Registry(project)
    current, previous = registry.production(), registry.previous_production()
    if previous is None:
        raise RegistryError("no previous production version to roll back to (see `userlens models`)")
    published = feature_store.publish(project, params, previous.version, previous.embeddings, progress=progress)
    registry.rollback()
    return {
        "version": previous.version,
        "rolled_back_from": current.version,
        "published": published,
        "message": f"rolled back from {current.version} to {previous.version}",
    }


def candidate_encoder(project: Project, params: Params):
    """The trained Barlow Twins candidate (data/models/barlow_twins/encoder.pt), ready to embed
    the current data/sequences: (encoder, its item vocabulary, max_length)."""
    from userlens.data import SequenceData
    from userlens.model import UserEncoder
    from userlens.registry import load_checkpoint
    from userlens.train import ENCODER

    path = project.model_dir(REFERENCE) / ENCODER
    if not path.exists():
        raise UserlensError(f"{project.relative(path)} not found: run `userlens pretrain` first")
    data = SequenceData.load(project.sequences_dir, params.sequences.max_length)
    encoder = UserEncoder.for_data(params.model, data)
    encoder.load_state_dict(load_checkpoint(path, "rerun `userlens pretrain`")["model"])  # weights_only
    return encoder.eval(), data.item_ids, params.sequences.max_length


def encoder_of(project: Project, version):
    """A registered version's encoder, ready to embed the current data/sequences: (encoder,
    the item vocabulary it was trained on, its max_length)."""
    from userlens.config import load_params
    from userlens.data import SequenceData
    from userlens.model import UserEncoder

    trained = load_params(version.params_file)
    items = pl.read_parquet(version.path / "items.parquet", columns=["item_index", "item_id"]).sort("item_index")
    vocabulary = items["item_id"].to_numpy()
    max_length = trained.sequences.max_length
    encoder = UserEncoder.for_data(trained.model, SequenceData.load(project.sequences_dir, max_length, vocabulary))
    try:
        encoder.load_state_dict(version.load_weights())
    except RuntimeError as exc:
        raise UserlensError(f"the model {version.version} does not fit the current data: {exc}") from None
    return encoder.eval(), vocabulary, max_length


def reexport(project: Project, params: Params) -> Path:
    """The production encoder embeds the users of the current data/sequences (new users and new
    events included) -> data/embeddings/production.parquet, under the production version's name."""
    import torch

    from userlens.embeddings import embed_sequences
    from userlens.registry import Registry

    version = Registry(project).production()
    if version is None:
        raise UserlensError("nothing in production to re-export: run `userlens run` (or `userlens promote`) first")
    encoder, vocabulary, max_length = encoder_of(project, version)
    with torch.no_grad():
        batches = embed_sequences(encoder, project.sequences_dir, max_length, vocabulary)
        rows = write_embeddings(project, "production", batches, version.version)
    log.info("re-exported %d users with the production model %s", rows, version.version)
    return project.embeddings_dir / "production.parquet"
