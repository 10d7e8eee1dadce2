"""Background jobs: training and evaluation run as separate OS processes.

DuckDB allows one writing process, so a job never opens the workspace. ``launch_job`` exports
the job's inputs to a folder ``data/jobs/<job_id>/``, records the job in the ``jobs`` table and
starts ``python -m crs_core.job_worker <folder>`` detached from the app. Everything the job does
is written to that folder, so its state survives a restart of the app and a crash of either side:

    config.json        format_version, job_id, kind, runner, config, the list of inputs
    inputs/<name>.jsonl the exported inputs (records, or key/value lines for a mapping)
    launch.json        pid (and /proc start time, host) of the last worker started by the app
    status.json        state, pid, step, total_steps, epoch, loss, throughput, eta_seconds, ...
                       (written atomically: temp file + os.replace)
    progress.jsonl     one line per logged step: step, epoch, loss, lr, time (a step reported
                       again, after a resume, first drops the lines from that step on: no step
                       appears twice)
    log.txt            the worker's stdout/stderr
    cancel             flag file: the worker stops at the next step boundary
    checkpoints/step-<n>/  complete checkpoints (temp dir + rename; manifest with sha256)
    model/             the final model (written to a temp dir, then renamed)
    result.json        metrics and the path of the final model (written before "succeeded")

States: queued, running, succeeded, failed, cancelled. A status that still says queued/running
while its process is gone reads as ``failed`` ("process died"), or ``cancelled`` if a cancel had
been requested. ``resume_job`` restarts the worker on the same folder; trainers continue from the
newest checkpoint that verifies (falling back to older ones when the newest is corrupt).
A trainer saves a checkpoint every ``checkpoint_every`` steps and also once ``checkpoint_seconds``
(job config, default 60; 0 turns it off) have passed since the last one
(``JobContext.checkpoint_due``), so a job killed early does not start again from step 0.

What runs in the worker is a *runner* ``module:function`` taking a :class:`JobContext`; what the
app does with a finished job is an *importer* ``(cursor, JobState) -> None`` run inside the same
transaction that marks the job imported. Runners are registered per kind (trained models in
``crs_core.model_kinds``, other kinds in ``RUNNERS``), importers in ``IMPORTERS``, or either is
given to ``launch_job`` as a ``module:function`` string.

This module imports only the standard library, so the worker starts fast.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .accounts import acting_name
from .jobs_context import JobContext
from .jobs_files import (_initial_status, _read_status_quiet, ACTIVE_STATES, CANCEL_FILE, CHECKPOINTS_DIR,
                         CHECKPOINT_SECONDS, CONFIG_FILE, CheckpointError, DEFAULT_JOBS_ROOT, ENV_JOBS_ROOT,
                         FINAL_STATES, FORMAT_VERSION, IMPORTERS, INPUTS_DIR, JobCancelled, JobError,
                         JobFormatError, JobImportError, JobNotFoundError, JobRunningError, JobState, LAUNCH_FILE,
                         LOCK_FILE, LOCK_WAIT_S, LOG_FILE, MANIFEST_FILE, MODEL_DIR, PROGRESS_FILE, PROJECT_ROOT,
                         RESULT_FILE, RUNNERS, STATES, STATUS_FILE, default_jobs_root, job_state,
                         list_checkpoints, read_input, read_log, read_progress, runner_for,
                         verify_checkpoint, wait_for_job, _CHILDREN, _CHILDREN_LOCK, _export_input, _folder_pid,
                         _fsync_dir, _now_iso, _pid_alive, _proc_start_time, _read_config, _resolve,
                         _split_target, _write_json_atomic)

__all__ = [
    "FORMAT_VERSION", "STATES", "FINAL_STATES", "JobError", "JobNotFoundError", "JobFormatError",
    "JobRunningError", "CheckpointError", "JobCancelled", "JobImportError", "JobState", "JobContext",
    "launch_job", "job_state", "job_folder", "cancel_job", "resume_job", "wait_for_job",
    "import_finished_jobs", "refresh_jobs", "list_jobs", "list_checkpoints", "verify_checkpoint",
    "read_input", "read_progress", "read_log", "runner_for", "default_jobs_root",
    "ACTIVE_STATES", "CANCEL_FILE", "CHECKPOINTS_DIR", "CHECKPOINT_SECONDS", "CONFIG_FILE",
    "DEFAULT_JOBS_ROOT", "ENV_JOBS_ROOT", "IMPORTERS", "INPUTS_DIR", "LAUNCH_FILE", "LOCK_FILE",
    "LOCK_WAIT_S", "LOG_FILE", "MANIFEST_FILE", "MODEL_DIR", "PROGRESS_FILE", "PROJECT_ROOT", "RESULT_FILE",
    "RUNNERS", "STATUS_FILE",
]

# -- launching (app side) --------------------------------------------------------------------
def _new_job_id(kind: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in kind)[:40]
    return f"{safe}-{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _worker_command(folder: Path, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The worker's command line and environment: one process, or torchrun's `nproc` of them
    for a job whose config asks for more (crs_core.train_dist)."""
    from . import train_dist

    nproc = train_dist.check_nproc(((_read_config(folder).get("config") or {}).get(train_dist.NPROC_KEY, 1)))
    if nproc == 1:
        return [sys.executable, "-m", "crs_core.job_worker", str(folder)], env
    return train_dist.launch_command(nproc, "crs_core.job_worker", str(folder)), train_dist.launch_env(env)


def _start_worker(folder: Path, attempt: int) -> int:
    env = os.environ.copy()
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # the worker shares the CPU with the app (and maybe other jobs): busy-waiting OpenMP threads
    # make oversubscribed torch 5-10x slower; passive waiting costs little when the CPU is free
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    argv, env = _worker_command(folder, env)
    with open(folder / LOG_FILE, "ab") as log:
        log.write(f"[{_now_iso()}] launching worker (attempt {attempt})\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(PROJECT_ROOT),
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    with _CHILDREN_LOCK:
        _CHILDREN[proc.pid] = proc
    _write_json_atomic(
        folder / LAUNCH_FILE,
        {
            "pid": proc.pid,
            "pid_start": _proc_start_time(proc.pid),
            "host": socket.gethostname(),
            "attempt": attempt,
            "launched_at": _now_iso(),
        },
    )
    return proc.pid


def launch_job(
    ws: Any,
    kind: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, object],
    jobs_root: str | os.PathLike | None = None,
    *,
    runner: str | None = None,
    importer: str | None = None,
) -> str:
    """Export `inputs` to a new job folder, record the job, start its worker; returns the job id.

    `config` must be JSON-serialisable; it is what the runner reads as ``ctx.config``.
    `inputs` maps a name to a list of records, a mapping or a DataFrame (written as JSONL).
    """
    target = runner or runner_for(kind)
    if target is None:
        from . import model_kinds

        known = sorted([*RUNNERS, *(k.kind for k in model_kinds.kinds())])
        raise JobError(f"no runner for job kind {kind!r}; known kinds: {known} (or pass runner=)")
    _split_target(target)
    if importer is not None:
        _split_target(importer)
    try:
        config_json = json.dumps(dict(config))
    except (TypeError, ValueError) as exc:
        raise JobError(f"job config is not JSON-serialisable: {exc}") from exc
    root = Path(jobs_root).expanduser().resolve() if jobs_root is not None else default_jobs_root()
    root.mkdir(parents=True, exist_ok=True)
    job_id = _new_job_id(kind)
    folder = root / job_id
    tmp = root / f".{job_id}.tmp"
    try:
        (tmp / INPUTS_DIR).mkdir(parents=True)
        entries = {}
        for name, obj in inputs.items():
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise JobError(f"input name {name!r}: use letters, digits, '-' and '_' only")
            entries[name] = _export_input(tmp / INPUTS_DIR / f"{name}.jsonl", obj)
        _write_json_atomic(
            tmp / CONFIG_FILE,
            {
                "format_version": FORMAT_VERSION,
                "job_id": job_id,
                "kind": kind,
                "runner": target,
                "importer": importer,
                "created_at": _now_iso(),
                "config": json.loads(config_json),
                "inputs": entries,
            },
        )
        _write_json_atomic(tmp / STATUS_FILE, _initial_status())
        os.replace(tmp, folder)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        with ws.transaction() as cur:
            cur.execute(
                "INSERT INTO jobs (job_id, kind, status, folder, config, created_by) VALUES (?, ?, 'queued', ?, ?, ?)",
                [job_id, kind, str(folder), config_json, acting_name()],
            )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        _start_worker(folder, attempt=1)
    except OSError as exc:
        _write_json_atomic(folder / STATUS_FILE, {**_initial_status(), "state": "failed", "error": f"cannot start the worker: {exc}"})
        _set_row_status(ws, job_id, "failed", finished=True)
        raise JobError(f"cannot start the worker for job {job_id}: {exc}") from exc
    return job_id




def _set_row_status(ws: Any, job_id: str, status: str, *, finished: bool, cur: Any = None) -> None:
    when = "coalesce(finished_at, current_timestamp)" if finished else "NULL"
    sql = f"UPDATE jobs SET status = ?, finished_at = {when} WHERE job_id = ?"
    params = [status, job_id]
    if cur is not None:
        cur.execute(sql, params)
        return
    with ws.transaction() as c:
        c.execute(sql, params)


def job_folder(ws: Any, job_id: str) -> Path:
    """The folder of a job recorded in the workspace."""
    row = ws.cursor().execute("SELECT folder FROM jobs WHERE job_id = ?", [job_id]).fetchone()
    if row is None:
        raise JobNotFoundError(f"no job {job_id!r} in workspace {getattr(ws, 'path', '')}")
    return Path(row[0])


def _signal_worker(pid: int, start: str | None, sig: int) -> None:
    if not _pid_alive(pid, start):
        return
    try:
        if os.getpgid(pid) == pid:  # the worker leads its own session/group: reach its children too
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cancel_job(
    folder: str | os.PathLike,
    *,
    grace_seconds: float = 60.0,
    kill_after_seconds: float = 15.0,
    wait: bool = False,
) -> JobState:
    """Ask a job to stop: a `cancel` flag the worker checks between steps (it saves a checkpoint
    and stops). If still running after `grace_seconds`, SIGTERM (stops at once, mid-step);
    after `kill_after_seconds` more, SIGKILL. Escalation runs in a background thread unless
    `wait`; either way the folder reads ``cancelled`` once the process has gone."""
    folder = Path(folder)
    st = job_state(folder)
    if st.finished:
        return st
    _write_json_atomic(folder / CANCEL_FILE, {"requested_at": _now_iso()})

    def escalate() -> None:
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            cur = job_state(folder)
            if cur.finished:
                return
            time.sleep(0.2)
        pid, start, host = _folder_pid(folder, _read_status_quiet(folder))
        if pid is None or (host and host != socket.gethostname()):
            return
        _signal_worker(pid, start, signal.SIGTERM)
        deadline = time.monotonic() + kill_after_seconds
        while time.monotonic() < deadline:
            if not _pid_alive(pid, start):
                return
            time.sleep(0.2)
        _signal_worker(pid, start, signal.SIGKILL)
        end = time.monotonic() + 5
        while _pid_alive(pid, start) and time.monotonic() < end:
            time.sleep(0.1)

    if wait:
        escalate()
    else:
        threading.Thread(target=escalate, name=f"cancel-{folder.name}", daemon=True).start()
    return job_state(folder)




def resume_job(ws: Any, job_id: str) -> JobState:
    """Restart the worker of a failed/cancelled job on its folder; it continues from the newest
    complete checkpoint (model, optimizer, scheduler, RNG states, step, data order)."""
    folder = job_folder(ws, job_id)
    st = job_state(folder)
    if st.state in ACTIVE_STATES:
        raise JobRunningError(f"job {job_id} is still {st.state} (pid {st.pid}); cancel it first or wait")
    if st.state == "succeeded":
        raise JobError(f"job {job_id} already succeeded; nothing to resume")
    with contextlib.suppress(FileNotFoundError):
        (folder / CANCEL_FILE).unlink()
    attempt = st.attempt + 1
    _write_json_atomic(folder / STATUS_FILE, _initial_status(_read_status_quiet(folder), attempt=attempt))
    with ws.transaction() as cur:
        cur.execute(
            "UPDATE jobs SET status = 'queued', finished_at = NULL, imported = FALSE WHERE job_id = ?", [job_id]
        )
    try:
        _start_worker(folder, attempt=attempt)
    except OSError as exc:
        _write_json_atomic(
            folder / STATUS_FILE,
            {**_initial_status(attempt=attempt), "state": "failed", "error": f"cannot start the worker: {exc}"},
        )
        _set_row_status(ws, job_id, "failed", finished=True)
        raise JobError(f"cannot restart the worker for job {job_id}: {exc}") from exc
    return job_state(folder)


# -- workspace side: list, sync, import ------------------------------------------------------
def _job_rows(ws: Any, where: str = "", params: list | None = None) -> list[tuple]:
    return ws.cursor().execute(
        "SELECT job_id, kind, status, folder, imported, created_at, finished_at FROM jobs "
        + where
        + " ORDER BY created_at DESC, job_id DESC",
        params or [],
    ).fetchall()


def list_jobs(ws: Any) -> list[JobState]:
    """All jobs of the workspace, newest first, with their folder state (read-only).

    A job whose folder is gone reads as state "missing"; an unreadable folder keeps the
    table's status and carries the reason in `error`."""
    out = []
    for job_id, kind, status, folder, imported, created_at, _finished in _job_rows(ws):
        try:
            st = job_state(folder)
        except JobNotFoundError as exc:
            st = JobState(job_id=job_id, kind=kind, folder=Path(folder), state="missing", error=str(exc), message="folder missing")
        except JobError as exc:
            st = JobState(job_id=job_id, kind=kind, folder=Path(folder), state=status, error=str(exc), message=str(exc))
        st.imported = bool(imported)
        st.created_at = created_at
        out.append(st)
    return out


def refresh_jobs(ws: Any) -> list[JobState]:
    """Copy each unfinished job's folder state into the jobs table; returns the states read."""
    states = []
    for job_id, kind, status, folder, imported, _c, _f in _job_rows(ws, "WHERE status IN ('queued', 'running')"):
        try:
            st = job_state(folder)
        except JobNotFoundError:
            _set_row_status(ws, job_id, "missing", finished=True)
            continue
        except JobError:
            continue
        if st.state != status:
            _set_row_status(ws, job_id, st.state, finished=st.finished)
        states.append(st)
    return states


def import_finished_jobs(ws: Any) -> list[str]:
    """Import each succeeded, not yet imported job once; returns the imported job ids.

    Per job, the importer (``IMPORTERS[kind]``, or the ``importer`` given at launch) and the
    ``imported`` flag are written in one transaction. A job without importer is just marked.
    Failures do not stop the others; they are raised together as JobImportError at the end."""
    refresh_jobs(ws)
    imported: list[str] = []
    failures: dict[str, str] = {}
    for job_id, kind, _status, folder, _imp, _c, _f in _job_rows(ws, "WHERE NOT imported AND status = 'succeeded'"):
        try:
            st = job_state(folder)
            if st.state != "succeeded":
                continue
            meta = _read_config(Path(folder))
            target = meta.get("importer") or IMPORTERS.get(kind)
            fn = _resolve(target) if target else None
            with ws.transaction() as cur:
                row = cur.execute("SELECT imported FROM jobs WHERE job_id = ?", [job_id]).fetchone()
                if row is None or row[0]:
                    continue  # another session imported it meanwhile
                if fn is not None:
                    fn(cur, st)
                cur.execute(
                    "UPDATE jobs SET imported = TRUE, status = 'succeeded', "
                    "finished_at = coalesce(finished_at, current_timestamp) WHERE job_id = ?",
                    [job_id],
                )
            imported.append(job_id)
        except Exception as exc:  # noqa: BLE001 - reported per job
            failures[job_id] = f"{type(exc).__name__}: {exc}"
    if failures:
        raise JobImportError(failures)
    return imported


