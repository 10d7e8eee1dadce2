"""The contract every teacher provider keeps: what the `Teacher` wrapper asks of an endpoint.

A provider knows how to find and reach one kind of endpoint and how to send it one request; it
owns what it starts (a client, a local server). It knows nothing of caches, budgets, retries or
concurrency: those are the wrapper's, the same for every provider.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..completion import Generation
from ..secrets import Secret
from ..structured import FORMATS


class Provider:
    """One kind of endpoint. ``config`` is the teacher's `TeacherConfig`; ``server`` an endpoint
    the caller started and keeps (for providers that start one; None: start it when needed).

    Blocking methods (``load``, ``close``) run in a worker thread; coroutines (``agenerate``,
    ``amodels``) on the teacher's event loop."""

    name: ClassVar[str]     # the registry key, TeacherConfig.provider
    label: ClassVar[str]    # what the Synthesis page shows
    free: ClassVar[bool] = False             # calls cost nothing (no price, no in-flight marks)
    default_concurrency: ClassVar[int] = 8   # requests in flight when the caller does not say
    structured_candidates: ClassVar[tuple[str, ...]] = FORMATS  # response_format forms to try, best first

    def __init__(self, config: Any, server: Any = None):
        self.config = config

    @staticmethod
    def check_config(config: Any) -> None:
        """Raise TeacherSetupError for a config this provider cannot use (TeacherConfig calls it)."""

    @property
    def model_name(self) -> str:
        """The model asked for, as part of every cache key."""
        return self.config.model

    @property
    def endpoint(self) -> str:
        """Where calls go, as part of every cache key (stable across runs)."""
        raise NotImplementedError

    @property
    def where(self) -> str:
        """The endpoint as messages name it."""
        return self.endpoint

    @property
    def api_key(self) -> Secret | None:
        """The key requests carry (the wrapper redacts it from messages)."""
        return None

    def load(self) -> None:
        """Get ready to send requests (connect; start what must run first). Called once, before
        the first request; raises TeacherSetupError when it cannot."""

    async def agenerate(self, body: dict[str, Any], *, headers: dict[str, str]) -> Generation:
        """Send one chat-completions request (``body``: model, messages and parameters) once.
        Raises `CallFailed` when this attempt failed."""
        raise NotImplementedError

    async def amodels(self) -> list[str]:
        """The endpoint's model ids."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``load`` made or started."""
