"""A job folder and what both sides read from it (standard library only): constants and file names,
errors, the runner and importer registries, atomic JSON, exported inputs, the folder's state
with process liveness, progress and log reading, and checkpoint verification. Used through
`crs_core.jobs`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import CRSError
from .progress import Progress




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
# kind -> what pages call a job of that kind (trained model kinds: "Training job")
JOB_NOUNS: dict[str, str] = {"lm_generate": "Generation job"}
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

    @property
    def progress(self) -> Progress:
        """The job's progress as pages show every background work (crs_core.progress.Progress)."""
        from . import model_kinds

        noun = JOB_NOUNS.get(self.kind) or ("Training job" if self.kind in {k.kind for k in model_kinds.kinds()}
                                            else "Job")
        label = f"{noun} {self.job_id}: {self.describe()}"
        detail = f"epoch {self.epoch:.2f}" if self.epoch else ""
        if not self.total_steps:
            finished = 1.0 if self.state == "succeeded" else 0.0
            return Progress(label, finished, finished, None, detail)
        return Progress(label, min(self.step, self.total_steps), self.total_steps, self.eta_seconds, detail)

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


def _read_status_quiet(folder: Path) -> dict[str, Any]:
    try:
        data = _read_json(folder / STATUS_FILE, "job status")
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, JobFormatError):
        return {}
