"""The candidates a teacher picked in its reply to the choose prompt (synthesis, Algorithm 2):
JSON, JSON cut off, number lists, numbered titles, HTML lists."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from ..prompts import N_GROUND_TRUTH
from ..titles import normalize_title, parse_title
from .reply import LIST_MARKER, html_to_text, json_values, unfence
from .title_lists import clean_listed_title, plausible_title


@dataclass(frozen=True)
class ChoiceParse:
    """The candidates a choose reply picked: 0-based positions in the teacher's order, plus what
    was dropped. ``reason`` says why nothing was picked."""

    picks: tuple[int, ...]
    out_of_range: int = 0   # numbers that are no candidate
    duplicates: int = 0     # a candidate picked again
    off_list: int = 0       # titles named that are not among the candidates
    truncated: bool = False  # JSON cut off (the complete numbers before the cut are kept)
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.picks)


_PICK_KEYS = ("picks", "choices", "numbers", "candidates", "recommendations", "ids", "items", "movies", "answer")


def _picks_from_json(obj: Any) -> list[Any] | None:
    if isinstance(obj, dict):
        lower = {str(k).lower(): v for k, v in obj.items()}
        for key in _PICK_KEYS:
            if isinstance(lower.get(key), list):
                return lower[key]
        lists = [v for v in obj.values() if isinstance(v, list)]
        return lists[0] if len(lists) == 1 else None
    if isinstance(obj, list):
        return obj
    return None


def _candidate_index(candidates: Sequence[str]) -> dict[str, list[tuple[int, int | None]]]:
    index: dict[str, list[tuple[int, int | None]]] = {}
    for i, t in enumerate(candidates):
        name, year = parse_title(t)
        index.setdefault(normalize_title(name or t), []).append((i, year))
    return index


def _title_position(title: str, index: dict[str, list[tuple[int, int | None]]]) -> int | None:
    name, year = parse_title(clean_listed_title(title))
    hits = index.get(normalize_title(name or title)) or []
    if not hits:
        return None
    same_year = [i for i, y in hits if year is not None and y == year]
    return same_year[0] if same_year else hits[0][0]


def parse_choice_reply(text: str, candidates: Sequence[str], limit: int = N_GROUND_TRUTH) -> ChoiceParse:
    """Candidate positions from a choose reply: JSON (``{"picks": [3, 1]}``, a bare list, numbers
    as strings, objects with a number or a title), JSON cut off by max_tokens (the numbers before
    the cut), or text ("3, 1, 7", numbered lines "3. Title (Year)", HTML lists). A number picks
    the candidate with that number (1-based); a title picks the candidate with that title (the
    teacher's own list numbers are not trusted when a title is given). Numbers out of range,
    repeated picks and titles that are not candidates are dropped and counted."""
    n = len(candidates)
    if text is None or not str(text).strip():
        return ChoiceParse((), reason="empty reply")
    body = html_to_text(unfence(str(text))).strip()
    index = _candidate_index(candidates)
    entries: list[tuple[str, Any]] = []  # ('num', int) | ('title', str)
    truncated = False

    def add(el: Any) -> None:
        if isinstance(el, bool):
            return
        if isinstance(el, int) or (isinstance(el, float) and el.is_integer()):
            entries.append(("num", int(el)))
        elif isinstance(el, str):
            m = re.fullmatch(r"\s*#?\s*(-?\d{1,4})\s*[.)]?\s*", el)
            if m:
                entries.append(("num", int(m.group(1))))
            else:
                m = re.match(r"^\s*#?(\d{1,3})\s*[.):\]-]\s*(.+)$", el)
                entries.append(("title", m.group(2) if m else el))
        elif isinstance(el, dict):
            lower = {str(k).lower(): v for k, v in el.items()}
            num = next((lower[k] for k in ("number", "n", "id", "index", "candidate", "pick") if k in lower), None)
            title = next((lower[k] for k in ("title", "movie", "name", "film") if isinstance(lower.get(k), str)), None)
            if title is not None:
                entries.append(("title", title))
            elif num is not None:
                add(num)

    found_json = False
    for obj in json_values(body):
        picks = _picks_from_json(obj)
        if picks is not None:
            found_json = True
            for el in picks:
                add(el)
            break
    if not found_json and body.lstrip()[:1] in "{[":
        # cut off: keep the numbers that are complete (followed by a comma)
        tail = body.split("[", 1)[1] if "[" in body else ""
        if tail or body.lstrip().startswith("{"):
            truncated = True
            for m in re.finditer(r"(-?\d{1,4})\s*,", tail):
                entries.append(("num", int(m.group(1))))
    if not found_json and not truncated:
        for line in body.splitlines():
            line = line.strip()
            if not line:
                continue
            if re.fullmatch(r"[#\d\s,;.and]+", line) and re.search(r"\d", line):
                for m in re.finditer(r"\d{1,4}", line):
                    entries.append(("num", int(m.group(0))))
                continue
            m = re.match(r"^\s*(?:#|no\.?\s*|number\s*)?(\d{1,3})\s*[.):\]-]?\s*(.*)$", line, re.I)
            if m and m.group(2).strip():
                entries.append(("title", m.group(2)))
            elif m:
                entries.append(("num", int(m.group(1))))
            elif LIST_MARKER.match(line) or len(line.split()) <= 12:  # a bulleted or bare title
                entries.append(("title", line))
    picks: list[int] = []
    seen: set[int] = set()
    out_of_range = duplicates = off_list = 0
    for kind, value in entries:
        if kind == "num":
            pos = value - 1 if 1 <= value <= n else None
            if pos is None:
                out_of_range += 1
                continue
        else:
            pos = _title_position(str(value), index)
            if pos is None:
                if plausible_title(clean_listed_title(str(value))):
                    off_list += 1
                continue
        if pos in seen:
            duplicates += 1
            continue
        seen.add(pos)
        picks.append(pos)
        if len(picks) >= limit:
            break
    reason = None
    if not picks:
        reason = ("JSON cut off before any pick" if truncated else
                  "no candidate picked" + (f" ({out_of_range} number(s) out of range, {off_list} title(s) not among "
                                           "the candidates)" if out_of_range or off_list else ""))
    return ChoiceParse(tuple(picks), out_of_range, duplicates, off_list, truncated, reason)

