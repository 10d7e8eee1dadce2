"""Movie titles from a teacher's recommendation reply (synthesis, Algorithm 2): numbered or
bulleted lists, JSON, one-line lists, prose around them."""

from __future__ import annotations

import json
import re
from typing import Any

from ..titles import normalize_title, parse_title
from .reply import LIST_MARKER, html_to_text, json_values, strip_markdown, unfence

_YEAR_GROUP = re.compile(r"[(\[]\s*(?:[A-Za-z ,]*\s)?(?:1[89]\d\d|20\d\d)(?:\s*[-–/]\s*(?:\d{2,4})?)?\s*[)\]]")
_PROSE_START = re.compile(
    r"^(?:here(?:'s| is| are)|sure|certainly|of course|okay|ok\b|i (?:hope|recommend|would|think|suggest)|"
    r"enjoy|these (?:movies|films|recommendations)|based on|as an ai|note:|let me know|happy watching|"
    r"i'm|i am|you might|you may|if you)",
    re.I,
)
_LABEL = re.compile(r"^(?:title|movie|film|recommendation)\s*\d*\s*[:：]\s*", re.I)
_TITLE_KEYS = ("title", "movie", "name", "film", "movie_name", "movie_title")
# an HTML element that starts a line of its own (a list item, a paragraph, a row)
_HTML_BLOCK = re.compile(r"<\s*/?\s*(?:li|p|div|tr|h[1-6]|ol|ul)\b[^<>]*>", re.I)
# a JSON string value that was complete before a cut (a key is followed by ':', not listed)
_COMPLETE_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"\s*(?=[,\]])')
_LIST_KEYS = ("recommendations", "movies", "titles", "items", "results", "films", "list", "recommended_movies")


def _titles_from_json(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        lower = {str(k).lower(): v for k, v in obj.items()}
        for key in _LIST_KEYS:
            if key in lower and isinstance(lower[key], (list, dict)):
                return _titles_from_json(lower[key])
        if any(k in lower for k in _TITLE_KEYS):
            return _titles_from_json([obj])
        values = list(obj.values())
        if values and all(isinstance(v, str) for v in values) and all(re.fullmatch(r"\d{1,3}", str(k)) for k in obj):
            return [v for v in values]  # {"1": "Heat (1995)", ...}
        return [str(k) for k in obj]  # {"Heat (1995)": 4, ...} or {"Heat": "1995"}
    if isinstance(obj, list):
        out = []
        for el in obj:
            if isinstance(el, str):
                out.append(el)
            elif isinstance(el, dict):
                lower = {str(k).lower(): v for k, v in el.items()}
                title = next((lower[k] for k in _TITLE_KEYS if isinstance(lower.get(k), str)), None)
                if title:
                    year = lower.get("year")
                    if year is not None and not re.search(r"\(\d{4}\)", title):
                        title = f"{title} ({year})"
                    out.append(title)
            elif isinstance(el, (list, tuple)) and el and isinstance(el[0], str):
                out.append(f"{el[0]} ({el[1]})" if len(el) > 1 and isinstance(el[1], (int, str)) else el[0])
        return out
    return []


def clean_listed_title(raw: str) -> str:
    """One listed title without list markers, markdown, quotes, labels or a trailing description."""
    s = strip_markdown(raw.strip())
    s = LIST_MARKER.sub("", s, count=1)
    s = strip_markdown(s)
    s = _LABEL.sub("", s)
    # a quoted title, perhaps followed by its year and a description
    m = re.match(r'^["“”\'‘]([^"“”]+?)["“”\'’]\s*(.*)$', s)
    if m:
        rest = m.group(2)
        year = _YEAR_GROUP.match(rest)
        s = m.group(1).strip() + (" " + year.group(0) if year else "")
    else:
        year = _YEAR_GROUP.search(s)
        if year and year.start() > 0:
            s = s[: year.end()]
    return re.sub(r"\s+", " ", s).strip(" \t-–—:;,.*_\"'“”")


def description_cut(title: str) -> str | None:
    """'Heat - a crime saga about ...' -> 'Heat'; None when there is nothing to cut."""
    for sep in (" - ", " – ", " — ", ": "):
        if sep in title:
            head, tail = title.split(sep, 1)
            if head.strip() and len(tail.split()) >= 3:
                return head.strip()
    return None


def plausible_title(s: str) -> bool:
    """A cleaned line reads as a title: short, not prose ("Here are...", "I hope..."), not a heading."""
    if not s or len(s) > 150 or not re.search(r"[A-Za-z0-9]", s):
        return False
    if s.endswith(":") or s.endswith("?"):
        return False
    if _PROSE_START.match(s):
        return False
    return len(s.split()) <= 20


def _quoted_titles(line: str) -> list[str]:
    """'... a movie called "Heat" or "Ronin" ...' -> ['Heat', 'Ronin'] (short quotes only)."""
    out = []
    for q in re.findall(r'["“]([^"“”]{2,80})["”]', line):
        if len(q.split()) <= 10 and not re.search(r"[.!?]\s", q):
            out.append(q)
    return out


def _unescape(json_string_body: str) -> str:
    try:
        return json.loads(f'"{json_string_body}"')
    except json.JSONDecodeError:
        return json_string_body


def parse_title_list(text: str, limit: int | None = None, *, dedupe: bool = True) -> list[str]:
    """Titles from a teacher's recommendation reply, in order (duplicates dropped unless
    ``dedupe=False``: the pipeline removes them after grounding, where two spellings of one
    film are known to be one).

    Handles numbered / bulleted lists, JSON (a list of strings or objects, or an object with a
    list, or title -> anything), prose before and after the list, years in () or [], markdown
    bold / links, quoted titles, descriptions after the year, one-line comma lists, HTML lists
    and JSON cut off by max_tokens (the strings completed before the cut).
    """
    if not text or not text.strip():
        return []
    body = html_to_text(_HTML_BLOCK.sub("\n", unfence(text)))
    raw: list[str] = []
    values = json_values(body)
    for obj in values:
        titles = [t for t in _titles_from_json(obj) if isinstance(t, str) and re.search(r"[A-Za-z]", t)]
        if len(titles) >= 2 or (titles and body.strip()[:1] in "[{"):
            raw = titles
            break
    if not values and body.lstrip()[:1] in "[{":
        raw = [_unescape(m) for m in _COMPLETE_STRING.findall(body)]
    if not raw:
        lines = [ln for ln in body.splitlines() if ln.strip()]
        marked = [ln for ln in lines if LIST_MARKER.match(ln) and not re.match(r"^\s*\d{4}\b", ln)]
        if marked:
            raw = marked
        elif len(lines) == 1 or (lines and max(len(ln) for ln in lines) > 200):
            line = " ".join(lines)
            if len(_YEAR_GROUP.findall(line)) >= 2:
                raw = re.split(r"(?<=[)\]])\s*(?:[,;]|\band\b)\s*", line)
            elif ";" in line or " | " in line:
                raw = re.split(r"\s*(?:;|\s\|\s)\s*", line)
            else:
                quoted = _quoted_titles(line)
                # one title alone counts only with its year: "I don't know." is not a title
                raw = quoted if quoted else ([line] if _YEAR_GROUP.search(line) and len(line.split()) <= 12 else [])
        else:  # several unmarked lines: short lines (or lines with a year) are titles;
            # from prose lines only quoted titles are taken
            raw = []
            for ln in lines:
                t = ln.strip()
                if _YEAR_GROUP.search(t) or (len(t.split()) <= 8 and not re.search(r"[.!?…:]\s*$", t)):
                    raw.append(t)
                else:
                    raw += _quoted_titles(t)
    out: list[str] = []
    seen: set[tuple[str, int | None]] = set()
    for item in raw:
        t = clean_listed_title(str(item))
        if not plausible_title(t):
            continue
        name, year = parse_title(t)
        key = (normalize_title(name or t), year)
        if dedupe and key in seen:
            continue
        seen.add(key)
        out.append(t)
        if limit is not None and len(out) >= limit:
            break
    return out


