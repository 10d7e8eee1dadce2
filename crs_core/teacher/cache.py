"""Where teacher replies are kept: the cache protocol and its three homes (memory, the
workspace's ``llm_cache`` table with in-flight marks, a JSONL file in a job folder), and the
writer thread that commits a teacher's results off its event loop."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import queue
import random
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from .errors import TeacherSetupError


class LLMCache(Protocol):
    """What a cache needs; ``get_many`` / ``put_many`` (one query / one commit for many keys) are
    used when a cache has them. ``put`` returns once the entry is durable; a key already there
    keeps its entry."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, entry: dict[str, Any]) -> None: ...


class MemoryCache:
    """Cache for ad-hoc use without a workspace (lives as long as the object)."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._data.get(key)
            return dict(entry) if entry is not None else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.put_many([(key, entry)])

    def put_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        with self._lock:
            for key, entry in items:
                self._data.setdefault(key, json.loads(json.dumps(entry)))

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(self._data[k]) for k in keys if k in self._data}

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __repr__(self) -> str:
        return f"MemoryCache({len(self)} entries)"


class WorkspaceCache:
    """The workspace's ``llm_cache`` table.

    ``put_many`` writes its entries in one transaction and returns once they are committed (a
    DuckDB commit costs milliseconds: the teacher commits the results that arrive together in
    one ``put_many`` rather than one commit per call, which would cap a concurrent run far below
    the endpoint's speed).
    """

    _SQL = ("INSERT INTO llm_cache (cache_key, provider, model, request, response, prompt_tokens, "
            "completion_tokens, cost) VALUES {values}")
    _MAX_ROWS = 200  # per INSERT statement

    def __init__(self, workspace: Any):
        self.ws = workspace

    _COLUMNS = "cache_key, provider, model, request, response, prompt_tokens, completion_tokens, cost"

    def get(self, key: str) -> dict[str, Any] | None:
        row = self.ws.cursor().execute(
            f"SELECT {self._COLUMNS} FROM llm_cache WHERE cache_key = ?", [key]
        ).fetchone()
        return None if row is None else self._entry(row)

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        unique = list(dict.fromkeys(keys))
        out: dict[str, dict[str, Any]] = {}
        cur = self.ws.cursor()
        for i in range(0, len(unique), 500):
            chunk = unique[i:i + 500]
            marks = ",".join(["?"] * len(chunk))
            for row in cur.execute(f"SELECT {self._COLUMNS} FROM llm_cache WHERE cache_key IN ({marks})", chunk).fetchall():
                out[row[0]] = self._entry(row)
        return out

    def entries_for(self, provider: str, model: str) -> dict[str, dict[str, Any]]:
        """Every entry of one provider's model (the only ones its requests can hit), by key:
        what a worker away from the workspace reads instead of the table."""
        rows = self.ws.cursor().execute(
            f"SELECT {self._COLUMNS} FROM llm_cache WHERE provider = ? AND model = ?", [provider, model]).fetchall()
        return {row[0]: self._entry(row) for row in rows}

    @staticmethod
    def _entry(row: Sequence[Any]) -> dict[str, Any]:
        _, provider, model, request, response, pt, ct, cost = row
        return {
            "provider": provider, "model": model,
            "request": json.loads(request) if isinstance(request, str) else request,
            "response": json.loads(response) if isinstance(response, str) else response,
            "prompt_tokens": pt, "completion_tokens": ct, "cost": cost,
        }

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.put_many([(key, entry)])

    def put_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        if items:
            self.record((), items, ())

    def record(self, started: Sequence[str], items: Sequence[tuple[str, dict[str, Any]]],
               settled: Sequence[str]) -> None:
        """One transaction: mark ``started`` keys in flight (llm_inflight, owned by this
        process), write the entries, and clear the marks of their keys and of ``settled``
        (requests that ended, with or without an entry)."""
        rows = list({r[0]: r for r in (_cache_row(key, entry) for key, entry in items)}.values())
        done = [r[0] for r in rows] + list(settled)
        try:
            self._write(rows, started, done, "")
        except Exception as exc:
            # a key already there (another process wrote it first): keep the existing row.
            # `ON CONFLICT DO NOTHING` is not the first choice because it costs DuckDB a
            # second sync per commit.
            if "constraint" not in str(exc).lower() and "duplicate" not in str(exc).lower():
                raise
            self._write(rows, started, done, " ON CONFLICT DO NOTHING")

    def _write(self, rows: list[list[Any]], started: Sequence[str], done: Sequence[str], suffix: str) -> None:
        with self.ws.transaction() as cur:
            for i in range(0, len(started), self._MAX_ROWS):
                chunk = list(started[i:i + self._MAX_ROWS])
                cur.execute("INSERT INTO llm_inflight (cache_key, owner) VALUES "
                            + ",".join(["(?, ?)"] * len(chunk))
                            + " ON CONFLICT (cache_key) DO UPDATE SET owner = excluded.owner, "
                              "started_at = excluded.started_at",
                            [v for key in chunk for v in (key, process_owner())])
            for i in range(0, len(rows), self._MAX_ROWS):
                chunk = rows[i:i + self._MAX_ROWS]
                values = ",".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
                cur.execute(self._SQL.format(values=values) + suffix, [v for r in chunk for v in r])
            for i in range(0, len(done), 500):
                chunk = list(done[i:i + 500])
                cur.execute(f"DELETE FROM llm_inflight WHERE cache_key IN ({','.join('?' * len(chunk))})", chunk)

    def interrupted_keys(self) -> set[str]:
        """Requests another process sent and never got into the cache: it stopped (crash, kill)
        with them in flight. An endpoint may have billed them; sending them again bills again."""
        rows = self.ws.cursor().execute(
            "SELECT cache_key FROM llm_inflight WHERE owner <> ? "
            "AND cache_key NOT IN (SELECT cache_key FROM llm_cache)", [process_owner()]).fetchall()
        return {str(r[0]) for r in rows}

    def __len__(self) -> int:
        return int(self.ws.scalar("SELECT count(*) FROM llm_cache"))

    def __repr__(self) -> str:
        return f"WorkspaceCache({getattr(self.ws, 'path', '?')})"


class JsonlCache:
    """A cache in a JSON-lines file, for background jobs that must not open the workspace
    (DESIGN: a job writes to its folder). A put appends one line per entry and fsyncs before it
    returns, so a crashed job repeats no call; a torn last line (crash mid-write) is skipped on load.
    ``entries()`` gives the rows for importing into the workspace's llm_cache later."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            with open(self.path, "r", encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self._data.setdefault(row["cache_key"], row["entry"])
                    except (ValueError, KeyError, TypeError):
                        continue
        self._file = open(self.path, "a", encoding="utf-8")
        if self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn last line: start a fresh one after it
                    self._file.write("\n")
                    self._file.flush()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._data.get(key)
            return dict(entry) if entry is not None else None

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(self._data[k]) for k in keys if k in self._data}

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.put_many([(key, entry)])

    def put_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Append the new entries' lines, then one fsync."""
        with self._lock:
            new = {key: entry for key, entry in items if key not in self._data}
            if not new:
                return
            self._file.write("".join(json.dumps({"cache_key": key, "entry": entry}, ensure_ascii=False) + "\n"
                                     for key, entry in new.items()))
            self._file.flush()
            os.fsync(self._file.fileno())
            for key, entry in new.items():
                self._data[key] = json.loads(json.dumps(entry))

    def entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        with self._lock:
            items = list(self._data.items())
        yield from items

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __repr__(self) -> str:
        return f"JsonlCache({self.path}, {len(self)} entries)"


_OWNER: tuple[int, str] | None = None


def process_owner() -> str:
    """'<pid>:<random>' naming this process in llm_inflight (a pid alone can be reused)."""
    global _OWNER
    if _OWNER is None or _OWNER[0] != os.getpid():
        _OWNER = (os.getpid(), f"{os.getpid()}:{random.SystemRandom().getrandbits(64):016x}")
    return _OWNER[1]


def import_cache_entries(workspace: Any, entries: Iterable[tuple[str, dict[str, Any]]]) -> int:
    """Copy cache entries (e.g. a job's ``JsonlCache.entries()``) into the workspace's
    llm_cache; existing keys are kept. Returns how many were offered."""
    items = list(entries)
    WorkspaceCache(workspace).put_many(items)
    return len(items)


def _cache_row(key: str, entry: dict[str, Any]) -> list[Any]:
    """An llm_cache row (the table's column order) from a cache entry."""
    return [key, entry.get("provider"), entry.get("model"), json.dumps(entry["request"]),
            json.dumps(entry["response"]), entry.get("prompt_tokens"), entry.get("completion_tokens"),
            entry.get("cost")]


def cache_get_many(cache: Any, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Entries for the keys found (one query when the cache supports ``get_many``)."""
    get_many = getattr(cache, "get_many", None)
    if get_many is not None:
        return get_many(keys)
    out = {}
    for key in dict.fromkeys(keys):
        entry = cache.get(key)
        if entry is not None:
            out[key] = entry
    return out


def cache_put_many(cache: Any, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Write entries (one commit when the cache supports ``put_many``); returns once durable."""
    put_many = getattr(cache, "put_many", None)
    if put_many is not None:
        put_many(items)
    else:
        for key, entry in items:
            cache.put(key, entry)


def as_cache(cache: Any) -> LLMCache:
    """A cache object from a cache, a workspace (its llm_cache table), a path (a JSON-lines
    file, for jobs) or None (in memory)."""
    if cache is None:
        return MemoryCache()
    if isinstance(cache, (str, os.PathLike)):
        return JsonlCache(cache)
    if hasattr(cache, "get") and hasattr(cache, "put"):
        return cache
    if hasattr(cache, "transaction") and hasattr(cache, "cursor"):
        return WorkspaceCache(cache)
    raise TypeError(f"not a cache or workspace: {cache!r}")


class CacheWriter:
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


_WRITERS: "weakref.WeakSet[CacheWriter]" = weakref.WeakSet()


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
