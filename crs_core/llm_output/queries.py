"""The query in a teacher's reply to the query prompt (synthesis, Algorithm 2), cleaned, or the
reason it is flagged: an echo of the prompt, a refusal, the assistant's voice, a copy."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from rapidfuzz import fuzz

from ..prompts import QUERY_SYSTEM
from ..titles import normalize_title, parse_title
from .reply import LIST_MARKER, html_to_text, json_values, strip_markdown, unfence


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
        s = LIST_MARKER.sub("", s, count=1) if not re.match(r"^\s*\d{4}\b", s) else s
        s = strip_markdown(s)
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
    body = unfence(str(text)).strip()
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
    body = html_to_text(body).strip()
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
        for r in reviews:
            nr = normalize_query(r)
            if norm in nr or (len(nr) >= len(norm) and fuzz.partial_ratio(norm, nr) >= 95):
                return QueryParse(None, "copies a review")
    return QueryParse(chosen, None)


