"""What a call asks: `ChatRequest` (messages and parameters; None takes the teacher's config)
and the deliberately high token estimate budget reservations are made with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

Messages = list[dict[str, Any]]


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


def message_text(messages: Messages) -> str:
    parts = []
    for m in messages:
        content = m.get("content", "")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(str(content or ""))
    return "\n".join(parts)

