"""The served `user_interest`: interest versions, their export, Feast, incremental refresh.

train_interest      InterestFusion trained with the CTR model on every user's HISTORY
                    partitions -> future-window examples (what lifelong.evaluate does per split),
                    on the event vectors of the PRODUCTION encoder (the served Barlow Twins
                    version, from the registry) -> a new interest version in
                    data/lifelong/<dataset>/interest/<version>/: fusion.pt (weights only),
                    manifest.json (what it was trained on and with) and user_interest.parquet
                    (every user's vector over ALL their partitions, the open cache included)
publish_interest    a version -> Feast `user_interest_{blue,green}`, with the embeddings' cut-over
refresh_interest    new events -> partitions and summaries of the users who have them -> only
                    those users re-fused by the served version -> only their rows re-materialised;
                    every other served row stays as it was, bit for bit
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from userlens.config import Params
from userlens.errors import UserlensError
from userlens.io import atomic_dir, read_json, utc_now, write_json_atomic, write_parquet_atomic
from userlens.lifelong import ctr, pipeline
from userlens.lifelong.fusion import InterestFusion, build_inputs
from userlens.lifelong.partitions import rule_of
from userlens.project import Project

log = logging.getLogger(__name__)

SERVED_VARIANT = "base+interest"  # the fusion learns what the base profile does not already say
FUSION, MANIFEST, EXPORT = "fusion.pt", "manifest.json", "user_interest.parquet"
BATCH_USERS = 1024


@dataclass(frozen=True)
class InterestVersion:
    path: Path

    @property
    def version(self) -> str:
        return self.path.name

    @property
    def manifest(self) -> dict[str, Any]:
        return read_json(self.path / MANIFEST)

    @property
    def export(self) -> Path:
        return self.path / EXPORT

    def fusion(self) -> InterestFusion:
        shape = self.manifest["fusion"]
        module = InterestFusion(shape["text_dim"], shape["event_dim"], shape["dim"], shape["max_partitions"])
        module.load_state_dict(torch.load(self.path / FUSION, map_location="cpu", weights_only=True))
        return module.eval()


def versions_dir(project: Project, params: Params) -> Path:
    return project.lifelong_dir(params.data.dataset) / "interest"


def get_version(project: Project, params: Params, version: str | None = None) -> InterestVersion:
    """A trained interest version (the latest one when `version` is None)."""
    folder = versions_dir(project, params)
    if version is None:
        done = sorted(p for p in folder.glob("interest-*") if (p / MANIFEST).exists()) if folder.exists() else []
        if not done:
            raise UserlensError("no interest version yet: run `userlens fuse` (it trains one on the production model)")
        return InterestVersion(done[-1])
    if not (folder / version / MANIFEST).exists():
        raise UserlensError(f"no interest version {version!r} in {project.relative(folder)}")
    return InterestVersion(folder / version)


# --- training a version ----------------------------------------------------------------------------


def train_interest(project: Project, params: Params, progress: bool = True) -> dict[str, Any]:
    """A new interest version on the production encoder: trained, exported for every user (not served)."""
    from userlens.baselines import handcrafted_profile, item_category_matrix
    from userlens.lifelong.evaluate import history_inputs
    from userlens.registry import Registry
    from userlens.release import encoder_of
    from userlens.stages import load_items

    started = time.perf_counter()
    production = Registry(project).production()
    if production is None:
        raise UserlensError(
            "user_interest is built on the served encoder, and nothing is in production yet: "
            "run `userlens run` (or `userlens promote`) first"
        )
    settings = params.lifelong
    _bring_up_to_date(project, params, progress)
    tables = load_items(project)
    if tables.rating_scale is None:
        raise UserlensError("user_interest trains on liked items (rated high): this data has no ratings")
    event_encoder = encoder_of(project, production)
    inputs, user_ids, sequences, summariser = history_inputs(project, params, tables, event_encoder, progress)
    features = ctr.UserFeatures(ctr.standardised(handcrafted_profile(project.sequences_dir)), None, inputs)
    data = ctr.examples(sequences, tables.rating_scale)
    categories = torch.from_numpy(item_category_matrix(project.sequences_dir).toarray())
    model = ctr.fit(SERVED_VARIANT, data, features, categories, np.arange(len(user_ids)), settings.ctr,
                    settings.fusion.dim, settings.fusion.max_partitions, seed=0)  # fmt: skip
    fusion = model.fusion.eval()
    state = {name: tensor.detach().clone() for name, tensor in fusion.state_dict().items()}
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in state.values())).hexdigest()[:8]
    version = f"interest-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{digest}"
    manifest = {
        "version": version,
        "created_at": utc_now(),
        "dataset": params.data.dataset,
        "encoder_version": production.version,
        "summariser": summariser,
        "rule": rule_of(settings.partition),
        "text_encoder": settings.fusion.text_encoder,
        "fusion": {
            "text_dim": int(inputs.text.shape[2]),
            "event_dim": int(inputs.events.shape[2]),
            "dim": settings.fusion.dim,
            "max_partitions": settings.fusion.max_partitions,
        },
        "trained_on": {"variant": SERVED_VARIANT, "users": len(user_ids), "examples": int(len(data.label))},
    }
    with atomic_dir(versions_dir(project, params) / version) as staging:  # appears whole or not at all
        torch.save(state, staging / FUSION)
        write_json_atomic(staging / MANIFEST, manifest)
        rows = interest_rows(project, params, manifest, fusion, event_encoder)
        write_parquet_atomic(staging / EXPORT, rows)
    log.info("interest version %s: %d users", version, rows.height)
    return {"version": version, "users": rows.height, "encoder_version": production.version,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def skip_reason(project: Project, params: Params) -> str | None:
    """Why no interest version can be trained now (None: one can). The pipelines also check lifelong.serve."""
    from userlens.registry import Registry
    from userlens.stages import load_items

    if Registry(project).production() is None:
        return "nothing is in production yet, and the fusion reads the production encoder (`userlens run`)"
    if load_items(project).rating_scale is None:
        return "the data has no ratings to learn liking from"
    return None


def _bring_up_to_date(project: Project, params: Params, progress: bool) -> dict[str, Any]:
    """Log, partitions, summaries: each costs only what is new."""
    return {
        "log": pipeline.sync_log(project, params),
        "partitions": pipeline.partitions(project, params),
        "summaries": pipeline.summarise(project, params, progress),
    }


def interest_rows(
    project: Project,
    params: Params,
    manifest: dict[str, Any],
    fusion: InterestFusion,
    event_encoder,
    users: list[str] | None = None,
) -> pl.DataFrame:
    """user_id, user_interest, interest_version, n_partitions, interest_events of `users` (all the
    partitioned users when None), fused over all their partitions with `fusion`."""
    store = pipeline.partition_store(project, params)
    closed, open_rows = store.closed(users), store.open()
    if users is not None:
        open_rows = open_rows.filter(pl.col("user_id").is_in(pl.Series(users, dtype=pl.String).implode()))
    ids = users if users is not None else sorted(set(closed["user_id"]) | set(open_rows["user_id"]))
    texts = pipeline.summary_store(project, params).records(manifest["summariser"], store.rule_hash)
    texts = texts.join(closed.select("user_id", "partition"), on=["user_id", "partition"], how="semi")
    inputs = build_inputs(ids, closed, open_rows, texts.select("user_id", "partition", "text"), event_encoder,
                          project.sequences_dir, params.lifelong)  # fmt: skip
    with torch.no_grad():
        vectors = [fusion(inputs.rows(torch.arange(s, min(s + BATCH_USERS, len(ids))))).numpy()
                   for s in range(0, len(ids), BATCH_USERS)]  # fmt: skip
    counts = _user_counts(closed, open_rows)
    frame = pl.DataFrame({"user_id": ids}, schema={"user_id": pl.String})
    frame = frame.with_columns(
        user_interest=pl.Series(np.concatenate(vectors), dtype=pl.List(pl.Float32)),
        interest_version=pl.lit(manifest["version"]),
    )
    return frame.join(counts, on="user_id", how="left").with_columns(
        pl.col("n_partitions", "interest_events").fill_null(0)
    )


def _user_counts(closed: pl.DataFrame, open_rows: pl.DataFrame) -> pl.DataFrame:
    """Per user: closed partitions, and events in them and the open cache (it only grows: the log is append-only)."""
    partitions = closed.group_by("user_id").agg(n_partitions=pl.len(), closed_events=pl.col("n_events").sum())
    cached = open_rows.group_by("user_id").agg(open_events=pl.col("n_events").sum())
    both = partitions.join(cached, on="user_id", how="full", coalesce=True)
    return both.select(
        "user_id",
        n_partitions=pl.col("n_partitions").fill_null(0).cast(pl.Int64),
        interest_events=(pl.col("closed_events").fill_null(0) + pl.col("open_events").fill_null(0)).cast(pl.Int64),
    )


# --- serving -------------------------------------------------------------------------------------


def _layout(project: Project, params: Params):
    from userlens.feature_sets import INTEREST
    from userlens.feature_store import Layout

    return Layout.of(project.root / params.serving.repo, INTEREST)


def _slot_table(export: Path, at: datetime) -> pa.Table:
    from userlens.feature_sets import INTEREST, version_table

    return version_table(export, INTEREST, at)


def publish_interest(
    project: Project, params: Params, version: str | None = None, progress: bool = False
) -> dict[str, Any]:
    """Serve an interest version (the latest by default) from Feast: standby slot, check, cut-over."""
    from userlens.feature_store import publish_set

    chosen = get_version(project, params, version)
    return publish_set(_layout(project, params), params.serving, lambda at: _slot_table(chosen.export, at),
                       source=str(chosen.export), progress=progress)  # fmt: skip


def served_interest(project: Project, params: Params) -> dict | None:
    """The user_interest serving pointer (None when none is served)."""
    from userlens.feature_store import read_pointer

    return read_pointer(_layout(project, params))


def refresh_interest(project: Project, params: Params, progress: bool = False) -> dict[str, Any]:
    """Bring the served interest version up to date with the events that arrived since.

    Only users whose partitions changed (new events) are re-summarised and re-fused, with the
    served version's own fusion and encoder; their rows alone are re-materialised."""
    from userlens.errors import ServingError
    from userlens.feature_store import refresh_set
    from userlens.registry import Registry
    from userlens.release import encoder_of

    started = time.perf_counter()
    pointer = served_interest(project, params)
    if pointer is None:
        raise ServingError("no user_interest is served yet: run `userlens fuse` and `userlens materialize --interest`")
    served = get_version(project, params, pointer["model_version"])
    manifest = served.manifest
    _check_compatible(manifest, params)
    done = _bring_up_to_date(project, params, progress)
    store = pipeline.partition_store(project, params)
    current = _user_counts(store.closed(), store.open())
    exported = pl.read_parquet(served.export)
    compared = current.join(exported.select("user_id", "n_partitions", "interest_events"), on="user_id",
                            how="left", suffix="_served")  # fmt: skip
    changed = compared.filter(
        pl.col("n_partitions").ne_missing(pl.col("n_partitions_served"))
        | pl.col("interest_events").ne_missing(pl.col("interest_events_served"))
    )["user_id"].to_list()
    if changed:
        event_encoder = encoder_of(project, Registry(project).get(manifest["encoder_version"]))
        rows = interest_rows(project, params, manifest, served.fusion(), event_encoder, changed)
        merged = pl.concat([exported.join(rows.select("user_id"), on="user_id", how="anti"), rows])
        write_parquet_atomic(served.export, merged)
    refreshed = refresh_set(_layout(project, params), params.serving,
                            lambda version, at: _slot_table(served.export, at), progress)  # fmt: skip
    return {
        "version": served.version,
        "new_events": done["log"]["new_events"],
        "summaries_generated": done["summaries"]["generated"],
        "users_refused": len(changed),
        "materialized": refreshed["changed"],
        "users": refreshed["users"],
        "seconds": round(time.perf_counter() - started, 3),
    }


def _check_compatible(manifest: dict[str, Any], params: Params) -> None:
    """A served version refreshes with the settings it was trained with, or not at all."""
    from userlens.lifelong.summaries import summariser_identity

    settings = params.lifelong
    now = {
        "rule": rule_of(settings.partition),
        "summariser": summariser_identity(settings.summary, settings.llm.model),
        "text_encoder": settings.fusion.text_encoder,
    }
    changed = [f"{key}: {manifest[key]} -> {value}" for key, value in now.items() if manifest[key] != value]
    if changed:
        raise UserlensError(
            f"the lifelong settings changed since the served interest version {manifest['version']} "
            f"({'; '.join(changed)}): it cannot be refreshed; run `userlens fuse` for a new version "
            "and `userlens materialize --interest` to serve it"
        )
