"""The dual encoder tuned on a label-free held-out split: each user's LAST history event.

The model trains on every history minus its last event and ranks that event among all items
(minus the shortened history): the SASRec way to validate, which never reads a future window
(the downstream test labels). One line per setting, side by side in one run. JSON in
benchmarks/out/dual_encoder-<dataset>.json.

    python benchmarks/dual_encoder.py                      # ML-100K: logQ, temperature, steps
    python benchmarks/dual_encoder.py --dataset ciao
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine  # noqa: E402

SETTINGS = {
    "200 steps, logQ": {"pretrain.steps": 200, "pretrain.logq_correction": True},
    "200 steps, no logQ": {"pretrain.steps": 200, "pretrain.logq_correction": False},
    "200 steps, no logQ, temperature 0.05": {"pretrain.steps": 200, "pretrain.logq_correction": False,
                                             "pretrain.temperature": 0.05},
    "600 steps, no logQ": {"pretrain.steps": 600, "pretrain.logq_correction": False},
}  # fmt: skip


def without_last_event(data):
    """The histories less their last event, and that event per user (users with >= 3 events)."""
    from userlens.data import PAD

    lengths = data.lengths
    last = data.items[torch.arange(data.n_users), (lengths - 1).clamp(min=0)].clone()
    short = dataclasses.replace(data, lengths=(lengths - 1).clamp(min=0))
    pad = torch.arange(data.items.shape[1])[None, :] >= short.lengths[:, None]
    short.items = data.items.masked_fill(pad, PAD)
    short.ratings = data.ratings.masked_fill(pad, 0.0)
    short.has_rating = data.has_rating & ~pad
    short.gaps = data.gaps.masked_fill(pad, 0.0)
    return short, last, np.flatnonzero((lengths >= 3).numpy())


def main() -> None:
    from userlens.config import load_params
    from userlens.data import N_SPECIAL, SequenceData
    from userlens.embeddings import embed_users
    from userlens.evaluate import hit_rate_at_k, ndcg_at_k, target_ranks
    from userlens.pretraining import train_dual_encoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    args = parser.parse_args()
    project = OUT / f"quality-{args.dataset}-project"
    if not (project / "data/sequences").exists():
        sys.exit(f"{project} has no sequences: run benchmarks/quality.py --dataset {args.dataset} first")
    base = load_params(project / "params.yaml")
    data = SequenceData.load(project / "data/sequences", base.sequences.max_length)
    short, last, users = without_last_event(data)
    rows = {}
    for name, overrides in SETTINGS.items():
        out = Path(tempfile.mkdtemp(prefix="userlens-de-"))
        started = time.perf_counter()
        model, _ = train_dual_encoder(short, base.with_overrides(overrides), {}, out, progress=False)
        shutil.rmtree(out, ignore_errors=True)
        with torch.no_grad():
            items = model.item_embeddings().float().numpy()
        scores = embed_users(model.encoder, short, users) @ items.T
        scores[:, :N_SPECIAL] = -np.inf
        for row, user in enumerate(users):
            scores[row, short.items[user, : short.lengths[user]].numpy()] = -np.inf
        ranks = target_ranks(scores, last[users].numpy())
        rows[name] = {"overrides": overrides, "hr@10": hit_rate_at_k(ranks, 10), "ndcg@10": ndcg_at_k(ranks, 10),
                      "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    (OUT / f"dual_encoder-{args.dataset}.json").write_text(json.dumps(rows, indent=2))
    print(f"Dataset: {args.dataset}; {len(users)} users. Machine: {machine()}\n")
    print("| setting | HR@10 | NDCG@10 | seconds |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['hr@10']:.3f} | {r['ndcg@10']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
