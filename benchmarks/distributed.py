"""Distributed pretraining: sequences/s of `userlens pretrain` in 1 and 2 processes (torchrun, DDP).

Builds data/sequences for N synthetic users (the real data stages, in a scratch project under
benchmarks/out/distributed-project, reused when present), then runs the real command on copies
of it, alternating the process counts over several rounds in one run: `userlens --set
pretrain.processes=P pretrain` (P = 1 is the plain single-process path). Sequences/s is the
global batch times the steps over the training time that rank 0 records per round (curves:
`seq_per_s`; evaluation and checkpoints excluded); wall seconds are the whole command's.

On the CPU, P processes split the cores (OMP_NUM_THREADS = cores / P); on a CUDA machine,
`--cuda` measures one process in bf16 at the largest batch that fits (doubling until out of
memory).

    python benchmarks/distributed.py                      # 20k users, processes 1 and 2
    python benchmarks/distributed.py --users 5000 --steps 40 --rounds 2
    python benchmarks/distributed.py --cuda               # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, synthetic_sequences  # noqa: E402


def pretrain(template: Path, work: Path, settings: dict) -> dict:
    """One `userlens pretrain` on a fresh copy of the project (no checkpoint to resume)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work, symlinks=True, ignore=shutil.ignore_patterns("models", "embeddings"))
    sets = [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]
    started = time.perf_counter()
    command = [sys.executable, "-m", "userlens", "--project", str(work), *sets, "pretrain", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    import torch

    history = torch.load(work / "data/models/barlow_twins/checkpoint.pt", weights_only=True)["history"]
    return {"seq_per_s": statistics.mean(row["seq_per_s"] for row in history), "wall_s": wall}


def cpu_scaling(template: Path, args) -> list[dict]:
    base = {"pretrain.steps": args.steps, "pretrain.eval_every": args.steps, "pretrain.batch_size": args.batch,
            "pretrain.device": "cpu"}  # fmt: skip
    samples: dict[int, list[dict]] = {p: [] for p in args.processes}
    for round_ in range(args.rounds):
        for processes in args.processes if round_ % 2 == 0 else reversed(args.processes):
            work = OUT / f"distributed-run{processes}-project"
            result = pretrain(template, work, {**base, "pretrain.processes": processes})
            if "error" in result:
                raise SystemExit(f"{processes} processes: {result['error']}")
            samples[processes].append(result)
            print(f"round {round_ + 1}: {processes} process(es): {result['seq_per_s']:,.0f} sequences/s", flush=True)
    first = statistics.median(s["seq_per_s"] for s in samples[args.processes[0]])
    rows = []
    for processes, runs in samples.items():
        rate = statistics.median(s["seq_per_s"] for s in runs)
        rows.append({"processes": processes, "seq_per_s": round(rate, 1), "ratio": round(rate / first, 2),
                     "wall_s": round(statistics.median(s["wall_s"] for s in runs), 1)})  # fmt: skip
    return rows


def cuda_largest_batch(template: Path, args) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": "no CUDA device on this machine"}
    best, batch = None, args.batch
    while batch <= 1 << 16:
        settings = {"pretrain.steps": args.steps, "pretrain.eval_every": args.steps, "pretrain.batch_size": batch,
                    "pretrain.device": "cuda"}  # fmt: skip
        result = pretrain(template, OUT / "distributed-runcuda-project", settings)
        if "error" in result:  # out of memory (or the users ran out): the last batch that fitted
            break
        best = {"device": torch.cuda.get_device_name(0), "batch_size": batch, **result}
        print(f"cuda batch {batch}: {result['seq_per_s']:,.0f} sequences/s", flush=True)
        batch *= 2
    return best or {"cuda": "no batch fitted"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per run")
    parser.add_argument("--batch", type=int, default=128, help="global batch (CPU); the first batch tried on CUDA")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per process count")
    parser.add_argument("--cuda", action="store_true", help="one CUDA process in bf16 at the largest batch that fits")
    args = parser.parse_args()

    template = OUT / "distributed-project"
    synthetic_sequences(template, args.users, ["data.synthetic.n_items=5000"])
    result = {"machine": machine(), "users": args.users, "steps": args.steps, "batch_size": args.batch}
    if args.cuda:
        result["cuda"] = cuda_largest_batch(template, args)
    else:
        result["cpu"] = cpu_scaling(template, args)
        print(f"\nDDP on the CPU (gloo), {args.users:,} users, global batch {args.batch}, {args.steps} steps:\n")
        print("| processes | sequences/s | vs 1 process | wall s |\n|---:|---:|---:|---:|")
        for row in result["cpu"]:
            print(f"| {row['processes']} | {row['seq_per_s']:,.0f} | {row['ratio']:.2f}x | {row['wall_s']} |")
    OUT.mkdir(exist_ok=True)
    (OUT / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
