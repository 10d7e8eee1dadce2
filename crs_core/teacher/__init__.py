"""The teacher LLM: chat completions through one wrapper (`Teacher`: cache, budget, concurrency,
retries, idempotency, structured-output fallback) around any provider of the registry.

    teacher = Teacher(TeacherConfig.openai("http://host/v1", "gpt-4o-mini"), cache=workspace,
                      budget=Budget(max_cost=2.0))
    c = teacher.chat([{"role": "user", "content": "hi"}])         # -> Completion
    results = teacher.chat_many(requests, concurrency=16)          # -> [Completion | TeacherFailure]
    teacher.tally()                                                # live, thread-safe counters

The parts: `wrapper` (Teacher, see its module note), `providers` (one module per kind of
endpoint and the registry PROVIDERS), `config` (TeacherConfig), `secrets` (the key and where it
may go), `budget` (prices, limits, tally), `cache` (the caches and their writer thread),
`request` / `completion` (what a call asks and returns), `structured` (response_format forms),
`errors`, `loop` (the event loop calls run on). Every name callers use is importable from here.
"""

from .budget import DEFAULT_PRICES, FREE, Budget, Price, Tally, price_for
from .cache import JsonlCache, LLMCache, MemoryCache, WorkspaceCache, as_cache, import_cache_entries
from .completion import BudgetExhausted, Completion, Result, TeacherFailure
from .config import (DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, ENV_MODEL, PROVIDER_LOCAL, PROVIDER_OPENAI,
                     TeacherConfig)
from .errors import BudgetExceeded, TeacherAuthError, TeacherError, TeacherSetupError
from .providers import NO_KEY, PROVIDERS, LocalLlama, OpenAICompatible, Provider, provider_labels
from .request import ChatRequest, Messages, RequestLike, as_request, estimate_tokens
from .secrets import (DEFAULT_BASE_URL, ENV_API_KEY, ENV_BASE_URL, REDACTED, Secret, endpoint_of, env_key_endpoint,
                      redact_secrets)
from .structured import (FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA, FORMAT_NONE, FORMAT_REFUSED_STATUS, FORMATS,
                         forget_structured_formats, response_format_for)
from .wrapper import CACHE_KEY_VERSION, Teacher, default_teacher, summarize

__all__ = [
    "Budget", "BudgetExceeded", "BudgetExhausted", "CACHE_KEY_VERSION", "ChatRequest", "Completion",
    "DEFAULT_BASE_URL", "DEFAULT_MAX_TOKENS", "DEFAULT_PRICES", "DEFAULT_TEMPERATURE", "ENV_API_KEY",
    "ENV_BASE_URL", "ENV_MODEL", "FORMATS", "FORMAT_JSON_OBJECT", "FORMAT_JSON_SCHEMA", "FORMAT_NONE",
    "FORMAT_REFUSED_STATUS", "FREE", "JsonlCache", "LLMCache", "LocalLlama", "MemoryCache", "Messages", "NO_KEY",
    "OpenAICompatible", "PROVIDERS", "PROVIDER_LOCAL", "PROVIDER_OPENAI", "Price", "Provider", "REDACTED",
    "RequestLike", "Result", "Secret", "Tally", "Teacher", "TeacherAuthError", "TeacherConfig", "TeacherError",
    "TeacherFailure", "TeacherSetupError", "WorkspaceCache", "as_cache", "as_request", "default_teacher",
    "endpoint_of", "env_key_endpoint", "estimate_tokens", "forget_structured_formats", "import_cache_entries",
    "price_for", "provider_labels", "redact_secrets", "response_format_for", "summarize",
]
