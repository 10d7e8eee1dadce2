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
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


from .errors import InputError
from .datasets_formats import (_amazon2023_meta, _amazon2023_reviews,
    _amazon_legacy_reviews, _cfcrs_dialogs, _crs_processed, _id2info, _imdb_reviews, _inspired_tsv,
    _movielens_links, _movielens_movies, _movielens_ratings, _movielens_tags, _redial_movielens_map,
    _redial_movies_with_mentions, _redial_raw, _unicrs_dbpedia)
from .datasets_io import (EntityIndex, INTERACTION_COLUMNS, ITEM_COLUMNS, KINDS, LINK_COLUMNS, LoadReport, Loaded,
    MAX_PROBLEMS, MAX_TEXT_CHARS, REVIEW_COLUMNS, TAG_COLUMNS, TURN_COLUMNS, clean_review_text, clean_title,
    entity_title, invert_entity2id, title_year, _Source, _collect, _open_binary)

__all__ = [
    "FORMATS", "KINDS", "Loaded", "LoadReport", "EntityIndex", "detect_format", "load", "load_reviews",
    "load_items", "load_interactions", "load_tags", "load_dialogues", "load_movielens_links",
    "invert_entity2id", "entity_title", "clean_title", "title_year", "clean_review_text", "REVIEW_COLUMNS",
    "ITEM_COLUMNS", "INTERACTION_COLUMNS", "TAG_COLUMNS", "TURN_COLUMNS", "LINK_COLUMNS", "MAX_PROBLEMS",
    "MAX_TEXT_CHARS",
]


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


def load_movielens_links(path: str | Path, skip_bad: bool = False) -> Loaded:
    """MovieLens ``links.csv`` (movieId, imdbId without "tt", tmdbId) -> item_key, imdb_id, tmdb_id."""
    return load(path, skip_bad=skip_bad, kind="links")
