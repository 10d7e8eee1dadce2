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
import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import CRSError

__all__ = [
    "FORMAT_VERSION",
    "STATES",
    "FINAL_STATES",
    "JobError",
    "JobNotFoundError",
    "JobFormatError",
    "JobRunningError",
    "CheckpointError",
    "JobCancelled",
    "JobImportError",
    "JobState",
    "JobContext",
    "launch_job",
    "job_state",
    "job_folder",
    "cancel_job",
    "resume_job",
    "wait_for_job",
    "import_finished_jobs",
    "refresh_jobs",
    "list_jobs",
    "list_checkpoints",
    "verify_checkpoint",
    "read_input",
    "read_progress",
    "read_log",
    "runner_for",
    "register_importer",
    "default_jobs_root",
]

FORMAT_VERSION = 1
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_STATES = frozenset({"queued", "running"})

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JOBS_ROOT = PROJECT_ROOT / "data" / "jobs"
ENV_JOBS_ROOT = "CRS_JOBS_ROOT"

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
LAUNCH_FILE = "launch.json"
PROGRESS_FILE = "progress.jsonl"
LOG_FILE = "log.txt"
CANCEL_FILE = "cancel"
RESULT_FILE = "result.json"
LOCK_FILE = "worker.lock"
LOCK_WAIT_S = 30.0  # how long a starting worker waits for the folder lock (see JobContext.acquire_lock)
INPUTS_DIR = "inputs"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_SECONDS = 60.0  # default time between checkpoints (job config "checkpoint_seconds")

# kind -> "module:function" run inside the worker with a JobContext, returning the result dict,
# for the kinds that are not trained models (those are in crs_core.model_kinds: see runner_for)
RUNNERS: dict[str, str] = {
    "lm_generate": "crs_core.train:run_generate_job",
}
# kind -> importer (callable or "module:function"): importer(cursor, JobState) inside a transaction.
# Training jobs have none: their model stays in the job folder (train.trained_models lists them)
# and an evaluation stores the run with its metrics.
IMPORTERS: dict[str, Callable[..., None] | str] = {}

# workers started by this process (so they can be reaped and never look alive as zombies)
_CHILDREN: dict[int, subprocess.Popen] = {}
_CHILDREN_LOCK = threading.Lock()


# -- errors ----------------------------------------------------------------------------------
class JobError(CRSError):
    """A job could not be launched, read, resumed or imported."""


class JobNotFoundError(JobError):
    """The job (its row or its folder) does not exist."""


class JobFormatError(JobError):
    """The job folder was written by another version of the studio, or is unreadable."""


class JobRunningError(JobError):
    """The operation needs a job that is not running."""


class CheckpointError(JobError):
    """A checkpoint is incomplete or a file in it is unreadable."""


class JobCancelled(JobError):
    """Raised inside the worker when a cancel was requested (flag file or SIGTERM)."""


class JobImportError(JobError):
    """One or more finished jobs could not be imported (the others were)."""

    def __init__(self, failures: Mapping[str, str]):
        self.failures = dict(failures)
        lines = "; ".join(f"{job}: {msg}" for job, msg in self.failures.items())
        super().__init__(f"could not import {len(self.failures)} finished job(s): {lines}")


# -- registries ------------------------------------------------------------------------------
def runner_for(kind: str) -> str | None:
    """The "module:function" that runs jobs of `kind`: a trained model kind's runner
    (crs_core.model_kinds), else RUNNERS."""
    from . import model_kinds

    try:
        return model_kinds.get(kind).runner
    except KeyError:
        return RUNNERS.get(kind)


def register_importer(kind: str, importer: Callable[..., None] | str) -> None:
    """Import finished jobs of `kind` with `importer(cursor, state)` (or "module:function")."""
    if isinstance(importer, str):
        _split_target(importer)
    IMPORTERS[kind] = importer


def _split_target(target: str) -> tuple[str, str]:
    module, sep, func = target.partition(":")
    if not sep or not module or not func:
        raise JobError(f"not a 'module:function' target: {target!r}")
    return module, func


def _resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(target):
        return target
    module, func = _split_target(target)
    try:
        obj = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise JobError(f"cannot load {target!r}: {exc}") from exc
    if not callable(obj):
        raise JobError(f"{target!r} is not callable")
    return obj


# -- small file helpers ----------------------------------------------------------------------
def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise JobFormatError(f"{what} {path} is unreadable: {exc}") from exc


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def default_jobs_root() -> Path:
    """$CRS_JOBS_ROOT, else <project>/data/jobs."""
    env = os.environ.get(ENV_JOBS_ROOT)
    return Path(env).expanduser().resolve() if env else DEFAULT_JOBS_ROOT


# -- inputs ----------------------------------------------------------------------------------
def _export_input(path: Path, obj: object) -> dict[str, Any]:
    """Write one input as JSONL; returns its entry for config.json."""
    try:
        import pandas as pd  # optional here; the app has it

        if isinstance(obj, pd.DataFrame):
            obj = json.loads(obj.to_json(orient="records", date_format="iso"))
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        kind, rows = "mapping", ({"key": k, "value": v} for k, v in obj.items())
    elif isinstance(obj, (str, bytes)) or not isinstance(obj, Iterable):
        raise JobError(
            f"input {path.stem!r} must be a list of records, a mapping or a DataFrame, "
            f"not {type(obj).__name__}"
        )
    else:
        kind, rows = "records", obj
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            try:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            except TypeError as exc:
                raise JobError(f"input {path.stem!r}, row {count + 1}: not JSON-serialisable: {exc}") from exc
            count += 1
        fh.flush()
        os.fsync(fh.fileno())
    return {"file": f"{INPUTS_DIR}/{path.name}", "type": kind, "count": count}


def read_input(folder: str | os.PathLike, name: str) -> list[Any] | dict[Any, Any]:
    """One exported input of a job folder, in the shape it was given (list or dict)."""
    folder = Path(folder)
    meta = _read_config(folder)
    entry = meta.get("inputs", {}).get(name)
    if entry is None:
        raise JobError(f"job {folder.name} has no input {name!r} (it has {sorted(meta.get('inputs', {}))})")
    path = folder / entry["file"]
    rows: list[Any] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as exc:
                        raise JobFormatError(f"{path}, line {lineno}: not JSON: {exc}") from exc
    except FileNotFoundError as exc:
        raise JobFormatError(f"job {folder.name}: input file {path} is missing") from exc
    if len(rows) != entry.get("count", len(rows)):
        raise JobFormatError(f"{path}: {len(rows)} rows, config.json says {entry['count']} (truncated file?)")
    if entry.get("type") == "mapping":
        return {row["key"]: row["value"] for row in rows}
    return rows


# -- folder reading --------------------------------------------------------------------------
def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise JobNotFoundError(
            f"job folder {folder} does not exist (deleted or moved?); the job cannot be inspected or resumed"
        )


def _read_config(folder: Path) -> dict[str, Any]:
    _check_folder(folder)
    try:
        meta = _read_json(folder / CONFIG_FILE, "job config")
    except FileNotFoundError as exc:
        raise JobFormatError(f"job folder {folder} has no {CONFIG_FILE}; it is not a job folder or is damaged") from exc
    if not isinstance(meta, dict):
        raise JobFormatError(f"{folder / CONFIG_FILE} is not a JSON object")
    version = meta.get("format_version", 0)
    if version != FORMAT_VERSION:
        age = "an older" if isinstance(version, int) and version < FORMAT_VERSION else "a newer"
        raise JobFormatError(
            f"job folder {folder} was written by {age} version of the studio (job format {version}, "
            f"this studio reads format {FORMAT_VERSION}); it cannot be read or resumed here: "
            "start the job again"
        )
    return meta


@dataclass
class JobState:
    """What a job folder says about the job (plus the jobs-table row where known)."""

    job_id: str
    kind: str
    folder: Path
    state: str  # queued | running | succeeded | failed | cancelled (| missing, from list_jobs)
    pid: int | None = None
    alive: bool = False
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    throughput: float | None = None  # examples per second
    eta_seconds: float | None = None
    updated_at: str | None = None
    started_at: str | None = None
    message: str | None = None  # e.g. "failed (process died)"
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    cancel_requested: bool = False
    attempt: int = 1
    result: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    imported: bool | None = None
    created_at: Any = None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def fraction(self) -> float:
        if not self.total_steps:
            return 1.0 if self.state == "succeeded" else 0.0
        return min(1.0, self.step / self.total_steps)

    def describe(self) -> str:
        """One line for a status column."""
        if self.message:
            return self.message
        if self.state == "running" and self.total_steps:
            return f"running: step {self.step}/{self.total_steps}"
        return self.state

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["folder"] = str(self.folder)
        return d


def _proc_stat(pid: int) -> list[str] | None:
    """Linux: the fields of /proc/<pid>/stat after the command name (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            data = fh.read()
    except OSError:
        return None
    return data[data.rfind(")") + 2 :].split()


def _proc_start_time(pid: int) -> str | None:
    """Linux: the process start time in clock ticks (tells a reused pid apart)."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _pid_alive(pid: int | None, start: str | None = None) -> bool:
    if not pid:
        return False
    with _CHILDREN_LOCK:
        proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:  # our child and it ended (reaped now)
        with _CHILDREN_LOCK:
            _CHILDREN.pop(pid, None)
        return False
    if os.path.isdir("/proc"):
        fields = _proc_stat(pid)
        if fields is None:
            return False
        if fields and fields[0] in ("Z", "X"):
            return False
        if start is not None and len(fields) > 19 and fields[19] != str(start):
            return False  # the pid was reused by another process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _folder_pid(folder: Path, status: Mapping[str, Any]) -> tuple[int | None, str | None, str | None]:
    """(pid, start time, host) of the worker the folder belongs to (None: not started yet)."""
    if status.get("pid"):  # written by the worker itself (a resume resets it to None)
        return status.get("pid"), status.get("pid_start"), status.get("host")
    launch: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, JobFormatError):
        launch = _read_json(folder / LAUNCH_FILE, "launch record") or {}
    if launch.get("pid") and int(launch.get("attempt") or 1) >= int(status.get("attempt") or 1):
        return launch.get("pid"), launch.get("pid_start"), launch.get("host")
    return None, None, None


def job_state(folder: str | os.PathLike) -> JobState:
    """Read a job folder. Works after a restart of the app; detects a worker that died."""
    folder = Path(folder)
    meta = _read_config(folder)
    try:
        status = _read_json(folder / STATUS_FILE, "job status")
    except FileNotFoundError:
        status = {"state": "queued"}
    if not isinstance(status, dict) or status.get("state") not in STATES:
        raise JobFormatError(f"{folder / STATUS_FILE} has no valid state")
    st = JobState(
        job_id=meta.get("job_id", folder.name),
        kind=meta.get("kind", "?"),
        folder=folder,
        state=status["state"],
        step=int(status.get("step") or 0),
        total_steps=status.get("total_steps"),
        epoch=status.get("epoch"),
        loss=status.get("loss"),
        throughput=status.get("throughput"),
        eta_seconds=status.get("eta_seconds"),
        updated_at=status.get("updated_at"),
        started_at=status.get("started_at"),
        message=status.get("message"),
        error=status.get("error"),
        warnings=list(status.get("warnings") or []),
        cancel_requested=(folder / CANCEL_FILE).exists(),
        attempt=int(status.get("attempt") or 1),
        config=meta.get("config") or {},
    )
    pid, start, host = _folder_pid(folder, status)
    st.pid = pid
    if st.state in ACTIVE_STATES:
        if host and host != socket.gethostname():
            st.alive = True  # another machine's process: trust its status
        elif pid is None:
            st.alive = True  # just launched; the pid is being recorded
        else:
            st.alive = _pid_alive(pid, start)
            if not st.alive:
                if st.cancel_requested:
                    st.state, st.message = "cancelled", "cancelled (process ended)"
                else:
                    st.state, st.message = "failed", "failed (process died)"
                    st.error = st.error or "the worker process died without reporting (killed, out of memory, or crashed)"
                st.eta_seconds = None
    if st.state == "succeeded":
        try:
            st.result = _read_json(folder / RESULT_FILE, "job result")
        except FileNotFoundError:
            st.state, st.message = "failed", "failed (result.json missing)"
            st.error = f"status says succeeded but {folder / RESULT_FILE} is missing"
    if st.state == "failed" and not st.message and st.error:
        st.message = f"failed: {st.error.splitlines()[0][:200]}"
    return st


def wait_for_job(folder: str | os.PathLike, timeout: float = 600.0, poll: float = 0.5) -> JobState:
    """Poll until the job is finished (raises JobError on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        st = job_state(folder)
        if st.finished:
            return st
        if time.monotonic() > deadline:
            raise JobError(f"job {st.job_id} still {st.state} after {timeout:.0f} s (step {st.step}/{st.total_steps})")
        time.sleep(poll)


def read_progress(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged steps (loss curve). A step logged twice (after a resume) keeps its last line."""
    path = Path(folder) / PROGRESS_FILE
    by_step: dict[int, dict[str, Any]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict) and "step" in row:
                        by_step[int(row["step"])] = row
    except FileNotFoundError:
        return []
    return [by_step[k] for k in sorted(by_step)]


def read_log(folder: str | os.PathLike, tail_bytes: int = 20_000) -> str:
    """The end of the worker's log."""
    path = Path(folder) / LOG_FILE
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - tail_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


# -- checkpoints (format shared by app and worker) -----------------------------------------
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint whose files all match it; CheckpointError otherwise."""
    path = Path(path)
    try:
        manifest = _read_json(path / MANIFEST_FILE, "checkpoint manifest")
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST_FILE} (incomplete)") from exc
    except JobFormatError as exc:
        raise CheckpointError(str(exc)) from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {manifest.get('format_version')}, this studio reads {FORMAT_VERSION}"
        )
    for rel, info in (manifest.get("files") or {}).items():
        f = path / rel
        try:
            size = f.stat().st_size
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path}: file {rel} is missing or unreadable ({exc})") from exc
        if size != info.get("bytes"):
            raise CheckpointError(f"checkpoint {path}: file {rel} has {size} bytes, expected {info.get('bytes')}")
        try:
            digest = _file_digest(f)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path}: file {rel} is unreadable ({exc})") from exc
        if digest != info.get("sha256"):
            raise CheckpointError(f"checkpoint {path}: file {rel} is corrupt (checksum mismatch)")
    return manifest


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints with a manifest, newest first (not yet verified)."""
    root = Path(folder) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and (p / MANIFEST_FILE).exists():
                with contextlib.suppress(ValueError):
                    found.append((int(p.name[5:]), p))
    return sorted(found, reverse=True)


# -- launching (app side) --------------------------------------------------------------------
def _new_job_id(kind: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in kind)[:40]
    return f"{safe}-{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


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
    with open(folder / LOG_FILE, "ab") as log:
        log.write(f"[{_now_iso()}] launching worker (attempt {attempt})\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "crs_core.job_worker", str(folder)],
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
                "INSERT INTO jobs (job_id, kind, status, folder, config) VALUES (?, ?, 'queued', ?, ?)",
                [job_id, kind, str(folder), config_json],
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


def _initial_status(previous: Mapping[str, Any] | None = None, attempt: int = 1) -> dict[str, Any]:
    keep = {k: previous.get(k) for k in ("step", "total_steps", "epoch", "loss", "started_at")} if previous else {}
    return {
        "state": "queued",
        "pid": None,
        "step": keep.get("step") or 0,
        "total_steps": keep.get("total_steps"),
        "epoch": keep.get("epoch"),
        "loss": keep.get("loss"),
        "throughput": None,
        "eta_seconds": None,
        "attempt": attempt,
        "started_at": keep.get("started_at"),
        "updated_at": _now_iso(),
        "message": None if attempt == 1 else f"queued (resume, attempt {attempt})",
        "error": None,
        "warnings": [],
    }


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


def _read_status_quiet(folder: Path) -> dict[str, Any]:
    try:
        data = _read_json(folder / STATUS_FILE, "job status")
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, JobFormatError):
        return {}


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
