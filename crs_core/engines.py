"""Where the heavy steps run: ``local`` (this process, the default) or ``ray`` (a Ray cluster).

Both engines run the same step code on the same blocks: embedding calls
``embed.encode_block`` on each block of texts; synthesis calls ``synth.SynthWorker``, which
produces one block of (item, k) units and returns the outcomes without writing; the generative
evaluation (``model_eval.evaluate_lm``) calls ``train.generate_titles`` on each block of
dialogue contexts. The process
that owns the workspace stays its one writer: it commits each block as it finishes (the
embedding cache with INSERT OR IGNORE, a query only when its id is not stored yet), so a
killed run resumes where it stopped, and a block Ray retried after a worker died is committed
once.

The ``ray`` engine:

- joins ``address`` (``ray start --head`` prints it; ``ray://host:10001`` for Ray Client,
  ``auto`` for the cluster of this machine); without one it starts a local Ray on this
  machine's cores. An address that does not answer is one ``EngineError`` and nothing starts.
- embedding: a pool of actors, each holding the encoder (``cpus_per_worker`` torch threads,
  ``gpus_per_worker`` > 0 for GPU actors) and encoding blocks of ``embed.CHUNK`` texts.
- synthesis: a pool of actors, each calling the teacher endpoint (vLLM, any OpenAI-compatible
  server) with the teacher's own concurrency over blocks of units. Teacher replies go to a
  spool folder next to the workspace (``<workspace>.ray/``, one JSON-lines file per worker
  process, fsynced before a call counts as done): a retried block, or a resumed run, reads the
  replies a dead worker got and pays no call twice. The driver imports each block's replies
  into the workspace's ``llm_cache`` with its queries; a finished run removes its spool.
  Workers read replies the workspace already has from a snapshot sent once per run.
- actors restart when their process dies (``max_restarts``) and Ray re-runs the block they
  held (``max_task_retries``).

Ray is imported only when the ``ray`` engine is used: the studio starts without it.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import CRSError
from .progress import ProgressFn

ENGINES = {
    "local": "in this process (the default)",
    "ray": "on a Ray cluster: --ray-address to join one, else a local Ray on this machine's cores",
}
DEFAULT_ENGINE = "local"
ENV_RAY_ADDRESS = "CRS_RAY_ADDRESS"
CONNECT_TIMEOUT = 5.0  # seconds to reach a given Ray address before giving up
ACTOR_RETRIES = 3  # restarts of a worker actor whose process died, and re-runs of its block


# a worker whose process dies is restarted and its block re-run; a second thread answers pid()
# while a block runs (the engine gives an actor one block at a time)
_ACTOR_OPTIONS = {"max_restarts": ACTOR_RETRIES, "max_task_retries": ACTOR_RETRIES, "max_concurrency": 2}


class EngineError(CRSError):
    """The engine cannot run: Ray missing or unreachable, or a step it cannot run remotely."""


def run_concurrently(fn: Callable[..., Any], units: Iterable[tuple], limit: int,
                     should_stop: Callable[[], bool]) -> Iterator[Any]:
    """``fn(*unit)`` for each unit, at most ``limit`` at once (threads), yielding results as they
    finish; no unit starts once ``should_stop()`` is true. Used where the calls are made: the
    local engine and each Ray synthesis worker."""
    limit = max(1, int(limit))
    if limit == 1:
        for unit in units:
            if should_stop():
                return
            yield fn(*unit)
        return
    pool = cf.ThreadPoolExecutor(max_workers=limit, thread_name_prefix="engine")
    try:
        pending: set[cf.Future] = set()
        it = iter(units)
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit and not should_stop():
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                    break
                pending.add(pool.submit(fn, *nxt))
            if not pending:
                return
            finished, pending = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                yield fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class SynthWork:
    """One synthesis run as an engine sees it (built by ``synth.run_synthesis``).

    units: the (item_id, k) still to produce, in order; limit: calls in flight per worker.
    produce(item_id, k) -> outcome (in this process); handle(outcome): count and store it (the
    driver, one at a time); should_stop(): the user, the budget or repeated failures stopped
    the run. For remote workers: spec() -> the picklable ``synth.SynthSpec``; payload(units)
    -> what a block needs from the workspace; commit_replies(entries): teacher replies into
    the workspace cache; remaining() -> the budget left (None: no limit); spool: the reply
    folder of this run."""

    units: list[tuple[str, int]]
    limit: int
    produce: Callable[[str, int], Any]
    handle: Callable[[Any], None]
    should_stop: Callable[[], bool]
    spec: Callable[[], Any]
    payload: Callable[[list[tuple[str, int]]], dict[str, Any]]
    commit_replies: Callable[[list[tuple[str, dict[str, Any]]]], None]
    remaining: Callable[[], Any]
    spool: Path


class LocalEngine:
    """Today's in-process code."""

    name = "local"

    def embed_blocks(self, encoder: Any, blocks: Sequence[list[str]], batch_size: int,
                     progress: ProgressFn | None) -> Iterator[tuple[int, np.ndarray]]:
        """(block index, vectors) for each block, in order; ``progress(done, n)`` within a block."""
        from .embed import encode_block

        for index, texts in enumerate(blocks):
            yield index, encode_block(encoder, texts, batch_size, progress)

    def synthesize(self, work: SynthWork) -> None:
        for out in run_concurrently(work.produce, work.units, work.limit, work.should_stop):
            work.handle(out)

    def generate_blocks(self, model_dir: Any, blocks: Sequence[list[list[str]]],
                        options: dict[str, Any]) -> Iterator[tuple[int, list[list[str]]]]:
        """(block index, generated titles per context) for each block of dialogue contexts."""
        if not blocks:
            return
        from .train import generate_titles, load_lm

        loaded = load_lm(model_dir)
        for index, contexts in enumerate(blocks):
            yield index, generate_titles(loaded, contexts, **options)

    def close(self) -> None:
        pass


# ==============================================================================================
# Ray
# ==============================================================================================
def _import_ray(local: bool = False):
    """The ray module. ``local``: a Ray about to start on this machine alone, whose processes
    then listen on 127.0.0.1 only (Ray's single-machine mode, which it otherwise keeps for macOS
    and Windows; on Linux its services listen on every interface)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by Ray's processes as they start
    try:
        import ray
    except ImportError:
        raise EngineError("the ray engine needs Ray: pip install 'ray[data]==2.60.0' "
                          "(it is in requirements.txt)") from None
    if local:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable at import
    return ray


def _ray_running() -> bool:
    """Whether this process is already connected to a Ray (then it is used as it is)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def check_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise EngineError unless something listens at a Ray address's host:port ('auto' is
    resolved by Ray itself)."""
    if address == "auto":
        return
    parts = urllib.parse.urlsplit(address if "://" in address else f"ray-gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise EngineError(f"Ray address {address!r} is not host:port (e.g. 127.0.0.1:6379 or ray://host:10001)")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise EngineError(f"Ray is not reachable at {address} ({reason}); start a cluster there with "
                          "`ray start --head`, or leave out the address to start a local Ray") from None


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


class RayEngine:
    """Steps on a Ray cluster (see the module docstring). One pool of worker actors at a time:
    an embedding pool holds CPUs (or GPUs) that a synthesis pool needs, so starting one ends the
    other."""

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float = 0):
        self.address = address or None
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self._ray = None
        self._started_ray = False
        self._pool_key: Any = None
        self._actors: list[Any] = []
        self._lock = threading.Lock()

    # -- cluster -------------------------------------------------------------------------------
    def connect(self):
        """Join the cluster (or start a local Ray); returns the ray module."""
        with self._lock:
            if self._ray is not None:
                return self._ray
            if self.address:
                check_address(self.address)
            ray = _import_ray(local=not self.address and not _ray_running())
            if not ray.is_initialized():
                try:
                    if self.address:
                        # the cluster's nodes get this package from here; their Python needs
                        # requirements.txt (the encoder's weights are a package too)
                        ray.init(address=self.address, log_to_driver=False, runtime_env={
                            "py_modules": [str(_repo_root() / "crs_core")], "excludes": ["__pycache__"]})
                    else:
                        from .embed import usable_cores

                        # Ray lowers its workers' priority by 15 by default (to keep its own
                        # processes responsive); here they do the step's work, which in process
                        # runs at this process's priority, so they get the same
                        ray.init(num_cpus=usable_cores(), include_dashboard=False, log_to_driver=False,
                                 runtime_env={"env_vars": {"PYTHONPATH": str(_repo_root())}},
                                 _system_config={"worker_niceness": 0})
                        self._started_ray = True
                except Exception as exc:  # Ray's errors are many and long: one line of it
                    where = f"at {self.address}" if self.address else "on this machine"
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise EngineError(f"could not start Ray {where}: {first}") from None
            self._ray = ray
            return ray

    def cluster_cpus(self) -> float:
        return float(self.connect().cluster_resources().get("CPU", 1))

    def pool_size(self, cpus_each: float) -> int:
        if self.workers:
            return max(1, int(self.workers))
        return max(1, int(self.cluster_cpus() // max(cpus_each, 1e-9)))

    @property
    def running_workers(self) -> int:
        """Actors in the current pool."""
        return len(self._actors)

    def worker_pids(self) -> list[int]:
        """The process ids of the current pool's actors (tests kill one)."""
        ray = self.connect()
        return ray.get([a.pid.remote() for a in self._actors])

    def _pool(self, key: Any, make: Callable[[], list[Any]]) -> list[Any]:
        if self._pool_key != key:
            self.release()
            self._actors = make()
            self._pool_key = key
        return self._actors

    def release(self) -> None:
        """End the worker actors (their CPUs go back to the cluster)."""
        if self._actors and self._ray is not None:
            for actor in self._actors:
                self._ray.kill(actor)
        self._actors, self._pool_key = [], None

    def close(self) -> None:
        self.release()
        if self._started_ray and self._ray is not None:
            self._ray.shutdown()
        self._ray, self._started_ray = None, False

    def _drain(self, submit: Callable[[Any, int], Any], n_blocks: int,
               may_start: Callable[[], bool] = lambda: True,
               returned: Callable[[int], None] = lambda _i: None) -> Iterator[Any]:
        """Run blocks 0..n-1 on the pool (``submit(actor, index) -> ObjectRef``), yielding each
        result as it finishes; no block starts once ``may_start()`` is false (blocks in flight
        still finish and are yielded)."""
        ray = self.connect()
        idle = list(self._actors)
        running: dict[Any, tuple[Any, int]] = {}
        nxt = 0
        try:
            while True:
                while idle and nxt < n_blocks and may_start():
                    actor = idle.pop()
                    running[submit(actor, nxt)] = (actor, nxt)
                    nxt += 1
                if not running:
                    return
                ready, _ = ray.wait(list(running), num_returns=1)
                actor, index = running.pop(ready[0])
                idle.append(actor)
                returned(index)
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayTaskError as exc:
                    # the step's own error (a teacher without a key, ...): its one line, not Ray's trace
                    if isinstance(getattr(exc, "cause", None), CRSError):
                        raise exc.cause from None
                    raise
                yield result
        finally:
            for ref in running:  # the caller stopped early (an error): nothing more is wanted
                try:
                    ray.cancel(ref)
                except Exception:  # already finished, or its actor is gone
                    pass

    # -- embedding ----------------------------------------------------------------------------
    def embed_blocks(self, encoder: Any, blocks: Sequence[list[str]], batch_size: int,
                     progress: ProgressFn | None) -> Iterator[tuple[int, np.ndarray]]:
        """(block index, vectors) as blocks finish, from actors holding the encoder: one built
        by name where the encoder is one of ``embed.ENCODERS`` (the same weights, the same
        vectors), else a copy of the given object."""
        if not blocks:
            return
        from .embed import ENCODERS

        ray = self.connect()
        name = getattr(encoder, "name", None)
        source = name if name in ENCODERS else encoder
        threads = max(1, int(self.cpus_per_worker))
        key = ("embed", name if name in ENCODERS else id(encoder), threads)

        def make() -> list[Any]:
            actor_cls = ray.remote(_embed_worker_class())
            options = dict(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, **_ACTOR_OPTIONS)
            return [actor_cls.options(**options).remote(source, threads)
                    for _ in range(self.pool_size(self.cpus_per_worker))]

        self._pool(key, make)
        yield from self._drain(lambda actor, i: actor.encode.remote(i, blocks[i], batch_size), len(blocks))

    # -- generation (LM evaluation) ------------------------------------------------------------------
    def generate_blocks(self, model_dir: Any, blocks: Sequence[list[list[str]]],
                        options: dict[str, Any]) -> Iterator[tuple[int, list[list[str]]]]:
        """(block index, generated titles per context) as blocks finish, from actors each holding
        the LM (on its GPU with ``gpus_per_worker``, else on ``cpus_per_worker`` threads). The
        model folder must be readable where the actors run."""
        if not blocks:
            return
        ray = self.connect()
        threads = max(1, int(self.cpus_per_worker))

        def make() -> list[Any]:
            actor_cls = ray.remote(_lm_worker_class())
            options_ = dict(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, **_ACTOR_OPTIONS)
            return [actor_cls.options(**options_).remote(str(model_dir), threads)
                    for _ in range(min(len(blocks), self.pool_size(self.cpus_per_worker)))]

        self._pool(("generate", str(model_dir), threads), make)
        yield from self._drain(lambda actor, i: actor.generate.remote(i, blocks[i], options), len(blocks))

    # -- synthesis ------------------------------------------------------------------------------
    def synthesize(self, work: SynthWork) -> None:
        """Blocks of ``work.limit`` x 2 units over a pool of synthesis actors; each block's
        replies and outcomes are committed here as it finishes."""
        if not work.units:
            return
        spec = work.spec()
        ray = self.connect()
        per_block = max(1, work.limit * 2)
        blocks = [work.units[s:s + per_block] for s in range(0, len(work.units), per_block)]
        work.spool.mkdir(parents=True, exist_ok=True)
        spec_ref = ray.put(spec)
        actor_cls = ray.remote(_synth_worker_class())
        # teacher calls wait on the endpoint: a worker needs little CPU of its own
        cpus = min(self.cpus_per_worker, 0.5)
        actors = self._pool(("synth", spec_ref.hex()), lambda: [
            actor_cls.options(num_cpus=cpus, **_ACTOR_OPTIONS).remote(spec_ref, str(work.spool)) for _ in range(min(len(blocks), self.pool_size(cpus)))])
        shares = _BudgetShares(work.remaining, len(actors))

        def submit(actor, index: int):
            return actor.run.remote(index, work.payload(blocks[index]), shares.take(index))

        try:
            for _index, outcomes, replies in self._drain(submit, len(blocks), lambda: not work.should_stop(),
                                                         shares.give_back):
                work.commit_replies(replies)
                for out in outcomes:
                    work.handle(out)
        finally:
            self.release()


class _BudgetShares:
    """A budget shared out among the blocks in flight: each block's teacher gets an equal part
    of what is neither spent (``remaining()``) nor lent to a block still running, so the blocks
    together never spend more than the budget."""

    def __init__(self, remaining: Callable[[], Any], slots: int):
        self.remaining, self.slots = remaining, max(1, slots)
        self.lent: dict[int, Any] = {}

    def take(self, index: int):
        left = self.remaining()
        if left is None:
            return None
        free = max(1, self.slots - len(self.lent))

        def part(name: str, whole: bool):
            total = getattr(left, name)
            if total is None:
                return None
            rest = total - sum(getattr(b, name) or 0 for b in self.lent.values())
            share = rest / free
            return max(0, int(share) if whole else share)

        share = replace(left, max_calls=part("max_calls", True), max_tokens=part("max_tokens", True),
                        max_cost=part("max_cost", False))
        self.lent[index] = share
        return share

    def give_back(self, index: int) -> None:
        self.lent.pop(index, None)


def _embed_worker_class():
    class EmbedWorker:
        """A Ray actor holding one encoder."""

        def __init__(self, source: Any, threads: int):
            import torch

            from .embed import get_encoder

            torch.set_num_threads(threads)
            self.encoder = get_encoder(source, workers=threads) if isinstance(source, str) else source

        def pid(self) -> int:
            return os.getpid()

        def encode(self, index: int, texts: list[str], batch_size: int) -> tuple[int, np.ndarray]:
            from .embed import encode_block

            return index, encode_block(self.encoder, texts, batch_size)

    return EmbedWorker


def _lm_worker_class():
    class LMWorker:
        """A Ray actor holding one LM for generation."""

        def __init__(self, model_dir: str, threads: int):
            import torch

            from .train import load_lm

            torch.set_num_threads(threads)
            self.loaded = load_lm(model_dir)

        def pid(self) -> int:
            return os.getpid()

        def generate(self, index: int, contexts: list[list[str]], options: dict[str, Any]):
            from .train import generate_titles

            return index, generate_titles(self.loaded, contexts, **options)

    return LMWorker


def _synth_worker_class():
    class SynthActor:
        """A Ray actor producing blocks of synthesis units with ``synth.SynthWorker``."""

        def __init__(self, spec: Any, spool: str):
            from .synth import SynthWorker

            self.cache = SpoolCache(Path(spool), spec.known_replies)
            self.worker = SynthWorker(spec, self.cache)

        def pid(self) -> int:
            return os.getpid()

        def run(self, index: int, payload: dict[str, Any], budget: Any):
            self.cache.refresh()  # replies that workers which died since got
            outcomes = self.worker.produce_block(payload, budget)
            keys = [c.cache_key for out in outcomes for c in out.completions]
            return index, outcomes, list(self.cache.get_many(keys).items())

    return SynthActor


class SpoolCache:
    """A synthesis worker's teacher cache: the replies the workspace had when the run started
    (``known``), then every reply in the run's spool folder; a new reply is appended to this
    process's own file of it (``teacher.JsonlCache``, fsynced before the call counts as done)."""

    def __init__(self, folder: Path, known: dict[str, dict[str, Any]] | None = None):
        from .teacher.cache import JsonlCache, process_owner

        self.folder = Path(folder)
        self.known = dict(known or {})
        self.own = JsonlCache(self.folder / f"worker-{process_owner().replace(':', '-')}.jsonl")
        self.others: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        found: dict[str, dict[str, Any]] = {}
        for path in sorted(self.folder.glob("*.jsonl")):
            if path == self.own.path:
                continue
            found.update(read_spool_file(path))
        with self._lock:
            self.others = found

    def get(self, key: str) -> dict[str, Any] | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        out = self.own.get_many(keys)
        with self._lock:
            for key in keys:
                if key not in out:
                    entry = self.known.get(key) or self.others.get(key)
                    if entry is not None:
                        out[key] = dict(entry)
        return out

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.own.put(key, entry)

    def put_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        self.own.put_many(items)


def read_spool_file(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of one worker's reply file; a torn last line (its process was killed while
    writing it) is skipped."""
    out: dict[str, dict[str, Any]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    out.setdefault(row["cache_key"], row["entry"])
                except (ValueError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    return out


def spool_folder(workspace_path: str | os.PathLike, what: str) -> Path:
    """Where a run's worker replies wait for the driver: next to the workspace file."""
    ws = Path(workspace_path)
    return ws.parent / f"{ws.name}.ray" / hashlib.sha1(what.encode("utf-8")).hexdigest()[:16]


def remove_spool(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# ==============================================================================================
# the registry
# ==============================================================================================
_ENGINES: dict[tuple, Any] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(name: str = DEFAULT_ENGINE, address: str | None = None, **options: Any):
    """The engine ``name`` (one instance per name, address and options per process). ``ray``
    with ``address`` None reads $CRS_RAY_ADDRESS, else starts a local Ray on first use."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if name == "local":
        return LocalEngine()
    address = address or os.environ.get(ENV_RAY_ADDRESS) or None
    key = (name, address, tuple(sorted(options.items())))
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = RayEngine(address, **options)
        return engine


def close_engines() -> None:
    """End every engine's workers and the local Ray this process started."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        engine.close()
