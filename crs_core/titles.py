"""Movie title parsing, normalisation and conservative catalog matching.

Titles come as "Title (Year)" in many real-world variants (MovieLens "Matrix, The (1999)",
"The Omen(2006)", missing years, accents, LLM markdown). `TitleMatcher` maps such strings
to catalog item ids and prefers returning no match over a wrong one.

Match tiers, first hit wins (Y = query year; tolerance = `year_tolerance`, default 1):

===========================================================  =============  ==================
tier                                                         method         score
===========================================================  =============  ==================
normalised title, year == Y                                  exact          1.00
same, ignoring spaces ("Spider Man" = "Spiderman")           exact          0.98
alternate title (MovieLens "(a.k.a. Se7en)"), year == Y      exact          0.95
the three above, 0 < |year - Y| <= tolerance, title of 2+    exact          0.90 / 0.88 / 0.85
words (one-word titles a year apart are often other films)
query without year, one item has the title                   exact_no_year  0.85
query without year, several items, `priority` decides        exact_no_year  0.70
opt-in `match_undated`: catalog row without year, and no     exact_no_year  0.75
dated row shares the title
opt-in `match_subtitles`: title before ":"/" - " equals the  fuzzy          0.75
other title, year == Y, same sequel numbers
fuzzy: ignoring the/a/an/of/in/and and abbreviations         fuzzy          0.85 * ratio / 100
(vol., pt., dr., st., vs.), rapidfuzz ratio >= `threshold`,
differing words only spelling variants ("Colour"/"Color");
year within tolerance (one-word titles: == Y)
===========================================================  =============  ==================

Several items in the deciding tier make the query ambiguous: `priority` (optional) picks the
strictly highest, otherwise the answer is None and lower tiers are not tried. Rows with the
same normalised title and the same year are taken as catalog duplicates of one film (the
first row, or the highest priority, wins). Titles of 4 characters or fewer never match
fuzzily ("Up" is not "Us").
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from rapidfuzz import fuzz, process

__all__ = [
    "Match",
    "TitleMatcher",
    "alternate_titles",
    "normalize_title",
    "parse_title",
]

MatchMethod = Literal["exact", "exact_no_year", "fuzzy"]

_MIN_YEAR, _MAX_YEAR = 1870, 2100

# --------------------------------------------------------------------------- parsing

_YEAR_WORDS = r"(?:tv|movie|film|video|series|mini-series|miniseries|short|documentary|version)"
_YEAR_GROUP = re.compile(
    r"[(\[]\s*(?:" + _YEAR_WORDS + r"[\s,]+)*"
    r"(?P<year>\d{4})"
    # "(2009/I)" (IMDb disambiguator), "(1975-1979)", "(2007-)"
    r"(?:\s*[-–/]\s*(?:\d{4}|[IVXivx]+)?)?"
    r"(?:[\s,]+" + _YEAR_WORDS + r")*\s*[)\]]$",
    re.IGNORECASE,
)
# "Inception, 2010" / "Inception - 2010"; a bare trailing number is part of the title
# ("Blade Runner 2049", "Death Race 2000").
_YEAR_SUFFIX = re.compile(r"(?:\s*,|\s+[-–—])\s*(?P<year>\d{4})$")
_TRAILING_JUNK = " \t\r\n,;:*_`"
_LEADING_JUNK = " \t\r\n*_`"
_QUOTES = {'"': '"', "“": "”", "„": "“", "«": "»", "'": "'", "‘": "’", "`": "`"}

_EN_ARTICLES = r"the|a|an"
# Capitalised only: MovieLens writes "Misérables, Les"; lowercase forms would catch real
# title endings. ", I" (Italian) is left out because of titles like "Me, Myself & I".
_FOREIGN_ARTICLES = (
    r"Les|La|Le|L'|Il|Lo|Gli|El|Los|Las|Der|Die|Das|Den|Det|De|En|Het|Un|Une|Una|Uno|Ein|Eine|Da"
)
_ARTICLE_SUFFIX = re.compile(
    r"^(?P<body>.+?),\s*(?P<art>(?i:" + _EN_ARTICLES + r")|" + _FOREIGN_ARTICLES + r")"
    r"(?P<rest>\s*(?::|\s[-–—]\s).*)?$"
)
_AKA = re.compile(r"^(?:a\.?k\.?a\.?|aka)\s+", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def _clean(raw: str) -> str:
    s = raw.replace("**", "").replace("__", "")
    s = _SPACES.sub(" ", s).strip(_TRAILING_JUNK).lstrip(_LEADING_JUNK)
    if s.endswith((").", "].")):  # sentence-final full stop after the year
        s = s[:-1]
    return s


def _strip_quotes(s: str) -> str:
    while len(s) >= 2 and _QUOTES.get(s[0]) == s[-1]:
        s = s[1:-1].strip()
    return s


def _move_article(title: str) -> str:
    m = _ARTICLE_SUFFIX.match(title)
    if not m:
        return title
    art = m.group("art")
    sep = "" if art.endswith("'") else " "
    return f"{art}{sep}{m.group('body').strip()}{m.group('rest') or ''}"


def _split_year(s: str) -> tuple[str, int | None]:
    for pattern in (_YEAR_GROUP, _YEAR_SUFFIX):
        m = pattern.search(s)
        if m:
            year = int(m.group("year"))
            rest = s[: m.start()].rstrip(_TRAILING_JUNK)
            if _MIN_YEAR <= year <= _MAX_YEAR and rest:
                return rest, year
    return s, None


def _trailing_group(s: str) -> int | None:
    """Start index of a balanced "(...)" group ending s, or None."""
    if not s.endswith(")"):
        return None
    depth = 0
    for i in range(len(s) - 1, -1, -1):
        if s[i] == ")":
            depth += 1
        elif s[i] == "(":
            depth -= 1
            if depth == 0:
                return i
    return None


def _parse(raw: str) -> tuple[str, str, list[str], int | None]:
    """(main title, main title with its parentheticals, alternates, year)."""
    s, year = _split_year(_clean(raw))
    s = s.strip()
    full = _move_article(_strip_quotes(s))
    alts: list[str] = []
    while True:
        i = _trailing_group(s)
        if i is None or not s[:i].strip():
            break
        alt = _AKA.sub("", s[i + 1 : -1].strip())
        if alt:
            alts.append(_move_article(_strip_quotes(alt)))
        s = s[:i].rstrip()
    alts.reverse()
    return _move_article(_strip_quotes(s)), full, alts, year


def parse_title(raw: str) -> tuple[str, int | None]:
    """Split "Title (Year)" into (display title, year), undoing MovieLens article suffixes.

    >>> parse_title("Matrix, The (1999)")
    ('The Matrix', 1999)
    >>> parse_title("City of God (Cidade de Deus) (2002)")
    ('City of God', 2002)
    """
    main, _, _, year = _parse(raw)
    return main, year


def alternate_titles(raw: str) -> list[str]:
    """Main title followed by the alternates in trailing parentheses, without year.

    >>> alternate_titles("Seven (a.k.a. Se7en) (1995)")
    ['Seven', 'Se7en']
    """
    main, _, alts, _ = _parse(raw)
    out: list[str] = []
    for t in (main, *alts):
        if t and t not in out:
            out.append(t)
    return out


# --------------------------------------------------------------------------- normalising

_TRANSLIT = str.maketrans(
    {"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "đ": "d", "ł": "l", "þ": "th", "ð": "d", "ı": "i"}
)
_FRACTION = re.compile(r"(?<=\d)(?=[\u00bc-\u00be\u2150-\u215e])")  # "8½" -> "8 ½"
_APOSTROPHES = re.compile(r"['’‘`´ʼ]")
_ACRONYM = re.compile(r"\b(?:[^\W\d_]\.){2,}")  # "L.A.", "E.T."
_NON_WORD = re.compile(r"[\W_]+")
_LEADING_ARTICLES = frozenset({"the", "a", "an"})
_ROMAN = {
    r: str(i)
    for i, r in enumerate(
        "ii iii iv v vi vii viii ix x xi xii xiii xiv xv xvi xvii xviii xix xx".split(), start=2
    )
}


def normalize_title(title: str) -> str:
    """Matching key: lowercase ASCII-folded words, no punctuation or leading article.

    "&" becomes "and", apostrophes vanish ("Schindler's" -> "schindlers"), other punctuation
    separates words, and Roman numerals II-XX after the first word become digits.

    >>> normalize_title("Star Wars: Episode IV - A New Hope")
    'star wars episode 4 a new hope'
    """
    s = _FRACTION.sub(" ", title).casefold().translate(_TRANSLIT)
    s = unicodedata.normalize("NFKD", s)
    s = "".join(c for c in s if not unicodedata.combining(c)).casefold()
    s = s.replace("&", " and ")
    s = _APOSTROPHES.sub("", s)
    s = _ACRONYM.sub(lambda m: m.group(0).replace(".", ""), s)
    words = _NON_WORD.sub(" ", s).split()
    while len(words) > 1 and words[0] in _LEADING_ARTICLES:
        del words[0]
    # The first word stays: "V for Vendetta", "X-Men" are not numbers.
    return " ".join(words[:1] + [_ROMAN.get(w, w) for w in words[1:]])


_SHORT = 4  # normalised titles this short (without spaces) never match fuzzily
_DIGITS = re.compile(r"\d+")
_EPISODE = re.compile(r"\bepisode \d+")


def _compact(key: str) -> str:
    return key.replace(" ", "")


# Only for fuzzy matching: words whose presence or spelling rarely tells two films apart.
_FILLER = frozenset({"the", "a", "an", "of", "in", "and"})
_ABBREVIATIONS = {"vol": "volume", "pt": "part", "vs": "versus", "dr": "doctor", "st": "saint"}


def _loose(key: str) -> str:
    words = [_ABBREVIATIONS.get(w, w) for w in key.split()]
    # The first word stays: "In the Labyrinth" is not "Labyrinth".
    return " ".join(words[:1] + [w for w in words[1:] if w not in _FILLER])


_SUBTITLE_SPLIT = re.compile(r":|\s[-–—]\s")


def _subtitle_prefix(title: str) -> str | None:
    """Normalised part before the first ":" or " - ", if the title has one."""
    parts = _SUBTITLE_SPLIT.split(title, maxsplit=1)
    if len(parts) < 2:
        return None
    key = normalize_title(parts[0])
    return key if len(_compact(key)) > _SHORT else None


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class Match:
    """A catalog hit for one query title."""

    item_id: str
    score: float  # in [0, 1]; see the module docstring for the scale
    method: MatchMethod
    matched_title: str  # catalog display title, e.g. "The Matrix"
    matched_year: int | None = None


@dataclass(frozen=True)
class _Entry:
    item_id: str
    title: str
    year: int | None




def _sequel_numbers(key: str) -> list[str]:
    # "Star Wars: Episode IV" is "Star Wars"; "Hostel: Part III" is not "Hostel".
    return sorted(_DIGITS.findall(_EPISODE.sub("", key)))


def _spelling_variant(a: str, b: str) -> bool:
    """"colour"/"color", "judgement"/"judgment"; not "haunted"/"hunted", "prime"/"primer"."""
    if min(len(a), len(b)) < 5 or a[:3] != b[:3]:
        return False
    if a.startswith(b) or b.startswith(a):  # "Alien"/"Aliens", "Valentin"/"Valentine"
        return False
    return fuzz.ratio(a, b) >= 80


def _fuzzy_compatible(a: str, b: str) -> bool:
    """Whether two different loose keys may name the same film.

    Allowed: only one-for-one spelling variants of words. Rejected: sequel numbers,
    extra or missing words ("I Still Know What You Did..."), parodies ("Night of the Living
    Bread"), plurals ("Alien"/"Aliens").
    """
    if len(_compact(a)) <= _SHORT or len(_compact(b)) <= _SHORT:
        return False
    if sorted(_DIGITS.findall(a)) != sorted(_DIGITS.findall(b)):
        return False
    if _compact(a) == _compact(b):  # only spacing differs
        return True
    wa, wb = a.split(), b.split()
    if len(wa) != len(wb):
        return False
    return all(x == y or _spelling_variant(x, y) for x, y in zip(wa, wb))


class _Ambiguous(Exception):
    pass


class TitleMatcher:
    """Matches free-form movie titles to catalog items; see the module docstring for tiers.

    `items` are (item_id, title, year); `title` may carry its own year ("The Matrix (1999)"),
    used when `year` is None. Several rows may share an item id (aliases).
    `priority` (item_id -> number, e.g. popularity) only breaks ties among ambiguous hits.
    `match_undated` and `match_subtitles` switch on two riskier tiers (see module docstring).
    """

    def __init__(
        self,
        items: Iterable[tuple[str, str, int | None]],
        *,
        priority: Mapping[str, float] | None = None,
        threshold: float = 90.0,
        year_tolerance: int = 1,
        match_undated: bool = False,
        match_subtitles: bool = False,
    ) -> None:
        self.threshold = threshold
        self.year_tolerance = year_tolerance
        self.match_undated = match_undated
        self.match_subtitles = match_subtitles
        self._priority = dict(priority or {})
        self._entries: list[_Entry] = []
        self._main: dict[str, list[int]] = defaultdict(list)
        self._compact: dict[str, list[int]] = defaultdict(list)
        self._alt: dict[str, list[int]] = defaultdict(list)
        self._subtitle: dict[str, list[int]] = defaultdict(list)
        self._loose: dict[str, list[int]] = defaultdict(list)
        loose_by_year: dict[int | None, set[str]] = defaultdict(set)
        for item_id, title, year in items:
            main, full, alts, parsed_year = _parse(title)
            if year is None:
                year = parsed_year
            idx = len(self._entries)
            self._entries.append(_Entry(str(item_id), main or title.strip(), year))
            for key in {normalize_title(main), normalize_title(full)} - {""}:
                self._add(self._main, key, idx)
                self._add(self._compact, _compact(key), idx)
                self._add(self._loose, _loose(key), idx)
                loose_by_year[year].add(_loose(key))
            for alt in alts:
                key = normalize_title(alt)
                if key:
                    self._add(self._alt, key, idx)
            prefix = _subtitle_prefix(main)
            if prefix:
                self._add(self._subtitle, prefix, idx)
        self._loose_by_year = {y: sorted(keys) for y, keys in loose_by_year.items()}
        self._all_loose = sorted(self._loose)
        self._cache: dict[tuple[str, int | None], Match | None] = {}

    @staticmethod
    def _add(index: dict[str, list[int]], key: str, idx: int) -> None:
        bucket = index[key]
        if not bucket or bucket[-1] != idx:
            bucket.append(idx)

    def __len__(self) -> int:
        return len({e.item_id for e in self._entries})

    # ---------------------------------------------------------------- public

    def match(self, raw: str, year: int | None = None) -> Match | None:
        """Best catalog item for `raw`, or None if there is none or it is ambiguous.

        An explicit `year` overrides a year written in `raw`.
        """
        cache_key = (raw, year)
        if cache_key not in self._cache:
            main, full, alts, parsed_year = _parse(raw)
            if len(self._cache) >= 200_000:
                self._cache.clear()
            try:
                result = self._match(main, full, alts, parsed_year if year is None else year)
            except _Ambiguous:
                result = None
            self._cache[cache_key] = result
        return self._cache[cache_key]

    def match_many(
        self, raws: Iterable[str], years: Iterable[int | None] | None = None
    ) -> list[Match | None]:
        """`match` for each title, optionally with a parallel iterable of years."""
        raws = list(raws)
        ys = list(years) if years is not None else [None] * len(raws)
        if len(ys) != len(raws):
            raise ValueError(f"match_many got {len(raws)} titles but {len(ys)} years")
        return [self.match(r, y) for r, y in zip(raws, ys)]

    # ---------------------------------------------------------------- internals

    def _match(self, main: str, full: str, alts: list[str], year: int | None) -> Match | None:
        main_keys = [k for k in dict.fromkeys((normalize_title(main), normalize_title(full))) if k]
        if not main_keys:
            return None
        alt_keys = [k for k in dict.fromkeys(normalize_title(a) for a in alts) if k]
        # (index, query keys, score when year equal, score when year within tolerance)
        levels = [
            (self._main, [(k, k) for k in main_keys], 1.0, 0.90),
            (self._compact, [(_compact(k), k) for k in main_keys], 0.98, 0.88),
            (self._alt, [(k, k) for k in main_keys + alt_keys], 0.95, 0.85),
            (self._main, [(k, k) for k in alt_keys], 0.95, 0.85),
        ]
        if year is None:
            # Without a year to check, a parenthetical in the query ("(Director's Cut)") is
            # too weak to match on its own.
            for index, keys, _, _ in levels[:3]:
                hits = self._hits(index, keys)
                if hits:
                    return self._resolve(hits, 0.85, "exact_no_year", fallback_score=0.70)
            return self._fuzzy(main_keys[0], None)

        for index, keys, same_score, _ in levels:
            hits = [i for i in self._hits(index, keys) if self._entries[i].year == year]
            if hits:
                return self._resolve(hits, same_score, "exact")
        for index, keys, _, near_score in levels:
            # One-word titles ("Heat", "Pocahontas", "Saw") are remade or reused too often
            # for a year off to be the same film.
            keys = [(k, words) for k, words in keys if " " in words]
            hits = [i for i in self._hits(index, keys) if self._near(self._entries[i].year, year)]
            if hits:
                return self._resolve(hits, near_score, "exact")

        if self.match_undated:
            # An undated row may be the film asked for, unless a dated row has the same title
            # (then the undated one is as likely another film, e.g. a remake).
            for index, keys, _, _ in levels[:2]:
                hits = self._hits(index, keys)
                if hits and all(self._entries[i].year is None for i in hits):
                    return self._resolve(hits, 0.75, "exact_no_year")

        if self.match_subtitles:
            hits = self._hits(self._subtitle, [(k, k) for k in main_keys])
            prefix = _subtitle_prefix(main)
            if prefix:
                hits += self._hits(self._main, [(prefix, prefix)])
            numbers = _sequel_numbers(main_keys[0])
            hits = [
                i
                for i in hits
                if self._entries[i].year == year
                and _sequel_numbers(normalize_title(self._entries[i].title)) == numbers
            ]
            if hits:
                return self._resolve(hits, 0.75, "fuzzy")

        return self._fuzzy(main_keys[0], year)

    def _near(self, a: int | None, b: int) -> bool:
        return a is not None and 0 < abs(a - b) <= self.year_tolerance

    @staticmethod
    def _hits(index: dict[str, list[int]], keys: list[tuple[str, str]]) -> list[int]:
        out: list[int] = []
        for k, _ in keys:
            for i in index.get(k, ()):
                if i not in out:
                    out.append(i)
        return out

    def _resolve(
        self, hits: list[int], score: float, method: MatchMethod, fallback_score: float | None = None
    ) -> Match:
        """One item from `hits`: the only item, same-title same-year duplicates, or priority."""
        entries = [self._entries[i] for i in hits]
        ids = list(dict.fromkeys(e.item_id for e in entries))
        years = {e.year for e in entries}
        if len(ids) > 1 and len(years) == 1 and None not in years:
            # Same normalised title and year under several ids: catalog duplicates of one film
            # (every such case in ReDial shares one IMDb id). Priority, else the first row.
            ids = sorted(ids, key=lambda i: -self._priority.get(i, 0.0))[:1]
        if len(ids) > 1:
            best = self._by_priority(ids)
            if best is None:
                raise _Ambiguous
            ids = [best]
            if fallback_score is not None:
                score = fallback_score
        entry = next(e for e in entries if e.item_id == ids[0])
        return Match(entry.item_id, score, method, entry.title, entry.year)

    def _by_priority(self, ids: list[str]) -> str | None:
        scored = sorted(((self._priority[i], i) for i in ids if i in self._priority), reverse=True)
        if not scored or (len(scored) > 1 and scored[0][0] == scored[1][0]):
            return None
        return scored[0][1]

    def _fuzzy(self, key: str, year: int | None) -> Match | None:
        loose = _loose(key)
        if len(_compact(loose)) <= _SHORT:
            return None
        if year is None:
            choices: list[str] = self._all_loose
        else:
            tol = self.year_tolerance if " " in loose else 0
            choices = [k for y in range(year - tol, year + tol + 1) for k in self._loose_by_year.get(y, ())]
        found = process.extract(loose, choices, scorer=fuzz.ratio, score_cutoff=self.threshold, limit=5)
        candidates: list[tuple[float, list[int]]] = []
        for cand, cand_score, _ in found:
            if cand != loose and not _fuzzy_compatible(loose, cand):
                continue
            hits = self._loose[cand]
            if year is not None:
                same = [i for i in hits if self._entries[i].year == year]
                hits = same or [i for i in hits if self._near(self._entries[i].year, year)]
            if hits:
                candidates.append((cand_score, hits))
        if not candidates:
            return None
        best_score, best_hits = candidates[0]
        best_ids = {self._entries[i].item_id for i in best_hits}
        for other_score, other_hits in candidates[1:]:
            # Another title about as close: refuse rather than guess.
            if other_score >= best_score - 2 and {self._entries[i].item_id for i in other_hits} != best_ids:
                return None
        return self._resolve(best_hits, round(0.85 * best_score / 100, 4), "fuzzy")
