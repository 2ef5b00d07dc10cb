"""Pretraining over several processes: PyTorch's DistributedDataParallel under `torchrun`.

`pretrain.processes` > 1 makes `userlens pretrain` / `baselines` (and the flow and `dvc repro`,
which call the same stages) start `torchrun --standalone --nproc-per-node N -m userlens ...`:
one process per GPU with NCCL, or CPU processes with gloo. Under torchrun each process joins the
process group (`join`), and training stays the single-process computation, spread out:

- every process draws the same global batch (the seeded epoch order, the step's augmentations)
  and encodes only its own rows of it (`own_rows`);
- the encoder outputs are gathered from every process with gradients (`gather`), so what depends
  on the whole batch is computed on the whole batch, identically everywhere: Barlow Twins'
  batch-normalised cross-correlation (the projector's BatchNorm included), the dual encoder's
  (prefix, next item) pairs and its in-batch negatives;
- DistributedDataParallel averages the gradients. Every process computes the full loss, and the
  gather's backward sums the processes' gradients of each row, so the average is exactly the
  single-process gradient (BENCHMARKS.md, tests/test_distributed.py: equal within float rounding);
- rank 0 alone evaluates, checkpoints and exports; a checkpoint holds the unwrapped model and
  resumes under any number of processes (the global batch does not depend on it).

Dropout draws its own masks in each process (seeded by rank), so with dropout > 0 a run is
equal to one process in distribution, not bit for bit.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from userlens.errors import ConfigError, UserlensError

log = logging.getLogger(__name__)

_gather_group = None  # the gathers' own communicator: never interleaved with DDP's all-reduces


def launched() -> bool:
    """This process was started by torchrun as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> torch.device:
    """Join torchrun's process group (once); this process's device (its own GPU on CUDA)."""
    global _gather_group
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _die_with_parent(signal.SIGKILL)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _gather_group = dist.new_group()
        atexit.register(dist.destroy_process_group)
    return device


def _die_with_parent(sig: signal.Signals) -> None:
    """Linux: this process receives `sig` when its parent dies. torchrun starts each worker in a
    session of its own, so a kill of the command that launched them (its process group, a
    Prefect cancellation) would leave them training, writing checkpoints beside the next run."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # 1: PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before that took effect
            os._exit(128 + int(sig))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def check_batch(batch_size: int, processes: int | None = None) -> None:
    processes = processes or world_size()
    if batch_size % processes:
        raise ConfigError(
            f"pretrain.batch_size: a batch of {batch_size} users does not split evenly over "
            f"{processes} processes (pretrain.processes); use a multiple of {processes}"
        )


def own_rows(x):
    """This process's contiguous share of a global batch (a tensor or a data.Batch)."""
    if world_size() == 1:
        return x
    share = len(x) // world_size()
    start = rank() * share
    if isinstance(x, torch.Tensor):
        return x[start : start + share]
    return type(x)(**{f.name: getattr(x, f.name)[start : start + share] for f in fields(x)})


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x`, concatenated in rank order; gradients flow back to each process's rows."""
    return x if world_size() == 1 else _Gather.apply(x)


class _Gather(torch.autograd.Function):
    """all_gather forward; backward: each row's gradient summed over the processes (each computed
    the loss of the whole batch from these rows), then this process's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous(), group=_gather_group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=_gather_group)  # gloo has no reduce_scatter: sum all, keep ours
        return own_rows(grad)


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model DistributedDataParallel trains (the model itself in one process)."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def from_main(value):
    """Rank 0's `value`, in every process (what only rank 0 computed: the validation score)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def run_under_torchrun(project_root: Path, params, command: str, processes: int, progress: bool) -> None:
    """`userlens <command>` in `processes` processes (torchrun), on these exact settings; rank 0
    writes the outputs. Raises if any process fails (its error is printed above)."""
    check_batch(params.pretrain.batch_size, processes)
    with tempfile.TemporaryDirectory(prefix="userlens-torchrun-") as tmp:
        settings = Path(tmp) / "params.yaml"  # the settings as resolved here (overrides included)
        settings.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        argv = [sys.executable, "-m", "userlens.distributed", "--standalone", f"--nproc-per-node={processes}",
                "-m", "userlens", "--project", str(project_root), "--params", str(settings), command]  # fmt: skip
        if not progress:
            argv.append("--no-progress")
        threads = max(1, (os.cpu_count() or 1) // processes)  # the cores, shared out
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        log.info("%s over %d processes: %s", command, processes, " ".join(argv))
        # Rank 0's summary line is the caller's to print; errors and progress go to stderr.
        done = subprocess.run(argv, cwd=project_root, env=env, stdout=subprocess.DEVNULL, check=False)
    if done.returncode:
        raise UserlensError(
            f"`userlens {command}` over {processes} processes (pretrain.processes) failed with exit code "
            f"{done.returncode}: see the first error above"
        )


def torchrun(argv: list[str]) -> int:
    """torchrun (torch.distributed.run, same arguments), returning the first failed process's exit
    code instead of raising: a process's own error is what the user needs to read, not the
    launcher's traceback after it."""
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    _die_with_parent(signal.SIGTERM)  # torchrun ends its workers on SIGTERM
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run.run(run.parse_args(argv))
    except ChildFailedError as failed:
        code = failed.get_first_failure()[1].exitcode
        return code if code > 0 else 1  # killed by a signal: negative
    return 0


if __name__ == "__main__":  # python -m userlens.distributed <torchrun arguments>
    sys.exit(torchrun(sys.argv[1:]))
