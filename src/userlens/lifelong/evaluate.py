"""Does `user_interest` help a downstream model? The lifelong evaluation (`userlens fuse`).

Without leakage: the partitions it reads are those of each user's HISTORY only (the event log
less the future window of data/sequences, partitioned by the same rule; closed partitions of
the history are the stored ones up to the split, so their summaries come from the cache), and
the CTR examples are the future window's rated events (lifelong.ctr). For every seed the
users are split into train and test, and every variant (ctr.VARIANTS) trains on the same
split, so the comparison is paired.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from userlens.baselines import handcrafted_profile, item_category_matrix
from userlens.config import Params
from userlens.errors import UserlensError
from userlens.io import read_json
from userlens.lifelong import ctr
from userlens.lifelong.fusion import build_inputs
from userlens.lifelong.partitions import partition_events, rule_hash, rule_of
from userlens.lifelong.summaries import Summaries, make_summariser
from userlens.project import Project

log = logging.getLogger(__name__)


def history_events(project: Project, log_events: pl.DataFrame) -> pl.DataFrame:
    """The logged events less every user's future window (data/sequences), in log order."""
    seq_dir = project.sequences_dir
    users = pl.read_parquet(seq_dir / "users.parquet", columns=["user_index", "user_id"])
    items = pl.read_parquet(seq_dir / "items.parquet", columns=["item_index", "item_id"])
    future = (
        pl.read_parquet(seq_dir / "sequences.parquet", columns=["user_index", "future_item_index", "future_timestamp"])
        .explode(["future_item_index", "future_timestamp"])
        .drop_nulls()
        .join(users, on="user_index")
        .join(items, left_on="future_item_index", right_on="item_index")
        .select("user_id", "item_id", timestamp="future_timestamp")
    )
    known = log_events.filter(pl.col("user_id").is_in(users["user_id"].implode()))
    return known.join(future, on=["user_id", "item_id", "timestamp"], how="anti", maintain_order="left")


def evaluate_interest(
    project: Project, params: Params, progress: bool = True, variants: tuple[str, ...] = ctr.VARIANTS
) -> dict[str, Any]:
    """CTR AUC / log loss of each variant over `lifelong.ctr.seeds` user splits."""
    from scipy import stats

    from userlens.stages import load_items

    started = time.perf_counter()
    settings = params.lifelong
    tables = load_items(project)
    if tables.rating_scale is None:
        raise UserlensError(
            "the lifelong CTR evaluation needs ratings (a liked item is rated high): this data has none"
        )
    from userlens.release import candidate_encoder

    encoder = candidate_encoder(project, params)
    inputs, user_ids, sequences, summariser = history_inputs(project, params, tables, encoder, progress)
    base = ctr.standardised(handcrafted_profile(project.sequences_dir))
    bt = ctr.standardised(_aligned_embeddings(project.embeddings_dir / "barlow_twins.parquet", user_ids))
    features = ctr.UserFeatures(base, bt, inputs)
    data = ctr.examples(sequences, tables.rating_scale)
    categories = torch.from_numpy(item_category_matrix(project.sequences_dir).toarray())
    scores: dict[str, dict[str, list[float]]] = {v: {"auc": [], "log_loss": []} for v in variants}
    units = [(seed, variant) for seed in range(settings.ctr.seeds) for variant in variants]
    for seed, variant in tqdm(units, desc="CTR (seed x variant)", disable=not progress):
        rng = np.random.default_rng(1_000 + seed)
        order = rng.permutation(len(user_ids))
        n_test = int(round(len(order) * settings.ctr.test_fraction))
        test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
        result, _ = ctr.fit_and_score(variant, data, features, categories, train, test, settings.ctr,
                                      settings.fusion.dim, settings.fusion.max_partitions, seed)  # fmt: skip
        for metric, value in result.items():
            scores[variant][metric].append(value)
    summary = {v: {m: _stat(values) for m, values in by.items()} for v, by in scores.items()}
    best_without = max((v for v in variants if "interest" not in v), key=lambda v: summary[v]["auc"]["mean"])
    paired = {}
    for variant in (v for v in variants if "interest" in v):
        diff = np.subtract(scores[variant]["auc"], scores[best_without]["auc"])
        p = (
            float(stats.ttest_rel(scores[variant]["auc"], scores[best_without]["auc"]).pvalue)
            if len(diff) > 1
            else None
        )
        paired[variant] = {"vs": best_without, "auc_gain_points": float(diff.mean() * 100), "p": p}
    return {
        "summariser": summariser,
        "text_encoder": settings.fusion.text_encoder,
        "examples": int(len(data.label)),
        "positive_share": float(data.label.mean()) if len(data.label) else float("nan"),
        "users": len(user_ids),
        "partitions": int(inputs.present.sum()),
        "variants": summary,
        "paired": paired,
        "seconds": round(time.perf_counter() - started, 1),
    }


def history_inputs(project: Project, params: Params, tables, event_encoder, progress: bool):
    """The fusion's inputs for every user of data/sequences, from their history partitions
    (summarised as needed); `event_encoder` is (encoder, vocabulary, max_length).
    Returns (inputs, user ids, sequences.parquet rows, summariser identity)."""
    from userlens.lifelong import pipeline

    settings = params.lifelong
    seq_dir = project.sequences_dir
    users = pl.read_parquet(seq_dir / "users.parquet", columns=["user_index", "user_id"]).sort("user_index")
    user_ids = users["user_id"].to_list()
    sequences = pl.read_parquet(seq_dir / "sequences.parquet").sort("user_index")
    logged = pipeline.event_log(project, params)
    if not logged.n_events:
        raise UserlensError("the event log is empty: run `userlens partitions` first")
    closed, open_rows = partition_events(history_events(project, logged.read()), settings.partition)
    manifest = read_json(seq_dir / "manifest.json")
    # History partitions are named apart from the stored ones: (user, index) means another set here.
    tag = f"{rule_hash(rule_of(settings.partition))}|history|{manifest['raw_dvc_hash']}|{manifest['params_hash']}"
    store: Summaries = pipeline.summary_store(project, params)
    summariser = make_summariser(settings.summary, settings.llm.model, settings.llm.device)
    store.update(closed, tag, summariser, tables.items, tables.rating_scale, settings.summary, progress)
    texts = store.records(summariser.identity, tag).select("user_id", "partition", "text")
    inputs = build_inputs(user_ids, closed, open_rows, texts, event_encoder, seq_dir, settings)
    return inputs, user_ids, sequences, summariser.identity


def _aligned_embeddings(path: Path, user_ids: list[str]) -> np.ndarray:
    """An export's vectors, which are in data/sequences' user order (as stages.evaluate requires)."""
    from userlens.embeddings import read_embeddings

    if not path.exists():
        raise UserlensError(f"{path} not found: run `userlens pretrain` first")
    ids, vectors = read_embeddings(path)
    if ids != user_ids:
        raise UserlensError(f"{path} is for other users than data/sequences: rerun `userlens pretrain`")
    return vectors


def _stat(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.nanmean(array)), "std": float(np.nanstd(array)), "per_seed": [float(v) for v in array]}


def markdown(result: dict[str, Any]) -> str:
    """The CTR table of one evaluation, for reports/lifelong.md and BENCHMARKS.md."""
    lines = [
        f"CTR on {result['dataset']}: {result['examples']:,} future events of {result['users']:,} users "
        f"({result['positive_share']:.0%} liked), {result['partitions']:,} partitions; summaries by "
        f"`{result['summariser']}`, text encoder `{result['text_encoder']}`",
        "",
        "| variant | AUC | log loss |",
        "|---|---:|---:|",
    ]
    for variant, stat in result["variants"].items():
        auc, loss = stat["auc"], stat["log_loss"]
        lines.append(f"| {variant} | {auc['mean']:.4f} ± {auc['std']:.4f} | {loss['mean']:.4f} ± {loss['std']:.4f} |")
    lines.append("")
    for variant, pair in result["paired"].items():
        p = "n/a" if pair["p"] is None else f"{pair['p']:.3f}"
        lines.append(f"- {variant} vs {pair['vs']}: {pair['auc_gain_points']:+.2f} AUC points (paired t-test p = {p})")
    return "\n".join(lines) + "\n"
