"""The worker side of a job: `JobContext`, what a runner is handed (config, inputs, progress,
checkpoints, cancel, the result). Used through `crs_core.jobs`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from .jobs_files import (_initial_status, _read_status_quiet, CANCEL_FILE, CHECKPOINTS_DIR, CHECKPOINT_SECONDS, FORMAT_VERSION, JobCancelled,
    LOCK_FILE, LOCK_WAIT_S, MANIFEST_FILE, MODEL_DIR, PROGRESS_FILE, RESULT_FILE, STATUS_FILE, list_checkpoints,
    read_input, read_progress, verify_checkpoint, _file_digest, _fsync_dir, _now_iso, _proc_start_time,
    _read_config, _write_json_atomic)


# -- worker side -----------------------------------------------------------------------------
class JobContext:
    """What a runner gets inside the worker: config, inputs, progress, cancel, checkpoints."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).resolve()
        self.meta = _read_config(self.folder)
        self.job_id: str = self.meta.get("job_id", self.folder.name)
        self.kind: str = self.meta.get("kind", "?")
        self.config: dict[str, Any] = dict(self.meta.get("config") or {})
        self.stop_signal: str | None = None
        self._lock_fh = None
        self._status: dict[str, Any] = _read_status_quiet(self.folder) or _initial_status()
        self._step_times: list[tuple[float, int, int]] = []  # (time, step, examples)
        self._last_ckpt_step: int | None = None
        self._last_ckpt_time = time.monotonic()  # the worker's start counts as one
        seconds = self.config.get("checkpoint_seconds", CHECKPOINT_SECONDS)
        self.checkpoint_seconds: float | None = float(seconds) if seconds else None
        rows = read_progress(self.folder)
        self._last_progress_step = int(rows[-1]["step"]) if rows else 0

    # ----- lifecycle
    def acquire_lock(self, wait: float = LOCK_WAIT_S) -> bool:
        """One worker per folder (released by the OS even on kill -9).

        Waits up to `wait` seconds: a worker killed a moment ago reads as dead as soon as its
        pid is reaped or a zombie, but the kernel may release its lock a little later."""
        import fcntl

        fh = open(self.folder / LOCK_FILE, "a+")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    fh.close()
                    return False
                time.sleep(0.2)
        self._lock_fh = fh
        return True

    def start(self) -> None:
        attempt = int(self._status.get("attempt") or 1)
        self._status.update(
            state="running",
            pid=os.getpid(),
            pid_start=_proc_start_time(os.getpid()),
            host=socket.gethostname(),
            attempt=attempt,
            started_at=self._status.get("started_at") or _now_iso(),
            message=None if attempt == 1 else f"resumed (attempt {attempt})",
            error=None,
            warnings=[],
        )
        self._write_status()
        self._cleanup_tmp()

    def finish(self, result: Mapping[str, Any], *, drop_checkpoints: bool = False) -> None:
        """Record the result, then (optionally) drop checkpoints, then publish `succeeded`: a
        watcher never sees the final state before the folder is final, and a crash in between
        is finished on restart from result.json + model/."""
        _write_json_atomic(self.folder / RESULT_FILE, dict(result))
        if drop_checkpoints:
            self.remove_checkpoints()
        self._status.update(state="succeeded", eta_seconds=0, message=None)
        self._write_status()

    def fail(self, error: str) -> None:
        self._status.update(state="failed", error=error, eta_seconds=None, message=None)
        self._write_status()

    def cancelled(self, message: str) -> None:
        self._status.update(state="cancelled", message=message, eta_seconds=None)
        self._write_status()

    def _write_status(self) -> None:
        self._status["updated_at"] = _now_iso()
        _write_json_atomic(self.folder / STATUS_FILE, self._status)

    def set_status(self, **fields: Any) -> None:
        self._status.update(fields)
        self._write_status()

    def warn(self, message: str) -> None:
        self.log(f"WARNING: {message}")
        self._status.setdefault("warnings", []).append(message)
        self._write_status()

    def _cleanup_tmp(self) -> None:
        root = self.folder / CHECKPOINTS_DIR
        if root.is_dir():
            for p in root.iterdir():
                if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                    shutil.rmtree(p, ignore_errors=True)
        for p in self.folder.glob(f".{MODEL_DIR}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    # ----- inputs, logging
    def read_input(self, name: str) -> list[Any] | dict[Any, Any]:
        return read_input(self.folder, name)

    def has_input(self, name: str) -> bool:
        return name in (self.meta.get("inputs") or {})

    def log(self, message: str) -> None:
        print(f"[{_now_iso()}] {message}", flush=True)

    # ----- progress and cancel
    def cancel_requested(self) -> bool:
        return self.stop_signal is not None or (self.folder / CANCEL_FILE).exists()

    def check_cancel(self) -> None:
        if self.cancel_requested():
            raise JobCancelled(self.stop_signal or "cancelled on request")

    def report(
        self,
        step: int,
        total_steps: int,
        *,
        epoch: float | None = None,
        loss: float | None = None,
        lr: float | None = None,
        examples: int = 0,
        log_every: int = 1,
    ) -> None:
        """Called after each optimizer step: progress line (every `log_every`) and status."""
        now = time.time()
        self._step_times.append((now, step, examples))
        self._step_times = self._step_times[-20:]
        throughput = eta = None
        if len(self._step_times) >= 2:
            (t0, s0, _), (t1, s1, _) = self._step_times[0], self._step_times[-1]
            n_ex = sum(e for _, _, e in self._step_times[1:])
            if t1 > t0 and s1 > s0:
                per_step = (t1 - t0) / (s1 - s0)
                throughput = n_ex / (t1 - t0)
                eta = per_step * max(0, total_steps - step)
        if loss is not None and not math.isfinite(loss):
            loss_val: float | None = None
        else:
            loss_val = None if loss is None else float(loss)
        if step <= self._last_progress_step:  # a resumed run repeats steps: theirs go first
            self.truncate_progress(step - 1)
        if step % max(1, log_every) == 0 or step == total_steps:
            with open(self.folder / PROGRESS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "epoch": epoch, "loss": loss_val, "lr": lr, "time": now}) + "\n")
            self._last_progress_step = step
        self._status.update(
            state="running",
            step=step,
            total_steps=total_steps,
            epoch=epoch,
            loss=loss_val,
            throughput=throughput,
            eta_seconds=eta,
        )
        self._write_status()

    def set_total(self, total_steps: int, step: int = 0) -> None:
        self._status.update(total_steps=total_steps, step=step)
        self._write_status()

    def truncate_progress(self, step: int) -> None:
        """Drop progress lines after `step` (before continuing from a checkpoint at `step`)."""
        path = self.folder / PROGRESS_FILE
        if not path.exists():
            return
        keep = [row for row in read_progress(self.folder) if int(row["step"]) <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in keep:
                fh.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
        self._last_progress_step = int(keep[-1]["step"]) if keep else 0

    def checkpoint_due(self, step: int, every_steps: int | None) -> bool:
        """Whether a trainer should save a checkpoint after ``step``: every ``every_steps``
        steps, and also when ``checkpoint_seconds`` have passed since the last checkpoint (or
        the worker's start): a job whose steps are slow, or killed before its first step
        checkpoint, loses at most that much work."""
        if every_steps and step % int(every_steps) == 0:
            return True
        return self.checkpoint_seconds is not None and time.monotonic() - self._last_ckpt_time >= self.checkpoint_seconds

    # ----- checkpoints
    @property
    def checkpoints_dir(self) -> Path:
        return self.folder / CHECKPOINTS_DIR

    @property
    def last_checkpoint_step(self) -> int | None:
        return self._last_ckpt_step

    def save_checkpoint(
        self,
        step: int,
        write: Callable[[Path], None],
        meta: Mapping[str, Any] | None = None,
        keep: int = 2,
    ) -> Path:
        """`write(tmp_dir)` writes the files; then a manifest (sizes, sha256) is added, the
        directory is renamed to ``checkpoints/step-<step>`` and all but the newest `keep` go."""
        root = self.checkpoints_dir
        root.mkdir(exist_ok=True)
        tmp = root / f".tmp-step-{step}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write(tmp)
            files = {}
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                    files[str(f.relative_to(tmp))] = {"bytes": f.stat().st_size, "sha256": _file_digest(f)}
            _write_json_atomic(
                tmp / MANIFEST_FILE,
                {"format_version": FORMAT_VERSION, "step": step, "created_at": _now_iso(), "files": files, "meta": dict(meta or {})},
            )
            _fsync_dir(tmp)
            final = root / f"step-{step}"
            if final.exists():
                old = root / f".old-step-{step}-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._last_ckpt_step = step
        self._last_ckpt_time = time.monotonic()
        for _s, p in list_checkpoints(self.folder)[max(1, keep) :]:
            shutil.rmtree(p, ignore_errors=True)
        self.log(f"checkpoint saved at step {step}")
        return final

    def load_checkpoint(self, read: Callable[[Path, dict[str, Any]], Any]) -> tuple[int, Any] | None:
        """Newest checkpoint that verifies and that `read(path, manifest)` loads; older ones are
        tried when a newer one is corrupt. None when there is none (a fresh start)."""
        candidates = list_checkpoints(self.folder)
        for step, path in candidates:
            try:
                manifest = verify_checkpoint(path)
                value = read(path, manifest)
            except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint falls back
                self.warn(f"checkpoint step-{step} is unusable ({exc}); trying an older one")
                continue
            self._last_ckpt_step = step
            self.log(f"resuming from checkpoint step {step}")
            return step, value
        if candidates:
            self.warn("no usable checkpoint left; starting from the beginning")
        return None

    # ----- final output
    @property
    def model_dir(self) -> Path:
        return self.folder / MODEL_DIR

    def save_output(self, write: Callable[[Path], None], name: str = MODEL_DIR) -> Path:
        """`write(tmp_dir)` writes the final model; the directory is then renamed to `name`."""
        final = self.folder / name
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def remove_checkpoints(self) -> None:
        shutil.rmtree(self.checkpoints_dir, ignore_errors=True)
