"""What goes wrong in a teacher call, as the callers see it (`TeacherError` and its kinds) and
as a provider reports one failed attempt to the wrapper that decides about retries (`CallFailed`)."""

from __future__ import annotations

from ..errors import CRSError


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



class CallFailed(Exception):
    """One attempt failed (a provider's answer to the wrapper): ``message`` for people (it may
    echo a key: the wrapper redacts it), ``kind`` as in TeacherError, ``retryable`` whether the
    same request may succeed later, ``retry_after`` the seconds the endpoint asked to wait."""

    def __init__(self, message: str, *, kind: str, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
