"""The teacher LLM: one interface to chat completions, with token counts, cache, retries,
concurrency and a budget.

    teacher = Teacher(TeacherConfig.openai("http://host/v1", "gpt-4o-mini"), cache=workspace,
                      budget=Budget(max_cost=2.0))
    c = teacher.chat([{"role": "user", "content": "hi"}])         # -> Completion
    results = teacher.chat_many(requests, concurrency=16)          # -> [Completion | TeacherFailure]
    teacher.tally()                                                # live, thread-safe counters

Providers (crs_core.teacher_providers: one class each, and the registry): ``openai``, any
OpenAI-compatible endpoint; ``local``, a llama.cpp server started on 127.0.0.1 (the default when
no endpoint is configured, ``TeacherConfig.from_env()``). Requests always go through the
``openai`` client (v1+ API) with ``max_retries=0``: retries are done here (exponential backoff
with jitter on 429, 5xx, timeouts, connection errors and unreadable responses, honouring
``Retry-After``), because a call must count its attempts, stop between attempts when its run is
cancelled, stop at once on 401/403, and move on to the next structured-output form when one is
refused, none of which the client's own retry loop exposes.

Concurrency: the HTTP calls of every teacher of the process run as coroutines on one asyncio
event loop in a background thread (``openai.AsyncOpenAI``): a call in flight costs a coroutine,
not a thread. ``chat`` and ``chat_many`` block their calling thread, which receives the results
(and runs ``on_result`` / ``progress``); they may be called from any number of threads.

Cache: every call goes through a cache keyed by a hash of (provider kind, endpoint, model,
messages, parameters, optional salt), never the API key. With a workspace the cache is its
``llm_cache`` table and each result is committed before the call counts as done (returned,
tallied, reported to ``progress``): a crash or restart repeats no paid call that was reported
done. Commits run in a writer thread, off the event loop: a call's concurrency slot is free as
soon as its response is read, and the results that arrive together are committed together (one
transaction; while requests are in flight the writer paces itself, see ``_CacheWriter``).
Identical requests in flight at the same time are made once. A background job, which must not
open the workspace, uses a
``JsonlCache`` in its folder (fsynced before a result counts as done; ``import_cache_entries``
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
import atexit
import collections
import contextlib
import email.utils
import hashlib
import ipaddress
import json
import logging
import os
import queue
import random
import re
import threading
import time
import urllib.parse
import weakref
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, Union

from .errors import CRSError
from .llm_output import first_json
from .teacher_providers import (DEFAULT_BASE_URL, FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA, FORMAT_NONE, FORMATS,
                                NO_KEY, ConfigProblem, LocalLlama, OpenAICompatible, Provider, provider_class)

log = logging.getLogger(__name__)

PROVIDER_OPENAI = OpenAICompatible.name
PROVIDER_LOCAL = LocalLlama.name
DEFAULT_TEMPERATURE = 0.8  # the active-synthesis paper's setting
DEFAULT_MAX_TOKENS = 512
ENV_API_KEY = "OPENAI_API_KEY"  # the only variable a key is read from (fixed: never a name given at run time)
ENV_BASE_URL = "CRS_TEACHER_BASE_URL"  # also the only endpoint $OPENAI_API_KEY is sent to
ENV_MODEL = "CRS_TEACHER_MODEL"
CACHE_KEY_VERSION = 1
RECENT_ENTRIES = 4096  # committed entries a teacher remembers (see Teacher._recent)

Messages = list[dict[str, Any]]


# ==============================================================================================
# errors and results
# ==============================================================================================
class TeacherError(CRSError):
    """A chat call failed for good (after the retries it deserved).

    kind: 'http' | 'timeout' | 'connection' | 'bad_response' | 'budget' | 'cancelled' | 'setup'.
    """

    def __init__(self, message: str, *, kind: str = "http", status: int | None = None, attempts: int = 0):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.attempts = attempts


class BudgetExceeded(TeacherError):
    """The next call would cross a budget limit, so it was not made."""

    def __init__(self, message: str):
        super().__init__(message, kind="budget")


class TeacherSetupError(TeacherError):
    """The teacher cannot work at all (no API key, unknown provider, no price for a money budget,
    the cache cannot be written). Raised from ``chat_many`` instead of per-request failures."""

    def __init__(self, message: str):
        super().__init__(message, kind="setup")


class TeacherAuthError(TeacherSetupError):
    """The endpoint refused the key (HTTP 401 / 403): no call can succeed, so the run stops at
    once with the endpoint's reason instead of failing call after call."""

    def __init__(self, message: str, *, status: int, attempts: int = 1):
        super().__init__(message)
        self.status = status
        self.attempts = attempts


@dataclass(frozen=True)
class Completion:
    """One chat completion.

    prompt_tokens / completion_tokens / cost are those of the call that produced the text; for a
    cached hit (``cached=True``) that call was made earlier and nothing was spent now (the
    teacher's ``tally()`` counts what this session spent). ``cost`` is None when the model has
    no price in the price table.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    cached: bool
    model: str = ""
    finish_reason: str | None = None
    cache_key: str = ""
    attempts: int = 0  # HTTP requests made for it now (0 for a cached hit)
    seconds: float = 0.0  # wall time including retries

    ok = True

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def json(self) -> Any:
        """The text parsed as JSON (tolerates a ```json fence or prose around one object/array)."""
        return first_json(self.text)


@dataclass(frozen=True)
class TeacherFailure:
    """A request of ``chat_many`` that produced no completion (its place in the result list)."""

    message: str
    kind: str = "http"
    status: int | None = None
    attempts: int = 0

    ok = False

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class BudgetExhausted(TeacherFailure):
    """Marker for requests not made because the budget was used up."""

    kind: str = "budget"


Result = Union[Completion, TeacherFailure]




# ==============================================================================================
# secrets, prices, configuration
# ==============================================================================================
class Secret:
    """A string that does not show itself: repr/str are masked, pickling is refused."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        if isinstance(value, Secret):
            value = value.reveal()
        object.__setattr__(self, "_value", str(value))

    def reveal(self) -> str:
        return self._value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Secret is immutable")

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __copy__(self) -> "Secret":
        return self

    def __deepcopy__(self, memo: dict) -> "Secret":
        return self

    def __reduce__(self):
        raise TypeError("an API key (Secret) is never pickled or written anywhere")


@dataclass(frozen=True)
class Price:
    """US dollars per 1M input (prompt) and output (completion) tokens."""

    input_per_1m: float
    output_per_1m: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6


FREE = Price(0.0, 0.0)

# List prices in USD per 1M tokens as published by OpenAI for these models (standard tier).
# Prices change: check them and override in TeacherConfig.prices. Dated snapshots
# ("gpt-4o-2024-08-06") match their family by the longest prefix.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
}


def price_for(model: str, prices: Mapping[str, Price]) -> Price | None:
    """The model's price: an exact entry, else the longest entry that prefixes the name."""
    if model in prices:
        return prices[model]
    best = None
    for name in prices:
        if model.startswith(name) and (best is None or len(name) > len(best)):
            best = name
    return prices[best] if best is not None else None


def endpoint_of(base_url: str | None) -> str:
    """The endpoint a key is fixed to: the base URL (api.openai.com when None) with scheme and
    host in lower case and no trailing slash."""
    parts = urllib.parse.urlsplit((base_url or DEFAULT_BASE_URL).strip())
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"),
                                    parts.query, "")) or (base_url or "")


def env_key_endpoint(environ: Mapping[str, str] | None = None) -> str:
    """Where ``$OPENAI_API_KEY`` may be sent: ``$CRS_TEACHER_BASE_URL``, else api.openai.com."""
    env = os.environ if environ is None else environ
    return endpoint_of(env.get(ENV_BASE_URL) or None)


_KEY_PATTERNS = [
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{6,}"),
    re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)\b(api[_-]?key|access[_-]?token|token|secret|password)(\s*[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]{6,}"),
]
REDACTED = "[redacted]"


def redact_secrets(text: str, *secrets: "str | Secret | None") -> str:
    """``text`` with the given secrets and anything that looks like a key (``sk-…``, bearer
    tokens, ``api_key=…``) replaced by ``[redacted]``: endpoint error messages can echo the key."""
    text = str(text)
    for secret in secrets:
        value = secret.reveal() if isinstance(secret, Secret) else secret
        if value and len(value) >= 4:
            text = text.replace(value, REDACTED)
    text = _KEY_PATTERNS[0].sub("Bearer " + REDACTED, text)
    text = _KEY_PATTERNS[1].sub(REDACTED, text)
    return _KEY_PATTERNS[2].sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class TeacherConfig:
    """How to reach the teacher. Holds no key unless one is given for the session (in memory,
    as a ``Secret``); ``to_dict()`` (what may be stored) never includes it."""

    provider: str = PROVIDER_LOCAL
    base_url: str | None = None  # openai provider; None = api.openai.com
    model: str = ""  # openai: required; local: the served alias (default smollm2-135m-instruct)
    temperature: float = DEFAULT_TEMPERATURE
    max_tokens: int = DEFAULT_MAX_TOKENS
    timeout: float = 60.0  # seconds per HTTP request
    max_attempts: int = 5  # HTTP requests per call, retries included
    backoff_base: float = 1.0  # seconds; attempt n waits ~ base * 2**(n-1), jittered
    backoff_max: float = 30.0
    max_retry_after: float = 120.0  # longest Retry-After honoured
    concurrency: int | None = None  # chat_many default; None: 1 local (one model), 8 otherwise
    api_key: Secret | None = field(default=None, repr=False, compare=False)
    # the endpoint the key was given for (default: this config's): it is sent nowhere else
    api_key_endpoint: str | None = field(default=None, repr=False, compare=False)
    prices: dict[str, Price] = field(default_factory=dict)  # on top of DEFAULT_PRICES
    local_model_path: str | None = None  # GGUF; None = models.local_teacher() (Qwen2.5-Coder-1.5B if installed, else SmolLM2)
    local_n_ctx: int = 2048
    local_n_threads: int = 2

    def __post_init__(self) -> None:
        try:
            provider = provider_class(self.provider)
        except KeyError as exc:
            raise TeacherSetupError(str(exc.args[0])) from None
        if self.api_key is not None and not isinstance(self.api_key, Secret):
            self.api_key = Secret(self.api_key)
        if self.api_key is not None and not self.api_key:
            self.api_key = None
        if self.api_key is None:
            self.api_key_endpoint = None
        elif self.api_key_endpoint is None:
            self.api_key_endpoint = self.key_endpoint
        else:
            self.api_key_endpoint = endpoint_of(self.api_key_endpoint)
        try:
            provider.check_config(self)
        except ConfigProblem as exc:
            raise TeacherSetupError(str(exc)) from None
        if self.max_attempts < 1:
            raise TeacherSetupError("max_attempts must be at least 1")
        self.prices = {k: (v if isinstance(v, Price) else Price(*v)) for k, v in self.prices.items()}

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def openai(cls, base_url: str | None, model: str, *, api_key: str | None = None, **kw: Any) -> "TeacherConfig":
        return cls(provider=PROVIDER_OPENAI, base_url=base_url, model=model, api_key=api_key, **kw)

    @classmethod
    def local(cls, model_path: str | os.PathLike | None = None, **kw: Any) -> "TeacherConfig":
        return cls(provider=PROVIDER_LOCAL, local_model_path=str(model_path) if model_path else None, **kw)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kw: Any) -> "TeacherConfig":
        """$CRS_TEACHER_BASE_URL (+ $CRS_TEACHER_MODEL; key from $OPENAI_API_KEY) selects an
        endpoint; without it, the local teacher."""
        env = os.environ if environ is None else environ
        base_url = env.get(ENV_BASE_URL)
        if base_url:
            return cls(provider=PROVIDER_OPENAI, base_url=base_url, model=env.get(ENV_MODEL) or "gpt-4o-mini", **kw)
        return cls(provider=PROVIDER_LOCAL, **kw)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, api_key: str | None = None) -> "TeacherConfig":
        names = {f.name for f in fields(cls)} - {"api_key", "api_key_endpoint"}
        kw = {k: v for k, v in data.items() if k in names}
        if "prices" in kw:
            kw["prices"] = {k: Price(**v) if isinstance(v, dict) else Price(*v) for k, v in kw["prices"].items()}
        return cls(api_key=api_key, **kw)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the key: safe for the workspace, job folders and exports."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("api_key", "api_key_endpoint"):
                continue
            value = getattr(self, f.name)
            if f.name == "prices":
                value = {k: {"input_per_1m": p.input_per_1m, "output_per_1m": p.output_per_1m} for k, p in value.items()}
            out[f.name] = value
        return out

    def with_api_key(self, api_key: str | None) -> "TeacherConfig":
        """This config with a key for its own endpoint (None: without a key)."""
        return replace(self, api_key=Secret(api_key) if api_key else None, api_key_endpoint=None)

    # -- derived ----------------------------------------------------------------------------
    @property
    def price_table(self) -> dict[str, Price]:
        return {**DEFAULT_PRICES, **self.prices}

    @property
    def default_concurrency(self) -> int:
        if self.concurrency is not None:
            return max(1, int(self.concurrency))
        return provider_class(self.provider).default_concurrency

    @property
    def key_endpoint(self) -> str:
        """The endpoint calls of this config go to, as keys are fixed to it."""
        return endpoint_of(self.base_url)

    def resolve_api_key(self) -> str | None:
        """The key for this config's endpoint (never stored anywhere): the given key if it was
        given for this endpoint, else $OPENAI_API_KEY if this is $CRS_TEACHER_BASE_URL's (or
        api.openai.com's) endpoint, else None."""
        endpoint = self.key_endpoint
        if self.api_key and self.api_key_endpoint == endpoint:
            return self.api_key.reveal()
        if endpoint == env_key_endpoint():
            return os.environ.get(ENV_API_KEY) or None
        return None

    @property
    def has_api_key(self) -> bool:
        return self.resolve_api_key() is not None

    def missing_key_reason(self) -> str:
        """Why no key is sent to this config's endpoint (for messages; names no key)."""
        endpoint = self.key_endpoint
        if self.api_key and self.api_key_endpoint != endpoint:
            return (f"the key was entered for {self.api_key_endpoint}, not {endpoint}; a key is sent only to "
                    "the endpoint it was entered for: enter it again for this one")
        where = env_key_endpoint()
        if endpoint != where and os.environ.get(ENV_API_KEY):
            return (f"${ENV_API_KEY} is sent only to {where} (${ENV_BASE_URL}); set ${ENV_BASE_URL}={endpoint} "
                    "to use it here, or enter a key for this session")
        return f"set ${ENV_API_KEY} (and ${ENV_BASE_URL}={endpoint}) in the environment or enter a key for this session"


# ==============================================================================================
# budget and tally
# ==============================================================================================
@dataclass(frozen=True)
class Budget:
    """Limits for a teacher's real (not cached) calls; None = no limit, 0 = no call at all.

    max_tokens counts prompt + completion tokens; max_cost is in US dollars (needs a price for
    the model, local models cost 0). A call counts against max_calls once, retries included.
    """

    max_calls: int | None = None
    max_tokens: int | None = None
    max_cost: float | None = None

    @property
    def unlimited(self) -> bool:
        return self.max_calls is None and self.max_tokens is None and self.max_cost is None

    def describe(self) -> str:
        parts = []
        if self.max_calls is not None:
            parts.append(f"{self.max_calls} calls")
        if self.max_tokens is not None:
            parts.append(f"{self.max_tokens:,} tokens")
        if self.max_cost is not None:
            parts.append(f"${self.max_cost:.4f}")
        return ", ".join(parts) or "unlimited"


@dataclass(frozen=True)
class Tally:
    """What a teacher has done since it was made (or ``reset_tally``): a consistent snapshot."""

    calls: int = 0  # real calls that returned a completion
    cached_hits: int = 0
    failures: int = 0  # calls that failed after their retries
    retries: int = 0  # extra HTTP attempts
    requests: int = 0  # HTTP requests sent
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0  # US dollars, priced calls only
    unpriced_calls: int = 0  # calls whose model has no price
    in_flight: int = 0
    budget_refused: int = 0  # requests not made because of the budget
    resent: int = 0  # calls an earlier process had in flight when it stopped, sent again now

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["total_tokens"] = self.total_tokens
        return d


_ZERO_COUNTS: dict[str, Any] = {f.name: f.default for f in fields(Tally)}


class _Ledger:
    """Budget accounting with reservations for in-flight calls. Used on the teacher loop only
    (no lock); other threads just read ``budget`` and ``exhausted``."""

    def __init__(self, budget: Budget | None):
        self.budget = budget or Budget()
        self.used_calls = 0
        self.used_tokens = 0
        self.used_cost = 0.0
        self.res_calls = 0
        self.res_tokens = 0
        self.res_cost = 0.0
        self.exhausted: str | None = None
        self._settled: asyncio.Future | None = None  # done when a reservation is settled

    def _fits(self, tokens: int, cost: float) -> str | None:
        b = self.budget
        zero = [n for n, v in (("calls", b.max_calls), ("tokens", b.max_tokens), ("cost", b.max_cost))
                if v is not None and v <= 0]
        if zero:
            return f"the budget is 0 ({', '.join('max_' + n for n in zero)} = 0), so no call is made"
        if b.max_calls is not None and self.used_calls + self.res_calls + 1 > b.max_calls:
            return f"the call limit ({b.max_calls} calls; {self.used_calls} made)"
        if b.max_tokens is not None and self.used_tokens + self.res_tokens + tokens > b.max_tokens:
            return (f"the token limit ({b.max_tokens:,} tokens; {self.used_tokens:,} used, "
                    f"the next call may take up to {tokens:,})")
        if b.max_cost is not None and self.used_cost + self.res_cost + cost > b.max_cost + 1e-12:
            return (f"the money limit (${b.max_cost:.4f}; ${self.used_cost:.4f} spent, "
                    f"the next call may cost up to ${cost:.4f})")
        return None

    async def reserve(self, tokens: int, cost: float, cancelled: Callable[[], bool]) -> tuple[int, float] | str:
        """Reserve a call's worst case; returns the reservation, or the reason it cannot be made."""
        if self.budget.unlimited:
            return (0, 0.0)
        while True:
            if self.exhausted is not None:
                return self.exhausted
            reason = self._fits(tokens, cost)
            if reason is None:
                self.res_calls += 1
                self.res_tokens += tokens
                self.res_cost += cost
                return (tokens, cost)
            if self.res_calls == 0:  # nothing in flight can free room: stop for good
                self.exhausted = (reason if "budget is 0" in reason
                                  else f"budget reached: {reason}; no further calls are made")
                return self.exhausted
            if cancelled():
                return "cancelled"
            if self._settled is None:
                self._settled = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._settled], timeout=0.5)  # in-flight calls settle with their real usage

    def settle(self, reservation: tuple[int, float], tokens: int, cost: float, *, made: bool = True) -> None:
        """Replace a reservation by the call's real usage (made=False: no request was sent)."""
        if self.budget.unlimited:
            return
        self.res_calls -= 1
        self.res_tokens -= reservation[0]
        self.res_cost -= reservation[1]
        self.used_calls += int(made)
        self.used_tokens += tokens
        self.used_cost += cost
        if self._settled is not None:
            self._settled.set_result(None)
            self._settled = None


# ==============================================================================================
# caches
# ==============================================================================================
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
        self._client: Any = None  # openai.AsyncOpenAI, used on the teacher loop
        self._finalizer: weakref.finalize | None = None
        self._base_url: str | None = None
        self._key: Secret | None = None  # the key the client sends (for redacting messages)
        self._refused: TeacherAuthError | None = None  # the endpoint refused the key: nothing more is sent
        self._client_lock = threading.Lock()
        self._lock = threading.Lock()
        self._counts: dict[str, Any] = dict(_ZERO_COUNTS)  # Tally's fields, under self._lock
        # on the teacher loop only: calls in flight by cache key (done with the committed cache
        # entry, or None if the call failed)
        self._inflight: dict[str, asyncio.Future] = {}
        # on the teacher loop only: the entries this teacher committed last, so that a request
        # whose cache lookup (in its calling thread) missed just before an identical call
        # committed is answered from that entry, not paid again
        self._recent: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        # cache commits, in their own thread; they pace themselves while requests are in flight
        self._writer = _CacheWriter(self.cache, lambda: self._counts["in_flight"] > 0)
        # requests are marked in flight in the workspace before they are sent (not for the
        # local server, which bills nothing); keys an earlier process left marked, read once
        self._marks_inflight = not self.provider.free and hasattr(self.cache, "interrupted_keys")
        self._interrupted: frozenset[str] | None = None
        self._ledger = _Ledger(budget)
        self._check_budget_pricing(budget)
        self._sleep = sleep

    # -- identity ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"Teacher(provider={self.config.provider!r}, model={self.model!r}, endpoint={self.endpoint!r})"

    @property
    def model(self) -> str:
        return self.provider.model()

    @property
    def endpoint(self) -> str:
        """Where calls go, as part of the cache key (see the provider's `endpoint`)."""
        return self.provider.endpoint()

    @property
    def _server(self) -> Any:
        """The local llama.cpp server, when the provider runs one (None until started)."""
        return getattr(self.provider, "server", None)

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
        self._ledger = _Ledger(budget)

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
            self._counts = {**_ZERO_COUNTS, "in_flight": in_flight}

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
        """Make the client now (and start the local server), instead of at the first call."""
        self._ensure_client()
        return self

    def close(self) -> None:
        self._writer.stop()  # nothing is left to write: every call returns after its commit
        with self._client_lock:
            if self._client is not None:
                self._finalizer.detach()
                with contextlib.suppress(Exception):
                    _on_loop(self._client.close(), timeout=10)
                self._client = None
            self.provider.close()

    def __enter__(self) -> "Teacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_client(self) -> Any:
        if self._client is not None:
            return self._client
        with self._client_lock:
            if self._client is not None:
                return self._client
            try:
                import openai
            except ImportError as exc:  # pragma: no cover - environment problem
                raise TeacherSetupError(
                    "the openai package is not installed; run the README setup (pip install -r requirements.txt)"
                ) from exc
            cfg = self.config

            def key_for(base_url: str) -> str:
                key = cfg.resolve_api_key()
                if key is not None:
                    return key
                if _is_loopback(base_url):
                    return NO_KEY
                raise TeacherSetupError(f"no API key for {base_url}: {cfg.missing_key_reason()}")

            base_url, key = self.provider.connect(key_for)
            self._base_url = base_url
            self._key = Secret(key)
            self._client = openai.AsyncOpenAI(base_url=base_url, api_key=key, timeout=cfg.timeout, max_retries=0)
            # a teacher dropped without close() still closes its connections
            self._finalizer = weakref.finalize(self, _close_soon, self._client)
            return self._client

    def ping(self) -> list[str]:
        """The endpoint's model ids (GET /models); raises TeacherError if it does not answer."""
        client = self._ensure_client()

        async def model_ids() -> list[str]:
            return [m.id for m in (await client.models.list()).data]

        try:
            return _on_loop(model_ids())
        except Exception as exc:
            raise TeacherError(self.redact(f"{self._base_url} does not answer: {_error_detail(exc)}"),
                               kind="connection") from exc

    def redact(self, text: str) -> str:
        """``text`` without this teacher's key or anything else that looks like a key."""
        return redact_secrets(text, self._key, self.config.api_key)

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
        with _FORMATS_LOCK:
            return _FORMATS.get(self._format_key())

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
        key = self._format_key()
        with _FORMATS_LOCK:
            lock = _FORMAT_LOCKS[key]
        with lock:
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
                with _FORMATS_LOCK:
                    _FORMATS[self._format_key()] = form
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

        running = asyncio.run_coroutine_threadsafe(call_all(), _teacher_loop())
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
        est_prompt = estimate_tokens(_message_text(req.messages)) + 4 * len(req.messages)
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
                    # making the client may start the local server: not on the loop
                    client = self._client or await asyncio.to_thread(self._ensure_client)
                    if store and self._marks_inflight:
                        marked = True
                        await self._writer.start(key)  # committed before the request is sent
                        if key in (self._interrupted or ()):
                            self._bump(resent=1)
                    made = True
                    t0 = time.monotonic()
                    raw, (text, finish, model_name, usage), attempts = await self._request_with_retries(
                        client, req, params, cancelled, idempotency_key=key if store else None)
                finally:
                    self._bump(in_flight=-1)
            if usage is not None:
                pt, ct = usage
            else:  # an endpoint that reports no usage: count estimates (budget stays honest)
                pt, ct = est_prompt, estimate_tokens(text)
            cost = price.cost(pt, ct) if price is not None else None
            spent_tokens, spent_cost = pt + ct, cost or 0.0
            if reservation is not None:  # spent now, whatever the commit does
                ledger.settle(reservation, spent_tokens, spent_cost, made=made)
                reservation = None
            completion = Completion(
                text=text, prompt_tokens=pt, completion_tokens=ct, cost=cost, cached=False,
                model=model_name or self.model, finish_reason=finish, cache_key=key,
                attempts=attempts, seconds=time.monotonic() - t0,
            )
            entry = None
            if store:
                entry = {
                    "provider": self.config.provider, "model": self.model, "request": record,
                    "response": {"text": text, "finish_reason": finish, "model": model_name,
                                 "id": raw.get("id"), "usage": raw.get("usage")},
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
        self, client: Any, req: ChatRequest, params: dict[str, Any], cancelled: Callable[[], bool],
        *, idempotency_key: str | None = None,
    ) -> tuple[dict[str, Any], tuple[str, str | None, str | None, tuple[int, int] | None], int]:
        """The decoded response, what ``_read_completion`` reads from it, and the attempts made.
        ``idempotency_key`` (the cache key) goes out as an ``Idempotency-Key`` header, the same
        for every attempt and for a rerun after a crash: an endpoint or gateway that honours it
        answers a repeated request without billing it again; others ignore it."""
        import openai

        cfg = self.config
        kwargs: dict[str, Any] = {
            "model": self.model, "messages": req.messages,
            "temperature": params["temperature"], "max_tokens": params["max_tokens"],
        }
        if "response_format" in params:
            kwargs["response_format"] = params["response_format"]
        if "seed" in params:
            kwargs["seed"] = params["seed"]
        where = self._base_url or self.endpoint
        options: dict[str, Any] = {"headers": {"Idempotency-Key": f"crs-{idempotency_key}"}} if idempotency_key else {}
        attempt = 0
        while True:
            if cancelled():
                raise TeacherError("cancelled", kind="cancelled", attempts=attempt)
            attempt += 1
            self._bump(requests=1, retries=1 if attempt > 1 else 0)
            retry_after: float | None = None
            try:
                # The openai client's own request path (auth, base URL, timeout, its error
                # classes) with the chat-completions body as is: `client.post(..., cast_to=object)`
                # returns the decoded JSON. It skips `chat.completions.create`'s parameter
                # transformation and response models (~40% of the client's CPU per call, which
                # caps calls/s at high concurrency) and passes server-specific parameters through.
                resp = await client.post("/chat/completions", cast_to=object, body=kwargs, options=options)
                raw = self._as_dict(resp)
                return raw, self._read_completion(raw), attempt  # raises _BadResponse
            except openai.APIStatusError as exc:
                status = exc.status_code
                detail = _error_detail(exc)
                kind, retryable = "http", status == 429 or status >= 500
                retry_after = _retry_after_seconds(getattr(exc.response, "headers", None))
                message = f"the teacher endpoint {where} answered HTTP {status}: {detail}"
                if req.probe and status in FORMAT_REFUSED_STATUS:  # this form is refused: the next one
                    kind, retryable = "format_refused", False
            except openai.APITimeoutError:
                status, kind, retryable = None, "timeout", True
                message = f"the teacher endpoint {where} did not answer within {cfg.timeout:g} s"
            except openai.APIConnectionError as exc:
                status, kind, retryable = None, "connection", True
                cause = exc.__cause__ or exc.__context__
                message = f"could not reach the teacher endpoint {where}: {_error_detail(exc)}" + (
                    f" ({type(cause).__name__}: {cause})" if cause is not None else "")
            except (_BadResponse, openai.APIResponseValidationError, ValueError) as exc:
                status, kind, retryable = None, "bad_response", True
                message = f"the teacher endpoint {where} sent an unusable response: {exc}"
            message = self.redact(message)  # endpoints echo keys in error messages
            if status in (401, 403):
                self._refused = TeacherAuthError(f"{message} (the endpoint refused the API key: no call can "
                                                 "succeed; check the key and the base URL)", status=status,
                                                 attempts=attempt)
                raise self._refused
            if not retryable or attempt >= cfg.max_attempts:
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise TeacherError(message + tries, kind=kind, status=status, attempts=attempt)
            delay = self._backoff(attempt, retry_after)
            log.info("teacher: %s; retry %d/%d in %.2f s", message, attempt, cfg.max_attempts - 1, delay)
            if self._sleep is not None:
                await asyncio.to_thread(self._sleep, delay)
            elif await _pause(delay, cancelled):
                raise TeacherError("cancelled", kind="cancelled", attempts=attempt)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        if retry_after is not None:
            return min(retry_after, cfg.max_retry_after)
        ceiling = min(cfg.backoff_max, cfg.backoff_base * (2 ** (attempt - 1)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # "equal jitter"

    @staticmethod
    def _as_dict(resp: Any) -> dict[str, Any]:
        if isinstance(resp, dict):
            return resp
        if isinstance(resp, (str, bytes)):
            raise _BadResponse(f"not JSON: {str(resp)[:120]!r}")
        dump = getattr(resp, "model_dump", None)
        if dump is None:
            raise _BadResponse(f"unexpected object {type(resp).__name__}")
        return dump()

    @staticmethod
    def _read_completion(raw: dict[str, Any]) -> tuple[str, str | None, str | None, tuple[int, int] | None]:
        choices = raw.get("choices")
        if not choices:
            raise _BadResponse("no choices in the response")
        first = choices[0] or {}
        message = first.get("message") or {}
        text = message.get("content")
        if text is None:
            refusal = message.get("refusal")
            raise _BadResponse(f"the model refused: {refusal}" if refusal else "the response has no message content")
        usage = raw.get("usage") or None
        counts = None
        if isinstance(usage, dict) and usage.get("prompt_tokens") is not None:
            counts = (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        return str(text), first.get("finish_reason"), raw.get("model"), counts

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


class _BadResponse(Exception):
    pass


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
