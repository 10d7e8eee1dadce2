"""One reader per real format: reviews (Amazon Reviews 2023, IMDb-style), items (Amazon metadata,
MovieLens), interactions and tags (MovieLens), dialogues (ReDial, INSPIRED). Used through
`crs_core.datasets`.
"""

from __future__ import annotations

import csv
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping


from .datasets_io import (EntityIndex, clean_review_text, clean_title, title_year, _BadRecord, _Source, _id,
                          _imdb, _int, _need_dict, _num, _short, _split, _str, _str_list, _text)


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
        from .datasets import load_movielens_links  # the dispatcher reads links.csv like any file

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
