"""Any endpoint that speaks OpenAI's chat completions (api.openai.com, a gateway, vLLM, a local
server), reached with the ``openai`` client through its public API.

The client is made with ``max_retries=0``: the `Teacher` wrapper makes the retries, see
`crs_core.teacher.wrapper`. A response is read from its raw JSON (``with_raw_response``) rather
than as the client's response model, so that a malformed body is a retryable "bad response" and
server-specific fields pass through.
"""

from __future__ import annotations

import email.utils
import json
import time
import weakref
from typing import Any

from ..completion import Generation
from ..errors import CallFailed, TeacherSetupError
from ..loop import close_soon, on_loop
from ..secrets import DEFAULT_BASE_URL, Secret, is_loopback
from .base import Provider

NO_KEY = "sk-no-key-required"  # what local servers get: they accept any key


class OpenAICompatible(Provider):
    """A hosted or self-run endpoint at ``config.base_url`` (api.openai.com when None)."""

    name = "openai"
    label = "OpenAI-compatible endpoint"

    def __init__(self, config: Any, server: Any = None):
        super().__init__(config)
        self._client: Any = None  # openai.AsyncOpenAI, used on the teacher loop
        self._finalizer: weakref.finalize | None = None
        self._base_url: str | None = None
        self._key: Secret | None = None

    @staticmethod
    def check_config(config: Any) -> None:
        if not config.model:
            raise TeacherSetupError(f"the {config.provider} teacher provider needs a model name")

    @property
    def endpoint(self) -> str:
        return (self.config.base_url or DEFAULT_BASE_URL).rstrip("/")

    @property
    def where(self) -> str:
        return self._base_url or self.endpoint

    @property
    def api_key(self) -> Secret | None:
        return self._key

    def load(self) -> None:
        base_url = self.endpoint
        self._connect(base_url, self._key_for(base_url))

    def _key_for(self, base_url: str) -> str:
        """The key fixed to this endpoint (see TeacherConfig.resolve_api_key); a server on this
        machine takes any."""
        key = self.config.resolve_api_key()
        if key is not None:
            return key
        if is_loopback(base_url):
            return NO_KEY
        raise TeacherSetupError(f"no API key for {base_url}: {self.config.missing_key_reason()}")

    def _connect(self, base_url: str, key: str) -> None:
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - environment problem
            raise TeacherSetupError(
                "the openai package is not installed; run the README setup (pip install -r requirements.txt)"
            ) from exc
        self._base_url, self._key = base_url, Secret(key)
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=key, timeout=self.config.timeout,
                                          max_retries=0)
        # a provider dropped without close() still closes its connections
        self._finalizer = weakref.finalize(self, close_soon, self._client)

    async def agenerate(self, body: dict[str, Any], *, headers: dict[str, str]) -> Generation:
        import openai

        where = self.where
        try:
            response = await self._client.chat.completions.with_raw_response.create(**body, extra_headers=headers)
            return read_generation(json.loads(response.content))
        except openai.APIStatusError as exc:
            status = exc.status_code
            raise CallFailed(f"the teacher endpoint {where} answered HTTP {status}: {error_detail(exc)}",
                             kind="http", status=status, retryable=status == 429 or status >= 500,
                             retry_after=retry_after_seconds(getattr(exc.response, "headers", None))) from exc
        except openai.APITimeoutError as exc:
            raise CallFailed(f"the teacher endpoint {where} did not answer within {self.config.timeout:g} s",
                             kind="timeout", retryable=True) from exc
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc.__context__
            raise CallFailed(f"could not reach the teacher endpoint {where}: {error_detail(exc)}"
                             + (f" ({type(cause).__name__}: {cause})" if cause is not None else ""),
                             kind="connection", retryable=True) from exc
        except (openai.APIResponseValidationError, ValueError) as exc:
            raise CallFailed(f"the teacher endpoint {where} sent an unusable response: {exc}",
                             kind="bad_response", retryable=True) from exc

    async def amodels(self) -> list[str]:
        try:
            return [m.id for m in (await self._client.models.list()).data]
        except Exception as exc:
            raise CallFailed(error_detail(exc), kind="connection") from exc

    def close(self) -> None:
        if self._client is not None:
            self._finalizer.detach()
            try:
                on_loop(self._client.close(), timeout=10)
            except Exception:  # noqa: BLE001 - a connection that will not close is dropped
                pass
            self._client = None


def read_generation(raw: Any) -> Generation:
    """A chat-completions response body; ValueError when it holds no usable reply."""
    if not isinstance(raw, dict):
        raise ValueError(f"not a JSON object: {str(raw)[:120]!r}")
    choices = raw.get("choices")
    if not choices:
        raise ValueError("no choices in the response")
    first = choices[0] or {}
    message = first.get("message") or {}
    text = message.get("content")
    if text is None:
        refusal = message.get("refusal")
        raise ValueError(f"the model refused: {refusal}" if refusal else "the response has no message content")
    usage = raw.get("usage") or None
    counts = None
    if isinstance(usage, dict) and usage.get("prompt_tokens") is not None:
        counts = (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    return Generation(text=str(text), finish_reason=first.get("finish_reason"), model=raw.get("model"),
                      usage=counts, response_id=raw.get("id"), raw_usage=raw.get("usage"))


def retry_after_seconds(headers: Any) -> float | None:
    """The wait an endpoint asks for: ``retry-after-ms``, else ``retry-after`` (seconds or a date)."""
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


def error_detail(exc: Any) -> str:
    """The endpoint's own message in an error body, else the exception's."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        msg = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if msg:
            return str(msg)
    return str(getattr(exc, "message", None) or exc)
