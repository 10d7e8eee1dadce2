"""The machinery under every teacher call: structured reply forms per endpoint, request
objects, the one asyncio event loop all calls run on, and the cache writer thread. Used through
`crs_core.teacher`."""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import email.utils
import logging
import os
import queue
import re
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

from .teacher_cache import cache_put_many
from .teacher_config import (Messages, TeacherSetupError)
from .teacher_providers import FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA, FORMAT_NONE, FORMATS

log = logging.getLogger("crs_core.teacher")


# ==============================================================================================
# structured replies: the response_format an endpoint accepts, decided once per endpoint
# ==============================================================================================
# OpenAI and vLLM take {"type": "json_schema", "json_schema": {...}}; llama_cpp.server 0.3.36
# answers that with HTTP 500 (its request model knows only 'text' and 'json_object') and
# enforces {"type": "json_object", "schema": ...} with a grammar. An endpoint that refuses both
# gets no response_format: the callers' tolerant parsers read its text.
# what a refusal of a response_format looks like (the refused request is not retried)
FORMAT_REFUSED_STATUS = frozenset({400, 415, 422, 500, 501})
_FORMATS: dict[tuple[str, str], str] = {}  # (endpoint, model) -> the form that worked, this process
_FORMAT_LOCKS: dict[tuple[str, str], threading.Lock] = collections.defaultdict(threading.Lock)
_FORMATS_LOCK = threading.Lock()


def response_format_for(schema: dict[str, Any], form: str, name: str | None = None) -> dict[str, Any] | None:
    """The response_format body of one form for a JSON schema (None for FORMAT_NONE)."""
    if form == FORMAT_JSON_SCHEMA:
        label = re.sub(r"[^A-Za-z0-9_-]", "_", str(name or schema.get("title") or "reply"))[:64]
        return {"type": "json_schema", "json_schema": {"name": label, "schema": schema, "strict": True}}
    if form == FORMAT_JSON_OBJECT:
        return {"type": "json_object", "schema": schema}
    if form == FORMAT_NONE:
        return None
    raise TeacherSetupError(f"unknown response_format form {form!r}; use one of {', '.join(FORMATS)}")


def forget_structured_formats() -> None:
    """Forget every endpoint's decided form (tests; an endpoint that was upgraded)."""
    with _FORMATS_LOCK:
        _FORMATS.clear()


# ==============================================================================================
# requests
# ==============================================================================================
@dataclass(frozen=True)
class ChatRequest:
    """One chat call. None parameters take the teacher's config. ``cache_salt`` only enters the
    cache key (e.g. the sample number when the same prompt is asked K times); ``seed`` is sent."""

    messages: Messages
    temperature: float | None = None
    max_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    cache_salt: str | int | None = None
    # The reply's JSON schema: sent as the endpoint's own response_format (see "structured replies"
    # below; an explicit response_format wins). Callers still parse tolerantly: an endpoint that
    # refuses every form gets no response_format.
    json_schema: dict[str, Any] | None = None
    probe: bool = False  # internal: this request decides the endpoint's form (a refusal is not retried)


RequestLike = Union[ChatRequest, Mapping[str, Any], Sequence[Mapping[str, Any]]]


def as_request(obj: RequestLike) -> ChatRequest:
    if isinstance(obj, ChatRequest):
        return obj
    if isinstance(obj, Mapping):
        return ChatRequest(**obj)
    return ChatRequest(messages=list(obj))


def estimate_tokens(text: str) -> int:
    """A deliberately high estimate (3 characters per token) for budget reservations."""
    return len(text) // 3 + 1


def _message_text(messages: Messages) -> str:
    parts = []
    for m in messages:
        content = m.get("content", "")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(str(content or ""))
    return "\n".join(parts)


def _retry_after_seconds(headers: Any) -> float | None:
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        value = headers.get("retry-after")
    except Exception:
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_detail(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        msg = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if msg:
            return str(msg)
    return str(getattr(exc, "message", None) or exc)


# ==============================================================================================
# the event loop the calls run on
# ==============================================================================================
_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None


def _teacher_loop() -> asyncio.AbstractEventLoop:
    """The event loop every teacher of this process makes its calls on: one daemon thread,
    started on first use (again in a forked child, which has no such thread)."""
    global _loop, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="teacher-loop", daemon=True).start()
            _loop_pid = os.getpid()
        return _loop


def _on_loop(coro: Any, timeout: float | None = None) -> Any:
    """Run a coroutine on the teacher loop and wait for its result (from any other thread)."""
    return asyncio.run_coroutine_threadsafe(coro, _teacher_loop()).result(timeout)


def _close_soon(client: Any) -> None:
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(client.close(), _teacher_loop())


async def _pause(seconds: float, cancelled: Callable[[], bool]) -> bool:
    """Sleep, looking at ``cancelled`` every 0.1 s; True if it said so before the time was up."""
    end = time.monotonic() + seconds
    while not cancelled():
        left = end - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, 0.1))
    return True


class _CacheWriter:
    """A teacher's cache commits, off the event loop: one writer thread takes every entry queued
    so far, writes them with one ``put_many`` (one transaction for the workspace, one fsync for a
    JSON-lines file) and then resolves their futures on the loop, while the loop goes on sending
    and receiving. Entries that arrive during a write go into the next one (group commit).

    A write costs the workspace milliseconds of CPU whatever its size, so while more results are
    on their way (``expecting()``: requests in flight) the next write starts no sooner than
    ``pace`` times the last one's duration after its start (at most ``max_wait`` later): the
    writer is busy at most 1/pace of the time and its batches grow with the rate, instead of
    one transaction per result. A lone result (nothing in flight) is written at once.

    The thread starts on the first entry and ends after ``idle_exit`` seconds without any, on
    ``stop()`` (``Teacher.close``) or at interpreter exit, once the entries queued are written.

    It also writes the in-flight marks of a cache that has ``record`` (the workspace):
    ``start(key)`` before a request is sent (written at once, never paced: a request waits for
    it) and ``end(key)`` for a request that ended without an entry; an entry clears its mark in
    the same transaction."""

    idle_exit = 5.0
    max_batch = 1000
    pace = 3.0
    max_wait = 0.05  # seconds

    def __init__(self, cache: Any, expecting: Callable[[], bool] = lambda: False):
        self.cache = cache
        self.expecting = expecting
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # (op, key, entry, future); None: stop
        self._urgent = threading.Event()  # a start is queued: no pacing
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._next_start = 0.0  # monotonic; see pace
        self.commits = 0  # put_many calls made (tests, benchmarks)
        _WRITERS.add(self)

    def write(self, key: str, entry: dict[str, Any]) -> asyncio.Future:
        """On the loop: queue an entry; the future is done once it is committed (or carries the
        TeacherSetupError that says why it could not be). The entry is handed over after the
        callbacks ready now, so that the next call's request (its slot was just released) is
        sent before the writer wakes up and competes with it for the GIL."""
        loop = asyncio.get_running_loop()
        written = loop.create_future()
        loop.call_soon(self._enqueue, ("put", key, entry, written))
        return written

    def start(self, key: str) -> asyncio.Future:
        """On the loop: mark a request in flight; the future is done once the mark is committed."""
        marked = asyncio.get_running_loop().create_future()
        self._enqueue(("start", key, None, marked))
        self._urgent.set()
        return marked

    def end(self, key: str) -> asyncio.Future:
        """On the loop: clear the mark of a request that ended without an entry; the future is
        done once that is committed."""
        cleared = asyncio.get_running_loop().create_future()
        self._enqueue(("end", key, None, cleared))
        return cleared

    def _enqueue(self, item: tuple[str, str, dict[str, Any] | None, asyncio.Future]) -> None:
        self._queue.put(item)
        with self._lock:  # after the put: a writer about to exit has seen the entry, or is gone
            if self._thread is None or self._pid != os.getpid():  # (none in a forked child)
                self._thread = threading.Thread(target=self._run, name="teacher-cache-writer", daemon=True)
                self._pid = os.getpid()
                self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Let the thread end now (after writing what is queued); a later write starts a new one."""
        with self._lock:
            thread = self._thread if self._pid == os.getpid() else None
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            self._queue.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while True:
            if stopping:  # idle or asked to stop: end, unless entries came meanwhile
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
            try:
                first = self._queue.get(timeout=self.idle_exit)
            except queue.Empty:
                stopping = True
                continue
            if first is None:
                stopping = True
                continue
            wait = min(self._next_start - time.monotonic(), self.max_wait)
            if wait > 0 and self.expecting() and first[0] != "start":  # entries arriving meanwhile join this write
                self._urgent.wait(wait)
            self._urgent.clear()
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < self.max_batch:
                    item = self._queue.get_nowait()
                    if item is None:
                        stopping = True
                    else:
                        batch.append(item)
            self._write(batch)

    def _write(self, batch: list[tuple[str, str, dict[str, Any] | None, asyncio.Future]]) -> None:
        error: Exception | None = None
        started = time.monotonic()
        last: dict[str, bool] = {}  # key -> still in flight after this batch (its last op wins)
        for op, key, _, _ in batch:
            last[key] = op == "start"
        items = [(key, entry) for op, key, entry, _ in batch if op == "put"]
        try:
            record = getattr(self.cache, "record", None)
            if record is not None:
                record([k for k, v in last.items() if v], items, [k for k, v in last.items() if not v])
            elif items:
                cache_put_many(self.cache, items)
        except Exception as exc:  # noqa: BLE001 - every call of the batch reports it
            error = exc
        self._next_start = started + self.pace * (time.monotonic() - started)
        self.commits += 1
        loops: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
        for *_, written in batch:
            loops.setdefault(written.get_loop(), []).append(written)
        for loop, futures in loops.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle_writes, futures, error)


_WRITERS: "weakref.WeakSet[_CacheWriter]" = weakref.WeakSet()


@atexit.register
def _stop_writers() -> None:
    """At interpreter exit: writer threads end (and release their cache cursors) first."""
    for writer in list(_WRITERS):
        with contextlib.suppress(Exception):
            writer.stop(timeout=5.0)


def _settle_writes(futures: list[asyncio.Future], error: Exception | None) -> None:
    for written in futures:
        if written.done():  # its caller was cancelled meanwhile
            continue
        if error is None:
            written.set_result(None)
        else:
            written.set_exception(TeacherSetupError(f"could not write the LLM cache: {error}"))
