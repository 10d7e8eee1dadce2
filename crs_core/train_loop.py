"""The training loop every trainer shares, readable top to bottom: device and seeds, the step
schedule (`_LoopSpec`), checkpoints and resume through the job hooks, the soft-label loss of
two-stage training, and `_run_loop` itself. Used through `crs_core.train`."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import train_dist
from .train_data import (TrainingError)

class _NoJob:
    """Hooks for running a trainer in-process without a job folder (no checkpoints)."""

    last_checkpoint_step = None

    def log(self, message: str) -> None:
        print(message, flush=True)

    def warn(self, message: str) -> None:
        print(f"WARNING: {message}", flush=True)

    def cancel_requested(self) -> bool:
        return False

    def report(self, step, total_steps, **kw) -> None:
        pass

    def set_total(self, total_steps, step=0) -> None:
        pass

    def truncate_progress(self, step) -> None:
        pass

    def save_checkpoint(self, step, write, meta=None, keep=2):
        return None

    def load_checkpoint(self, read):
        return None

    def checkpoint_due(self, step, every_steps) -> bool:
        return False

    def save_output(self, write, name="model"):
        raise NotImplementedError


def _hooks_or_default(hooks: Any, out_dir: Any) -> Any:
    if hooks is None:
        if out_dir is None:
            raise TrainingError("out_dir is required when training outside a job")
        return _NoJob()
    return hooks


def pick_device(preference: str | None = "auto"):
    import torch

    if preference and preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda", train_dist.cuda_device_index()) if train_dist.world().distributed else torch.device("cuda")
    return torch.device("cpu")


def _autocast(device):
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    py = random.getstate()
    npst = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "py_version": py[0],
        "py_state": torch.tensor(py[1], dtype=torch.int64),
        "py_gauss": py[2],
        "np_keys": torch.from_numpy(npst[1].astype(np.int64)),
        "np_pos": int(npst[2]),
        "np_has_gauss": int(npst[3]),
        "np_cached": float(npst[4]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((state["py_version"], tuple(int(x) for x in state["py_state"].tolist()), state["py_gauss"]))
    np.random.set_state(
        ("MT19937", state["np_keys"].numpy().astype(np.uint32), state["np_pos"], state["np_has_gauss"], state["np_cached"])
    )
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    import torch

    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _linear_warmup_decay(optimizer, warmup: int, total: int):
    import torch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class _LoopSpec:
    n_units: int
    units_per_step: int
    min_last: int
    epochs: int
    seed: int
    max_steps: int | None
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    max_grad_norm: float

    @classmethod
    def of(cls, n_units: int, units_per_step: int, min_last: int, cfg: Any) -> "_LoopSpec":
        """The schedule of a run of `cfg` over `n_units`, `units_per_step` a step on each process
        (a last, smaller step of fewer than `min_last` units is dropped). Across processes a step
        takes `units_per_step` x world size units, and a step needs one unit per process."""
        size = train_dist.world().size
        return cls(n_units, max(1, min(units_per_step * size, n_units)), max(min_last, size), cfg.epochs, cfg.seed,
                   cfg.max_steps, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.log_every, cfg.max_grad_norm)

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.n_units, self.units_per_step)
        return full + (1 if rest >= self.min_last else 0)

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, int(self.max_steps)) if self.max_steps else total


def soft_label_loss(logits, target, teacher_logits=None, alpha: float = 0.0, mask=None):
    """Per-row terms of ``L_finetune = L_ce + alpha * KL(P || y_hat)`` (paper equations 2-4).

    `logits` [rows, classes] give P = softmax(logits); `target` [rows] the real label's class;
    `teacher_logits` (same shape, no gradient) give the soft labels y_hat = softmax; `mask`
    (bool, same shape) removes classes from both distributions (a bi-encoder's other positives).
    Returns ``(ce, kl)``, each a [rows] tensor: ``ce_i = -log P_i[target_i]`` and
    ``kl_i = sum_j P_ij (log P_ij - log y_hat_ij)`` (masked classes contribute 0); ``kl`` is
    all zeros without teacher or with alpha == 0. The caller averages and adds
    ``ce.mean() + alpha * kl.mean()``."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    logp = F.log_softmax(logits, dim=-1)
    ce = -logp.gather(1, target.view(-1, 1)).squeeze(1)
    if teacher_logits is None or not alpha:
        return ce, torch.zeros_like(ce)
    t = teacher_logits.detach().float()
    if mask is not None:
        t = t.masked_fill(mask, float("-inf"))
    logq = F.log_softmax(t, dim=-1)
    p = logp.exp()
    if mask is not None:  # 0 * log(0 / 0) := 0, with finite values so no NaN reaches the gradient
        logp, logq = logp.masked_fill(mask, 0.0), logq.masked_fill(mask, 0.0)
    return ce, (p * (logp - logq)).sum(-1)


class _StageHooks:
    """A job's hooks seen by one stage of a two-stage run: progress on one axis (stage 2 after
    stage 1), checkpoints tagged with their stage, stage 1's model saved as ``stage1/``."""

    def __init__(self, hooks: Any, stage: int, offset: int, grand_total: int, output_name: str | None = None):
        self._h, self.stage, self.offset, self.grand_total = hooks, stage, offset, grand_total
        self.output_name = output_name
        self.last_checkpoint_step: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._h, name)

    def log(self, message: str) -> None:
        self._h.log(f"[stage {self.stage}] {message}")

    def report(self, step, total_steps, **kw) -> None:
        self._h.report(self.offset + step, self.grand_total, **kw)

    def set_total(self, total_steps, step=0) -> None:
        self._h.set_total(self.grand_total, self.offset + step)

    def truncate_progress(self, step) -> None:
        self._h.truncate_progress(self.offset + step)

    def save_checkpoint(self, step, write, meta=None, keep=2):
        out = self._h.save_checkpoint(step, write, {**dict(meta or {}), "stage": self.stage}, keep=keep)
        self.last_checkpoint_step = step
        return out

    def load_checkpoint(self, read):
        from .jobs import CheckpointError

        def read_stage(path: Path, manifest: dict[str, Any]):
            stage = (manifest.get("meta") or {}).get("stage", 1)
            if stage != self.stage:
                raise CheckpointError(f"{path.name} belongs to stage {stage}")
            return read(path, manifest)

        loaded = self._h.load_checkpoint(read_stage)
        if loaded is not None:
            self.last_checkpoint_step = loaded[0]
        return loaded

    def save_output(self, write, name="model"):
        return self._h.save_output(write, name=self.output_name or name)


def _trainable(model) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _run_loop(
    spec: _LoopSpec,
    *,
    hooks: Any,
    model,
    optimizer,
    scheduler,
    step_fn: Callable[[list[int]], tuple[float, int]],
    after_step: Callable[[int], bool] | None = None,
    extra_state: tuple[Callable[[Path], None], Callable[[Path], None]] | None = None,
) -> dict[str, Any]:
    """The optimizer-step loop shared by both trainers: resume, steps, report, checkpoints, cancel.

    `step_fn(idx)` gets the units of the whole step (the same on every process; each process
    computes its `train_dist.shard`), runs the backward passes and returns (the step's loss over
    all processes, units). `hooks` are `train_dist.rank_hooks`: only rank 0 writes.

    `after_step(done)` runs after each optimizer step (validation); True stops training there
    (early stopping). `extra_state` = (write(folder), read(folder)) keeps the caller's own state
    (e.g. the best weights so far) in every checkpoint.

    A run that cannot learn stops with a TrainingError instead of "succeeding": a loss that is
    not finite (NaN / inf), or a loss of exactly 0 at the first step (nothing to learn, e.g.
    every in-batch negative masked)."""
    import torch

    from .jobs import CheckpointError, JobCancelled

    total = spec.total_steps
    spe = spec.steps_per_epoch
    if total < 1:
        raise TrainingError(f"not enough training data for one step ({spec.n_units} units, {spec.units_per_step} per step)")
    if spec.units_per_step < train_dist.world().size:
        raise TrainingError(f"{spec.n_units} training units cannot feed {train_dist.world().size} processes "
                            "(each needs at least one a step); use fewer processes")
    params = _trainable(model)
    names = [n for n, _ in params]
    shapes = {n: tuple(p.shape) for n, p in params}
    losses: list[float] = []

    def write(tmp: Path, step: int) -> None:
        torch.save({n: p.detach().to("cpu") for n, p in params}, tmp / "model.pt")
        torch.save(
            {
                "step": step,
                "epoch": step // spe,
                "data_order": {"seed": spec.seed, "epoch": step // spe, "position": step % spe,
                               "steps_per_epoch": spe, "units_per_step": spec.units_per_step},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                "losses": losses[-1000:],
            },
            tmp / "trainer_state.pt",
        )
        if extra_state is not None:
            extra_state[0](tmp)

    def read(path: Path, manifest: dict[str, Any]):
        weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        if sorted(weights) != sorted(names):
            raise CheckpointError(f"{path}: its weights do not match this model's trainable parameters")
        for n, t in weights.items():
            if tuple(t.shape) != shapes[n]:
                raise CheckpointError(f"{path}: parameter {n} has shape {tuple(t.shape)}, expected {shapes[n]}")
        order = state.get("data_order", {})
        if order.get("steps_per_epoch") != spe or order.get("units_per_step") != spec.units_per_step:
            raise CheckpointError(f"{path}: written for a different data layout ({order}); cannot continue from it")
        return weights, state, path

    def save(step: int) -> None:
        hooks.save_checkpoint(step, lambda tmp: write(tmp, step), {"step": step, "total_steps": total}, keep=spec.keep_checkpoints)

    start = 0
    loaded = hooks.load_checkpoint(read)
    if loaded is not None:
        start, (weights, state, loaded_path) = loaded
        with torch.no_grad():
            for n, p in params:
                p.copy_(weights[n].to(p.device, p.dtype))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        losses = list(state.get("losses", []))
        if extra_state is not None:
            extra_state[1](loaded_path)
        hooks.truncate_progress(start)
    hooks.set_total(total, start)
    size = train_dist.world().size
    hooks.log(f"training: {total} steps ({spe} per epoch, {spec.epochs} epoch(s)), starting at step {start}"
              + (f", on {size} processes ({spec.units_per_step} units a step in all)" if size > 1 else ""))

    model.train()
    order_epoch, order = -1, []
    t_start = time.time()
    for step in range(start, total):
        if train_dist.main_says(hooks.cancel_requested()):  # every rank stops at the same step
            if step > 0 and hooks.last_checkpoint_step != step:
                save(step)
            raise JobCancelled(f"cancelled on request at step {step}/{total}")
        epoch = step // spe
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(spec.seed, epoch, spec.n_units), epoch
        pos = step % spe
        idx = order[pos * spec.units_per_step : (pos + 1) * spec.units_per_step]
        optimizer.zero_grad(set_to_none=True)
        loss, n_examples = step_fn(idx)
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at step {step + 1}: training diverged and cannot "
                                "learn; lower the learning rate (or raise the temperature)")
        if step == 0 and loss == 0.0:
            raise TrainingError("the loss is exactly 0 at step 1: there is nothing to learn (for the dense "
                                "retriever: every in-batch negative is masked, i.e. each batch's items are all "
                                "labels of its queries); give more varied examples or a larger batch")
        if spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], spec.max_grad_norm)
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
        done = step + 1
        hooks.report(done, total, epoch=round(done / spe, 4), loss=float(loss), lr=lr, examples=n_examples,
                     log_every=spec.log_every)
        stop = bool(after_step(done)) if after_step is not None else False
        if stop and done < total:
            hooks.log(f"early stop at step {done}/{total}")
            break
        if done < total and hooks.checkpoint_due(done, spec.checkpoint_every):  # every N steps or 60 s
            save(done)
    else:
        done = total
    if start >= total:
        done = total
    seconds = time.time() - t_start
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": done,
        "planned_steps": total,
        "resumed_from_step": start,
        "steps_this_run": done - start,
        "seconds_this_run": round(seconds, 2),
        "seconds_per_step": round(seconds / max(1, done - start), 3),
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "last_loss": losses[-1] if losses else None,
    }


# -- dense retriever -------------------------------------------------------------------------
