"""The training loop shared by Barlow Twins and the dual encoder (the loop only; models live in model.py).

- device chosen automatically (CUDA -> MPS -> CPU), bf16 autocast on CUDA;
- AdamW with linear warm-up and cosine decay, gradient clipping;
- a checkpoint at the end of every epoch (model, optimiser, schedule, RNG, history), written
  atomically; `fit` resumes from it, and a resumed run ends exactly where an uninterrupted one
  does because every epoch's shuffling and augmentation draw from generators seeded by
  (seed, epoch) and the global RNG state is restored;
- early stopping on a validation score (higher is better), keeping the best weights;
- a collapse monitor each epoch: per-dimension std and effective rank of the embeddings;
- per-epoch curves in a CSV for `dvc plots`, and a progress bar with loss and throughput.
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

from userlens.config import PretrainParams
from userlens.io import atomic_file

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"  # the latest epoch: what a resume starts from
BEST = "best.pt"  # the weights with the best validation score
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
    """The RNG of one epoch: the same (seed, epoch) always draws the same batches and views."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + salt)


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def collapse_stats(embeddings: np.ndarray) -> dict[str, float]:
    """Mean per-dimension std and effective rank (exp of the entropy of the normalised singular
    values; Roy & Vetterli 2007): both fall towards 0 / 1 when the embeddings collapse."""
    x = embeddings.astype(np.float64) - embeddings.mean(axis=0, keepdims=True)
    singular = np.linalg.svd(x, compute_uv=False)
    p = singular / max(singular.sum(), 1e-12)
    entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
    return {"embedding_std": float(x.std(axis=0).mean()), "effective_rank": float(np.exp(entropy))}


@dataclass
class FitResult:
    epochs_run: int
    best_epoch: int
    best_score: float
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


# step_loss(model, user_indices, generator) -> scalar loss tensor (on the model's device)
StepLoss = Callable[[torch.nn.Module, torch.Tensor, torch.Generator], torch.Tensor]


def fit(
    model: torch.nn.Module,
    step_loss: StepLoss,
    embed: Callable[[torch.nn.Module], np.ndarray],
    score: Callable[[np.ndarray], float],
    train_users: np.ndarray,
    params: PretrainParams,
    out_dir: Path,
    *,
    desc: str = "train",
    progress: bool = True,
    stop_after_epochs: int | None = None,
) -> FitResult:
    """Train, checkpointing every epoch into `out_dir`; resume from its checkpoint if present.

    `stop_after_epochs` ends this call early (as a kill after that epoch's checkpoint would):
    calling `fit` again resumes. The best weights end up in `out_dir/best.pt` and in `model`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    batch_size = min(params.batch_size, len(train_users))
    steps_per_epoch = max(1, len(train_users) // batch_size)  # drop the ragged last batch (BatchNorm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(params.epochs * steps_per_epoch, params.warmup_fraction)
    )
    state = {"epoch": 0, "best_epoch": 0, "best_score": -math.inf, "bad_epochs": 0, "history": []}
    if (out_dir / CHECKPOINT).exists():
        state = _load_checkpoint(out_dir / CHECKPOINT, model, optimizer, schedule)
        log.info("%s: resuming after epoch %d", desc, state["epoch"])
    if state["epoch"] == 0:
        torch.manual_seed(params.seed)  # dropout's RNG; later epochs restore it from the checkpoint
    autocast = device.type == "cuda"
    users = torch.as_tensor(train_users, dtype=torch.long)
    started, ran = time.perf_counter(), 0

    while state["epoch"] < params.epochs and state["bad_epochs"] < params.patience:
        epoch = state["epoch"] + 1
        generator = epoch_generator(params.seed, epoch)
        order = users[torch.randperm(len(users), generator=generator)]
        model.train()
        losses, t0 = [], time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} {epoch}/{params.epochs}", disable=not progress, leave=False)
        for step in bar:
            batch_users = order[step * batch_size : (step + 1) * batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = step_loss(model, batch_users, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            rate = (step + 1) * batch_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", seq_per_s=f"{rate:,.0f}")
        model.eval()
        embeddings = embed(model)
        val = float(score(embeddings))
        row = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "val_score": val,
            "lr": schedule.get_last_lr()[0],
            "seq_per_s": steps_per_epoch * batch_size / (time.perf_counter() - t0),
            **collapse_stats(embeddings),
        }
        state["history"].append(row)
        state["epoch"] = epoch
        if val > state["best_score"]:
            state.update(best_epoch=epoch, best_score=val, bad_epochs=0)
            atomic_save({"model": model.state_dict()}, out_dir / BEST)
        else:
            state["bad_epochs"] += 1
        atomic_save(_checkpoint(state, model, optimizer, schedule), out_dir / CHECKPOINT)
        _write_curves(state["history"], out_dir / CURVES)
        log.info(
            "%s epoch %d: loss %.4f, val %.4f, effective rank %.1f",
            desc,
            epoch,
            row["loss"],
            val,
            row["effective_rank"],
        )
        ran += 1
        if stop_after_epochs is not None and ran >= stop_after_epochs:
            break

    finished = state["epoch"] >= params.epochs or state["bad_epochs"] >= params.patience
    if finished and (out_dir / BEST).exists():
        model.load_state_dict(torch.load(out_dir / BEST, map_location=device, weights_only=True)["model"])
    return FitResult(
        epochs_run=state["epoch"],
        best_epoch=state["best_epoch"],
        best_score=state["best_score"],
        stopped_early=state["bad_epochs"] >= params.patience,
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


def _load_checkpoint(path: Path, model, optimizer, schedule) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=True)
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
