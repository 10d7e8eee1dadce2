"""Structured replies: the response_format forms a reply's JSON schema can be sent in, and the
form each endpoint accepts, decided once per endpoint and model for the process.

OpenAI and vLLM take ``{"type": "json_schema", "json_schema": {...}}``; llama_cpp.server 0.3.36
answers that with HTTP 500 (its request model knows only 'text' and 'json_object') and enforces
``{"type": "json_object", "schema": ...}`` with a grammar. An endpoint that refuses both gets no
response_format: the callers' tolerant parsers read its text.
"""

from __future__ import annotations

import collections
import re
import threading
from typing import Any

from .errors import TeacherSetupError

FORMAT_JSON_SCHEMA = "json_schema"
FORMAT_JSON_OBJECT = "json_object+schema"
FORMAT_NONE = "none"
FORMATS = (FORMAT_JSON_SCHEMA, FORMAT_JSON_OBJECT, FORMAT_NONE)
# what a refusal of a response_format looks like (the refused request is not retried)
FORMAT_REFUSED_STATUS = frozenset({400, 415, 422, 500, 501})

FormatKey = tuple[str, str]  # (endpoint, model)
_decided: dict[FormatKey, str] = {}  # the form that worked, this process
_probe_locks: dict[FormatKey, threading.Lock] = collections.defaultdict(threading.Lock)
_lock = threading.Lock()


def response_format_for(schema: dict[str, Any], form: str, name: str | None = None) -> dict[str, Any] | None:
    """The response_format body of one form for a JSON schema (None for FORMAT_NONE)."""
    if form == FORMAT_JSON_SCHEMA:
        label = re.sub(r"[^A-Za-z0-9_-]", "_", str(name or schema.get("title") or "reply"))[:64]
        return {"type": "json_schema", "json_schema": {"name": label, "schema": schema, "strict": True}}
    if form == FORMAT_JSON_OBJECT:
        return {"type": "json_object", "schema": schema}
    if form == FORMAT_NONE:
        return None
    raise TeacherSetupError(f"unknown response_format form {form!r}; use one of {', '.join(FORMATS)}")


def decided_form(key: FormatKey) -> str | None:
    with _lock:
        return _decided.get(key)


def decide_form(key: FormatKey, form: str) -> None:
    with _lock:
        _decided[key] = form


def probe_lock(key: FormatKey) -> threading.Lock:
    """Held while one request decides the endpoint's form: one probe per endpoint at a time."""
    with _lock:
        return _probe_locks[key]


def forget_structured_formats() -> None:
    """Forget every endpoint's decided form (tests; an endpoint that was upgraded)."""
    with _lock:
        _decided.clear()
