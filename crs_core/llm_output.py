"""Reading what a teacher LLM replies: one place for JSON extraction and every reply parser.

- `json_values(text)`: every JSON array / object in a reply, outermost first, in order. Strict by
  default (what `json.JSONDecoder.raw_decode` accepts at a '[' or '{'); `lenient=True` also reads
  near-JSON (single quotes, trailing commas, Python literals: `ast.literal_eval`, never `eval`)
  inside balanced brackets, which small models write when asked for scores.
- `first_json(text)`: a reply that should be JSON (a code fence, the whole text, else the first
  value); `ValueError` if there is none.
- `json_list(value)`: a list column as DuckDB / pandas return it (JSON text, array, list, None).
- `parse_title_list`, `parse_query_reply`, `parse_choice_reply`: synthesis (Algorithm 2);
  `parse_scores`: the 0-4 relevance scores of label augmentation (FNSCRS).

Parsers never raise on bad text: they return what they could read and a reason for what they
could not (HTML, truncated JSON, prose around it, prompt-injected instructions are all text).
"""

from __future__ import annotations

import ast
import html
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from rapidfuzz import fuzz

from .prompts import QUERY_SYSTEM
from .titles import normalize_title, parse_title

N_GROUND_TRUTH = 20
_BR = re.compile(r"<\s*br\s*/?\s*>", re.I)


# ==============================================================================================
# JSON in a reply
# ==============================================================================================
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
    """Every JSON array / object in the text, outermost first, in order of appearance."""
    if lenient:
        return _lenient_values(text)
    out: list[Any] = []
    dec = json.JSONDecoder()
    i, n = 0, len(text)
    while i < n:
        j = min([p for p in (text.find("[", i), text.find("{", i)) if p >= 0], default=-1)
        if j < 0:
            break
        try:
            obj, end = dec.raw_decode(text, j)
        except json.JSONDecodeError:
            i = j + 1
            continue
        out.append(obj)
        i = end
    return out


def first_json(text: str) -> Any:
    """The JSON a reply consists of: inside a code fence, the whole text, else the value at the
    first '{' or '['. `ValueError` when there is none."""
    text = text.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.S)
    if fence:
        text = fence.group(1)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if starts:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[min(starts):])
            return obj
        except json.JSONDecodeError:
            pass
    raise ValueError(f"the teacher's reply is not JSON: {text[:200]!r}")


# ==============================================================================================
# synthesis: title lists, queries, choices
# ==============================================================================================
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.S)
_MARKER = re.compile(
    r"^\s*(?:"
    r"(?:#\s*)?\d{1,3}\s*[.)\]:]\s*|"      # 1.  1)  1]  1:  #1.
    r"#\s*\d{1,3}\s+|"                     # #1 Title
    r"\(\d{1,3}\)\s*|"                     # (1)
    r"\d{1,3}\s+[-–—]\s+|"                 # 1 - Title
    r"[-*•·‣▪◦–—]\s+"                      # bullets
    r")"
)
_YEAR_GROUP = re.compile(r"[(\[]\s*(?:[A-Za-z ,]*\s)?(?:1[89]\d\d|20\d\d)(?:\s*[-–/]\s*(?:\d{2,4})?)?\s*[)\]]")
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_PROSE_START = re.compile(
    r"^(?:here(?:'s| is| are)|sure|certainly|of course|okay|ok\b|i (?:hope|recommend|would|think|suggest)|"
    r"enjoy|these (?:movies|films|recommendations)|based on|as an ai|note:|let me know|happy watching|"
    r"i'm|i am|you might|you may|if you)",
    re.I,
)
_LABEL = re.compile(r"^(?:title|movie|film|recommendation)\s*\d*\s*[:：]\s*", re.I)
_TITLE_KEYS = ("title", "movie", "name", "film", "movie_name", "movie_title")
_LIST_KEYS = ("recommendations", "movies", "titles", "items", "results", "films", "list", "recommended_movies")


def _strip_markdown(s: str) -> str:
    s = _MD_LINK.sub(r"\1", s)
    s = re.sub(r"(\*\*|__)(.+?)\1", r"\2", s)
    s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", s)
    s = s.replace("`", "")
    return s.strip(" \t*_")


def _unfence(text: str) -> str:
    m = _FENCE.search(text)
    if m and len(m.group(1).strip()) >= len(text.strip()) * 0.3:
        return m.group(1)
    return text.replace("```", "")




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
    s = _strip_markdown(raw.strip())
    s = _MARKER.sub("", s, count=1)
    s = _strip_markdown(s)
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


def _description_cut(title: str) -> str | None:
    """'Heat - a crime saga about ...' -> 'Heat'; None when there is nothing to cut."""
    for sep in (" - ", " – ", " — ", ": "):
        if sep in title:
            head, tail = title.split(sep, 1)
            if head.strip() and len(tail.split()) >= 3:
                return head.strip()
    return None


def _plausible_title(s: str) -> bool:
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


def parse_title_list(text: str, limit: int | None = None, *, dedupe: bool = True) -> list[str]:
    """Titles from a teacher's recommendation reply, in order (duplicates dropped unless
    ``dedupe=False``: the pipeline removes them after grounding, where two spellings of one
    film are known to be one).

    Handles numbered / bulleted lists, JSON (a list of strings or objects, or an object with a
    list, or title -> anything), prose before and after the list, years in () or [], markdown
    bold / links, quoted titles, descriptions after the year, and one-line comma lists.
    """
    if not text or not text.strip():
        return []
    body = _unfence(text)
    raw: list[str] = []
    for obj in json_values(body):
        titles = [t for t in _titles_from_json(obj) if isinstance(t, str) and re.search(r"[A-Za-z]", t)]
        if len(titles) >= 2 or (titles and body.strip()[:1] in "[{"):
            raw = titles
            break
    if not raw:
        lines = [ln for ln in body.splitlines() if ln.strip()]
        marked = [ln for ln in lines if _MARKER.match(ln) and not re.match(r"^\s*\d{4}\b", ln)]
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
        if not _plausible_title(t):
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


@dataclass(frozen=True)
class QueryParse:
    """A query reply, cleaned: ``query`` is None when the reply is flagged (``reason`` says why)."""

    query: str | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.query is not None


_Q_PREFIX = re.compile(
    r"^(?:(?:here(?:'s| is)\s+(?:the|a|my|one|your)\s+)?(?:(?:synthetic|generated|converted|distinct|final|"
    r"sample|new|user|customer|rewritten|resulting|example)\s+)*(?:query|question|request|user|customer|q|"
    r"output|answer|response|prompt|sentence|result|text|rephrased|rewrite|message)\s*\d*\s*(?:\*\*|__)?\s*[:：]|"
    r"(?:user|query|question)\s*[-–—])\s*",
    re.I,
)
_Q_INTRO = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|here(?:'s| is| are)|based on|below is|i (?:have|would|will)|"
    r"this (?:is|query)|the following)\b",
    re.I,
)
_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i cannot|i can't|as an ai|as a language model|i'm unable|i am unable|"
    r"cannot assist|can't assist|can't help with|cannot help with)\b",
    re.I,
)
_ASSISTANT = re.compile(
    r"\b(?:i'?m ready to help|i am ready to help|how (?:can|may) i (?:help|assist)|what is your question|"
    r"what can i do for you|i'?d be (?:happy|glad) to help|let me know (?:if|what|how))\b",
    re.I,
)
_ECHO = re.compile(r"<\s*/?\s*review|\*\*sample queries|\*\*input review|sample queries:|input review:", re.I)
# the assistant's voice: recommending, addressing the user, presenting an answer
_ASSISTANT_VOICE = re.compile(
    r"\b(?:i (?:would |'d |do |can |highly |strongly )?(?:recommend|suggest)(?! (?:a|any|some) (?:movie|film)s?\b)|"
    r"i'?d like to recommend|my (?:recommendation|suggestion)s?\b|"
    r"you (?:should|must|might|may|will|would|could) (?:definitely |really |also )?(?:watch|enjoy|like|love|check|try|consider)|"
    r"you'?ll (?:love|enjoy|like)|check out|give (?:it|this|them) a (?:try|watch|shot)|"
    r"here (?:are|is) (?:some|a few|my|the|a)\b|this (?:movie|film) (?:is|has|offers|features)\b|"
    r"if you (?:like|liked|enjoy|enjoyed|love|loved|are looking)\b|(?:is|are) (?:a )?must[- ]see)",
    re.I,
)
# a summary of the reviews (the source), not a request
_ABOUT_REVIEWS = re.compile(
    r"\b(?:the|these|those|this|both|all|my|other) reviews?\b|\breviewers?\b|\bthe (?:review|critic)s? (?:say|said|mention|praise)",
    re.I,
)
# a question about the reviewed film itself ("What are the strengths of this movie?")
_ABOUT_THE_FILM = re.compile(
    r"\bthis (?:movie|film)\b|\b(?:of|in|about|from) the (?:movie|film)\b(?! (?:that|which|where|with|like)\b)",
    re.I,
)
_SYSTEM_TALK = re.compile(
    r"\b(?:system prompt|system message|my (?:instructions|prompt|guidelines)|i (?:was|am|have been) "
    r"(?:instructed|told|asked) to|as instructed|(?:the|these) instructions)\b",
    re.I,
)
_QUOTES = "\"'“”‘’«»"
_SHINGLE = 6  # words: a run this long shared with a prompt is an echo


def _shingles(text: str, n: int = _SHINGLE) -> set[tuple[str, ...]]:
    words = normalize_query(text).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _echoes(text: str, prompts: Sequence[str]) -> bool:
    mine = _shingles(text)
    return bool(mine) and any(mine & _shingles(p) for p in prompts if p)


def _degenerate(text: str) -> str | None:
    """Why the text is a repeated-token degeneration, or None."""
    if re.search(r"(\S)\1{5,}", text):
        return "a character repeated"
    low = re.sub(r"\s+", " ", text.casefold())
    if re.search(r"\b((?:[\w']+\W+){1,4}?)\1{3,}", low + " "):
        return "a word or phrase repeated"
    words = re.findall(r"[\w']+", low)
    if len(words) >= 16 and len(set(words)) / len(words) < 0.4:
        return "few distinct words"
    return None


def names_title(query: str, title: str | None) -> bool:
    """The query names the film: its normalised title (or its main title before a colon, when
    that has two words or more) appears as whole words. Titles shorter than 4 letters are not
    checked ("Up", "It" are everyday words)."""
    if not title:
        return False
    q = f" {normalize_title(query)} "
    title = parse_title(str(title))[0] or str(title)  # "Matrix, The (1999)" -> "The Matrix"
    keys = {normalize_title(title)}
    main = re.split(r"\s*[:\-–—]\s+", title, maxsplit=1)[0]
    if len(main.split()) >= 2:
        keys.add(normalize_title(main))
    return any(len(k.replace(" ", "")) >= 4 and f" {k} " in q for k in keys)


_REPLY_TAG = re.compile(r"<\s*/?\s*[a-zA-Z][a-zA-Z0-9:-]*(?:\s[^<>]*)?/?\s*>")


def _html_to_text(text: str) -> str:
    """Tags out, entities decoded, in a reply (models sometimes answer in HTML)."""
    if "<" not in text and "&" not in text:
        return text
    return html.unescape(_REPLY_TAG.sub(" ", _BR.sub("\n", text)))


def _json_field(body: str, keys: Sequence[str]) -> tuple[str | None, bool]:
    """(a string field of a JSON object reply, cut off?). A reply that opens a JSON object with
    one of ``keys`` but ends inside it is cut off (the teacher hit max_tokens)."""
    s = body.strip()
    if not s.startswith("{"):
        return None, False
    for obj in json_values(s):
        if isinstance(obj, dict):
            lower = {str(k).lower(): v for k, v in obj.items()}
            for k in keys:
                if isinstance(lower.get(k), str):
                    return lower[k], False
            strings = [v for v in obj.values() if isinstance(v, str)]
            if len(strings) == 1:
                return strings[0], False
        break
    key_alt = "|".join(re.escape(k) for k in keys)
    if re.match(r'\{\s*"(?:' + key_alt + r')"\s*:\s*"', s, re.I):
        return None, True
    return None, False


def normalize_query(text: str) -> str:
    """Lower case, punctuation dropped, spaces collapsed (for exact-duplicate detection)."""
    s = re.sub(r"[^\w\s]", " ", str(text).casefold())
    return re.sub(r"\s+", " ", s).strip()


def _strip_query_line(line: str) -> str:
    s = line.strip()
    for _ in range(3):
        before = s
        s = _MARKER.sub("", s, count=1) if not re.match(r"^\s*\d{4}\b", s) else s
        s = _strip_markdown(s)
        s = _Q_PREFIX.sub("", s)
        s = s.strip()
        if s == before:
            break
    # a quoted query followed by commentary: keep the quoted part
    m = re.match(r'^["“]([^"“”]{8,})["”](.*)$', s, re.S)
    if m:
        s = m.group(1)
    s = s.strip().strip(_QUOTES).strip()
    return re.sub(r"\s+", " ", s)


QUERY_KEYS = ("query", "request", "question", "text")


def parse_query_reply(text: str, *, reviews: Sequence[str] = (), templates: Sequence[str] = (),
                      seed_title: str | None = None, prompts: Sequence[str] | None = None,
                      min_words: int = 4, max_words: int = 120) -> QueryParse:
    """The query in a teacher reply, or a flag.

    Reads a JSON reply (``{"query": ...}``) or free text: cleans code fences, HTML, intro lines
    ("Here is a query in a similar style:"), prefixes ("Query:", "User:", "**Question:**"), list
    markers, markdown and wrapping quotes, and takes the first line that reads as a request.
    Flags (one reason each): empty; JSON cut off; an echo of the prompt (``<review>``, "Sample
    Queries") or of the system prompt (a run of 6 words of ``prompts``, default QUERY_SYSTEM, or
    talk about its instructions); a refusal; an assistant's reply ("I'm ready to help"); the
    assistant's voice ("I recommend...", "You'll love..."); a summary of the reviews ("The
    reviewers loved..."); a repeated-token degeneration; too short / too long; a reply that names
    the seed film (``seed_title``); a copy of one of the reviews or of a style template.
    """
    if text is None or not str(text).strip():
        return QueryParse(None, "empty reply")
    body = _unfence(str(text)).strip()
    if _ECHO.search(body):
        return QueryParse(None, "echoes the prompt")
    field_value, cut = _json_field(body, QUERY_KEYS)
    if cut:
        return QueryParse(None, "truncated JSON reply")
    if field_value is not None:
        body = field_value.strip()
        if not body:
            return QueryParse(None, "empty reply")
        if _ECHO.search(body):
            return QueryParse(None, "echoes the prompt")
    body = _html_to_text(body).strip()
    prompts = (QUERY_SYSTEM,) if prompts is None else tuple(prompts)
    if _SYSTEM_TALK.search(body) or _echoes(body, prompts):
        return QueryParse(None, "echoes the system prompt")
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    chosen = first = None
    for ln in lines:
        cand = _strip_query_line(ln)
        if not cand:
            continue
        first = first or cand
        if (ln.rstrip().endswith(":") or cand.endswith(":")) and len(lines) > 1:
            continue  # "Here is a query in a similar style:" / "**Query:**"
        if _Q_INTRO.match(cand) and len(cand.split()) <= 14 and len(lines) > 1 and not cand.endswith("?"):
            continue
        if len(cand.split()) < min_words:
            continue  # "**2**", "---", a lone label: the query may be on the next line
        chosen = cand
        break
    if chosen is None:
        chosen = first
    if chosen is None:
        return QueryParse(None, "no query in the reply")
    words = chosen.split()
    if _REFUSAL.search(chosen):
        return QueryParse(None, "refusal")
    if _ASSISTANT.search(chosen):
        return QueryParse(None, "an assistant's reply, not a user's request")
    if _ASSISTANT_VOICE.search(chosen):
        return QueryParse(None, "the assistant's voice, not a user's request")
    if _ABOUT_REVIEWS.search(chosen):
        return QueryParse(None, "talks about the reviews, not a request")
    if _ABOUT_THE_FILM.search(chosen):
        return QueryParse(None, "asks about the reviewed film, not for one to watch")
    why = _degenerate(chosen)
    if why:
        return QueryParse(None, f"repeated-token degeneration ({why})")
    if len(words) < min_words:
        return QueryParse(None, f"too short ({len(words)} word{'s' if len(words) != 1 else ''})")
    if len(words) > max_words:
        return QueryParse(None, f"too long ({len(words)} words)")
    if not re.search(r"[A-Za-z]{2}", chosen):
        return QueryParse(None, "not text")
    if names_title(chosen, seed_title):
        return QueryParse(None, "names the seed film")
    norm = normalize_query(chosen)
    for t in templates:
        if normalize_query(t) == norm or _echoes(chosen, [t]):  # the same, or 6 words in a row of it
            return QueryParse(None, "copies a style template")
    if len(norm) >= 25:
        from rapidfuzz import fuzz

        for r in reviews:
            nr = normalize_query(r)
            if norm in nr or (len(nr) >= len(norm) and fuzz.partial_ratio(norm, nr) >= 95):
                return QueryParse(None, "copies a review")
    return QueryParse(chosen, None)


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
    body = _html_to_text(_unfence(str(text))).strip()
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
            elif _MARKER.match(line) or len(line.split()) <= 12:  # a bulleted or bare title
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
                if _plausible_title(clean_listed_title(str(value))):
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


# ==============================================================================================
# label augmentation: relevance scores 0-4
# ==============================================================================================
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_SCORE_NAME_KEYS = ("movie", "title", "name", "item", "film", "recommendation")
_SCORE_KEYS = ("score", "relevance", "rating", "value")
_WRAPPER_KEYS = ("scores", "recommendations", "results", "movies", "ratings", "items", "relevance")
_YEAR = re.compile(r"\s*\((?:19|20)\d{2}\)\s*$")
_LEADING_NUM = re.compile(r"^\s*#?\d{1,3}\s*[.):\]-]\s+")


def normalize_label(text: str) -> str:
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


def _lenient(fragment: str) -> Any:
    """JSON, or nearly JSON (single quotes, trailing commas, Python literals)."""
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


def _lenient_values(text: str) -> list[Any]:
    """Every JSON-like object/array in the text, outermost ones, in order of appearance."""
    out = []
    i = 0
    while i < len(text):
        starts = [p for p in (text.find("{", i), text.find("[", i)) if p >= 0]
        if not starts:
            break
        j = min(starts)
        end = _balanced_end(text, j)
        if end < 0:
            i = j + 1
            continue
        value = _lenient(text[j:end])
        if isinstance(value, (dict, list)):
            out.append(value)
            i = end
        else:
            i = j + 1
    return out


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
    for value in _lenient_values(body):
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
