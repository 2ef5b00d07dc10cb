"""The training loop shared by Barlow Twins and the dual encoder (the loop only; models live in model.py).

- the budget is counted in optimiser steps (`steps`, each of `batch_size` users), not epochs:
  a small dataset is then not starved (943 users at batch 128 are 7 steps an epoch) and a
  large one does not take hours per "epoch";
- device chosen automatically (CUDA -> MPS -> CPU), bf16 autocast on CUDA;
- AdamW with linear warm-up and cosine decay over the budget, gradient clipping;
- every `eval_every` steps (a round): the validation score, the collapse monitor (per-dimension
  std, effective rank), a row of curves.csv for `dvc plots`, and a checkpoint (model,
  optimiser, schedule, RNG, history) written atomically. `fit` resumes from it, and a resumed
  run ends exactly where an uninterrupted one does: step k's users come from the permutation
  of its epoch, seeded by (seed, epoch), its augmentations from a generator seeded by
  (seed, k), and the global RNG (dropout) is restored;
- selection: "last" exports the final weights (a fixed budget, chosen beforehand on validation
  users, e.g. by the sweep); "probe" keeps the round with the best validation score and stops
  after `patience` rounds without a better one. Which round was selected, and why, is returned.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from userlens import distributed
from userlens.config import TrainLoopParams
from userlens.geometry import effective_rank
from userlens.io import atomic_file

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"  # the latest round: what a resume starts from
BEST = "best.pt"  # the selected weights (the last round, or the best validation probe)
ENCODER = "encoder.pt"  # the final encoder alone: what evaluation and the registry load
CURVES = "curves.csv"


def pick_device(preference: str = "auto") -> torch.device:
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A seeded RNG: the same (seed, epoch, salt) always draws the same numbers."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + salt)


STEP_SALT = 104_729  # step generators never coincide with epoch generators
BUCKET_SALT = 15_485_863  # ... nor with the generator that shuffles length-sorted batches


def step_generator(seed: int, step: int) -> torch.Generator:
    """The RNG of one optimiser step (augmented views, sampled pairs)."""
    return epoch_generator(seed, step, STEP_SALT)


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def collapse_stats(embeddings: np.ndarray) -> dict[str, float]:
    """Mean per-dimension std and effective rank (geometry.effective_rank): both fall towards
    0 / 1 when the embeddings collapse."""
    std = embeddings.astype(np.float64).std(axis=0).mean()
    return {"embedding_std": float(std), "effective_rank": effective_rank(embeddings)}


@dataclass
class FitResult:
    steps_run: int
    selected_step: int
    selection: str  # "last" or "probe"
    reason: str  # why that step: one sentence for the manifest and the reports
    best_score: float  # validation score at the selected step
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def epoch_order(
    users: torch.Tensor,
    seed: int,
    epoch: int,
    batch_size: int,
    lengths: torch.Tensor | None = None,
    length_buckets: int = 1,
) -> torch.Tensor:
    """The users of one epoch, batch after batch: a seeded permutation. With `length_buckets` = W
    > 1, each window of W batches is sorted by history length, cut into batches, and the batches
    shuffled, so each batch holds users of about one length (little padding) while the users of a
    batch are still drawn at random from the window. Depends on (seed, epoch) only: resumable."""
    order = users[torch.randperm(len(users), generator=epoch_generator(seed, epoch))]
    if lengths is None or length_buckets <= 1:
        return order
    span, shuffle = batch_size * length_buckets, epoch_generator(seed, epoch, BUCKET_SALT)
    full = len(order) // batch_size * batch_size  # the ragged rest is never a step (see fit)
    pieces = []
    for start in range(0, full, span):
        window = order[start : min(start + span, full)]
        window = window[torch.argsort(lengths[window], stable=True)]
        batches = window.split(batch_size)
        pieces += [batches[i] for i in torch.randperm(len(batches), generator=shuffle)]
    return torch.cat([*pieces, order[full:]])


# step_loss(model, user_indices, generator) -> scalar loss tensor (on the model's device)
StepLoss = Callable[[torch.nn.Module, torch.Tensor, torch.Generator], torch.Tensor]


def fit(
    model: torch.nn.Module,
    step_loss: StepLoss,
    embed: Callable[[torch.nn.Module], np.ndarray],
    score: Callable[[np.ndarray], float],
    train_users: np.ndarray,
    params: TrainLoopParams,
    out_dir: Path,
    *,
    lengths: torch.Tensor | None = None,
    length_buckets: int = 1,
    desc: str = "train",
    progress: bool = True,
    stop_after_rounds: int | None = None,
) -> FitResult:
    """Train for `params.steps` steps, checkpointing every round into `out_dir`; resume from its
    checkpoint if present. `stop_after_rounds` ends this call early (as a kill after that
    round's checkpoint would): calling `fit` again resumes. The selected weights end up in
    `out_dir/best.pt` and in `model`. `lengths` (every user's history length) and
    `length_buckets` > 1 batch users of similar length together (epoch_order).

    Under torchrun (distributed.py) every process runs this loop on the same global batches;
    rank 0 alone evaluates and writes the checkpoints and curves."""
    out_dir = Path(out_dir)
    main = distributed.is_main()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    device = next(model.parameters()).device
    batch_size = min(params.batch_size, len(train_users))
    distributed.check_batch(batch_size)
    steps_per_epoch = max(1, len(train_users) // batch_size)  # drop the ragged last batch (BatchNorm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(params.steps, params.warmup_fraction))
    state = {"step": 0, "best_step": 0, "best_score": -math.inf, "bad_rounds": 0, "history": []}
    saved = _read_checkpoint(out_dir, desc)
    distributed.barrier()  # every process has read it before rank 0 sets an unreadable one aside
    if saved is None and main:
        _set_aside_unreadable(out_dir)
    if saved:
        state = _apply_checkpoint(saved, model, optimizer, schedule)
        log.info("%s: resuming after step %d", desc, state["step"])
    if state["step"] == 0:
        torch.manual_seed(params.seed)  # dropout's RNG; later rounds restore it from the checkpoint
    if not main:  # each process its own dropout masks (rank 0's are the checkpointed ones)
        torch.manual_seed(params.seed * 1_000_003 + state["step"] * 7_919 + distributed.rank())
    trained = distributed.wrap(model)  # what takes the steps (DistributedDataParallel under torchrun)
    autocast = device.type == "cuda"
    users = torch.as_tensor(train_users, dtype=torch.long)
    by_probe = params.selection == "probe"
    started, ran, order, order_epoch = time.perf_counter(), 0, users, -1
    bar = tqdm(total=params.steps, initial=state["step"], desc=desc, unit="step", disable=not (progress and main),
               leave=False)  # fmt: skip

    while state["step"] < params.steps and not (by_probe and state["bad_rounds"] >= params.patience):
        model.train()
        first = state["step"]
        last = min(params.steps, first + params.eval_every)
        losses, t0 = [], time.perf_counter()
        for step in range(first, last):
            epoch, slot = divmod(step, steps_per_epoch)
            if epoch != order_epoch:  # each epoch: one seeded permutation of the users
                order_epoch = epoch
                order = epoch_order(users, params.seed, epoch, batch_size, lengths, length_buckets)
            batch_users = order[slot * batch_size : (slot + 1) * batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = step_loss(trained, batch_users, step_generator(params.seed, step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(1)
            rate = len(losses) * batch_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", seq_per_s=f"{rate:,.0f}")
        train_seconds = time.perf_counter() - t0
        model.eval()
        row = None
        if main:
            embeddings = embed(model)
            row = {
                "step": last,
                "epoch": round(last * batch_size / len(users), 3),  # passes over the training users
                "sequences_seen": last * batch_size,
                "loss": float(np.mean(losses)),
                "val_score": float(score(embeddings)),
                "lr": schedule.get_last_lr()[0],
                "seq_per_s": len(losses) * batch_size / train_seconds,
                **collapse_stats(embeddings),
            }
        val = distributed.from_main(row["val_score"] if row else None)  # every process stops alike
        state["step"] = last
        better = not by_probe or val > state["best_score"]
        if better:
            state.update(best_step=last, best_score=val, bad_rounds=0)
        else:
            state["bad_rounds"] += 1
        if main:
            state["history"].append(row)
            if better:
                atomic_save({"model": model.state_dict()}, out_dir / BEST)
            atomic_save(_checkpoint(state, model, optimizer, schedule), out_dir / CHECKPOINT)
            _write_curves(state["history"], out_dir / CURVES)
            log.info("%s step %d: loss %.4f, val %.4f, effective rank %.1f", desc, last, row["loss"], val,
                     row["effective_rank"])  # fmt: skip
        ran += 1
        if stop_after_rounds is not None and ran >= stop_after_rounds:
            break
    bar.close()

    stopped_early = by_probe and state["bad_rounds"] >= params.patience
    finished = state["step"] >= params.steps or stopped_early
    distributed.barrier()  # rank 0 has written best.pt
    if finished and (out_dir / BEST).exists():
        model.load_state_dict(torch.load(out_dir / BEST, map_location=device, weights_only=True)["model"])
    if by_probe:
        reason = (f"best validation probe ({state['best_score']:.4f}) at step {state['best_step']} of "
                  f"{state['step']} run" + (f"; stopped after {params.patience} rounds without a better one"
                                            if stopped_early else ""))  # fmt: skip
    else:
        reason = f"last step of the fixed budget ({params.steps} steps of {batch_size} users)"
    return FitResult(
        steps_run=state["step"],
        selected_step=state["best_step"],
        selection=params.selection,
        reason=reason,
        best_score=state["best_score"],
        stopped_early=stopped_early,
        history=state["history"],
        seconds=time.perf_counter() - started,
    )


def _checkpoint(state: dict, model, optimizer, schedule) -> dict:
    return {
        **state,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


CHECKPOINT_KEYS = ("step", "best_step", "best_score", "bad_rounds", "history", "model", "optimizer", "schedule",
                   "torch_rng", "cuda_rng")  # fmt: skip


def _read_checkpoint(out_dir: Path, desc: str) -> dict | None:
    """The checkpoint to resume from: {} when there is none, None when it cannot be used.

    A checkpoint (or the best.pt beside it) that does not load with weights_only=True (damaged,
    truncated, or holding code, which is never run) is not resumed: training starts again from
    step 0, the safe restart. The run is seeded by (seed, step), so it ends where an
    uninterrupted run ends, only later; fit sets the unreadable files aside as
    <name>.unreadable."""
    from userlens.registry import RegistryError, load_checkpoint  # the one weights_only loader

    path = out_dir / CHECKPOINT
    if not path.exists():
        return {}
    try:
        saved = load_checkpoint(path, "set aside")
        if (out_dir / BEST).exists():
            load_checkpoint(out_dir / BEST, "set aside")
        if missing := [k for k in CHECKPOINT_KEYS if k not in saved]:
            raise RegistryError(f"not a training checkpoint (missing {missing})")
    except RegistryError as exc:
        log.warning("%s: %s is unreadable (%s): training again from step 0, the unreadable files set aside as "
                    "*.unreadable", desc, path, str(exc).splitlines()[0])  # fmt: skip
        return None
    return saved


def _set_aside_unreadable(out_dir: Path) -> None:
    for name in (CHECKPOINT, BEST):
        if (out_dir / name).exists():
            (out_dir / name).replace(out_dir / f"{name}.unreadable")


def _apply_checkpoint(saved: dict, model, optimizer, schedule) -> dict:
    model.load_state_dict(saved.pop("model"))
    optimizer.load_state_dict(saved.pop("optimizer"))
    schedule.load_state_dict(saved.pop("schedule"))
    torch.set_rng_state(saved.pop("torch_rng"))
    cuda_rng = saved.pop("cuda_rng")
    if cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    return saved


def atomic_save(obj: dict, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def _write_curves(history: list[dict], path: Path) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
