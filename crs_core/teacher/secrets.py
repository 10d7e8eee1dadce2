"""The API key: a `Secret` that never shows itself, the one endpoint a key may be sent to
(`endpoint_of`, `env_key_endpoint`), and redaction of anything key-like in endpoint messages."""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from typing import Any, Mapping

DEFAULT_BASE_URL = "https://api.openai.com/v1"
ENV_API_KEY = "OPENAI_API_KEY"  # the only variable a key is read from (fixed: never a name given at run time)
ENV_BASE_URL = "CRS_TEACHER_BASE_URL"  # also the only endpoint $OPENAI_API_KEY is sent to


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


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

