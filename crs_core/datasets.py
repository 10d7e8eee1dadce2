"""Loaders for the review, item, interaction and dialogue files a user can point the studio at.

Every loader reads one file (plain or gzip, detected from its bytes), never writes anything, and
returns a :class:`Loaded` (``data`` DataFrame + :class:`LoadReport`; it also unpacks as
``df, report = load_reviews(path)``). Each *kind* of data has one common shape, whatever the
source format (see the ``*_COLUMNS`` schemas below):

- reviews       ``load_reviews``      Amazon 2023 / Amazon 2014-2018 JSON lines, IMDb (aclImdb) JSONL
- items         ``load_items``        Amazon 2023 ``meta_`` JSONL, ReDial / INSPIRED ``id2info`` JSON,
                                      MovieLens ``movies.csv`` (+ ``links.csv``), ReDial
                                      ``movies_with_mentions.csv``, ReDial<->MovieLens ``movies_data.csv``
- interactions  ``load_interactions`` MovieLens ``ratings.csv``
- tags          ``load_tags``         MovieLens ``tags.csv``
- dialogues     ``load_dialogues``    ReDial raw JSONL, INSPIRED TSV, UniCRS ``*_data_dbpedia.jsonl``,
                                      CFCRS ``{dialog_id, dialog}`` JSONL, processed turn files
                                      (UniCRS ``*_data_processed.jsonl``, LLMs-as-zero-shot ``test.jsonl``,
                                      iEvaLM ``test_data_processed.jsonl``)

``detect_format(path)`` sniffs the content (first line / header), not the file name.

Bad input: by default the first problem raises :class:`~crs_core.errors.InputError` naming the
file, the 1-based line and what is wrong. With ``skip_bad=True`` bad records (a line, a CSV row,
a whole dialogue, a catalog entry) are skipped and listed in ``report.problems``. Problems with
the file as a whole (missing, empty, unknown format, missing CSV columns, ``.gz`` that is not
gzip) always raise.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import itertools
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import unquote

import pandas as pd

from .errors import InputError

__all__ = [
    "FORMATS", "KINDS", "Loaded", "LoadReport", "EntityIndex",
    "detect_format", "load", "load_reviews", "load_items", "load_interactions", "load_tags",
    "load_dialogues", "load_movielens_links", "invert_entity2id", "entity_title", "clean_title",
    "title_year", "clean_review_text",
    "REVIEW_COLUMNS", "ITEM_COLUMNS", "INTERACTION_COLUMNS", "TAG_COLUMNS", "TURN_COLUMNS",
    "LINK_COLUMNS",
]

# --------------------------------------------------------------------------------------------
# Common shapes (column -> dtype). "object" columns hold str / None / list / dict values.
# --------------------------------------------------------------------------------------------

REVIEW_COLUMNS = {
    "review_id": "object",   # unique within the file
    "item_key": "object",    # the source's item id: ASIN / parent ASIN, IMDb "tt..."
    "user_id": "object",     # None when the source has no users (IMDb)
    "text": "object",        # HTML <br /> turned into newlines, nothing else touched
    "rating": "float64",     # NaN when absent
    "timestamp": "Int64",    # unix seconds, <NA> when absent
    "source": "object",
    "extra": "object",       # dict of source-specific fields (summary, votes, split, ...)
}
ITEM_COLUMNS = {
    "item_key": "object",
    "title": "object",       # "Name (Year)" where the source has it
    "year": "Int64",
    "genres": "object",      # list[str]
    "plot": "object",        # "" when unknown
    "directors": "object",   # list[str]
    "cast": "object",        # list[str]
    "imdb_id": "object",     # "tt0114709" or None
    "source": "object",
    "source_ids": "object",  # dict: {"redial": "...", "movielens": "...", "imdb": "tt...", ...}
    "extra": "object",
}
INTERACTION_COLUMNS = {
    "user_id": "object", "item_key": "object", "rating": "float64", "timestamp": "Int64",
    "source": "object",
}
TAG_COLUMNS = {
    "user_id": "object", "item_key": "object", "tag": "object", "timestamp": "Int64",
    "source": "object",
}
LINK_COLUMNS = {"item_key": "object", "imdb_id": "object", "tmdb_id": "object"}
TURN_COLUMNS = {
    "dialog_id": "object",
    "turn_id": "object",          # str; source message/turn id, or the utterance index
    "speaker": "object",          # "recommender" | "seeker" | None (unknown)
    "context": "object",          # list[str]: utterances before this turn (consecutive messages
                                  # of one speaker merged), movie placeholders replaced by titles
    "resp": "object",             # str: this turn's utterance
    "rec": "object",              # list[str]: movie references recommended in this turn
    "mentioned": "object",        # list[str]: movie references mentioned earlier in the context
    "ref_kind": "object",         # what rec/mentioned hold: "title" | "redial_id" | "entity_id"
    "rec_titles": "object",       # list[str | None]: readable titles of rec
    "mentioned_titles": "object",  # list[str | None]
    "source": "object",
    "extra": "object",            # dict (ReDial questionnaire answers, INSPIRED strategies, ...)
}

KINDS = ("reviews", "items", "interactions", "tags", "links", "dialogues")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

MAX_PROBLEMS = 1000  # problems kept verbatim in a report; further ones are only counted
# Longest text one record (a review, an utterance) may hold. The longest bundled review has 13,704
# characters; one review of 20 MB made embedding take 68 s and 3.8 GB instead of 18 s and 0.8 GB.
MAX_TEXT_CHARS = 100_000


@dataclass
class LoadReport:
    """What happened while loading one file."""

    path: str
    fmt: str
    kind: str
    kept: int = 0        # rows in the returned DataFrame
    skipped: int = 0     # bad records skipped (lines, CSV rows, dialogues, catalog entries)
    problems: list[tuple[int | None, str]] = field(default_factory=list)  # (line, reason)
    notes: list[str] = field(default_factory=list)  # non-errors worth knowing (files joined, ...)

    def summary(self) -> str:
        text = f"{self.path} [{self.fmt}]: kept {self.kept} {self.kind} rows, skipped {self.skipped}"
        shown = "; ".join(f"line {ln}: {why}" if ln else why for ln, why in self.problems[:5])
        if shown:
            text += f" ({shown}{'; ...' if len(self.problems) > 5 else ''})"
        return text


@dataclass
class Loaded:
    """A loader's result; unpacks as ``data, report``."""

    data: pd.DataFrame
    report: LoadReport

    def __iter__(self):
        return iter((self.data, self.report))


class _BadRecord(Exception):
    """A problem with one record; the reading loop turns it into an InputError or a skip."""


# --------------------------------------------------------------------------------------------
# Reading files: gzip sniffing, line iteration, error routing
# --------------------------------------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"


def _open_binary(path: Path):
    """Open ``path`` for binary reading, decompressing gzip when the bytes say so."""
    if not path.exists():
        raise InputError("file not found", str(path))
    if path.is_dir():
        raise InputError("is a directory, not a file", str(path))
    with path.open("rb") as fh:
        magic = fh.read(2)
    if not magic:
        raise InputError("file is empty", str(path))
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    if path.suffix.lower() == ".gz":
        raise InputError("named .gz but is not gzip-compressed", str(path))
    return path.open("rb")


class _Source:
    """One input file being read.

    Yields decoded lines / JSON values / CSV rows while tracking the 1-based line number, and
    routes record problems (``bad``) either to an :class:`InputError` or to the report.
    """

    def __init__(self, path: str | Path, fmt: str, kind: str, skip_bad: bool):
        self.path = Path(path)
        self.name = str(path)
        self.skip_bad = skip_bad
        self.report = LoadReport(path=self.name, fmt=fmt, kind=kind)
        self.line: int | None = 0        # line of the record being handled (None: whole document)
        self.unterminated = False        # the current line has no trailing newline (truncated?)

    # -- problems --------------------------------------------------------------------------
    def bad(self, reason: str, line: int | None | str = "current") -> None:
        """A bad record: raise in strict mode, else count it and move on."""
        line = self.line if line == "current" else line
        if not self.skip_bad:
            raise InputError(reason, self.name, line)
        self.report.skipped += 1
        if len(self.report.problems) < MAX_PROBLEMS:
            self.report.problems.append((line, reason))

    def fail(self, reason: str, line: int | None = None) -> InputError:
        """A problem with the file as a whole (raised whatever ``skip_bad`` says)."""
        return InputError(reason, self.name, line)

    def records(self, items: Iterable[Any], convert: Callable[[Any], Any]) -> Iterator[dict]:
        """Apply ``convert`` (one record -> one row, or a list of rows) to each item;
        a :class:`_BadRecord` from it skips that record (or raises, in strict mode)."""
        for item in items:
            try:
                out = convert(item)
            except _BadRecord as exc:
                self.bad(str(exc))
                continue
            if isinstance(out, list):
                yield from out
            else:
                yield out

    # -- text lines ------------------------------------------------------------------------
    def lines(self) -> Iterator[str]:
        """Non-blank lines, decoded as UTF-8, without line terminators; streams the file."""
        seen_text = False
        with _open_binary(self.path) as fh:
            raw_lines = iter(fh)
            while True:
                try:
                    raw = next(raw_lines)
                except StopIteration:
                    break
                except (EOFError, OSError, zlib.error) as exc:   # truncated / corrupt gzip
                    self.bad(f"compressed data is truncated or corrupt after line {self.line} "
                             f"({exc})", self.line + 1)
                    break
                self.line += 1
                self.unterminated = not raw.endswith(b"\n")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    self.bad(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                             f"{exc.start + 1}); re-save the file as UTF-8")
                    continue
                if self.line == 1:
                    text = text.lstrip("\ufeff")
                text = text.rstrip("\r\n")
                if text.strip():
                    seen_text = True
                    yield text
        if not seen_text and not self.report.skipped:
            raise self.fail("file is empty (no data lines)")

    def json_lines(self) -> Iterator[Any]:
        """One JSON value per non-blank line."""
        for text in self.lines():
            try:
                yield json.loads(text)
            except json.JSONDecodeError as exc:
                self.bad(self._json_problem(text, exc))

    def _json_problem(self, text: str, exc: json.JSONDecodeError) -> str:
        if text.lstrip()[:1] not in ("{", "["):
            return (f"not a JSON line (starts with {text[:40]!r}); the file does not look like "
                    "JSON lines")
        if self.unterminated:   # only the last line can lack its newline
            return (f"last line is incomplete ({exc.msg} at column {exc.colno}, no final "
                    "newline): the file looks truncated")
        return f"malformed JSON: {exc.msg} at column {exc.colno}"

    def json_document(self) -> Any:
        """The whole file as one JSON value (catalog / entity2id files)."""
        with _open_binary(self.path) as fh:
            try:
                raw = fh.read()
            except (EOFError, OSError, zlib.error) as exc:
                raise self.fail(f"compressed data is truncated or corrupt ({exc})") from None
        try:
            text = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise self.fail(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})", line) from None
        del raw
        if not text.strip():
            raise self.fail("file is empty")
        try:
            doc = json.loads(text, object_pairs_hook=_KeyCheckedDict)
        except json.JSONDecodeError as exc:
            raise self.fail(f"malformed or truncated JSON: {exc.msg} at column {exc.colno}",
                            exc.lineno) from None
        self.line = None
        return doc

    # -- CSV / TSV ---------------------------------------------------------------------------
    def csv_rows(self, required: Iterable[str], delimiter: str = ",",
                 quoting: int = csv.QUOTE_MINIMAL) -> Iterator[dict[str, str]]:
        """Rows as {column: value} dicts; the header must hold every ``required`` column."""
        reader = csv.reader((t + "\n" for t in self.lines()), delimiter=delimiter,
                            quoting=quoting, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise self.fail("file is empty (no header line)") from None
        except csv.Error as exc:
            raise self.fail(f"unreadable header: {exc}", self.line) from None
        missing = [c for c in required if c not in header]
        if missing:
            raise self.fail(f"missing column(s) {', '.join(missing)}; the header has: "
                            f"{', '.join(header)[:200]}", self.line)
        n_rows = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                self.bad(f"unreadable row: {exc}")
                continue
            n_rows += 1
            if len(values) != len(header):
                self.bad(f"expected {len(header)} fields, found {len(values)}")
                continue
            yield dict(zip(header, values))
        if n_rows == 0:
            raise self.fail("has a header but no data rows")


class _KeyCheckedDict(dict):
    """JSON object that remembers keys it saw twice (json keeps only the last silently)."""

    def __init__(self, pairs):
        super().__init__()
        self.duplicates: list[str] = []
        for key, value in pairs:
            if key in self:
                self.duplicates.append(key)
            else:
                self[key] = value


def _collect(src: _Source, rows: Iterable[dict], schema: Mapping[str, str],
             unique: tuple[str, ...] = ()) -> Loaded:
    """Gather row dicts into the common-shape DataFrame, rejecting duplicate ``unique`` keys."""
    columns: dict[str, list] = {name: [] for name in schema}
    first_line: dict[tuple, int | None] = {}
    for row in rows:
        line = row.pop("_line", src.line)
        if unique:
            key = tuple(row[name] for name in unique)
            if key in first_line:
                where = f" (first on line {first_line[key]})" if first_line[key] else ""
                shown = key[0] if len(key) == 1 else key
                src.bad(f"duplicate {'/'.join(unique)} {shown!r}{where}", line)
                continue
            first_line[key] = line
        for name, values in columns.items():
            values.append(row[name])
    frame = pd.DataFrame({name: _column(values, schema[name]) for name, values in columns.items()})
    src.report.kept = len(frame)
    return Loaded(frame, src.report)


def _column(values: list, dtype: str) -> pd.Series:
    if dtype == "Int64":
        return pd.Series(pd.array(values, dtype="Int64"))
    return pd.Series(values, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Field helpers (raise _BadRecord with a user-readable reason)
# --------------------------------------------------------------------------------------------

def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _need_dict(obj: Any, what: str = "a JSON object") -> dict:
    if not isinstance(obj, dict):
        raise _BadRecord(f"expected {what}, found {type(obj).__name__} {_short(obj)}")
    return obj


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _str(rec: Mapping, name: str, required: bool = True) -> str | None:
    """Text (or an integer, as text); None when absent/blank and optional."""
    value = rec.get(name)
    if _missing(value):
        if required:
            raise _BadRecord(f"missing field '{name}'" if value is None else
                             f"field '{name}' is empty")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _BadRecord(f"field '{name}' should be text, found {_short(value)}")
    return str(value)


def _text(rec: Mapping, name: str) -> str:
    """A required text field that may be empty (review and utterance texts)."""
    value = rec.get(name)
    if not isinstance(value, str):
        raise _BadRecord(f"missing field '{name}'" if value is None else
                         f"field '{name}' should be text, found {_short(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise _BadRecord(f"field '{name}' has {len(value):,} characters, more than the {MAX_TEXT_CHARS:,} a record "
                         "may hold; shorten or split it (or skip such records with --skip-bad)")
    return value


def _num(rec: Mapping, name: str, required: bool = False, lo: float | None = None,
         hi: float | None = None) -> float | None:
    """A number (JSON number or numeric text) within [lo, hi]; None when absent and optional."""
    value = rec.get(name)
    if _missing(value):
        if required:
            raise _BadRecord(f"missing field '{name}'")
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise _BadRecord(f"field '{name}' is not a number: {_short(value)}") from None
    if math.isnan(number) or math.isinf(number):
        raise _BadRecord(f"field '{name}' is not a finite number: {_short(value)}")
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        raise _BadRecord(f"field '{name}' = {_short(value)} is outside {lo:g}..{hi:g}")
    return number


def _int(rec: Mapping, name: str, required: bool = False) -> int | None:
    number = _num(rec, name, required)
    if number is None:
        return None
    if number != int(number):
        raise _BadRecord(f"field '{name}' should be a whole number: {_short(rec.get(name))}")
    return int(number)


def _id(rec: Mapping, name: str, required: bool = True) -> str | None:
    """An identifier as text; float-formatted numbers (144711.0, "144711.0") lose the ".0"."""
    value = rec.get(name)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = _str(rec, name, required)
    if text is None:
        return None
    text = text.strip()
    return text.split(".")[0] if re.fullmatch(r"\d+\.0+", text) else text


def _str_list(rec: Mapping, name: str) -> list[str]:
    """A list of strings; absent/null -> []; a plain string -> [string]."""
    value = rec.get(name)
    if _missing(value):
        return []
    if isinstance(value, str):
        return [value.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _BadRecord(f"field '{name}' should be a list of text, found {_short(value)}")
    return [v.strip() for v in value if v.strip()]


def _split(text: str | None, sep: str) -> list[str]:
    return [part.strip() for part in (text or "").split(sep) if part.strip()]


_IMDB_ID = re.compile(r"tt\d{7,8}")


def _imdb(value: Any) -> str | None:
    """IMDb id as "tt" + at least 7 digits from "tt0114709", "0114709", 114709 or "114709.0"."""
    if _missing(value):
        return None
    text = str(value).strip()
    if _IMDB_ID.fullmatch(text):
        return text
    if re.fullmatch(r"\d+(\.0+)?", text):
        return f"tt{int(float(text)):07d}"
    raise _BadRecord(f"not an IMDb id: {_short(value)}")


# --------------------------------------------------------------------------------------------
# Text and title helpers (public: the studio uses them to match titles across sources)
# --------------------------------------------------------------------------------------------

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_review_text(text: str) -> str:
    """Turn HTML line breaks (``<br />``, ``<br>``) into newlines; leave everything else as is."""
    return _BR.sub("\n", text)


def clean_title(title: str) -> str:
    """Collapse whitespace and put a space before a trailing "(Year)": "The Omen(2006)" -> "The Omen (2006)"."""
    text = " ".join(str(title).split())
    return re.sub(r"(?<=\S)\((\d{4})\)$", r" (\1)", text)


def title_year(title: str | None) -> int | None:
    """The year of a "Name (Year)" title, else None."""
    match = re.search(r"\((\d{4})\)\s*$", title or "")
    return int(match.group(1)) if match else None


_FILM_SUFFIX = re.compile(r"\s*\((?:(\d{4}) )?(?:[A-Za-z][\w\- ]* )?film\)$")


def entity_title(entity: str) -> str:
    """A readable title for an entity2id key.

    DBpedia URIs become titles: ``<http://dbpedia.org/resource/Super_Troopers>`` -> "Super Troopers",
    ``..._(2019_film)>`` -> "... (2019)", ``..._(film)>`` -> "..." (percent-escapes decoded).
    Keys that are already names ("Pari (1995)", "comedy") come back whitespace-cleaned.
    """
    text = entity.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if "/resource/" in text:
        text = text.rsplit("/resource/", 1)[1]
    elif re.match(r"https?://", text):
        text = text.rstrip("/").rsplit("/", 1)[-1]
    else:
        return clean_title(text)
    text = unquote(text).replace("_", " ")
    match = _FILM_SUFFIX.search(text)
    if match:
        text = text[:match.start()] + (f" ({match.group(1)})" if match.group(1) else "")
    return clean_title(text)


def invert_entity2id(entity2id: Mapping[str, int] | str | Path) -> dict[int, str]:
    """{id: entity key} from an entity2id mapping or file; two keys sharing an id is an error."""
    path = None
    if not isinstance(entity2id, Mapping):
        path, entity2id = str(entity2id), _load_entity2id_file(entity2id)
    inverse: dict[int, str] = {}
    for key, eid in entity2id.items():
        if eid in inverse:
            raise InputError(f"entity id {eid} is used by both {inverse[eid]!r} and {key!r}",
                             path)
        inverse[eid] = key
    return inverse


def _load_entity2id_file(path: str | Path) -> dict[str, int]:
    src = _Source(path, "entity2id", "entities", skip_bad=False)
    doc = src.json_document()
    if not isinstance(doc, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in doc.values()):
        raise src.fail("expected a JSON object mapping entity names to integer ids")
    if doc.duplicates:
        raise src.fail(f"duplicate entity key {doc.duplicates[0]!r}")
    return doc


@dataclass
class EntityIndex:
    """The id space of one processed CRS folder: entity2id.json (+ item_ids.json of movies)."""

    name_of_id: dict[int, str]            # id -> entity key (URI or name)
    id_of_name: dict[str, int]
    movie_ids: frozenset[int] | None = None   # None: unknown which ids are movies

    @classmethod
    def load(cls, entity2id: str | Path, item_ids: str | Path | None = None) -> EntityIndex:
        mapping = _load_entity2id_file(entity2id)
        movies = None
        if item_ids is not None:
            src = _Source(item_ids, "item_ids", "entities", skip_bad=False)
            doc = src.json_document()
            if not isinstance(doc, list) or not all(isinstance(v, int) for v in doc):
                raise src.fail("expected a JSON list of integer ids")
            movies = frozenset(doc)
        try:
            inverse = invert_entity2id(mapping)
        except InputError as exc:
            raise InputError(str(exc), str(entity2id)) from None
        return cls(inverse, dict(mapping), movies)

    @classmethod
    def next_to(cls, data_file: str | Path) -> EntityIndex | None:
        """The entity2id.json (+ item_ids.json) in the same folder as ``data_file``, if any."""
        folder = Path(data_file).parent
        if not (folder / "entity2id.json").is_file():
            return None
        items = folder / "item_ids.json"
        return cls.load(folder / "entity2id.json", items if items.is_file() else None)

    def title(self, eid: int) -> str | None:
        key = self.name_of_id.get(eid)
        return entity_title(key) if key is not None else None

    def is_movie(self, ref: int | str) -> bool | None:
        """Whether an id (or an entity name) is a movie; None when unknown."""
        eid = self.id_of_name.get(ref) if isinstance(ref, str) else ref
        if self.movie_ids is None or eid is None:
            return None
        return eid in self.movie_ids


# --------------------------------------------------------------------------------------------
# Reviews
# --------------------------------------------------------------------------------------------

def _review(review_id: str, item_key: str, user_id: str | None, text: str, rating: float | None,
            timestamp: int | None, source: str, extra: dict) -> dict:
    return {"review_id": review_id, "item_key": item_key, "user_id": user_id,
            "text": clean_review_text(text), "rating": rating, "timestamp": timestamp,
            "source": source, "extra": extra}


def _amazon2023_reviews(src: _Source, **_) -> Iterator[dict]:
    """Amazon Reviews 2023: user_id, parent_asin, asin, rating, title, text, timestamp (ms), ..."""
    def row(obj):
        obj = _need_dict(obj)
        user, parent = _str(obj, "user_id"), _str(obj, "parent_asin")
        asin = _str(obj, "asin", required=False) or parent
        millis = _int(obj, "timestamp", required=True)
        text = _text(obj, "text")
        extra = {"title": _str(obj, "title", required=False), "asin": asin,
                 "helpful_vote": _int(obj, "helpful_vote"),
                 "verified_purchase": obj.get("verified_purchase")}
        return _review(f"{user}:{asin}:{millis}", parent, user, text,
                       _num(obj, "rating", required=True, lo=1, hi=5), millis // 1000,
                       "amazon_2023", extra)
    return src.records(src.json_lines(), row)


def _amazon_legacy_reviews(src: _Source, **_) -> Iterator[dict]:
    """Amazon 2014 / 2018 reviews: reviewerID, asin, reviewText, overall, summary, unixReviewTime."""
    def row(obj):
        obj = _need_dict(obj)
        user, asin = _str(obj, "reviewerID"), _str(obj, "asin")
        seconds = _int(obj, "unixReviewTime", required=True)
        text = _text(obj, "reviewText")
        is_2018 = "verified" in obj or "vote" in obj or "style" in obj
        helpful = obj.get("helpful")            # 2014: [helpful, total]; 2018: vote "1,234"
        if isinstance(helpful, list) and helpful:
            votes = _int({"helpful": helpful[0]}, "helpful")
        else:
            vote = obj.get("vote")
            votes = _int({"vote": vote.replace(",", "") if isinstance(vote, str) else vote}, "vote")
        extra = {"summary": _str(obj, "summary", required=False), "helpful_votes": votes,
                 "verified": obj.get("verified")}
        return _review(f"{user}:{asin}:{seconds}", asin, user, text,
                       _num(obj, "overall", required=True, lo=1, hi=5), seconds,
                       "amazon_2018" if is_2018 else "amazon_2014", extra)
    return src.records(src.json_lines(), row)


def _imdb_reviews(src: _Source, **_) -> Iterator[dict]:
    """IMDb reviews (aclImdb as JSONL): review_id, imdb_id, text, rating, split, label, file."""
    def row(obj):
        obj = _need_dict(obj)
        review_id, text = _str(obj, "review_id"), _text(obj, "text")
        imdb_id = _imdb(_str(obj, "imdb_id"))
        extra = {k: obj.get(k) for k in ("split", "label", "file") if k in obj}
        return _review(review_id, imdb_id, None, text, _num(obj, "rating", lo=1, hi=10), None,
                       "imdb", extra)
    return src.records(src.json_lines(), row)


# --------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------

def _item(item_key: str, title: str | None, source: str, *, id_space: str | None = None,
          year: int | None = None, genres: list[str] | None = None, plot: str = "",
          directors: list[str] | None = None, cast: list[str] | None = None,
          imdb_id: str | None = None, source_ids: dict | None = None,
          extra: dict | None = None) -> dict:
    """One item row; ``source_ids`` gets {id_space (default: source): item_key, "imdb": ...}."""
    title = clean_title(title) if title else ""
    ids = {id_space or source: item_key}
    if imdb_id:
        ids["imdb"] = imdb_id
    ids.update({k: v for k, v in (source_ids or {}).items() if v})
    return {"item_key": item_key, "title": title, "year": title_year(title) or year,
            "genres": genres or [], "plot": plot or "", "directors": directors or [],
            "cast": cast or [], "imdb_id": imdb_id, "source": source, "source_ids": ids,
            "extra": extra or {}}


def _people(details: Mapping, *names: str) -> list[str]:
    """Amazon 2023 ``details`` people field: a list, or a comma-separated string."""
    for name in names:
        value = details.get(name)
        if isinstance(value, list):
            return [str(v).strip() for v in value if str(v).strip()]
        if isinstance(value, str) and value.strip():
            return _split(value, ",")
    return []


def _amazon2023_meta(src: _Source, **_) -> Iterator[dict]:
    """Amazon 2023 ``meta_`` file: parent_asin, title, main_category, categories, description,
    features, details (Directors, Starring/Actors, Release date, ...), average_rating, ..."""
    def row(obj):
        obj = _need_dict(obj)
        key = _str(obj, "parent_asin")
        details = obj.get("details") or {}
        if not isinstance(details, dict):
            raise _BadRecord(f"field 'details' should be an object, found {_short(details)}")
        description = _str_list(obj, "description")
        year = None
        for candidate in _str_list(obj, "features") + [str(details.get(k, "")) for k in
                                                       ("Release date", "Date First Available")]:
            match = re.fullmatch(r"(?:.*\D)?((?:19|20)\d{2})", candidate.strip())
            if match:
                year = int(match.group(1))
                break
        extra = {k: obj.get(k) for k in ("main_category", "average_rating", "rating_number",
                                         "store", "price") if obj.get(k) is not None}
        main = obj.get("main_category")
        genres = [c for c in _str_list(obj, "categories")
                  if c != main and c != "Genre for Featured Categories"]
        return _item(key, _str(obj, "title", required=False), "amazon_2023", id_space="amazon",
                     year=year, genres=genres,
                     plot="\n".join(d for d in description if d != "Product Description"),
                     directors=_people(details, "Directors", "Director"),
                     cast=_people(details, "Starring", "Actors", "Cast"), extra=extra)
    return src.records(src.json_lines(), row)


def _id2info(src: _Source, label: str, **_) -> Iterator[dict]:
    """ReDial ``id2info.json`` / INSPIRED ``id2info_inspired.json``: {id: {name, genre, plot,
    director, star, [writer, imdb_id]}} as one JSON object."""
    doc = src.json_document()
    if not isinstance(doc, dict):
        raise src.fail(f"expected a JSON object {{id: movie info}}, found {type(doc).__name__}")
    if not doc:
        raise src.fail("contains no entries")
    for key in doc.duplicates:
        src.bad(f"duplicate item_key {key!r}")

    def row(entry):
        key, info = entry
        try:
            info = _need_dict(info, "an object of movie info")
            return _item(key, _str(info, "name"), label, genres=_str_list(info, "genre"),
                         plot=_str(info, "plot", required=False) or "",
                         directors=_str_list(info, "director"), cast=_str_list(info, "star"),
                         imdb_id=_imdb(info.get("imdb_id")),
                         extra={"writers": _str_list(info, "writer")} if "writer" in info else {})
        except _BadRecord as exc:
            raise _BadRecord(f"entry {key!r}: {exc}") from None
    return src.records(doc.items(), row)


def load_movielens_links(path: str | Path, skip_bad: bool = False) -> Loaded:
    """MovieLens ``links.csv`` (movieId, imdbId without "tt", tmdbId) -> item_key, imdb_id, tmdb_id."""
    return load(path, skip_bad=skip_bad, kind="links")


def _movielens_links(src: _Source, **_) -> Iterator[dict]:
    def row(rec):
        return {"item_key": _id(rec, "movieId"), "imdb_id": _imdb(rec.get("imdbId")),
                "tmdb_id": _id(rec, "tmdbId", required=False)}
    return src.records(src.csv_rows(("movieId", "imdbId")), row)


def _movielens_movies(src: _Source, links: str | Path | None = None, **_) -> Iterator[dict]:
    """MovieLens ``movies.csv`` (movieId, title, genres "A|B"); IMDb/TMDb ids come from
    ``links.csv`` (given, or found next to the file)."""
    if links is None and (src.path.parent / "links.csv").is_file():
        links = src.path.parent / "links.csv"
    id_map: dict[str, dict] = {}
    if links is not None:
        frame = load_movielens_links(links, skip_bad=src.skip_bad).data
        id_map = {r.item_key: {"imdb": r.imdb_id, "tmdb": r.tmdb_id}
                  for r in frame.itertuples(index=False)}
        src.report.notes.append(f"IMDb/TMDb ids joined from {links}")

    def row(rec):
        key = _id(rec, "movieId")
        ids = id_map.get(key, {})
        genres = [g for g in _split(rec.get("genres"), "|") if g != "(no genres listed)"]
        return _item(key, _str(rec, "title"), "movielens", genres=genres, imdb_id=ids.get("imdb"),
                     source_ids={"tmdb": ids.get("tmdb")})
    return src.records(src.csv_rows(("movieId", "title", "genres")), row)


def _redial_movies_with_mentions(src: _Source, **_) -> Iterator[dict]:
    """ReDial ``movies_with_mentions.csv``: movieId, movieName, nbMentions."""
    def row(rec):
        return _item(_id(rec, "movieId"), _str(rec, "movieName"), "redial",
                     extra={"n_mentions": _int(rec, "nbMentions")})
    return src.records(src.csv_rows(("movieId", "movieName")), row)


def _redial_movielens_map(src: _Source, **_) -> Iterator[dict]:
    """CRB-CRS ``movies_data.csv`` / ``movies_rating_data.csv``: ReDial ``databaseId`` <->
    MovieLens ``movieId`` <-> numeric ``imdbID``, with genres, directors, actors, year, country."""
    def row(rec):
        key = _id(rec, "databaseId", required=False)
        if key is None:
            raise _BadRecord("no ReDial id (empty 'databaseId')")
        extra = {k: rec[k] for k in ("country",) if rec.get(k)}
        if rec.get("rating_mean"):
            extra["movielens_rating_mean"] = _num(rec, "rating_mean", lo=0, hi=5)
        return _item(key, _str(rec, "title"), "redial_movielens_map", id_space="redial",
                     year=_int(rec, "year"),
                     genres=_split(rec.get("genres"), "|"),
                     directors=_split(rec.get("directors"), ","),
                     cast=_split(rec.get("actors"), ","), imdb_id=_imdb(rec.get("imdbID")),
                     source_ids={"movielens": _id(rec, "movieId", required=False)}, extra=extra)
    return src.records(src.csv_rows(("databaseId", "title", "imdbID", "movieId")), row)


# --------------------------------------------------------------------------------------------
# Interactions and tags
# --------------------------------------------------------------------------------------------

def _movielens_ratings(src: _Source, **_) -> Iterator[dict]:
    """MovieLens ``ratings.csv``: userId, movieId, rating (0.5-5), timestamp (s)."""
    def row(rec):
        return {"user_id": _id(rec, "userId"), "item_key": _id(rec, "movieId"),
                "rating": _num(rec, "rating", required=True, lo=0, hi=5),
                "timestamp": _int(rec, "timestamp"), "source": "movielens"}
    return src.records(src.csv_rows(("userId", "movieId", "rating", "timestamp")), row)


def _movielens_tags(src: _Source, **_) -> Iterator[dict]:
    """MovieLens ``tags.csv``: userId, movieId, tag, timestamp (s)."""
    def row(rec):
        return {"user_id": _id(rec, "userId"), "item_key": _id(rec, "movieId"),
                "tag": _str(rec, "tag"), "timestamp": _int(rec, "timestamp"),
                "source": "movielens"}
    return src.records(src.csv_rows(("userId", "movieId", "tag", "timestamp")), row)


# --------------------------------------------------------------------------------------------
# Dialogues
# --------------------------------------------------------------------------------------------

@dataclass
class _Utterance:
    speaker: str              # "recommender" | "seeker"
    text: str
    refs: list[str]           # movie references in this utterance, in order
    turn_id: str
    line: int | None = None
    extra: dict = field(default_factory=dict)


_SPEAKERS = {"RECOMMENDER": "recommender", "SEEKER": "seeker"}


def _speaker(role: Any) -> str:
    speaker = _SPEAKERS.get(str(role).strip().upper())
    if speaker is None:
        raise _BadRecord(f"unknown speaker role {_short(role)} (expected RECOMMENDER or SEEKER)")
    return speaker


def _unique(refs: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(refs))


def _turns(dialog_id: str, utterances: list[_Utterance], source: str, ref_kind: str,
           titles: Mapping[str, str] | None = None,
           rec_extra: Callable[[list[str]], dict] | None = None) -> list[dict]:
    """Recommender turns of one dialogue.

    Consecutive utterances of one speaker are merged (text joined by a space, ``turn_id`` of
    the last one). Every recommender utterance becomes a turn; its ``rec`` holds the movies it
    mentions that were not mentioned earlier in the dialogue (so recommendation turns are the
    ones with a non-empty ``rec``), ``mentioned`` every movie mentioned before it.
    """
    merged: list[_Utterance] = []
    for utt in utterances:
        if merged and merged[-1].speaker == utt.speaker:
            last = merged[-1]
            last.text = f"{last.text} {utt.text}".strip()
            last.refs += utt.refs
            last.turn_id, last.line = utt.turn_id, utt.line
            for key, value in utt.extra.items():
                last.extra.setdefault(key, []).extend(value)
        else:
            merged.append(_Utterance(utt.speaker, utt.text, list(utt.refs), utt.turn_id,
                                     utt.line, {k: list(v) for k, v in utt.extra.items()}))
    name = (lambda ref: titles.get(ref)) if titles is not None else (lambda ref: ref)
    turns, context, seen = [], [], []
    for utt in merged:
        refs = _unique(utt.refs)
        if utt.speaker == "recommender":
            rec = [ref for ref in refs if ref not in seen]
            turn_extra = dict(utt.extra)
            if rec_extra is not None:
                turn_extra.update(rec_extra(rec))
            turns.append({"dialog_id": dialog_id, "turn_id": utt.turn_id,
                          "speaker": "recommender", "context": list(context), "resp": utt.text,
                          "rec": rec, "mentioned": list(seen), "ref_kind": ref_kind,
                          "rec_titles": [name(r) for r in rec],
                          "mentioned_titles": [name(r) for r in seen], "source": source,
                          "extra": turn_extra, "_line": utt.line})
        seen += [ref for ref in refs if ref not in seen]
        context.append(utt.text)
    return turns


_MENTION = re.compile(r"@(\d+)")


def _redial_raw(src: _Source, **_) -> Iterator[dict]:
    """ReDial raw dialogues: conversationId, initiatorWorkerId (seeker), respondentWorkerId
    (recommender), messages[{messageId, senderWorkerId, text}], movieMentions {id: title},
    initiatorQuestions / respondentQuestions {id: {suggested, seen, liked}}. ``@<id>`` in the
    text is replaced by the movie title; references are ReDial movie ids."""
    def mapping(obj, name):
        value = obj.get(name)
        if value in (None, [], {}):
            return {}
        if not isinstance(value, dict):
            raise _BadRecord(f"field '{name}' should be an object, found {_short(value)}")
        return value

    def dialogue(obj):
        obj = _need_dict(obj)
        dialog_id = _id(obj, "conversationId")
        seeker, recommender = _id(obj, "initiatorWorkerId"), _id(obj, "respondentWorkerId")
        mentions = mapping(obj, "movieMentions")
        titles = {str(k): clean_title(v) for k, v in mentions.items() if isinstance(v, str)}
        answers = {"initiator": mapping(obj, "initiatorQuestions"),
                   "respondent": mapping(obj, "respondentQuestions")}
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRecord(f"dialogue {dialog_id}: field 'messages' is missing or empty")
        utterances = []
        for number, msg in enumerate(messages, 1):
            try:
                msg = _need_dict(msg)
                sender = _id(msg, "senderWorkerId")
                if sender not in (seeker, recommender):
                    raise _BadRecord(f"sender {sender} is neither the initiator ({seeker}) "
                                     f"nor the respondent ({recommender})")
                text = _text(msg, "text")
                refs = [m for m in _MENTION.findall(text) if m in titles]
                text = _MENTION.sub(lambda m: titles.get(m.group(1), m.group(0)), text)
                utterances.append(_Utterance(
                    "recommender" if sender == recommender else "seeker", " ".join(text.split()),
                    refs, _id(msg, "messageId", required=False) or str(number), src.line))
            except _BadRecord as exc:
                raise _BadRecord(f"dialogue {dialog_id}, message {number}: {exc}") from None

        def feedback(rec):
            return {"feedback": {ref: {who: a[ref] for who, a in answers.items() if ref in a}
                                 for ref in rec}}
        return _turns(dialog_id, utterances, "redial", "redial_id", titles, feedback)
    return src.records(src.json_lines(), dialogue)


def _inspired_tsv(src: _Source, **_) -> Iterator[dict]:
    """INSPIRED original TSV, one utterance (sentence) per row: dialog_id, utt_id, speaker,
    turn_id, text (quotes written QUOTATION_MARK), movies ("A (2019); B (2016)"),
    expert_label (recommender strategy), ... References are titles."""
    def rows_to_utterance(rec):
        text = _str(rec, "text", required=False) or ""
        return _str(rec, "dialog_id"), _Utterance(
            _speaker(rec.get("speaker")), " ".join(text.replace("QUOTATION_MARK", '"').split()),
            [clean_title(t) for t in _split(rec.get("movies"), ";")], _id(rec, "utt_id"),
            src.line, {"strategies": _split(rec.get("expert_label"), ";")})

    def dialogues():
        current, utterances = None, []
        for dialog_id, utt in src.records(
                src.csv_rows(("dialog_id", "utt_id", "speaker", "text", "movies"),
                             delimiter="\t", quoting=csv.QUOTE_NONE), rows_to_utterance):
            if dialog_id != current and utterances:
                yield from _turns(current, utterances, "inspired", "title")
                utterances = []
            current = dialog_id
            utterances.append(utt)
        if utterances:
            yield from _turns(current, utterances, "inspired", "title")
    return dialogues()


def _split_name(path: Path) -> str:
    """"test" for test_data_dbpedia.jsonl(.gz): dialogue ids become test_0, test_1, ..."""
    stem = path.name.split(".")[0]
    return stem.split("_")[0] or stem


def _utterances_from_list(items: Any, what: str, line: int | None) -> list[_Utterance]:
    """UniCRS / CFCRS utterance dicts {text, role, movie: ["Name (Year)", ...]}."""
    if not isinstance(items, list) or not items:
        raise _BadRecord(f"{what} should be a non-empty list of utterances")
    utterances = []
    for number, utt in enumerate(items):
        try:
            utt = _need_dict(utt)
            text = _text(utt, "text")
            utterances.append(_Utterance(_speaker(utt.get("role")), " ".join(text.split()),
                                         [clean_title(t) for t in _str_list(utt, "movie")],
                                         str(number), line))
        except _BadRecord as exc:
            raise _BadRecord(f"utterance {number}: {exc}") from None
    return utterances


def _unicrs_dbpedia(src: _Source, **_) -> Iterator[dict]:
    """UniCRS ``*_data_dbpedia.jsonl``: one dialogue per line as a JSON list of utterances
    {text, role, movie (titles), entity_link, movie_link, ...}. Dialogue ids are
    "<split>_<index>" (index = 0-based dialogue line), turn ids utterance indexes."""
    prefix, counter = _split_name(src.path), itertools.count()

    def dialogue(obj):
        dialog_id = f"{prefix}_{next(counter)}"
        utterances = _utterances_from_list(obj, "a dialogue line", src.line)
        return _turns(dialog_id, utterances, "unicrs", "title")
    return src.records(src.json_lines(), dialogue)


def _cfcrs_dialogs(src: _Source, **_) -> Iterator[dict]:
    """CFCRS ``{dialog_id, dialog: [{role, text, movie (titles), ...}]}`` JSON lines."""
    def dialogue(obj):
        obj = _need_dict(obj)
        utterances = _utterances_from_list(obj.get("dialog"), "field 'dialog'", src.line)
        return _turns(_id(obj, "dialog_id"), utterances, "cfcrs", "title")
    return src.records(src.json_lines(), dialogue)


def _crs_processed(src: _Source, entities: EntityIndex | str | Path | None = None,
                   **_) -> Iterator[dict]:
    """Processed turn files, one turn per line: {context: [utterances], resp, rec: [refs], ...}.

    - UniCRS ``*_data_processed.jsonl``: rec/entity are entity ids, no dialogue ids (they are
      inferred: a turn whose context does not extend the previous turn's starts a dialogue).
    - LLMs-as-zero-shot ``test.jsonl``/``test_raw.jsonl``: + dialog_id, turn_id, is_user,
      prev_entity (entities mentioned before the turn).
    - iEvaLM ``test_data_processed.jsonl``: rec/entity are titles, + dialog_id, turn_id.

    Entity ids resolve through ``entities`` (an EntityIndex or an entity2id.json path; default:
    entity2id.json / item_ids.json next to the file). ``mentioned`` keeps only movies when it is
    known which entities are movies (item_ids.json, or titles ending in "(Year)"). ``resp`` is
    kept as in the file (UniCRS writes ``<movie>`` placeholders there).
    """
    index = entities
    if isinstance(index, (str, Path)):
        path = Path(index)
        items = path.parent / "item_ids.json"
        index = EntityIndex.load(path, items if items.is_file() else None)
    elif index is None:
        index = EntityIndex.next_to(src.path)
        if index is not None:
            src.report.notes.append(f"entity ids resolved with {src.path.parent / 'entity2id.json'}")
    prefix = _split_name(src.path)
    state = {"previous": None, "dialogues": -1, "turn": 0, "inferred": False, "kind": None}

    def refs(obj, name) -> tuple[list[str], str | None]:
        """References in a list field and their kind (None for an empty list)."""
        values = obj.get(name) or []
        if not isinstance(values, list):
            raise _BadRecord(f"field '{name}' should be a list, found {_short(values)}")
        if not values:
            return [], None
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return [str(v) for v in values], "entity_id"
        if all(isinstance(v, str) for v in values):
            return [clean_title(v) for v in values], "title"
        raise _BadRecord(f"field '{name}' mixes ids and titles: {_short(values)}")

    def title_of(ref: str, kind: str) -> str | None:
        if kind == "title":
            return ref
        return index.title(int(ref)) if index is not None else None

    def is_movie(ref: str, kind: str) -> bool:
        known = index.is_movie(int(ref) if kind == "entity_id" else ref) if index else None
        if known is not None:
            return known
        return kind == "entity_id" or title_year(ref) is not None

    def turn(obj):
        obj = _need_dict(obj)
        context = obj.get("context")
        if not isinstance(context, list) or not all(isinstance(u, str) for u in context):
            raise _BadRecord("field 'context' should be a list of utterances")
        resp = obj.get("resp")
        if not isinstance(resp, str):
            raise _BadRecord("missing field 'resp'" if resp is None else "field 'resp' is not text")
        rec, rec_kind = refs(obj, "rec")
        mentioned, mentioned_kind = refs(obj, "prev_entity" if "prev_entity" in obj else "entity")
        kinds = {k for k in (rec_kind, mentioned_kind, state["kind"]) if k}
        if len(kinds) > 1:
            raise _BadRecord("movie references mix entity ids and titles (within the line or "
                             "compared with earlier lines)")
        kind = state["kind"] = kinds.pop() if kinds else ("title" if "template" in obj
                                                          else "entity_id")
        mentioned = [m for m in _unique(mentioned) if is_movie(m, kind)]
        if "dialog_id" in obj:
            dialog_id, turn_id = _id(obj, "dialog_id"), _id(obj, "turn_id")
        else:                       # UniCRS: dialogues are runs of turns with growing contexts
            state["inferred"] = True
            previous = state["previous"]
            if previous is None or not (len(context) > len(previous)
                                        and context[:len(previous)] == previous):
                state["dialogues"] += 1
                state["turn"] = 0
            state["previous"] = context
            dialog_id, turn_id = f"{prefix}_{state['dialogues']}", str(state["turn"])
            state["turn"] += 1
        speaker = None
        if "is_user" in obj:
            speaker = "seeker" if obj["is_user"] else "recommender"
        while context and not context[0].strip():   # drop the "" padding some files start with
            context = context[1:]
        variant = ("llms_zero_shot" if "is_user" in obj else
                   "ievalm" if "template" in obj else "unicrs")
        return {"dialog_id": dialog_id, "turn_id": turn_id, "speaker": speaker,
                "context": context, "resp": resp, "rec": rec, "mentioned": mentioned,
                "ref_kind": kind, "rec_titles": [title_of(r, kind) for r in rec],
                "mentioned_titles": [title_of(m, kind) for m in mentioned], "source": variant,
                "extra": {}}

    def turns():
        yield from src.records(src.json_lines(), turn)
        if state["inferred"]:
            src.report.notes.append("the file has no dialogue ids: dialog_id/turn_id were "
                                    "inferred from context continuity")
        if index is None and state["kind"] == "entity_id":
            src.report.notes.append("no entity2id.json found: entity ids were not resolved to "
                                    "titles and 'mentioned' may include non-movie entities")
        elif index is None and state["kind"] == "title":
            src.report.notes.append("no entity2id.json found: 'mentioned' keeps the context "
                                    "entities whose name ends in a year, e.g. 'Heat (1995)'")
    return turns()


# --------------------------------------------------------------------------------------------
# Format registry, detection and dispatchers
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Format:
    kind: str
    rows: Callable[..., Iterator[dict]]
    description: str
    options: dict = field(default_factory=dict)


FORMATS: dict[str, _Format] = {
    "amazon2023_reviews": _Format("reviews", _amazon2023_reviews, "Amazon Reviews 2023 JSONL"),
    "amazon_legacy_reviews": _Format("reviews", _amazon_legacy_reviews,
                                     "Amazon 2014/2018 review JSON lines"),
    "imdb_reviews": _Format("reviews", _imdb_reviews, "IMDb review JSONL (aclImdb)"),
    "amazon2023_meta": _Format("items", _amazon2023_meta, "Amazon Reviews 2023 meta_ JSONL"),
    "redial_id2info": _Format("items", _id2info, "ReDial id2info.json catalog",
                              {"label": "redial"}),
    "inspired_id2info": _Format("items", _id2info, "INSPIRED id2info_inspired.json catalog",
                                {"label": "inspired"}),
    "movielens_movies": _Format("items", _movielens_movies, "MovieLens movies.csv"),
    "redial_movies_with_mentions": _Format("items", _redial_movies_with_mentions,
                                           "ReDial movies_with_mentions.csv"),
    "redial_movielens_map": _Format("items", _redial_movielens_map,
                                    "ReDial<->MovieLens movies_data.csv"),
    "movielens_ratings": _Format("interactions", _movielens_ratings, "MovieLens ratings.csv"),
    "movielens_tags": _Format("tags", _movielens_tags, "MovieLens tags.csv"),
    "movielens_links": _Format("links", _movielens_links, "MovieLens links.csv"),
    "redial_raw": _Format("dialogues", _redial_raw, "ReDial raw dialogues JSONL"),
    "inspired_tsv": _Format("dialogues", _inspired_tsv, "INSPIRED original TSV"),
    "unicrs_dbpedia": _Format("dialogues", _unicrs_dbpedia, "UniCRS *_data_dbpedia.jsonl"),
    "cfcrs_dialogs": _Format("dialogues", _cfcrs_dialogs, "CFCRS dialogue JSONL"),
    "crs_processed": _Format("dialogues", _crs_processed,
                             "processed CRS turns JSONL (UniCRS / LLMs-zero-shot / iEvaLM)"),
}

_SCHEMAS = {"reviews": (REVIEW_COLUMNS, ("review_id",)), "items": (ITEM_COLUMNS, ("item_key",)),
            "interactions": (INTERACTION_COLUMNS, ("user_id", "item_key", "timestamp")),
            "tags": (TAG_COLUMNS, ()), "links": (LINK_COLUMNS, ("item_key",)),
            "dialogues": (TURN_COLUMNS, ("dialog_id", "turn_id"))}

# Files detect_format recognises that no loader turns into a table.
_AUX_FORMATS = {"entity2id": "entity2id.json (entity -> id)", "item_ids": "item_ids.json"}

_SNIFF_BYTES = 1 << 18


def _classify_record(obj: dict) -> str | None:
    keys = set(obj)
    if {"movieMentions", "messages"} <= keys:
        return "redial_raw"
    if {"dialog_id", "dialog"} <= keys:
        return "cfcrs_dialogs"
    if {"context", "resp"} <= keys:
        return "crs_processed"
    if {"review_id", "imdb_id", "text"} <= keys:
        return "imdb_reviews"
    if {"reviewerID", "asin"} <= keys:
        return "amazon_legacy_reviews"
    if "parent_asin" in keys and ("user_id" in keys or "text" in keys):
        return "amazon2023_reviews"
    if "parent_asin" in keys and keys & {"main_category", "categories", "details", "description"}:
        return "amazon2023_meta"
    return None


def _classify_first_entry(value: Any) -> str | None:
    """A top-level JSON object {key: value} classified by its first value."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "entity2id"
    if isinstance(value, dict) and "name" in value:
        return "redial_id2info" if "imdb_id" in value else "inspired_id2info"
    return None


def _sniff_json(head: str) -> str | None:
    """Classify JSON text from its start (which may be cut off)."""
    decoder = json.JSONDecoder()
    first_line = head.split("\n", 1)[0]
    try:                                            # a complete first line: JSON lines
        obj = json.loads(first_line)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        found = _classify_record(obj)
        if found or not obj:
            return found
        entry = _classify_first_entry(next(iter(obj.values())))
        if entry == "entity2id" and not all(isinstance(v, int) and not isinstance(v, bool) for v in obj.values()):
            return None  # a record of unknown fields whose first value is a number, not an entity map
        return entry
    if isinstance(obj, list):
        if obj and isinstance(obj[0], dict) and {"role", "text"} <= set(obj[0]):
            return "unicrs_dbpedia"
        return "item_ids" if obj and all(isinstance(v, int) for v in obj) else None
    try:                                            # one big (possibly pretty-printed) document
        pos = len(head) - len(head.lstrip()) + 1
        if head.lstrip().startswith("["):
            first, _ = decoder.raw_decode(head, _skip_ws(head, pos))
            if isinstance(first, dict) and {"role", "text"} <= set(first):
                return "unicrs_dbpedia"
            return "item_ids" if isinstance(first, int) else None
        key, pos = decoder.raw_decode(head, _skip_ws(head, pos))
        pos = _skip_ws(head, pos)
        if head[pos:pos + 1] != ":":
            return None
        value, _ = decoder.raw_decode(head, _skip_ws(head, pos + 1))
        return _classify_first_entry(value)
    except (json.JSONDecodeError, IndexError):
        return None


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


_HEADERS = [  # (columns that must all be in the header, format)
    ({"dialog_id", "speaker", "text", "movies"}, "inspired_tsv"),
    ({"databaseId", "title", "imdbID"}, "redial_movielens_map"),
    ({"movieId", "movieName"}, "redial_movies_with_mentions"),
    ({"userId", "movieId", "rating"}, "movielens_ratings"),
    ({"userId", "movieId", "tag"}, "movielens_tags"),
    ({"movieId", "imdbId"}, "movielens_links"),
    ({"movieId", "title", "genres"}, "movielens_movies"),
]


def detect_format(path: str | Path, kind: str | None = None) -> str:
    """Name of the format of ``path`` (a key of FORMATS, or "entity2id" / "item_ids"),
    sniffed from the first non-empty line / header, not from the file name. ``kind``: what the
    file should hold (the error for an unrecognised file then lists that kind's formats)."""
    path = Path(path)
    raw = b""
    with _open_binary(path) as fh:
        while len(raw) < _SNIFF_BYTES:      # small reads: a truncated gzip still yields its start
            try:
                chunk = fh.read1(8192)
            except (EOFError, OSError, zlib.error) as exc:
                if raw:
                    break
                raise InputError(f"compressed data is truncated or corrupt ({exc})",
                                 str(path)) from None
            if not chunk:
                break
            raw += chunk
    if b"\x00" in raw:
        raise InputError("does not look like a text file (it contains NUL bytes)", str(path))
    head = codecs.getincrementaldecoder("utf-8")("replace").decode(raw).lstrip("\ufeff").lstrip()
    if not head:
        raise InputError("file is empty", str(path))
    first_line = head.split("\n", 1)[0].rstrip("\r")
    if head[0] in "{[":
        found = _sniff_json(head)
    else:
        delimiter = "\t" if "\t" in first_line else ","
        header = {c.strip() for c in next(csv.reader([first_line], delimiter=delimiter), [])}
        found = next((fmt for cols, fmt in _HEADERS if cols <= header), None)
    if found is None:
        expected = f" (known {kind} formats: {_formats_of(kind)})" if kind in KINDS else ""
        raise InputError(f"unrecognised format; it starts with {first_line[:80]!r}{expected}", str(path))
    return found


def _formats_of(kind: str) -> str:
    return ", ".join(spec.description for spec in FORMATS.values() if spec.kind == kind)


def load(path: str | Path, fmt: str | None = None, skip_bad: bool = False,
         kind: str | None = None, source: str | None = None, **options) -> Loaded:
    """Load any supported file into its kind's common shape (see the module doc).

    ``kind`` (reviews/items/...) makes a file of another kind an error; ``source`` overrides
    the ``source`` column; ``options`` go to the format (``links=`` for MovieLens movies,
    ``entities=`` for processed CRS turns).
    """
    detected = fmt is None
    fmt = fmt or detect_format(path, kind)
    if fmt in _AUX_FORMATS:
        raise InputError(f"is an {_AUX_FORMATS[fmt]} file, not data: pass it as entities= to "
                         "load_dialogues (or use invert_entity2id / EntityIndex)", str(path))
    spec = FORMATS.get(fmt)
    if spec is None:
        raise InputError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}", str(path))
    if kind is not None and spec.kind != kind:
        what = "looks like" if detected else f"format {fmt!r} is"
        raise InputError(f"{what} {spec.description} ({spec.kind}), not {kind}", str(path))
    src = _Source(path, fmt, spec.kind, skip_bad)
    schema, unique = _SCHEMAS[spec.kind]
    rows = spec.rows(src, **spec.options, **options)
    if source is not None:
        rows = ({**row, "source": source} for row in rows)
    return _collect(src, rows, schema, unique)


def load_reviews(path: str | Path, fmt: str | None = None, skip_bad: bool = False,
                 source: str | None = None) -> Loaded:
    """Reviews (REVIEW_COLUMNS) from Amazon 2023 / 2014-2018 or IMDb JSONL (plain or gzip)."""
    return load(path, fmt, skip_bad, kind="reviews", source=source)


def load_items(path: str | Path, fmt: str | None = None, skip_bad: bool = False,
               source: str | None = None, links: str | Path | None = None) -> Loaded:
    """Item metadata (ITEM_COLUMNS). ``links``: MovieLens links.csv for movies.csv (default:
    the links.csv next to it, if present)."""
    options = {"links": links} if links is not None else {}
    return load(path, fmt, skip_bad, kind="items", source=source, **options)


def load_interactions(path: str | Path, fmt: str | None = None, skip_bad: bool = False,
                      source: str | None = None) -> Loaded:
    """User-item ratings (INTERACTION_COLUMNS), e.g. MovieLens ratings.csv."""
    return load(path, fmt, skip_bad, kind="interactions", source=source)


def load_tags(path: str | Path, fmt: str | None = None, skip_bad: bool = False,
              source: str | None = None) -> Loaded:
    """User-item tags (TAG_COLUMNS), e.g. MovieLens tags.csv."""
    return load(path, fmt, skip_bad, kind="tags", source=source)


def load_dialogues(path: str | Path, fmt: str | None = None, skip_bad: bool = False,
                   source: str | None = None,
                   entities: EntityIndex | str | Path | None = None) -> Loaded:
    """CRS turns (TURN_COLUMNS). ``entities``: entity2id.json (or an EntityIndex) for files
    that refer to movies by entity id (default: entity2id.json next to the file)."""
    options = {"entities": entities} if entities is not None else {}
    return load(path, fmt, skip_bad, kind="dialogues", source=source, **options)
