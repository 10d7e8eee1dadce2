"""`Teacher`, the one wrapper around any provider: chat completions with token counts, cache,
retries, concurrency, idempotency, structured replies and a budget.

Providers (``crs_core.teacher.providers``: one module each, and the registry ``PROVIDERS``):
``openai``, any OpenAI-compatible endpoint; ``local``, a llama.cpp server started on 127.0.0.1
(the default when no endpoint is configured, ``TeacherConfig.from_env()``). A provider sends one
request; everything here (cache, budget, concurrency, retries, idempotency, the structured-output
fallback) is the same for every provider.

Retries are made here, not by the openai client (it runs with ``max_retries=0``): exponential
backoff with jitter on 429, 5xx, timeouts, connection errors and unusable responses, honouring
``Retry-After`` up to ``max_retry_after``. The client's own loop cannot do what the tests in
tests/test_teacher.py require of a call: retry a 200 whose body is unusable, count each attempt
(``Completion.attempts``, ``TeacherError.attempts``, ``Tally.requests`` / ``retries``), back off
by the config's ``backoff_base`` / ``backoff_max``, stop between attempts when its run is
cancelled, and not retry a 500 that refuses a response_format form while probing.

Concurrency: the HTTP calls of every teacher of the process run as coroutines on one asyncio
event loop in a background thread (``crs_core.teacher.loop``): a call in flight costs a coroutine,
not a thread. ``chat`` and ``chat_many`` block their calling thread, which receives the results
(and runs ``on_result`` / ``progress``); they may be called from any number of threads.

Cache: every call goes through a cache keyed by a hash of (provider kind, endpoint, model,
messages, parameters, optional salt), never the API key. With a workspace the cache is its
``llm_cache`` table and each result is committed before the call counts as done (returned,
tallied, reported to ``progress``): a crash or restart repeats no paid call that was reported
done. Commits run in a writer thread, off the event loop: a call's concurrency slot is free as
soon as its response is read, and the results that arrive together are committed together (one
transaction; while requests are in flight the writer paces itself, see ``cache.CacheWriter``).
Identical requests in flight at the same time are made once. A background job, which must not
open the workspace, uses a ``JsonlCache`` in its folder (fsynced before a result counts as done; ``import_cache_entries``
copies it into the workspace later). Without either, an in-memory ``MemoryCache``.

Budget: limits on calls, tokens and money (price table, $ per 1M input / output tokens; local
costs 0). A call starts only if its worst case (estimated prompt + max_tokens) fits into what is
left after finished and in-flight calls; otherwise the teacher waits for in-flight calls to
settle and, if it still does not fit, stops: ``chat`` raises ``BudgetExceeded`` and
``chat_many`` returns what completed plus ``BudgetExhausted`` markers for the rest.

The API key lives only in memory (``Secret``); it is never part of a cache key, the workspace,
``TeacherConfig.to_dict()``, a repr, or a log line. A key is sent only to the endpoint it is
fixed to: a key given with a config (typed into the studio) to the base URL it was given for
(a config whose base URL changed drops it: the key must be entered again), and
``$OPENAI_API_KEY`` only to ``$CRS_TEACHER_BASE_URL`` (api.openai.com when unset). Error messages
from an endpoint are redacted of anything that looks like a key before they are shown or logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import queue
import random
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Sequence

from .budget import FREE, Budget, Ledger, Price, Tally, ZERO_COUNTS, price_for
from .cache import CacheWriter, LLMCache, as_cache, cache_get_many
from .completion import BudgetExhausted, Completion, Generation, Result, TeacherFailure
from .config import TeacherConfig
from .errors import BudgetExceeded, CallFailed, TeacherAuthError, TeacherError, TeacherSetupError
from .loop import on_loop, pause, teacher_loop
from .providers import Provider, provider_class
from .request import ChatRequest, Messages, RequestLike, as_request, estimate_tokens, message_text
from .secrets import redact_secrets
from .structured import FORMAT_REFUSED_STATUS, decide_form, decided_form, probe_lock, response_format_for

log = logging.getLogger(__name__)

CACHE_KEY_VERSION = 1
RECENT_ENTRIES = 4096  # committed entries a teacher remembers (see Teacher._recent)


# ==============================================================================================
# the teacher
# ==============================================================================================
class Teacher:
    """Chat completions with cache, retries, concurrency, tally and budget (see module doc)."""

    def __init__(
        self,
        config: TeacherConfig | None = None,
        *,
        cache: LLMCache | Any | None = None,
        budget: Budget | None = None,
        api_key: str | None = None,
        server: Any | None = None,
        sleep: Callable[[float], None] | None = None,
    ):
        """config: None = ``TeacherConfig.from_env()``. cache: a cache, a Workspace (its
        llm_cache table) or None (in memory). api_key: overrides the config's/environment's key
        for this object only. server: a LlamaServer to use (local provider; not stopped by
        ``close``); otherwise the local provider starts its own on first need and ``close`` (or
        interpreter exit) stops it. sleep: replaces the wait between retries (tests; it is
        called in a worker thread)."""
        self.config = config or TeacherConfig.from_env()
        if api_key:
            self.config = self.config.with_api_key(api_key)
        self.cache: LLMCache = as_cache(cache)
        self.provider: Provider = provider_class(self.config.provider)(self.config, server)
        self._loaded = False  # provider.load() has run
        self._refused: TeacherAuthError | None = None  # the endpoint refused the key: nothing more is sent
        self._load_lock = threading.Lock()
        self._lock = threading.Lock()
        self._counts: dict[str, Any] = dict(ZERO_COUNTS)  # Tally's fields, under self._lock
        # on the teacher loop only: calls in flight by cache key (done with the committed cache
        # entry, or None if the call failed)
        self._inflight: dict[str, asyncio.Future] = {}
        # on the teacher loop only: the entries this teacher committed last, so that a request
        # whose cache lookup (in its calling thread) missed just before an identical call
        # committed is answered from that entry, not paid again
        self._recent: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        # cache commits, in their own thread; they pace themselves while requests are in flight
        self._writer = CacheWriter(self.cache, lambda: self._counts["in_flight"] > 0)
        # requests are marked in flight in the workspace before they are sent (not for the
        # local server, which bills nothing); keys an earlier process left marked, read once
        self._marks_inflight = not self.provider.free and hasattr(self.cache, "interrupted_keys")
        self._interrupted: frozenset[str] | None = None
        self._ledger = Ledger(budget)
        self._check_budget_pricing(budget)
        self._sleep = sleep

    # -- identity ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"Teacher(provider={self.config.provider!r}, model={self.model!r}, endpoint={self.endpoint!r})"

    @property
    def model(self) -> str:
        return self.provider.model_name

    @property
    def endpoint(self) -> str:
        """Where calls go, as part of the cache key (see the provider's `endpoint`)."""
        return self.provider.endpoint

    @property
    def price(self) -> Price | None:
        if self.provider.free:
            return FREE
        return price_for(self.model, self.config.price_table)

    # -- budget and tally ---------------------------------------------------------------
    def _check_budget_pricing(self, budget: Budget | None) -> None:
        if budget is not None and budget.max_cost is not None and self.price is None:
            raise TeacherSetupError(
                f"a money budget needs a price for model {self.model!r}: add it to the price table "
                "($ per 1M input and output tokens)"
            )

    def set_budget(self, budget: Budget | None) -> None:
        """Replace the budget; the new one counts from now."""
        self._check_budget_pricing(budget)
        self._ledger = Ledger(budget)

    @property
    def budget(self) -> Budget:
        return self._ledger.budget

    @property
    def budget_exhausted(self) -> str | None:
        """Why the budget stopped calls, or None while calls may still be made."""
        return self._ledger.exhausted

    def tally(self) -> Tally:
        """A consistent snapshot of the counters; safe to call from any thread at any time."""
        with self._lock:
            return Tally(**self._counts)

    def reset_tally(self) -> None:
        with self._lock:
            in_flight = self._counts["in_flight"]
            self._counts = {**ZERO_COUNTS, "in_flight": in_flight}

    def _bump(self, **delta: Any) -> None:
        with self._lock:
            counts = self._counts
            for k, v in delta.items():
                counts[k] += v

    def interrupted_calls(self) -> int:
        """Requests that an earlier process on this cache sent and never got an answer for (it
        crashed or was killed with them in flight): the endpoint may have billed them, and a
        run that needs them sends them again. Counted once per teacher, before its first call."""
        if self._interrupted is None:
            finder = getattr(self.cache, "interrupted_keys", None)
            self._interrupted = frozenset(finder() if finder is not None else ())
        return len(self._interrupted)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "Teacher":
        """Connect now (and start the local server), instead of at the first call."""
        self._load()
        return self

    def close(self) -> None:
        self._writer.stop()  # nothing is left to write: every call returns after its commit
        with self._load_lock:
            self.provider.close()
            self._loaded = False

    def __enter__(self) -> "Teacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _load(self) -> None:
        if self._loaded:
            return
        with self._load_lock:
            if not self._loaded:
                self.provider.load()
                self._loaded = True

    def ping(self) -> list[str]:
        """The endpoint's model ids (GET /models); raises TeacherError if it does not answer."""
        self._load()
        try:
            return on_loop(self.provider.amodels())
        except CallFailed as exc:
            raise TeacherError(self.redact(f"{self.provider.where} does not answer: {exc.message}"),
                               kind="connection") from exc

    def redact(self, text: str) -> str:
        """``text`` without this teacher's key or anything else that looks like a key."""
        return redact_secrets(text, self.provider.api_key, self.config.api_key)

    # -- cache keys -------------------------------------------------------------------------
    def request_record(self, req: ChatRequest) -> dict[str, Any]:
        """What identifies a call (hashed into the cache key, stored with the result): no key."""
        cfg = self.config
        params: dict[str, Any] = {
            "temperature": cfg.temperature if req.temperature is None else float(req.temperature),
            "max_tokens": cfg.max_tokens if req.max_tokens is None else int(req.max_tokens),
        }
        if req.response_format is not None:
            params["response_format"] = req.response_format
        elif req.json_schema is not None:
            form = self.structured_format() or self.structured_candidates()[0]
            fmt = response_format_for(req.json_schema, form)
            if fmt is not None:
                params["response_format"] = fmt
        if req.seed is not None:
            params["seed"] = int(req.seed)
        record = {
            "v": CACHE_KEY_VERSION, "provider": cfg.provider, "endpoint": self.endpoint,
            "model": self.model, "messages": req.messages, "params": params,
        }
        if req.cache_salt is not None:
            record["salt"] = req.cache_salt
        return record

    @staticmethod
    def cache_key_of(record: dict[str, Any]) -> str:
        canon = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def cache_key(self, request: RequestLike) -> str:
        return self.cache_key_of(self.request_record(as_request(request)))

    # -- calls (in the calling thread) -----------------------------------------------------
    def chat(
        self,
        messages: Messages,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        response_format: dict[str, Any] | None = None,
        seed: int | None = None,
        cache_salt: str | int | None = None,
        use_cache: bool = True,
        stop: threading.Event | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> Completion:
        """One chat completion (cached). Raises TeacherError / BudgetExceeded. json_schema: the
        reply's schema, sent in the form this endpoint accepts (decided on the first such call)."""
        req = ChatRequest(list(messages), temperature, max_tokens, response_format, seed, cache_salt,
                          json_schema=json_schema)
        if self._needs_format_probe(req):
            outcome = self._probe_format(req, stop=stop, use_cache=use_cache)
            if isinstance(outcome, TeacherError):
                raise outcome
            return outcome
        with contextlib.closing(self._outcomes([req], limit=1, stop=stop, use_cache=use_cache)) as outcomes:
            for _, outcome in outcomes:
                if isinstance(outcome, TeacherError):
                    raise outcome
                return outcome
        raise AssertionError("unreachable: every request has an outcome")

    def chat_many(
        self,
        requests: Iterable[RequestLike],
        *,
        concurrency: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        on_result: Callable[[int, Result], None] | None = None,
        stop: threading.Event | None = None,
        use_cache: bool = True,
    ) -> list[Result]:
        """Run requests concurrently (at most ``concurrency`` in flight) and return results in
        request order: a Completion, a TeacherFailure (error after retries, or cancelled via
        ``stop``) or a BudgetExhausted marker. ``progress(done, total)`` and
        ``on_result(index, result)`` are called in the calling thread as results arrive.
        Setup errors (no key, the local server cannot start, the cache cannot be written)
        raise instead."""
        reqs = [as_request(r) for r in requests]
        total = len(reqs)
        results: list[Result | None] = [None] * total
        limit = max(1, int(concurrency or self.config.default_concurrency))
        done = 0
        first = next((i for i, r in enumerate(reqs) if self._needs_format_probe(r)), None)
        rest = list(range(total))
        if first is not None:  # one structured request alone decides the endpoint's form
            outcome = self._probe_format(reqs[first], stop=stop, use_cache=use_cache)
            results[first] = outcome if isinstance(outcome, Completion) else _failure(outcome)
            done += 1
            if on_result is not None:
                on_result(first, results[first])
            if progress is not None:
                progress(done, total)
            rest.remove(first)
        with contextlib.closing(self._outcomes([reqs[i] for i in rest], limit=limit, stop=stop,
                                               use_cache=use_cache)) as outcomes:
            for j, outcome in outcomes:
                i = rest[j]
                result = outcome if isinstance(outcome, Completion) else _failure(outcome)
                results[i] = result
                done += 1
                if on_result is not None:
                    on_result(i, result)
                if progress is not None:
                    progress(done, total)
        return [r if r is not None else TeacherFailure("not run", kind="cancelled") for r in results]

    # -- structured replies -------------------------------------------------------------
    def _format_key(self) -> tuple[str, str]:
        return (self.endpoint, self.model)

    def structured_format(self) -> str | None:
        """The response_format form this endpoint accepts (FORMATS), None until decided."""
        return decided_form(self._format_key())

    def structured_candidates(self) -> tuple[str, ...]:
        """Forms to try, best first: the local llama.cpp server is known to take json_object with
        a schema; any other endpoint is asked the OpenAI way first."""
        return self.provider.structured_candidates

    def _needs_format_probe(self, req: ChatRequest) -> bool:
        return req.json_schema is not None and req.response_format is None and self.structured_format() is None

    def _probe_format(self, req: ChatRequest, *, stop: threading.Event | None,
                      use_cache: bool) -> Completion | TeacherError:
        """Answer ``req`` while deciding the endpoint's form: each candidate form in turn, until
        one is answered (a cached answer counts: that form worked before). A refusal
        (FORMAT_REFUSED_STATUS) moves on to the next form without retries; any other error is
        returned and decides nothing. One probe per endpoint at a time; requests that wait for
        it use the decision."""
        with probe_lock(self._format_key()):
            if self.structured_format() is not None:
                outcome = None
            else:
                outcome = self._probe_locked(req, stop=stop, use_cache=use_cache)
        if outcome is not None:
            return outcome
        with contextlib.closing(self._outcomes([req], limit=1, stop=stop, use_cache=use_cache)) as outcomes:
            for _, outcome in outcomes:
                return outcome
        raise AssertionError("unreachable: every request has an outcome")

    def _probe_locked(self, req: ChatRequest, *, stop: threading.Event | None,
                      use_cache: bool) -> Completion | TeacherError:
        refusals: list[str] = []
        for form in self.structured_candidates():
            fmt = response_format_for(req.json_schema or {}, form)
            probe = replace(req, response_format=fmt, json_schema=None, probe=fmt is not None)
            outcome: Completion | TeacherError | None = None
            with contextlib.closing(self._outcomes([probe], limit=1, stop=stop, use_cache=use_cache)) as outcomes:
                for _, outcome in outcomes:
                    break
            if isinstance(outcome, TeacherError) and outcome.kind == "format_refused":
                refusals.append(f"{form}: {outcome}")
                log.info("teacher: %s refuses response_format %s; trying the next form", self.endpoint, form)
                continue
            if isinstance(outcome, Completion):
                decide_form(self._format_key(), form)
                if refusals:
                    log.info("teacher: %s takes structured replies as %s", self.endpoint, form)
            return outcome
        raise AssertionError("unreachable: the last form sends no response_format")

    def _outcomes(
        self, reqs: Sequence[ChatRequest], *, limit: int, stop: threading.Event | None, use_cache: bool,
    ) -> Iterator[tuple[int, Completion | TeacherError]]:
        """``(index, Completion or TeacherError)`` per request, in the calling thread, as they come:
        the cached ones first (one lookup), then the calls, which run on the teacher loop with at
        most ``limit`` in flight. A completion is in the cache before it is yielded.

        Setup errors (and any error that is not a TeacherError) raise. When this stops early (an
        error here or in the consumer, who must close it), the calls not started are cancelled
        and those in flight finish, and are committed, before it returns."""
        records = [self.request_record(r) for r in reqs]
        keys = [self.cache_key_of(rec) for rec in records]
        todo = list(range(len(reqs)))
        if use_cache:
            hits = cache_get_many(self.cache, keys)
            todo = [i for i in todo if keys[i] not in hits]
            for i, key in enumerate(keys):
                if key in hits:
                    yield i, self._from_cache(key, hits[key])
        if not todo:
            return
        if self._marks_inflight:
            self.interrupted_calls()  # read before this teacher marks anything
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        halt = threading.Event()  # the calling thread has given up

        def cancelled() -> bool:
            return halt.is_set() or (stop is not None and stop.is_set())

        async def call_all() -> None:
            slots = asyncio.Semaphore(limit)  # HTTP requests in flight
            # calls from their start to their cache commit: twice the slots, so that a slot is
            # free again as soon as its response is read (up to `limit` results wait for their
            # commit meanwhile), but calls never run further ahead of the cache than that
            calls = asyncio.Semaphore(2 * limit)

            async def one(i: int) -> None:
                try:
                    outcome: Any = await self._call(reqs[i], records[i], keys[i], calls, slots, cancelled,
                                                    use_cache=use_cache)
                except BaseException as exc:  # noqa: BLE001 - the calling thread raises what it must
                    outcome = exc
                arrived.put((i, outcome))

            await asyncio.gather(*(one(i) for i in todo))

        running = asyncio.run_coroutine_threadsafe(call_all(), teacher_loop())
        try:
            for _ in todo:
                i, outcome = arrived.get()
                if isinstance(outcome, BaseException) and (
                        isinstance(outcome, TeacherSetupError) or not isinstance(outcome, TeacherError)):
                    raise outcome
                yield i, outcome
        finally:
            halt.set()
            running.result()

    # -- on the teacher loop ----------------------------------------------------------------
    async def _call(
        self, req: ChatRequest, record: dict[str, Any], key: str, calls: asyncio.Semaphore,
        slots: asyncio.Semaphore, cancelled: Callable[[], bool], *, use_cache: bool,
    ) -> Completion:
        """One request whose key was not in the cache. If the same key is in flight, its result
        (once committed) is a cached hit here; if that call fails, this request makes its own.
        The check comes before waiting for a place in ``calls``, so a duplicate never starts
        after its leader has finished."""
        if not use_cache:
            async with calls:
                return (await self._call_and_store(req, record, key, slots, cancelled, store=False))[0]
        if (recent := self._recent.get(key)) is not None:
            return self._from_cache(key, recent)
        while (leader := self._inflight.get(key)) is not None:
            while not leader.done():
                if cancelled():
                    raise TeacherError("cancelled", kind="cancelled")
                await asyncio.wait([leader], timeout=0.25)
            if leader.result() is not None:
                return self._from_cache(key, leader.result())
        done = self._inflight[key] = asyncio.get_running_loop().create_future()
        entry = None
        try:
            async with calls:
                completion, entry = await self._call_and_store(req, record, key, slots, cancelled, store=True)
            return completion
        finally:
            del self._inflight[key]
            done.set_result(entry)
            if entry is not None:
                self._recent[key] = entry
                if len(self._recent) > RECENT_ENTRIES:
                    self._recent.popitem(last=False)

    async def _call_and_store(
        self, req: ChatRequest, record: dict[str, Any], key: str, slots: asyncio.Semaphore,
        cancelled: Callable[[], bool], *, store: bool,
    ) -> tuple[Completion, dict[str, Any] | None]:
        """Budget check, the HTTP call (holding one of the concurrency slots), then the cache
        commit in the writer thread (after the slot is released and the budget settled, so the
        next call's request overlaps it). Returns the completion and the cache entry committed
        (None when store is False)."""
        params = record["params"]
        price = self.price
        est_prompt = estimate_tokens(message_text(req.messages)) + 4 * len(req.messages)
        worst_tokens = est_prompt + params["max_tokens"]
        worst_cost = price.cost(est_prompt, params["max_tokens"]) if price is not None else 0.0
        ledger = self._ledger  # settle where reserved, even if set_budget replaces it meanwhile
        reservation: tuple[int, float] | None = None
        spent_tokens, spent_cost, made = 0, 0.0, False
        marked = False  # this request's in-flight mark is (or may be) in the workspace
        try:
            async with slots:
                if cancelled():
                    raise TeacherError("cancelled before it started", kind="cancelled")
                if self._refused is not None:
                    raise TeacherAuthError(str(self._refused), status=self._refused.status, attempts=0)
                got = await ledger.reserve(worst_tokens, worst_cost, cancelled)
                if isinstance(got, str):
                    if got == "cancelled":
                        raise TeacherError("cancelled", kind="cancelled")
                    self._bump(budget_refused=1)
                    raise BudgetExceeded(got)
                reservation = got
                self._bump(in_flight=1)
                try:
                    if not self._loaded:  # loading may start the local server: not on the loop
                        await asyncio.to_thread(self._load)
                    if store and self._marks_inflight:
                        marked = True
                        await self._writer.start(key)  # committed before the request is sent
                        if key in (self._interrupted or ()):
                            self._bump(resent=1)
                    made = True
                    t0 = time.monotonic()
                    reply, attempts = await self._request_with_retries(
                        req, params, cancelled, idempotency_key=key if store else None)
                finally:
                    self._bump(in_flight=-1)
            if reply.usage is not None:
                pt, ct = reply.usage
            else:  # an endpoint that reports no usage: count estimates (budget stays honest)
                pt, ct = est_prompt, estimate_tokens(reply.text)
            cost = price.cost(pt, ct) if price is not None else None
            spent_tokens, spent_cost = pt + ct, cost or 0.0
            if reservation is not None:  # spent now, whatever the commit does
                ledger.settle(reservation, spent_tokens, spent_cost, made=made)
                reservation = None
            completion = Completion(
                text=reply.text, prompt_tokens=pt, completion_tokens=ct, cost=cost, cached=False,
                model=reply.model or self.model, finish_reason=reply.finish_reason, cache_key=key,
                attempts=attempts, seconds=time.monotonic() - t0,
            )
            entry = None
            if store:
                entry = {
                    "provider": self.config.provider, "model": self.model, "request": record,
                    "response": {"text": reply.text, "finish_reason": reply.finish_reason, "model": reply.model,
                                 "id": reply.response_id, "usage": reply.raw_usage},
                    "prompt_tokens": pt, "completion_tokens": ct, "cost": cost,
                }
                await self._writer.write(key, entry)  # committed before the call counts as done
                marked = False  # (the entry's commit cleared the mark)
            self._bump(calls=1, prompt_tokens=pt, completion_tokens=ct, cost=cost or 0.0,
                       unpriced_calls=0 if price is not None else 1)
            return completion, entry
        except TeacherError as exc:
            if exc.kind not in ("cancelled", "setup", "budget"):
                self._bump(failures=1)
            raise
        finally:
            if reservation is not None:
                ledger.settle(reservation, spent_tokens, spent_cost, made=made)
            if marked:  # ended without an entry (failed, cancelled): no longer in flight
                with contextlib.suppress(TeacherError):  # (the error that ended it is the one to raise)
                    await self._writer.end(key)

    async def _request_with_retries(
        self, req: ChatRequest, params: dict[str, Any], cancelled: Callable[[], bool],
        *, idempotency_key: str | None = None,
    ) -> tuple[Generation, int]:
        """The provider's answer and the attempts made (see the module note on retries).
        ``idempotency_key`` (the cache key) goes out as an ``Idempotency-Key`` header, the same
        for every attempt and for a rerun after a crash: an endpoint or gateway that honours it
        answers a repeated request without billing it again; others ignore it."""
        cfg = self.config
        body: dict[str, Any] = {
            "model": self.model, "messages": req.messages,
            "temperature": params["temperature"], "max_tokens": params["max_tokens"],
        }
        if "response_format" in params:
            body["response_format"] = params["response_format"]
        if "seed" in params:
            body["seed"] = params["seed"]
        headers = {"Idempotency-Key": f"crs-{idempotency_key}"} if idempotency_key else {}
        attempt = 0
        while True:
            if cancelled():
                raise TeacherError("cancelled", kind="cancelled", attempts=attempt)
            attempt += 1
            self._bump(requests=1, retries=1 if attempt > 1 else 0)
            try:
                return await self.provider.agenerate(body, headers=headers), attempt
            except CallFailed as exc:
                failed = exc
            kind, retryable, status = failed.kind, failed.retryable, failed.status
            if req.probe and status in FORMAT_REFUSED_STATUS:  # this form is refused: the next one
                kind, retryable = "format_refused", False
            message = self.redact(failed.message)  # endpoints echo keys in error messages
            if status in (401, 403):
                self._refused = TeacherAuthError(f"{message} (the endpoint refused the API key: no call can "
                                                 "succeed; check the key and the base URL)", status=status,
                                                 attempts=attempt)
                raise self._refused
            if not retryable or attempt >= cfg.max_attempts:
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise TeacherError(message + tries, kind=kind, status=status, attempts=attempt)
            delay = self._backoff(attempt, failed.retry_after)
            log.info("teacher: %s; retry %d/%d in %.2f s", message, attempt, cfg.max_attempts - 1, delay)
            if self._sleep is not None:
                await asyncio.to_thread(self._sleep, delay)
            elif await pause(delay, cancelled):
                raise TeacherError("cancelled", kind="cancelled", attempts=attempt)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        if retry_after is not None:
            return min(retry_after, cfg.max_retry_after)
        ceiling = min(cfg.backoff_max, cfg.backoff_base * (2 ** (attempt - 1)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # "equal jitter"

    def _from_cache(self, key: str, entry: dict[str, Any]) -> Completion:
        resp = entry.get("response") or {}
        self._bump(cached_hits=1)
        return Completion(
            text=resp.get("text", ""), prompt_tokens=int(entry.get("prompt_tokens") or 0),
            completion_tokens=int(entry.get("completion_tokens") or 0), cost=entry.get("cost"),
            cached=True, model=resp.get("model") or entry.get("model") or "",
            finish_reason=resp.get("finish_reason"), cache_key=key, attempts=0,
        )


def _failure(exc: TeacherError) -> TeacherFailure:
    """chat_many's place-holder for a request that failed."""
    if isinstance(exc, BudgetExceeded):
        return BudgetExhausted(str(exc))
    return TeacherFailure(str(exc), kind=exc.kind, status=exc.status, attempts=exc.attempts)


# ==============================================================================================
# conveniences
# ==============================================================================================
def default_teacher(workspace: Any | None = None, *, budget: Budget | None = None, **config: Any) -> Teacher:
    """The teacher the studio uses when nothing else is said: an endpoint from the environment
    ($CRS_TEACHER_BASE_URL), else the local llama.cpp server with SmolLM2."""
    return Teacher(TeacherConfig.from_env(**config), cache=workspace, budget=budget)


def summarize(results: Sequence[Result]) -> dict[str, int]:
    """Counts of completions, cached hits, failures and budget stops in a chat_many result."""
    out = {"completed": 0, "cached": 0, "failed": 0, "budget": 0, "cancelled": 0}
    for r in results:
        if isinstance(r, Completion):
            out["completed"] += 1
            out["cached"] += int(r.cached)
        elif isinstance(r, BudgetExhausted):
            out["budget"] += 1
        elif r.kind == "cancelled":
            out["cancelled"] += 1
        else:
            out["failed"] += 1
    return out
