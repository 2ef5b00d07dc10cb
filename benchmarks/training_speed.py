"""Pretraining speed: sequences/s of a Barlow Twins step and its achieved FLOP/s vs the matmul peak.

In one run: (1) the machine's measured matmul peak (square float32 matmuls on the CPU, bf16 on
CUDA), (2) the model FLOPs of one training step (two views, forward + backward) counted by
torch.utils.flop_counter, (3) the wall time of that step. Achieved = FLOPs / time; the figure
is achieved / peak. Full-length sequences (every user has max_length events).

With --sequences (a project's data/sequences: real history lengths), also the same steps on
those users' histories, batches drawn at random (each padded to its longest user) against
batches of similar length (`pretrain.length_buckets`), the same batches timed in alternating
rounds in one run: sequences/s, useful (non-padding) events/s, padding share, FLOP ratio.

    python benchmarks/training_speed.py                  # CPU (and CUDA when present)
    python benchmarks/training_speed.py --batch 64 --length 100 --threads 1
    python benchmarks/training_speed.py --sequences benchmarks/out/quality-ml-100k-project/data/sequences
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, REPO, machine  # noqa: E402
from userlens.augment import two_views  # noqa: E402
from userlens.config import AugmentParams, ModelParams  # noqa: E402
from userlens.data import N_SPECIAL, Batch  # noqa: E402
from userlens.model import BarlowTwins, UserEncoder  # noqa: E402


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - started)


def full_batch(batch: int, length: int, n_items: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(
        items=torch.randint(N_SPECIAL, n_items + N_SPECIAL, (batch, length), generator=g),
        ratings=torch.rand(batch, length, generator=g),
        has_rating=torch.ones(batch, length, dtype=torch.bool),
        gaps=torch.rand(batch, length, generator=g) * 10,
        padding=torch.zeros(batch, length, dtype=torch.bool),
    )


def measure(device: torch.device, args) -> dict:
    torch.manual_seed(0)
    params = ModelParams(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, dropout=0.1)
    categories = torch.zeros(args.items + N_SPECIAL, 19)
    encoder = UserEncoder(params, args.items, 19, args.length, item_categories=categories)
    model = BarlowTwins(encoder, (256, 256), 0.005).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = full_batch(args.batch, args.length, args.items)
    generator = torch.Generator().manual_seed(1)
    autocast = device.type == "cuda"

    def step() -> None:
        view1, view2 = two_views(batch, AugmentParams(crop_prob=0.0), generator)  # full length: no crops
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(view1.to(device), view2.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(2):
        step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < args.seconds:
        step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - started) / steps
    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {
        "device": name,
        "sequences_per_s": args.batch / step_s,
        "step_ms": 1000 * step_s,
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / step_s / 1e9,
        "peak_gflops": peak / 1e9,
        "fraction_of_peak": flops / step_s / peak,
    }


def measure_buckets(device: torch.device, args) -> list[dict]:
    """Barlow Twins steps on real histories (augmentations as params.yaml's), random batches vs
    length buckets: FLOPs counted on each mode's batches once, then the same batches timed in
    alternating rounds (the machine is shared: both modes see the same noise)."""
    from userlens.config import load_params
    from userlens.data import SequenceData
    from userlens.train import epoch_order

    params = load_params(REPO / "params.yaml")
    data = SequenceData.load(args.sequences, args.length)
    torch.manual_seed(0)
    model = BarlowTwins(UserEncoder.for_data(params.model, data), (256, 256), 0.005).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = device.type == "cuda"

    def step(users: torch.Tensor, generator: torch.Generator) -> None:
        view1, view2 = two_views(data.batch(users), params.augment, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(view1.to(device), view2.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    users = torch.arange(data.n_users)
    modes = {"random batches": 1, f"length_buckets={args.buckets}": args.buckets}
    batches, flops = {}, {}
    for name, buckets in modes.items():
        order = epoch_order(users, 0, 0, args.batch, data.lengths, buckets)
        batches[name] = list(order[: len(order) // args.batch * args.batch].split(args.batch))[: args.steps]
        with FlopCounterMode(display=False) as counter:
            for users_ in batches[name]:
                step(users_, torch.Generator().manual_seed(1))
        flops[name] = counter.get_total_flops()
    seconds = dict.fromkeys(modes, 0.0)
    for _ in range(args.rounds):
        for name in modes:
            generator = torch.Generator().manual_seed(1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for users_ in batches[name]:
                step(users_, generator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - started
    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = []
    for name in modes:
        real = sum(int(data.lengths[u].sum()) for u in batches[name])
        computed = sum(len(u) * int(data.lengths[u].max()) for u in batches[name])
        per_round = seconds[name] / args.rounds
        rows.append({
            "batches": name, "steps": len(batches[name]),
            "sequences_per_s": len(batches[name]) * args.batch / per_round,
            "useful_events_per_s": real / per_round,
            "padding_share": 1 - real / computed,
            "achieved_gflops": flops[name] / per_round / 1e9,
            "fraction_of_peak": flops[name] / per_round / peak,
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per device")
    parser.add_argument("--sequences", type=Path, help="a data/sequences folder: also random vs length-bucketed "
                        "batches on its real history lengths")  # fmt: skip
    parser.add_argument("--buckets", type=int, default=8, help="pretrain.length_buckets of the bucketed mode")
    parser.add_argument("--steps", type=int, default=20, help="steps per mode per round (--sequences)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (--sequences)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [measure(d, args) for d in devices]
    buckets = {str(d): measure_buckets(d, args) for d in devices} if args.sequences else {}
    OUT.mkdir(exist_ok=True)
    (OUT / "training_speed.json").write_text(
        json.dumps({"machine": machine(), "args": vars(args), "rows": rows, "buckets": buckets}, indent=2, default=str)
    )
    print(f"Machine: {machine()}")
    print(f"Barlow Twins step: batch {args.batch}, length {args.length}, d_model {args.d_model}, "
          f"{args.layers} layers, two views, forward + backward + AdamW\n")  # fmt: skip
    print("| device | sequences/s | step ms | GFLOP/step | achieved GFLOP/s | matmul peak GFLOP/s | of peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['device']} | {r['sequences_per_s']:,.0f} | {r['step_ms']:,.0f} | {r['gflop_per_step']:.1f} | "
              f"{r['achieved_gflops']:,.1f} | {r['peak_gflops']:,.1f} | {r['fraction_of_peak']:.1%} |")  # fmt: skip

    for device, bucket_rows in buckets.items():
        print(f"\nReal history lengths ({args.sequences}), {device}, batch {args.batch}, max length {args.length}, "
              f"{args.steps} steps x {args.rounds} alternating rounds per mode\n")  # fmt: skip
        print("| batches | sequences/s | useful events/s | padding share | achieved GFLOP/s | of peak |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in bucket_rows:
            print(f"| {r['batches']} | {r['sequences_per_s']:,.0f} | {r['useful_events_per_s']:,.0f} | "
                  f"{r['padding_share']:.1%} | {r['achieved_gflops']:,.1f} | "
                  f"{r['fraction_of_peak']:.1%} |")  # fmt: skip
        ratio = bucket_rows[1]["useful_events_per_s"] / bucket_rows[0]["useful_events_per_s"]
        print(f"\nuseful events/s, buckets vs random: {ratio:.2f}x")


if __name__ == "__main__":
    main()
