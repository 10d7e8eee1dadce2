"""What a call returns: a `Completion` (and its text read as JSON), or in `chat_many`'s list a
`TeacherFailure` / `BudgetExhausted` in its place; `Generation` is a provider's raw answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from ..llm_output import first_json


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


@dataclass(frozen=True)
class Generation:
    """One answered HTTP request, as a provider read it (the wrapper prices, caches and counts it).
    ``usage`` is (prompt, completion) tokens, None when the endpoint reports none."""

    text: str
    finish_reason: str | None = None
    model: str | None = None
    usage: tuple[int, int] | None = None
    response_id: str | None = None
    raw_usage: Any = None  # the endpoint's usage object, stored with the cache entry
