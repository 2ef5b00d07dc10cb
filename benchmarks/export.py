"""Embedding export: users/s and peak memory of streamed inference + Parquet export.

Builds data/sequences for N synthetic users (the real data stages, in a scratch project under
benchmarks/out/export-project, reused when present), then, in a fresh process, embeds every
user with a (randomly initialised) default encoder and writes the export Parquet the way the
pretrain stage does: chunks of users, batches cut from users sorted by history length (the
default) and, for comparison in the same run, from users in their stored order (mixed lengths,
each batch padded to its longest user). Padding share = padded positions / positions computed.

    python benchmarks/export.py                 # 1M users
    python benchmarks/export.py --users 100000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, emit, machine, run_worker, synthetic_sequences  # noqa: E402


def worker(project: Path, by_length: bool) -> None:
    import polars as pl
    import torch

    from userlens.config import load_params
    from userlens.data import SequenceData
    from userlens.embeddings import embed_sequences, export_embeddings
    from userlens.model import UserEncoder

    params = load_params(project / "params.yaml")
    sequences = project / "data" / "sequences"
    first = next(SequenceData.chunks(sequences, params.sequences.max_length, chunk_users=1))
    torch.manual_seed(0)
    encoder = UserEncoder.for_data(params.model, first).eval()
    positions = {"real": 0, "computed": 0}
    forward = encoder.forward

    def counting(batch):  # the positions each batch computes, and how many are real events
        positions["real"] += int((~batch.padding).sum())
        positions["computed"] += batch.padding.numel()
        return forward(batch)

    encoder.forward = counting
    user_ids = pl.read_parquet(sequences / "users.parquet", columns=["user_id"])["user_id"]
    started = time.perf_counter()
    rows = export_embeddings(
        project / "data" / "embeddings" / f"bench-{'sorted' if by_length else 'mixed'}.parquet",
        user_ids,
        embed_sequences(encoder, sequences, params.sequences.max_length, first.item_ids, by_length=by_length),
        "bench",
        datetime.now(UTC),
    )
    emit({"users": rows, "seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
          "padding_share": 1 - positions["real"] / positions["computed"]})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="sorted", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.mode == "sorted")
        return
    project = OUT / "export-project"
    print(f"preparing {args.users:,} synthetic users ...", file=sys.stderr)
    synthetic_sequences(project, args.users, ["data.synthetic.n_items=20000", "data.synthetic.mean_events_per_user=10"])
    results = {}
    for mode in ("mixed", "sorted"):
        print(f"export, batches {mode} ...", file=sys.stderr)
        results[mode] = run_worker(Path(__file__).resolve(), str(project), "--mode", mode)
    OUT.mkdir(exist_ok=True)
    (OUT / "export.json").write_text(json.dumps({"machine": machine(), **results}, indent=2))
    print(f"Machine: {machine()}\n")
    print("| batches | users | seconds | users/s | padding share | peak MiB | torch threads |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, label in (("mixed", "stored order (before)"), ("sorted", "sorted by length")):
        r = results[mode]
        print(f"| {label} | {r['users']:,} | {r['seconds']:.1f} | {r['users'] / r['seconds']:,.0f} | "
              f"{r['padding_share']:.1%} | {r['peak_rss_mib']:,.0f} | {r['threads']} |")  # fmt: skip
    print(f"\nspeed-up: {results['mixed']['seconds'] / results['sorted']['seconds']:.1f}x")


if __name__ == "__main__":
    main()
