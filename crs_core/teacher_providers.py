"""Where a teacher's requests go: one provider class per kind of endpoint, behind a small
contract, and the registry `TeacherConfig` and the pages read their names from.

A provider answers what differs between endpoints — the model name and the endpoint id that
enter cache keys, whether calls cost money, how to connect (base URL and key), which structured
reply forms to try first, how many requests to keep in flight — and owns what it starts (the
local llama.cpp server). Everything else (the cache, the budget, concurrency, retries,
idempotency, the structured-output fallback) is `crs_core.teacher.Teacher`, the same for every
provider. The HTTP protocol is always OpenAI's chat completions (the openai client): a new
provider is a new way to find and reach such an endpoint, added as a class here plus one
`register_provider` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

from .errors import CRSError

__all__ = ["Provider", "OpenAICompatible", "LocalLlama", "PROVIDERS", "register_provider",
           "DEFAULT_BASE_URL", "NO_KEY", "FORMAT_JSON_SCHEMA", "FORMAT_JSON_OBJECT", "FORMAT_NONE", "FORMATS"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_KEY = "sk-no-key-required"  # what local servers get: they accept any key
FORMAT_JSON_SCHEMA = "json_schema"
FORMAT_JSON_OBJECT = "json_object+schema"
FORMAT_NONE = "none"
FORMATS = (FORMAT_JSON_SCHEMA, FORMAT_JSON_OBJECT, FORMAT_NONE)


class Provider:
    """The contract; `config` is the teacher's `TeacherConfig`."""

    name: ClassVar[str]
    label: ClassVar[str]
    free: ClassVar[bool] = False             # calls cost nothing (no price, no in-flight marks)
    default_concurrency: ClassVar[int] = 8
    structured_candidates: ClassVar[tuple[str, ...]] = (FORMAT_JSON_SCHEMA, FORMAT_JSON_OBJECT, FORMAT_NONE)

    def __init__(self, config: Any, server: Any = None):
        self.config = config

    @staticmethod
    def check_config(config: Any) -> None:
        """Raise a setup error for a config this provider cannot use (called by TeacherConfig)."""

    def model(self) -> str:
        return self.config.model

    def endpoint(self) -> str:
        """Where calls go, as part of every cache key."""
        raise NotImplementedError

    def connect(self, missing_key: Callable[[str], str | None]) -> tuple[str, str]:
        """(base URL, key) to send requests with; starts what must run first.
        `missing_key(base_url)` returns the key to use or raises when there is none."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop what `connect` started."""


_REGISTRY: dict[str, type[Provider]] = {}
PROVIDERS: tuple[str, ...] = ()


def register_provider(cls: type[Provider]) -> type[Provider]:
    global PROVIDERS
    _REGISTRY[cls.name] = cls
    PROVIDERS = tuple(_REGISTRY)
    return cls


def provider_class(name: str) -> type[Provider]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown teacher provider {name!r}; use one of {', '.join(_REGISTRY)}") from None


def provider_labels() -> dict[str, str]:
    return {name: cls.label for name, cls in _REGISTRY.items()}


@register_provider
class OpenAICompatible(Provider):
    """A hosted or self-run endpoint that speaks OpenAI's chat completions."""

    name = "openai"
    label = "OpenAI-compatible endpoint"

    @staticmethod
    def check_config(config: Any) -> None:
        if not config.model:
            raise ConfigProblem("the openai teacher provider needs a model name")

    def endpoint(self) -> str:
        return (self.config.base_url or DEFAULT_BASE_URL).rstrip("/")

    def connect(self, missing_key: Callable[[str], str | None]) -> tuple[str, str]:
        base_url = self.endpoint()
        return base_url, missing_key(base_url)


@register_provider
class LocalLlama(Provider):
    """The offline teacher: a llama.cpp server on 127.0.0.1 (crs_core.llama_server) serving the
    installed GGUF model (crs_core.models.local_teacher), started on first need."""

    name = "local"
    label = "Local model (offline, llama.cpp)"
    free = True
    default_concurrency = 1  # one model, one request at a time
    structured_candidates = (FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA, FORMAT_NONE)  # known to take json_object

    def __init__(self, config: Any, server: Any = None):
        super().__init__(config)
        self.server = server          # a LlamaServer given by the caller is not stopped by close()
        self._owns_server = False
        self._endpoint_id: str | None = None
        self._choice: Any = ...       # models.local_teacher(), asked once

    def _local_choice(self) -> Any:
        if self._choice is ...:
            from .models import ModelAssemblyError, local_teacher

            try:
                self._choice = local_teacher()
            except ModelAssemblyError:
                raise
            except CRSError:
                self._choice = None
        return self._choice

    def model(self) -> str:
        if self.server is not None:
            return self.server.model_alias
        if self.config.model:
            return self.config.model
        if self.config.local_model_path:
            return Path(self.config.local_model_path).stem
        choice = self._local_choice()
        return choice.alias if choice is not None else "?"

    def model_path(self) -> Path | None:
        if self.server is not None:
            return Path(self.server.model_path)
        if self.config.local_model_path:
            return Path(self.config.local_model_path)
        choice = self._local_choice()
        return choice.path if choice is not None else None

    def endpoint(self) -> str:
        """The model file (name and size): the server's port changes from run to run."""
        if self._endpoint_id is None:
            path = self.model_path()
            size = path.stat().st_size if path is not None and path.exists() else 0
            self._endpoint_id = f"local:{path.name if path is not None else '?'}:{size}"
        return self._endpoint_id

    def connect(self, missing_key: Callable[[str], str | None]) -> tuple[str, str]:
        from .llama_server import LlamaServer

        cfg = self.config
        if self.server is None:
            choice = None if cfg.local_model_path else self._local_choice()  # the model named in cache keys
            self.server = LlamaServer(cfg.local_model_path or (choice.path if choice is not None else None),
                                      n_ctx=cfg.local_n_ctx, n_threads=cfg.local_n_threads,
                                      model_alias=cfg.model or (choice.alias if choice is not None else None))
            self._owns_server = True
        if not self.server.is_running:
            self.server.start()
        return self.server.base_url, NO_KEY

    def close(self) -> None:
        if self._owns_server and self.server is not None:
            self.server.stop()
            self.server = None
            self._owns_server = False


class ConfigProblem(CRSError):
    """A provider cannot use this config (TeacherConfig turns it into a TeacherSetupError)."""
