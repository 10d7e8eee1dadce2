"""The background worker: ``python -m crs_core.job_worker <job_folder>``.

Started detached by ``crs_core.jobs.launch_job`` / ``resume_job`` (stdout and stderr go to the
folder's log.txt). It never opens the workspace: it reads the folder, runs the job's runner
with a :class:`crs_core.jobs.JobContext` and writes status, progress, checkpoints and the
result back to the folder.

Stopping: a ``cancel`` flag file is honoured between steps (the runner saves a checkpoint and
stops); SIGTERM stops at once (the last periodic checkpoint stays); SIGKILL is detected by the
app from the dead pid. Exit codes: 0 succeeded or cancelled, 1 failed, 2 unreadable folder,
3 another worker holds the folder.

A training job whose config has ``nproc`` > 1 runs this module under torchrun
(`crs_core.train_dist`): rank 0 is the worker described above; the other ranks run the same
runner with hooks that read the folder and write nothing (`_follow`).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

from . import jobs


def _offline_env() -> None:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")


def run(folder: str | os.PathLike, *, install_signals: bool = True) -> int:
    """Run the job in `folder` in this process; returns the exit code."""
    from . import train_dist

    _offline_env()
    folder = Path(folder)
    if not train_dist.world().distributed:
        return _run(folder, install_signals, lambda go: None)
    train_dist.init_job_group()
    if not train_dist.world().is_main:
        return _follow(folder)
    told: list[bool] = []

    def tell_followers(go: bool) -> None:
        """Whether the other ranks run the runner too (once: not when the job is done or refused)."""
        if not told:
            told.append(go)
            train_dist.main_says(go)

    try:
        return _run(folder, install_signals, tell_followers)
    finally:
        tell_followers(False)
        train_dist.shutdown()


def _run(folder: Path, install_signals: bool, tell_followers) -> int:
    try:
        ctx = jobs.JobContext(folder)
    except jobs.JobError as exc:
        print(f"job worker: {exc}", file=sys.stderr, flush=True)
        return 2
    if not ctx.acquire_lock():
        print(f"job worker: another worker is already running on {folder}; exiting", file=sys.stderr, flush=True)
        return 3
    ctx.start()
    ctx.log(f"worker pid {os.getpid()} started: job {ctx.job_id} ({ctx.kind}), runner {ctx.meta.get('runner')}")

    if install_signals:

        def on_term(signum, frame):  # noqa: ARG001
            if ctx.stop_signal is None:
                ctx.stop_signal = "terminated (SIGTERM)"
                raise jobs.JobCancelled(ctx.stop_signal)

        signal.signal(signal.SIGTERM, on_term)

    # the final model is saved by then; optimizer states in checkpoints are large
    drop_checkpoints = not ctx.config.get("keep_checkpoints_after_success", False)
    try:
        result_file = folder / jobs.RESULT_FILE
        if result_file.exists() and (folder / jobs.MODEL_DIR).exists():
            # a previous attempt finished its work but died before reporting it
            import json

            ctx.log("result.json already present: marking the job succeeded")
            ctx.finish(json.loads(result_file.read_text(encoding="utf-8")), drop_checkpoints=drop_checkpoints)
            return 0
        ctx.check_cancel()
        runner = jobs._resolve(ctx.meta.get("runner") or jobs.runner_for(ctx.kind) or "")
        tell_followers(True)
        result = runner(ctx)
        ctx.finish(result or {}, drop_checkpoints=drop_checkpoints)
        ctx.log("job succeeded")
        return 0
    except jobs.JobCancelled as exc:
        ctx.log(f"job cancelled: {exc}")
        ctx.cancelled(f"cancelled: {exc}")
        return 0
    except BaseException as exc:  # noqa: BLE001 - everything is reported in the folder
        traceback.print_exc()
        sys.stdout.flush()
        msg = str(exc).strip() or repr(exc)
        ctx.fail(f"{type(exc).__name__}: {msg}")
        return 1


def _follow(folder: Path) -> int:
    """A rank other than 0 of a job run across processes: the runner's share of the work; rank 0
    reports the job's state, and its failure ends this process (torchrun stops every rank)."""
    from . import train_dist

    try:
        if not train_dist.main_says(False):
            return 0
        ctx = jobs.JobContext(folder)
        runner = jobs._resolve(ctx.meta.get("runner") or jobs.runner_for(ctx.kind) or "")
        runner(train_dist.rank_hooks(ctx))
        return 0
    except jobs.JobCancelled:  # with rank 0, which records it; exiting 0 lets it finish doing so
        return 0
    except BaseException as exc:  # noqa: BLE001 - rank 0 writes the job's error; one line here
        print(f"job worker rank {train_dist.world().rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        train_dist.shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m crs_core.job_worker <job_folder>", file=sys.stderr)
        return 2
    return run(argv[0])


if __name__ == "__main__":
    sys.exit(main())
