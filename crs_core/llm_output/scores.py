"""The 0-4 relevance scores in a teacher's reply to the scoring prompt (label augmentation,
FNSCRS): JSON or near-JSON in any of the shapes small models write, a cut-off object, lines,
prose; each score matched to a listed title."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

from rapidfuzz import fuzz

from .reply import json_values

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_SCORE_NAME_KEYS = ("movie", "title", "name", "item", "film", "recommendation")
_SCORE_KEYS = ("score", "relevance", "rating", "value")
_WRAPPER_KEYS = ("scores", "recommendations", "results", "movies", "ratings", "items", "relevance")
_YEAR = re.compile(r"\s*\((?:19|20)\d{2}\)\s*$")
_LEADING_NUM = re.compile(r"^\s*#?\d{1,3}\s*[.):\]-]\s+")


def normalize_label(text: str) -> str:
    """Accents, case, "&" and punctuation folded, so a reply's spelling of a title meets the listed one."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    text = text.lower().replace("&", " and ")
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


@dataclass
class ParsedScores:
    """Scores read from one reply, by position in the listed batch."""

    scores: dict[int, float] = field(default_factory=dict)    # in [0, 4]
    clipped: set[int] = field(default_factory=set)            # given outside 0-4, clipped
    missing: set[int] = field(default_factory=set)            # listed but not scored
    found_json: bool = False

    @property
    def unparsable(self) -> bool:
        return not self.scores


def _score_value(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        v = float(value)
    elif isinstance(value, str):
        m = _NUMBER.search(value)
        if not m:
            return None
        v = float(m.group(0))
    elif isinstance(value, Mapping):
        lower = {str(k).lower(): v for k, v in value.items()}
        inner = next((lower[k] for k in _SCORE_KEYS if k in lower), None)
        return _score_value(inner) if inner is not None else None
    else:
        return None
    return v if math.isfinite(v) else None



def _pairs(value: Any, n: int) -> list[tuple[Any, Any]]:
    """(key, raw score) pairs from a parsed JSON value; an int key is a list position (0-based)."""
    if isinstance(value, dict):
        lower = {str(k).strip().lower(): v for k, v in value.items()}
        for k in _WRAPPER_KEYS:
            if k in lower and isinstance(lower[k], (dict, list)) and len(value) <= 2:
                return _pairs(lower[k], n)
        name = next((lower[k] for k in _SCORE_NAME_KEYS if k in lower and isinstance(lower[k], str)), None)
        score = next((lower[k] for k in _SCORE_KEYS if k in lower), None)
        if name is not None and score is not None:
            return [(name, score)]
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, list):
        out: list[tuple[Any, Any]] = []
        if value and all(_score_value(v) is not None and not isinstance(v, Mapping) for v in value) \
                and len(value) == n:
            return [(i, v) for i, v in enumerate(value)]
        for el in value:
            if isinstance(el, dict):
                out += _pairs(el, n)
            elif isinstance(el, (list, tuple)) and len(el) == 2 and isinstance(el[0], str):
                out.append((el[0], el[1]))
        return out
    return []


class _BatchMatcher:
    """Maps a reply's movie keys to positions of the listed batch."""

    def __init__(self, titles: Sequence[str]):
        self.n = len(titles)
        self.full = [normalize_label(t) for t in titles]
        self.bare = [normalize_label(_YEAR.sub("", t)) for t in titles]

    def match(self, key: Any) -> int | None:
        if isinstance(key, int):
            return key if 0 <= key < self.n else None
        raw = str(key).strip().strip("\"'“”‘’*`")
        k = normalize_label(raw)
        if not k:
            return None
        for names in (self.full, self.bare):
            hits = [i for i, t in enumerate(names) if t == k]
            if len(hits) == 1:
                return hits[0]
        if k.isdigit() and 1 <= int(k) <= self.n:          # the list number
            return int(k) - 1
        stripped = normalize_label(_LEADING_NUM.sub("", raw))         # "3. Heat (1995)"
        if stripped != k:
            found = self.match(stripped)
            if found is not None:
                return found
        # the key is the listed line (title + description) or starts with the title
        hits = [i for i, t in enumerate(self.full) if t and (k.startswith(t + " ") or k == t)]
        if len(hits) != 1:
            hits = [i for i, t in enumerate(self.bare) if t and k.startswith(t + " ")]
        if len(hits) == 1:
            return hits[0]
        scored = sorted(((max(fuzz.ratio(k, f), fuzz.ratio(k, b)), i)
                         for i, (f, b) in enumerate(zip(self.full, self.bare))), reverse=True)
        if scored and scored[0][0] >= 90 and (len(scored) == 1 or scored[1][0] < scored[0][0] - 3):
            return scored[0][1]
        return None


_QUOTED_PAIR = re.compile(r'["“]([^"“”\n]{1,300})["”]\s*:\s*["“]?\s*([-+]?\d+(?:\.\d+)?)')
_PROSE_SCORE = re.compile(
    r"(?:score|rating|relevance)\s+(?:for|of)\s+(?:the\s+)?(?:movie\s+|film\s+)?[\"“']?(.{2,150}?)[\"”']?"
    r"\s+(?:is|=|:)\s+([-+]?\d+(?:\.\d+)?)", re.I)
_LINE_SCORE = re.compile(
    r"^\s*(?:[-*•]\s*)?(?:#?\d{1,3}[.)]\s*)?[\"“'*]*(.+?)[\"”'*]*\s*[:=\-–—]\s*\**\s*"
    r"([-+]?\d+(?:\.\d+)?)\s*(?:/\s*4|out of 4)?\**\s*[.,]?\s*$")


def parse_scores(text: str, titles: Sequence[str]) -> ParsedScores:
    """Scores for the listed ``titles`` from a relevance reply (see the module docstring).

    The JSON value (object or list) that scores the most listed titles wins, the later one on a
    tie (the answer ends the reply; an echoed template comes first). Without any, quoted
    '"Title": score' pairs (a reply cut off by the token limit) are read, then lines such as
    'Heat (1995): 3.5' or prose such as 'The score for the movie "Heat" is 3.5'."""
    out = ParsedScores()
    matcher = _BatchMatcher(titles)
    body = (text or "").replace("```json", "```").replace("```", "\n")
    best: dict[int, Any] = {}
    for value in json_values(body, lenient=True):
        out.found_json = True
        got: dict[int, Any] = {}
        for key, raw in _pairs(value, matcher.n):
            pos = matcher.match(key)
            if pos is not None and pos not in got and _score_value(raw) is not None:
                got[pos] = raw
        if got and len(got) >= len(best):
            best = got
    if not best:  # a cut-off or malformed object: its '"Title": score' pairs
        for m in _QUOTED_PAIR.finditer(body):
            pos = matcher.match(m.group(1))
            if pos is not None and pos not in best:
                best[pos] = m.group(2)
    if not best:  # plain lines ("Heat (1995): 3.5"), prose ("the score for Heat is 3.5")
        for line in body.splitlines():
            m = _LINE_SCORE.match(line)
            found = [m] if m else list(_PROSE_SCORE.finditer(line))
            for m in found:
                pos = matcher.match(m.group(1))
                if pos is not None and pos not in best:
                    best[pos] = m.group(2)
    for pos, raw in best.items():
        v = _score_value(raw)
        if v is None:
            continue
        if v < 0.0 or v > 4.0:
            out.clipped.add(pos)
            v = min(4.0, max(0.0, v))
        out.scores[pos] = v
    out.missing = set(range(matcher.n)) - set(out.scores)
    return out
