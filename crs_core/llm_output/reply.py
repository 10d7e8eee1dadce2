"""A teacher's reply as text: code fences, HTML, markdown and list markers taken off, and the one
JSON extractor (`json_values`) every reply parser reads JSON with."""

from __future__ import annotations

import ast
import html
import json
import re
from typing import Any

import numpy as np

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.S)
_WHOLE_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
# a list item's marker: "1." "1)" "1]" "1:" "#1." "#1 " "(1)" "1 - " and bullets
LIST_MARKER = re.compile(
    r"^\s*(?:"
    r"(?:#\s*)?\d{1,3}\s*[.)\]:]\s*|"      # 1.  1)  1]  1:  #1.
    r"#\s*\d{1,3}\s+|"                     # #1 Title
    r"\(\d{1,3}\)\s*|"                     # (1)
    r"\d{1,3}\s+[-–—]\s+|"                 # 1 - Title
    r"[-*•·‣▪◦–—]\s+"                      # bullets
    r")"
)
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_BR = re.compile(r"<\s*br\s*/?\s*>", re.I)
_REPLY_TAG = re.compile(r"<\s*/?\s*[a-zA-Z][a-zA-Z0-9:-]*(?:\s[^<>]*)?/?\s*>")


def strip_markdown(s: str) -> str:
    """Links, bold, italics and backticks out; the text they marked stays."""
    s = _MD_LINK.sub(r"\1", s)
    s = re.sub(r"(\*\*|__)(.+?)\1", r"\2", s)
    s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", s)
    s = s.replace("`", "")
    return s.strip(" \t*_")


def unfence(text: str) -> str:
    """The inside of the reply's code fence when that is most of the reply, else the reply
    without its fence marks (a short fenced snippet inside prose is not the answer)."""
    m = _FENCE.search(text)
    if m and len(m.group(1).strip()) >= len(text.strip()) * 0.3:
        return m.group(1)
    return text.replace("```", "")


def html_to_text(text: str) -> str:
    """Tags out, entities decoded, in a reply (models sometimes answer in HTML)."""
    if "<" not in text and "&" not in text:
        return text
    return html.unescape(_REPLY_TAG.sub(" ", _BR.sub("\n", text)))


# ----------------------------------------------------------------------------------------- JSON
def json_list(value: Any) -> list:
    """A list column's value (JSON text, numpy array, list or None) as a Python list."""
    if value is None:
        return []
    if isinstance(value, str):
        return list(json.loads(value)) if value.strip() else []
    if isinstance(value, np.ndarray):
        return value.tolist()
    return list(value)


def json_values(text: str, *, lenient: bool = False) -> list[Any]:
    """Every JSON array / object in the text, outermost first, in order of appearance.

    Strict (the default): what `json.JSONDecoder.raw_decode` accepts at a '[' or '{'; the reply
    parsers of synthesis use it, since the teacher was asked for JSON. ``lenient=True`` also reads
    near-JSON inside balanced brackets (single quotes, trailing commas, Python literals, through
    `ast.literal_eval`, never `eval`), which small models write when asked for relevance scores.
    A value cut off before its closing bracket is read by neither."""
    out: list[Any] = []
    decoder = json.JSONDecoder()
    i, n = 0, len(text)
    while i < n:
        j = min([p for p in (text.find("[", i), text.find("{", i)) if p >= 0], default=-1)
        if j < 0:
            break
        value, end = _near_json_at(text, j) if lenient else _json_at(decoder, text, j)
        if isinstance(value, (dict, list)):
            out.append(value)
            i = end
        else:
            i = j + 1
    return out


def first_json(text: str) -> Any:
    """The JSON a reply consists of: the whole text (inside a code fence or not), else the first
    array / object in it (`json_values`). `ValueError` when there is none."""
    text = text.strip()
    fence = _WHOLE_FENCE.match(text)
    if fence:
        text = fence.group(1)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    found = json_values(text)
    if found:
        return found[0]
    raise ValueError(f"the teacher's reply is not JSON: {text[:200]!r}")


def _json_at(decoder: json.JSONDecoder, text: str, start: int) -> tuple[Any, int]:
    try:
        return decoder.raw_decode(text, start)
    except json.JSONDecodeError:
        return None, -1


def _near_json_at(text: str, start: int) -> tuple[Any, int]:
    end = _balanced_end(text, start)
    return (_near_json(text[start:end]), end) if end > 0 else (None, -1)


def _balanced_end(text: str, start: int) -> int:
    """Index after the bracket closing the one at ``start`` (strings respected), or -1."""
    pairs = {"{": "}", "[": "]"}
    stack = [pairs[text[start]]]
    quote = None
    i = start + 1
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'" and not (ch == "'" and text[i - 1].isalnum() and i + 1 < len(text) and text[i + 1].isalnum()):
            quote = ch
        elif ch in pairs:
            stack.append(pairs[ch])
        elif ch in "}]":
            if ch != stack[-1]:
                return -1
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    return -1


def _near_json(fragment: str) -> Any:
    """JSON, or nearly JSON (single quotes, trailing commas, Python literals); None if neither."""
    try:
        return json.loads(fragment)
    except json.JSONDecodeError:
        pass
    fixed = re.sub(r",\s*([}\]])", r"\1", fragment)
    try:
        return json.loads(fixed)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(fixed)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
