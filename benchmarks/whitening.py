"""The whitening shrinkage of the Barlow Twins export, on the label-free neighbour-taste criterion.

Reads the trained Barlow Twins encoder of a quality project (run benchmarks/quality.py for the
dataset first), takes its raw output (whitening off), refits the whitening at each shrinkage
and reports the geometry of the exported vectors: effective rank, random-pair cosine, and how
often the top-10 cosine neighbours share the user's favourite HISTORY category (no downstream
label is read). JSON in benchmarks/out/whitening-<dataset>.json.

    python benchmarks/whitening.py --dataset ml-100k
    python benchmarks/whitening.py --dataset ciao
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine  # noqa: E402

SHRINKAGES = (0.3, 0.1, 0.03, 0.01, 0.0)


def main() -> None:
    from userlens.config import load_params
    from userlens.data import SequenceData
    from userlens.embeddings import embed_users
    from userlens.evaluate import history_favourite_category
    from userlens.geometry import geometry, neighbour_taste
    from userlens.model import UserEncoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    args = parser.parse_args()
    project = OUT / f"quality-{args.dataset}-project"
    weights = project / "data/models/barlow_twins/encoder.pt"
    if not weights.exists():
        sys.exit(f"{weights} not found: run benchmarks/quality.py --dataset {args.dataset} first")
    params = load_params(project / "params.yaml")
    data = SequenceData.load(project / "data/sequences", params.sequences.max_length)
    encoder = UserEncoder.for_data(params.model, data)
    encoder.load_state_dict(torch.load(weights, weights_only=True)["model"])
    encoder.output_mean.zero_()
    encoder.output_whitening.copy_(torch.eye(encoder.d_model))
    raw = embed_users(encoder, data)
    favourite = history_favourite_category(project / "data/sequences")
    rows = {"raw": {**geometry(raw), **neighbour_taste(raw, favourite)}}
    for shrinkage in SHRINKAGES:
        encoder.fit_whitening(torch.from_numpy(raw), shrinkage)
        vectors = embed_users(encoder, data)
        rows[str(shrinkage)] = {**geometry(vectors), **neighbour_taste(vectors, favourite)}
    (OUT / f"whitening-{args.dataset}.json").write_text(json.dumps(rows, indent=2))
    print(f"Dataset: {args.dataset}. Machine: {machine()}\n")
    print("| shrinkage | effective rank | random-pair cosine | neighbours same favourite | lift |")
    print("|---|---:|---:|---:|---:|")
    for name, g in rows.items():
        print(f"| {name} | {g['effective_rank']:.1f} / {g['dim']} | {g['random_pair_cosine']:.3f} | "
              f"{g['neighbour_same_favourite']:.3f} | {g['lift']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
