"""Training across processes: the one training loop, on one process or many (DDP).

Launched by ``torchrun`` (``python -m torch.distributed.run``), every process gets WORLD_SIZE,
RANK and LOCAL_RANK in its environment; without them the run is one process (world size 1) and
everything here is a no-op, so the trainers have no second code path:

- `init` starts the process group: gloo on CPU, nccl on CUDA (one GPU per LOCAL_RANK).
- `wrap` puts the model in DistributedDataParallel for the training forward passes (the bare
  model stays what checkpoints and the saved model are written from, so their parameter names
  do not depend on the world size, and a run can resume on another number of processes).
- The config's batch size is per process: each optimizer step takes ``batch x world`` units of
  the same seeded order a single process uses, and `shard` gives rank r the r-th contiguous
  block of them. 2 processes x batch b therefore see, step by step, exactly the examples one
  process sees with batch 2b.
- Rank 0 alone writes: progress, logs, checkpoints, the job record and the final model (the
  other ranks get `rank_hooks`, which read the job folder and write nothing). Rank 0's cancel
  flag is broadcast so every rank stops at the same step.

`launch_command` builds the torchrun command line that `crs_core.jobs` runs for a job whose
config has ``nproc`` > 1; it binds the rendezvous to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .train_data import TrainingError

NPROC_KEY = "nproc"  # the job-config key: processes a training job runs on (default 1)


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the run, from torchrun's environment (one process without it)."""
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    raw = {n: os.environ.get(n) for n in names}
    if raw["WORLD_SIZE"] is None:
        return World()
    try:
        size, rank = int(raw["WORLD_SIZE"]), int(raw["RANK"] or 0)
        local = int(raw["LOCAL_RANK"] if raw["LOCAL_RANK"] is not None else rank)
    except ValueError:
        raise TrainingError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers, got {raw}") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise TrainingError(f"inconsistent torchrun environment {raw}: need 0 <= RANK < WORLD_SIZE")
    return World(size, rank, local)


def init(device) -> World:
    """Start the process group once (gloo on CPU, nccl on CUDA); the world this process is in."""
    w = world()
    if w.distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return w


def init_job_group() -> None:
    """The process group of a job's worker, started before the job's device is known: gloo for
    CPU tensors, and nccl for CUDA tensors where there is a GPU."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world().local_rank)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def cuda_device_index() -> int:
    """The GPU of this process: one per LOCAL_RANK."""
    return world().local_rank


def wrap(model, device):
    """The model the training forward passes go through: DDP when distributed, else `model`."""
    if not world().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # buffers here are constants (position ids, rotary frequencies; no batch norm): broadcasting
    # them would add a collective to every forward, and then ranks with different numbers of
    # micro-batches in a step (a short last step) would wait on each other forever
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def sync_gradients(forward_model, sync: bool):
    """Context of one backward pass: gradients are averaged across ranks only when `sync` (the
    last micro-batch of a step); the others accumulate locally (DDP's no_sync)."""
    if sync or not hasattr(forward_model, "no_sync"):
        return contextlib.nullcontext()
    return forward_model.no_sync()


def grad_scale() -> int:
    """DDP averages gradients over ranks; a loss normalised by the GLOBAL count (tokens of the
    whole step) is multiplied by this so the average is the sum a single process computes."""
    return world().size


def shard_sizes(n: int, size: int | None = None) -> list[int]:
    """Units of each rank in a step of `n` units: contiguous blocks, sizes differing by <= 1."""
    size = world().size if size is None else size
    base, extra = divmod(n, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def shard(idx: Sequence[int], w: World | None = None) -> list[int]:
    """This rank's block of a step's units (all of them on one process)."""
    w = world() if w is None else w
    sizes = shard_sizes(len(idx), w.size)
    start = sum(sizes[: w.rank])
    return list(idx[start : start + sizes[w.rank]])


def all_sum(value: float) -> float:
    """The sum of `value` over all ranks (the value itself on one process)."""
    if not world().distributed:
        return float(value)
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def gather_rows(x, sizes: Sequence[int]):
    """Every rank's rows of `x` in rank order, with gradient (all_gather whose backward sums
    the gradient of each copy back to its rank). `sizes`: the rows of each rank."""
    if not world().distributed:
        return x
    import torch
    import torch.distributed.nn.functional as dist_fn

    width = max(sizes)  # all_gather needs the same shape on every rank; a short last step pads
    padded = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))]) if x.shape[0] < width else x
    with warnings.catch_warnings():
        # deprecated in favour of torch.distributed._functional_collectives, a private module;
        # the public function is the one whose backward (sum over ranks) is documented
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def main_says(flag: bool) -> bool:
    """Rank 0's `flag` on every rank (a cancel request seen by rank 0 stops them all together)."""
    if not world().distributed:
        return bool(flag)
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written the model the others read next)."""
    if world().distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def shutdown() -> None:
    if world().distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class _Follower:
    """The hooks of a rank other than 0: it reads what rank 0's hooks read (config, inputs,
    checkpoints) and writes nothing; logs go to its own stderr (torchrun prefixes the rank)."""

    def __init__(self, hooks: Any):
        self._h = hooks
        self.last_checkpoint_step: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._h, name)

    def log(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def report(self, step, total_steps, **kw) -> None:
        pass

    def set_total(self, total_steps, step=0) -> None:
        pass

    def truncate_progress(self, step) -> None:
        pass

    def checkpoint_due(self, step, every_steps) -> bool:
        return False

    def save_checkpoint(self, step, write, meta=None, keep=2):
        self.last_checkpoint_step = step
        return None

    def load_checkpoint(self, read):
        from .jobs import JobContext, list_checkpoints, verify_checkpoint

        if not isinstance(self._h, JobContext):  # e.g. a two-stage run's stage hooks, which filter by stage
            loaded = self._h.load_checkpoint(read)
            self.last_checkpoint_step = loaded[0] if loaded is not None else None
            return loaded
        for step, path in list_checkpoints(self._h.folder):  # as JobContext.load_checkpoint, without its log lines
            try:
                value = read(path, verify_checkpoint(path))
            except Exception:  # noqa: BLE001 - rank 0 reports the unusable checkpoint
                continue
            self.last_checkpoint_step = step
            return step, value
        return None

    def save_output(self, write, name="model"):
        return None


def rank_hooks(hooks: Any) -> Any:
    """`hooks` on rank 0 (and on one process); on the other ranks, hooks that write nothing."""
    if world().is_main or isinstance(hooks, _Follower):
        return hooks
    return _Follower(hooks)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(nproc: int, module: str, *args: str, port: int | None = None) -> list[str]:
    """``python -m torch.distributed.run`` running ``python -m <module> <args>`` on `nproc`
    processes of this machine, the rendezvous on 127.0.0.1 (a free port unless `port`)."""
    n = check_nproc(nproc)
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={n}",
            "--master_addr=127.0.0.1", f"--master_port={port or free_port()}", "-m", module, *args]


def launch_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a torchrun launch: gloo talks over the loopback interface unless told otherwise."""
    out = dict(env)
    out.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return out


def check_nproc(value: Any) -> int:
    """`value` as a number of processes (a whole number >= 1), else a TrainingError."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() \
            or int(value) < 1:
        raise TrainingError(f"{NPROC_KEY} must be a whole number >= 1, got {value!r}")
    return int(value)
