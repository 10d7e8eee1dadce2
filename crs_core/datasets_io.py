"""Reading seed-data files safely: the frame shapes every reader returns, load reports, gzip
sniffing and line iteration with bad-line routing, field helpers with user-readable reasons, and
the text and title helpers the studio uses to match titles across sources. Used through
`crs_core.datasets`.
"""

from __future__ import annotations

import csv
import gzip
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
