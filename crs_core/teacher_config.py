"""The teacher's configuration and bookkeeping: errors and results, the API key as a `Secret`
fixed to its endpoint, prices, `TeacherConfig`, and the budget (`Budget`, `Tally`, the ledger).
Used through `crs_core.teacher`, which re-exports every public name."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Union

from .errors import CRSError
from .llm_output import first_json
from .teacher_providers import DEFAULT_BASE_URL, ConfigProblem, LocalLlama, OpenAICompatible, provider_class

log = logging.getLogger("crs_core.teacher")

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
