"""The pipeline stages: plain functions with explicit inputs and outputs (paths).

`dvc.yaml` calls them through the CLI and the Prefect flow calls them as tasks; nothing is
implemented twice. Every stage writes its folder atomically and records where its inputs
came from (raw-data DVC hash, params hash, git revision) in a manifest.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from userlens.config import Params
from userlens.errors import UserlensError, ValidationFailed
from userlens.io import (
    atomic_dir,
    file_sha256,
    git_revision,
    read_json,
    save_array_atomic,
    utc_now,
    write_json_atomic,
)
from userlens.project import Project
from userlens.schema import QUARANTINE_ROW, TABLES, CanonicalTables, outside_scale
from userlens.sequences import dense_codes, split_sequences
from userlens.sources import read_source, snapshot_source
from userlens.validation_results import drop_counts
from userlens.versioning import add_and_push, dvc_hash

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def fetch_raw(project: Project, params: Params, progress: bool = True) -> dict:
    """Put the configured source's raw files into data/raw/<dataset>/ (replacing the old snapshot)."""
    target = project.raw_dir(params.data.dataset)
    start = time.perf_counter()
    with atomic_dir(target) as staging:
        info = snapshot_source(params.data, staging, progress=progress)
    info["seconds"] = round(time.perf_counter() - start, 3)
    log.info("raw snapshot of %s in %s", params.data.dataset, project.relative(target))
    return info


def version_raw(project: Project, params: Params) -> str:
    """`dvc add` + `dvc push` the raw snapshot; returns its DVC hash."""
    return add_and_push(project.root, project.raw_dir(params.data.dataset), params.dvc.remote, params.dvc.push)


def ingest(project: Project, params: Params) -> dict:
    """data/raw/<dataset>/ -> data/canonical/{interactions,items,users}.parquet + manifest.json."""
    raw_dir = project.raw_dir(params.data.dataset)
    if not raw_dir.is_dir():
        raise UserlensError(f"no raw snapshot at {project.relative(raw_dir)}: run `userlens fetch` first")
    raw_hash = dvc_hash(raw_dir)
    start = time.perf_counter()
    tables = read_source(params.data, raw_dir)
    manifest = {
        "stage": "ingest",
        "dataset": params.data.dataset,
        "source": params.data.source,
        "raw_dvc_hash": raw_hash,
        "params_hash": params.section_hash("data"),
        "git_revision": git_revision(project.root),
        "created_at": utc_now(),
        "rows": {name: getattr(tables, name).height for name in TABLES},
        "rating_scale": list(tables.rating_scale) if tables.rating_scale else None,
        "rating_scale_origin": tables.rating_scale_origin,
        # rated rows outside the scale: validation.repair.rating_out_of_scale decides their fate
        "rating_scale_outside": tables.interactions.select(outside_scale(tables.rating_scale).sum()).item(),
        "notes": tables.notes,
    }
    with atomic_dir(project.canonical_dir) as staging:
        for name in TABLES:
            getattr(tables, name).write_parquet(staging / f"{name}.parquet")
        write_json_atomic(staging / MANIFEST, manifest)
    manifest["seconds"] = round(time.perf_counter() - start, 3)
    log.info("ingested %s", ", ".join(f"{v:,} {k}" for k, v in manifest["rows"].items()))
    return manifest


def load_canonical(project: Project) -> tuple[CanonicalTables, dict]:
    folder = project.canonical_dir
    if not (folder / MANIFEST).exists():
        raise UserlensError(f"no canonical tables in {project.relative(folder)}: run `userlens ingest` first")
    manifest = read_json(folder / MANIFEST)
    frames = {name: pl.read_parquet(folder / f"{name}.parquet") for name in TABLES}
    scale = tuple(manifest["rating_scale"]) if manifest["rating_scale"] else None
    return CanonicalTables(**frames, rating_scale=scale, rating_scale_origin=manifest["rating_scale_origin"]), manifest


@dataclasses.dataclass(frozen=True)
class ItemTables:
    """What item readers need of data/canonical: the items table and the rating scale."""

    items: pl.DataFrame
    rating_scale: tuple[float, float] | None


def load_items(project: Project) -> ItemTables:
    """The canonical items and rating scale, without reading the interactions (load_canonical reads all)."""
    folder = project.canonical_dir
    if not (folder / MANIFEST).exists():
        raise UserlensError(f"no canonical tables in {project.relative(folder)}: run `userlens ingest` first")
    scale = read_json(folder / MANIFEST)["rating_scale"]
    return ItemTables(pl.read_parquet(folder / "items.parquet"), tuple(scale) if scale else None)


def validate(project: Project, params: Params, now: int | None = None):
    """Run the GX suites on data/canonical; write reports/validation.json, Data Docs and, when
    it passes, reports/quarantine/interactions.parquet (the rows the repair rules drop).

    Raises ValidationFailed (with the human summary) when any expectation fails, so nothing
    downstream runs; the last passing run's quarantine stays as it was.
    """
    from userlens.validation import validate_tables

    tables, manifest = load_canonical(project)
    report = validate_tables(
        tables, params.validation, project.data_docs_dir, now=now, quarantine_dir=project.quarantine_dir
    )
    record = {
        **report.to_dict(),
        "summary": report.summary(),
        "canonical_manifest_sha256": file_sha256(project.canonical_dir / MANIFEST),
        "raw_dvc_hash": manifest["raw_dvc_hash"],
        "dataset": manifest["dataset"],
        "params_hash": params.section_hash("validation"),
        "created_at": utc_now(),
    }
    write_json_atomic(project.validation_report, record)
    log.info("%s", report.summary())
    if not report.success:
        raise ValidationFailed(report.summary())
    return report


def build_sequences(project: Project, params: Params) -> dict:
    """Validated canonical tables -> data/sequences/{sequences,users,items}.parquet + manifest.json.

    Refuses tables that have not passed validation: reports/validation.json must say success
    for exactly the canonical tables on disk. The interactions validation quarantined (the
    repair rules' drops, reports/quarantine/) are left out.
    """
    interactions, tables, canonical = validated_interactions(project)
    quarantined = tables.interactions.height - interactions.height
    start = time.perf_counter()
    min_events, rule = params.validation.min_events_per_user, params.validation.short_users
    # Dense indices in sorted id order; the maps are saved as users.parquet / items.parquet.
    user_ids = interactions["user_id"].unique().sort()
    user_index = dense_codes(interactions["user_id"], user_ids).to_numpy()
    short = np.bincount(user_index, minlength=len(user_ids)) < min_events
    if rule == "drop" and short.any():
        kept_rows = ~short[user_index]
        user_index = (np.cumsum(~short) - 1)[user_index[kept_rows]].astype(np.int32)
        interactions = interactions.filter(pl.Series(kept_rows))
        user_ids = user_ids.filter(pl.Series(~short))
        log.info(
            "dropped %d users with fewer than %d events (validation.short_users=drop)",
            short.sum(),
            min_events,
        )
    item_ids = tables.items["item_id"].sort()
    events = pl.DataFrame(
        {
            "user_index": user_index,
            "item_index": dense_codes(interactions["item_id"], item_ids),
            "timestamp": interactions["timestamp"],
            "rating": interactions["rating"],
        }
    )
    users = pl.DataFrame({"user_index": pl.int_range(len(user_ids), dtype=pl.Int32, eager=True), "user_id": user_ids})
    items = pl.DataFrame({"item_index": pl.int_range(len(item_ids), dtype=pl.Int32, eager=True), "item_id": item_ids})
    sequences = split_sequences(events, params.sequences)

    categories = sorted(set(tables.items["categories"].explode().drop_nulls().to_list()))
    items_out = items.join(tables.items, on="item_id", maintain_order="left").with_columns(
        # An Enum's physical value is the position in `categories`. (replace_strict with an empty
        # mapping, data without categories, returns its list<str> input: SequenceData cannot read it.)
        category_index=pl.col("categories").list.eval(
            pl.element().cast(pl.Enum(categories)).to_physical().cast(pl.Int32)
        )
    )
    users_out = users.join(tables.users, on="user_id", how="left", maintain_order="left").join(
        sequences.select(
            "user_index",
            n_history=pl.col("history_item_index").list.len(),
            n_future=pl.col("future_item_index").list.len(),
        ),
        on="user_index",
        maintain_order="left",
    )
    manifest = {
        "stage": "sequences",
        "dataset": canonical["dataset"],
        "raw_dvc_hash": canonical["raw_dvc_hash"],
        "params_hash": params.section_hash("validation", "sequences"),
        "git_revision": git_revision(project.root),
        "created_at": utc_now(),
        "n_users": users_out.height,
        "n_items": items_out.height,
        "n_history_events": int(users_out["n_history"].sum()),
        "n_future_events": int(users_out["n_future"].sum()),
        "short_users": {"count": int(short.sum()), "min_events": min_events, "rule": rule},
        "quarantined_events": quarantined,  # left out: reports/quarantine/interactions.parquet
        "categories": categories,
        "rating_scale": canonical["rating_scale"],
    }
    with atomic_dir(project.sequences_dir) as staging:
        sequences.write_parquet(staging / "sequences.parquet")
        users_out.write_parquet(staging / "users.parquet")
        items_out.write_parquet(staging / "items.parquet")
        write_json_atomic(staging / MANIFEST, manifest)
    manifest["seconds"] = round(time.perf_counter() - start, 3)
    log.info(
        "sequences for %d users (%d history, %d future events)",
        manifest["n_users"],
        manifest["n_history_events"],
        manifest["n_future_events"],
    )
    return manifest


def validated_interactions(project: Project) -> tuple[pl.DataFrame, CanonicalTables, dict]:
    """The canonical interactions that passed validation, less the quarantined rows; with the
    canonical tables and their manifest (what the sequences stage and the event log read)."""
    tables, canonical = load_canonical(project)
    quarantine = _require_validated(project)
    return _without_quarantined(tables.interactions, quarantine), tables, canonical


def _without_quarantined(interactions: pl.DataFrame, quarantine: pl.DataFrame) -> pl.DataFrame:
    """The canonical interactions less the rows validation quarantined (by row number)."""
    keep = np.ones(interactions.height, dtype=bool)
    keep[quarantine[QUARANTINE_ROW].to_numpy()] = False
    return interactions.filter(pl.Series(keep))


def _require_validated(project: Project) -> pl.DataFrame:
    """Check that reports/validation.json passed the canonical tables on disk; returns the
    quarantined interactions that validation recorded (their file must be the one it wrote)."""
    path = project.validation_report
    if not path.exists():
        raise UserlensError("the canonical tables have not been validated: run `userlens validate` first")
    record = read_json(path)
    if record.get("canonical_manifest_sha256") != file_sha256(project.canonical_dir / MANIFEST):
        raise UserlensError(
            "reports/validation.json is for other canonical tables than those in data/canonical: "
            "run `userlens validate` first"
        )
    if not record.get("success"):
        raise ValidationFailed(
            "the canonical tables failed validation (reports/validation.json); fix the data and rerun"
        )
    quarantine = project.quarantine_dir / "interactions.parquet"
    recorded = (record.get("quarantine") or {}).get("sha256")
    if not quarantine.exists() or recorded != file_sha256(quarantine):
        raise UserlensError(
            f"{project.relative(quarantine)} is not the quarantine that reports/validation.json recorded: "
            "run `userlens validate` first"
        )
    return pl.read_parquet(quarantine)


def summary_markdown(project: Project, params: Params, stages: dict) -> str:
    """The data summary that `make run` prints and the Prefect flow publishes as an artifact."""
    ingest_info = stages.get("ingest", {})
    rows = ingest_info.get("rows", {})
    validation = read_json(project.validation_report) if project.validation_report.exists() else None
    seq = stages.get("sequences")
    lines = [
        f"# userlens data summary: {params.data.dataset} ({params.data.source})",
        "",
        "| | |",
        "|---|---|",
        f"| raw DVC hash | `{stages.get('raw_dvc_hash', 'n/a')}` |",
        f"| interactions | {rows.get('interactions', 0):,} |",
        f"| users | {rows.get('users', 0):,} |",
        f"| items | {rows.get('items', 0):,} |",
        f"| rating scale | {ingest_info.get('rating_scale')} ({ingest_info.get('rating_scale_origin')}; "
        f"{ingest_info.get('rating_scale_outside', 0):,} rated rows outside) |",
    ]
    if validation is not None:
        docs = validation.get("data_docs_index")
        lines.append(f"| validation | {'passed' if validation['success'] else 'FAILED'} |")
        lines.append(f"| Data Docs | `{project.relative(Path(docs)) if docs else 'n/a'}` |")
        if quarantine := validation.get("quarantine"):
            where = f"`{project.relative(Path(quarantine['file']))}`" if "file" in quarantine else "nothing written"
            lines.append(f"| quarantined interactions | {quarantine['rows']:,} ({drop_counts(quarantine)}): {where} |")
    if seq is not None:
        short = seq["short_users"]
        lines += [
            f"| sequence users | {seq['n_users']:,} (short users: {short['count']:,}, rule {short['rule']}) |",
            f"| history / future events | {seq['n_history_events']:,} / {seq['n_future_events']:,} |",
        ]
    if validation is not None:
        lines += ["", "```", validation["summary"], "```"]
    return "\n".join(lines) + "\n"


# --- learning: pretrain (Barlow Twins), baselines, evaluate ---------------------------------------

METHODS = ("barlow_twins", "dual_encoder", "als", "handcrafted", "random")
RUN_KEY = "run_key.txt"
BASELINES_SUMMARY = "baselines.json"  # what `baselines` made, beside the dual encoder
TRAINING_CODE = ("data.py", "model.py", "augment.py", "train.py", "pretraining.py", "distributed.py")
TRAINING_SECTIONS = {  # the params sections a trained model depends on (the dual encoder uses no augmentation)
    "barlow_twins": ("model", "augment", "pretrain"),
    "dual_encoder": ("model", "pretrain"),
}


def pretrain(project: Project, params: Params, progress: bool = True) -> dict:
    """data/sequences -> Barlow Twins encoder in data/models/barlow_twins/ + its user embeddings.

    With `pretrain.processes` > 1: the same, under torchrun (distributed.py); rank 0 exports."""
    from userlens import distributed
    from userlens.pretraining import train_barlow_twins

    if params.pretrain.processes > 1 and not distributed.launched():
        distributed.run_under_torchrun(project.root, params, "pretrain", params.pretrain.processes, progress)
        return read_json(project.model_dir("barlow_twins") / MANIFEST)
    data, labels, sequences = training_inputs(project, params)
    out_dir = model_dir(project, "barlow_twins", params, sequences)
    encoder, result = train_barlow_twins(data, params, labels, out_dir, progress)
    if not distributed.is_main():
        return {}
    return _export_model(project, out_dir, params, sequences, encoder, data, result)


def train_baselines(project: Project, params: Params, progress: bool = True) -> dict:
    """The comparison methods on the same sequences: dual encoder (same budget), ALS, handcrafted, random."""
    import torch

    from userlens import baselines, distributed
    from userlens.data import N_SPECIAL
    from userlens.pretraining import train_dual_encoder

    if params.pretrain.processes > 1 and not distributed.launched():
        distributed.run_under_torchrun(project.root, params, "baselines", params.pretrain.processes, progress)
        return read_json(project.model_dir("dual_encoder") / BASELINES_SUMMARY)
    data, labels, sequences = training_inputs(project, params)
    out_dir = model_dir(project, "dual_encoder", params, sequences)
    dual, result = train_dual_encoder(data, params, labels, out_dir, progress)
    if not distributed.is_main():  # the other baselines, and every export, are rank 0's
        return {}
    summary = {"dual_encoder": _export_model(project, out_dir, params, sequences, dual.encoder, data, result)}
    with torch.no_grad():  # the item tower's vectors in item_index order, for next-item ranking
        save_array_atomic(project.embeddings_dir / "dual_encoder.items.npy",
                          dual.item_embeddings().float().cpu().numpy()[N_SPECIAL:])  # fmt: skip

    seq_dir = project.sequences_dir
    als_users, als_items = baselines.als_factors(seq_dir, params.baselines, seed=params.pretrain.seed)
    save_array_atomic(project.embeddings_dir / "als.items.npy", als_items)
    identity = f"{params.section_hash('baselines', 'pretrain')}|{sequences['raw_dvc_hash']}|{sequences['params_hash']}"
    for method, vectors in (
        ("als", als_users),
        ("handcrafted", baselines.handcrafted_profile(seq_dir)),
        ("random", baselines.random_vectors(data.n_users, params.model.d_model, params.pretrain.seed)),
    ):
        version = f"{method}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"
        write_embeddings(project, method, [vectors], version)
        summary[method] = {"model_version": version, "dim": int(vectors.shape[1])}
    write_json_atomic(out_dir / BASELINES_SUMMARY, summary)
    return summary


def evaluate(project: Project, params: Params, progress: bool = True) -> dict:
    """Frozen embeddings of every method -> reports/metrics.json, report.md, label_curves.png."""
    from userlens.embeddings import read_embeddings
    from userlens.evaluate import build_tasks, evaluate_methods, history_favourite_category
    from userlens.geometry import geometry, neighbour_taste
    from userlens.pretraining import validation_users
    from userlens.report import GEOMETRY, write_report

    user_ids = pl.read_parquet(project.sequences_dir / "users.parquet", columns=["user_id"])["user_id"].to_list()
    embeddings, item_vectors = {}, {}
    for method in METHODS:
        path = project.embeddings_dir / f"{method}.parquet"
        if not path.exists():
            continue
        ids, vectors = read_embeddings(path)
        if ids != user_ids:
            raise UserlensError(f"{project.relative(path)} is for other users than data/sequences: rerun its stage")
        embeddings[method] = vectors
        items = path.with_name(f"{method}.items.npy")
        if items.exists():
            item_vectors[method] = np.load(items)
    if not embeddings:
        raise UserlensError("no embeddings in data/embeddings/: run `userlens pretrain` and `userlens baselines` first")
    held_out = validation_users(len(user_ids), params)  # their labels drive selection: not for testing
    tasks = {name: _without(task, held_out) for name, task in build_tasks(project.sequences_dir).items()}
    results = evaluate_methods(embeddings, tasks, params.evaluate, item_vectors=item_vectors, progress=progress)
    if params.evaluate.finetune.enabled:
        _add_finetuned(project, params, results, tasks, progress)
    favourite = history_favourite_category(project.sequences_dir)  # label-free: the history's own taste
    seed = params.pretrain.seed
    results[GEOMETRY] = {
        m: {**geometry(x, seed), **neighbour_taste(x, favourite, seed=seed)} for m, x in embeddings.items()
    }
    write_report(results, project.reports_dir, reference="barlow_twins", baseline="dual_encoder", tasks=tasks)
    return results


def _add_finetuned(project: Project, params: Params, results: dict, tasks: dict, progress: bool) -> None:
    """results[task][method]["finetune"] for the methods with a trained encoder."""
    from userlens.data import SequenceData
    from userlens.finetune import PROBE, finetune_methods, load_encoder
    from userlens.train import ENCODER

    data = SequenceData.load(project.sequences_dir, params.sequences.max_length)
    encoders = {}
    for method in ("barlow_twins", "dual_encoder"):
        if (project.model_dir(method) / ENCODER).exists():
            encoders[method] = load_encoder(project.model_dir(method), params.model, data)
    if not encoders:
        raise UserlensError("evaluate.finetune.enabled needs a trained encoder in data/models/: run pretrain first")
    evaluation = params.evaluate
    tuned = finetune_methods(encoders, params.model, data, tasks, evaluation.seeds, evaluation.test_fraction,
                             evaluation.finetune, params.pretrain.device, progress)  # fmt: skip
    for task, by_method in tuned.items():
        for method, curve in by_method.items():
            results[task][method][PROBE] = curve


def training_inputs(project: Project, params: Params):
    from userlens.data import SequenceData
    from userlens.evaluate import build_tasks

    manifest_path = project.sequences_dir / MANIFEST
    if not manifest_path.exists():
        raise UserlensError("no sequences in data/sequences/: run `userlens sequences` first")
    data = SequenceData.load(project.sequences_dir, params.sequences.max_length)
    tasks = build_tasks(project.sequences_dir).values()
    labels = {task.name: task.labels for task in tasks if task.kind == "classification"}
    return data, labels, read_json(manifest_path)


def model_dir(project: Project, method: str, params: Params, sequences: dict, folder: Path | None = None) -> Path:
    """data/models/<method>/ (or `folder`), emptied when its checkpoint came from other settings,
    data or training code: a resume continues only the same run (a finished one is then just reused)."""
    code = hashlib.sha256(b"".join((Path(__file__).parent / f).read_bytes() for f in TRAINING_CODE)).hexdigest()
    key = "|".join(
        [params.section_hash(*TRAINING_SECTIONS[method]), str(params.sequences.max_length),
         sequences["raw_dvc_hash"], sequences["params_hash"], code[:16]]
    )  # fmt: skip
    from userlens import distributed

    folder = project.model_dir(method) if folder is None else folder
    marker = folder / RUN_KEY
    if distributed.is_main():  # under torchrun: one process prepares it, the others wait
        if folder.exists() and (not marker.exists() or marker.read_text() != key):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)
    distributed.barrier()
    return folder


def _export_model(project: Project, model_dir: Path, params: Params, sequences: dict, encoder, data, result) -> dict:
    """Embeddings of every user -> data/embeddings/<method>.parquet; the run -> <model_dir>/manifest.json;
    the encoder behind those embeddings -> <model_dir>/encoder.pt (weights only, what the registry keeps)."""
    from userlens.embeddings import embed_sequences
    from userlens.train import ENCODER, atomic_save

    method, run_key = model_dir.name, (model_dir / RUN_KEY).read_text()
    version = f"{method}-{hashlib.sha256(run_key.encode()).hexdigest()[:10]}"
    batches = embed_sequences(encoder, project.sequences_dir, params.sequences.max_length, data.item_ids)
    rows = write_embeddings(project, method, batches, version)
    atomic_save({"model": {k: v.cpu() for k, v in encoder.state_dict().items()}}, model_dir / ENCODER)
    manifest = {
        "method": method,
        "model_version": version,
        "raw_dvc_hash": sequences["raw_dvc_hash"],
        "params_hash": params.section_hash(*TRAINING_SECTIONS[method]),
        "git_revision": git_revision(project.root),
        "created_at": utc_now(),
        "users": rows,
        "steps_run": result.steps_run,
        "batch_size": params.pretrain.batch_size,
        "selection": {
            "rule": result.selection,
            "step": result.selected_step,
            "reason": result.reason,
            "validation_score": result.best_score,
        },  # fmt: skip
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 2),
        "final": result.history[-1] if result.history else None,
    }
    write_json_atomic(model_dir / MANIFEST, manifest)
    log.info("%s: %d steps, selected step %d (%s), %d users exported", method, result.steps_run,
             result.selected_step, result.reason, rows)  # fmt: skip
    return manifest


def write_embeddings(project: Project, method: str, batches, version: str) -> int:
    from userlens.embeddings import export_embeddings

    user_ids = pl.read_parquet(project.sequences_dir / "users.parquet", columns=["user_id"])["user_id"]
    return export_embeddings(
        project.embeddings_dir / f"{method}.parquet", user_ids, batches, version, datetime.now(UTC)
    )


def _without(task, users: np.ndarray):
    labels = task.labels.copy()
    labels[users] = -1
    return dataclasses.replace(task, labels=labels)
