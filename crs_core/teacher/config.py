"""`TeacherConfig`: how to reach the teacher (a provider from the registry and its settings),
the retry and concurrency settings every provider shares, and which key may be sent where."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from .budget import DEFAULT_PRICES, Price
from .errors import TeacherSetupError
from .providers import LocalLlama, OpenAICompatible, provider_class
from .secrets import ENV_API_KEY, ENV_BASE_URL, Secret, endpoint_of, env_key_endpoint

PROVIDER_OPENAI = OpenAICompatible.name
PROVIDER_LOCAL = LocalLlama.name
DEFAULT_TEMPERATURE = 0.8  # the active-synthesis paper's setting
DEFAULT_MAX_TOKENS = 512
ENV_MODEL = "CRS_TEACHER_MODEL"


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
        provider = provider_class(self.provider)
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
        provider.check_config(self)
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
