"""Ingest: files in real formats -> the workspace tables, all-or-nothing.

Everything is parsed and validated in memory first (`crs_core.datasets`), then written in one
transaction, so a failed ingest leaves the workspace exactly as it was.

Dialogue turns are resolved to catalog items here. Processed test files (the LLMs-as-zero-shot
copies of ReDial / INSPIRED) name movies by DBpedia entity, whose name has no year; each is
matched first against the movies of *its own dialogue* in the raw release (a handful of
candidates with years, so the match is safe), then against the whole catalog.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import datasets
from .catalog import CatalogBuilder, display_title
from .errors import InputError
from .progress import ProgressFn, report
from .store import PROJECT_ROOT, Workspace, insert_frame
from .titles import TitleMatcher, parse_title

BUNDLED = PROJECT_ROOT / "data" / "bundled"


@dataclass
class IngestReport:
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, list] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}" for k, v in self.counts.items()]
        return out + self.notes


# ---------------------------------------------------------------------------------- catalog
def build_catalog(bundled: Path) -> tuple[pd.DataFrame, CatalogBuilder]:
    redial = datasets.load_items(bundled / "movie_catalog/redial_cfcrs/id2info.json").data
    mentions = datasets.load_items(bundled / "redial/original/movies_with_mentions.csv").data
    ml_map = datasets.load_items(bundled / "movie_catalog/redial_movielens_map/movies_data.csv",
                                 skip_bad=True).data
    movies = datasets.load_items(bundled / "movielens_small/movies.csv",
                                 links=bundled / "movielens_small/links.csv").data
    inspired = datasets.load_items(bundled / "movie_catalog/inspired_cfcrs/id2info_inspired.json").data
    imdb_hint = {str(r["item_key"]): r["imdb_id"] for r in ml_map.to_dict("records") if r.get("imdb_id")}
    builder = CatalogBuilder()
    builder.add_redial(redial)
    builder.add_redial(mentions[~mentions["item_key"].astype(str).isin(set(redial["item_key"].astype(str)))],
                       imdb_hint)
    builder.add_movielens(movies)
    builder.add_inspired(inspired)
    return builder.frame(), builder


def catalog_matcher(items: pd.DataFrame) -> TitleMatcher:
    return TitleMatcher(zip(items["item_id"], items["title"],
                            [None if pd.isna(y) else int(y) for y in items["year"]]))


# ---------------------------------------------------------------------------- dialogue turns
class TurnResolver:
    """Maps movie references of dialogue turns to catalog item ids."""

    def __init__(self, items: pd.DataFrame, matcher: TitleMatcher | None = None):
        self.matcher = matcher or catalog_matcher(items)
        self.by_redial = {rid: item_id
                          for ids, item_id in zip(items["redial_id"], items["item_id"]) if isinstance(ids, str)
                          for rid in ids.split("|")}
        self.candidates: dict[str, list[tuple[str, str | None]]] = {}
        self._local: dict[str, TitleMatcher] = {}
        self.unresolved = 0
        self.resolved = 0
        self.missing_titles: list[str] = []  # dialogue movies with a year that no catalog lists

    def add_dialog_candidates(self, turns: pd.DataFrame, prefix: str = "") -> None:
        """Movies named in raw dialogues: dialog id -> [("Title (Year)", redial id or None)]."""
        for row in turns.to_dict("records"):
            refs = list(row["rec"]) + list(row["mentioned"])
            titles = list(row["rec_titles"]) + list(row["mentioned_titles"])
            bucket = self.candidates.setdefault(prefix + str(row["dialog_id"]), [])
            for ref, title in zip(refs, titles):
                redial_id = str(ref) if row["ref_kind"] == "redial_id" else None
                if (title, redial_id) not in bucket:
                    bucket.append((title, redial_id))

    def resolve(self, dialog_id: str, title: str) -> str | None:
        item = self._resolve(dialog_id, title)
        if item is None:
            self.unresolved += 1
        else:
            self.resolved += 1
        return item

    def _local_matcher(self, dialog_id: str) -> TitleMatcher | None:
        if dialog_id not in self._local:
            local = self.candidates.get(dialog_id)
            # A candidate known by ReDial id is keyed by its item, so two spellings of one
            # film in a dialogue are aliases rather than an ambiguity.
            # Few candidates, so the riskier tiers are safe here; among films of one title,
            # DBpedia's undisambiguated name is the earliest ("Rocky" is the 1976 film).
            keyed = [(self.by_redial.get(rid or "") or f"title:{t}", t) for t, rid in local or []]
            priority = {key: -(parse_title(t)[1] or 9999) for key, t in keyed}
            self._local[dialog_id] = TitleMatcher(
                ((key, t, None) for key, t in keyed), priority=priority,
                match_undated=True, match_subtitles=True,
            ) if keyed else None
        return self._local[dialog_id]

    def _resolve(self, dialog_id: str, title: str) -> str | None:
        local = self._local_matcher(dialog_id)
        hit = local.match(title) if local is not None else None
        if hit is not None:
            if not hit.item_id.startswith("title:"):
                return hit.item_id
            title = hit.item_id[len("title:"):]
        found = self.matcher.match(title)
        if found is None and parse_title(title)[1] is not None:
            self.missing_titles.append(title)
        return found.item_id if found is not None else None

    def frame(self, turns: pd.DataFrame, dataset: str, only_rec: bool = True) -> pd.DataFrame:
        rows = []
        for row in turns.to_dict("records"):
            if only_rec and not len(row["rec"]):
                continue
            did = str(row["dialog_id"])
            rec = _unique(self.resolve(did, t) for t in row["rec_titles"])
            mentioned = _unique(self._resolve(did, t) for t in row["mentioned_titles"])
            rows.append({
                "dataset": dataset, "turn_id": f"{did}/{row['turn_id']}", "dialog_id": did,
                "context": json.dumps(list(row["context"])), "resp": row["resp"],
                "rec_items": json.dumps(rec), "rec_titles": json.dumps(list(row["rec_titles"])),
                "mentioned_items": json.dumps(mentioned),
            })
        return pd.DataFrame(rows)


def _unique(values) -> list[str]:
    out: list[str] = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return out


def build_turns(bundled: Path, items: pd.DataFrame, matcher: TitleMatcher) -> tuple[pd.DataFrame, dict]:
    stats: dict[str, object] = {}
    frames = []
    missing: list[str] = []
    # ReDial test: processed turns (entity ids) resolved through the raw release's movie mentions
    resolver = TurnResolver(items, matcher)
    raw = datasets.load_dialogues(bundled / "redial/original/test_data.jsonl").data
    resolver.add_dialog_candidates(raw, prefix="test_")
    redial = datasets.load_dialogues(bundled / "redial/llms_zero_shot/test.jsonl").data
    frames.append(resolver.frame(redial, "redial_test"))
    stats["redial_test_targets_found"] = (resolver.resolved, resolver.resolved + resolver.unresolved)
    missing += resolver.missing_titles
    # INSPIRED test: processed turns resolved through the UniCRS copy of the same dialogues
    resolver = TurnResolver(items, matcher)
    resolver.add_dialog_candidates(
        datasets.load_dialogues(bundled / "inspired/unicrs_dbpedia/test_data_dbpedia.jsonl").data)
    inspired = datasets.load_dialogues(bundled / "inspired/llms_zero_shot/test.jsonl").data
    frames.append(resolver.frame(inspired, "inspired_test"))
    stats["inspired_test_targets_found"] = (resolver.resolved, resolver.resolved + resolver.unresolved)
    missing += resolver.missing_titles
    # INSPIRED train: titles with years, straight to the catalog
    resolver = TurnResolver(items, matcher)
    train = datasets.load_dialogues(bundled / "inspired/unicrs_dbpedia/train_data_dbpedia.jsonl").data
    frames.append(resolver.frame(train, "inspired_train"))
    stats["inspired_train_targets_found"] = (resolver.resolved, resolver.resolved + resolver.unresolved)
    missing += resolver.missing_titles
    return pd.concat(frames, ignore_index=True), stats, sorted(set(missing))


# --------------------------------------------------------------------------- default data
def ingest_default(ws: Workspace, bundled: Path = BUNDLED, progress: ProgressFn | None = None) -> IngestReport:
    """Build items, reviews, interactions, tags and test/train turns from data/bundled."""
    rep = IngestReport()
    steps = 6
    report(progress, 0, steps)
    items, builder = build_catalog(bundled)
    rep.counts.update({f"items_{k}" if k != "items" else "items": v for k, v in builder.report.counts.items()})
    rep.counts["imdb_conflicts"] = builder.report.conflicts
    report(progress, 1, steps)

    reviews = datasets.load_reviews(bundled / "imdb_reviews/imdb_reviews_catalog.jsonl.gz").data
    reviews = _attach_items(reviews, items, "imdb_id", "reviews", rep, skip_unknown=False)
    report(progress, 2, steps)
    ratings = datasets.load_interactions(bundled / "movielens_small/ratings.csv").data
    ratings = _attach_items(ratings, items, "movielens_id", "interactions", rep, skip_unknown=True)
    tags = datasets.load_tags(bundled / "movielens_small/tags.csv").data
    tags = _attach_items(tags, items, "movielens_id", "tags", rep, skip_unknown=True)
    report(progress, 3, steps)

    matcher = catalog_matcher(items)
    turns, stats, missing = build_turns(bundled, items, matcher)
    if missing:  # movies only the dialogues name: add them, then resolve again
        rep.counts["items_from_dialogues"] = len(builder.add_titles(missing, "dialogue"))
        items = builder.frame()
        matcher = catalog_matcher(items)
        turns, stats, _ = build_turns(bundled, items, matcher)
        rep.counts["items"] = len(items)
    for key, (found, total) in stats.items():
        rep.counts[key] = f"{found:,} / {total:,} ({found / max(total, 1):.1%})"
    report(progress, 4, steps)

    review_items = set(reviews["item_id"])
    redial_items = set(items.loc[items["redial_id"].notna(), "item_id"])
    inspired_items = set(items.loc[items["inspired_id"].notna(), "item_id"])
    rep.counts.update({
        "reviews": len(reviews), "review_items": len(review_items),
        "review_items_in_redial": len(review_items & redial_items),
        "review_items_in_inspired": len(review_items & inspired_items),
        "interactions": len(ratings), "tags": len(tags),
        **{f"turns_{d}": int(n) for d, n in turns.groupby("dataset").size().items()},
    })

    with ws.transaction() as cur:
        for table in ("items", "reviews", "interactions", "tags", "dialogue_turns"):
            cur.execute(f"DELETE FROM {table}")
        insert_frame(cur, "items", items)
        insert_frame(cur, "reviews", reviews.assign(ts=reviews["timestamp"])[
            ["review_id", "item_id", "user_id", "text", "rating", "ts", "source"]])
        insert_frame(cur, "interactions", ratings.assign(ts=ratings["timestamp"])[
            ["user_id", "item_id", "rating", "ts", "source"]])
        insert_frame(cur, "tags", tags.assign(ts=tags["timestamp"])[["user_id", "item_id", "tag", "ts", "source"]])
        insert_frame(cur, "dialogue_turns", turns)
        ws.set_meta("ingest_report", rep.counts, cur)
    report(progress, steps, steps)
    return rep


def _attach_items(frame: pd.DataFrame, items: pd.DataFrame, key_column: str, what: str,
                  rep: IngestReport, *, skip_unknown: bool, path: str | None = None,
                  load_report: datasets.LoadReport | None = None) -> pd.DataFrame:
    """Map each row's `item_key` to an item id via items[key_column] (or the item id itself).
    Skipped rows are counted in ``load_report`` when given (one "kept N, skipped M" for the
    file), else noted in ``rep``."""
    keys = items[key_column].dropna()
    lookup = dict(zip(keys.astype(str), items.loc[keys.index, "item_id"]))
    lookup.update({i: i for i in items["item_id"]})
    mapped = frame["item_key"].astype(str).map(lookup)
    unknown = mapped.isna()
    if unknown.any():
        examples = frame.loc[unknown, "item_key"].astype(str).unique()[:5].tolist()
        if not skip_unknown:
            raise InputError(f"{int(unknown.sum())} {what} refer to items not in the catalog, "
                             f"e.g. {examples}; ingest the items first or ask to skip them", path)
        rep.skipped[what] = examples
        reason = f"{int(unknown.sum()):,} rows refer to items not in the catalog (e.g. {examples})"
        if load_report is None:
            rep.notes.append(f"{what}: skipped {reason}")
        else:
            load_report.skipped += int(unknown.sum())
            load_report.problems.append((None, reason))
    out = frame.loc[~unknown].assign(item_id=mapped[~unknown])
    if load_report is not None:
        load_report.kept = len(out)
    return out


# ------------------------------------------------------------------------- a user's own files
def ingest_file(ws: Workspace, path: str | Path, kind: str | None = None, *, fmt: str | None = None,
                skip_bad: bool = False, dataset: str | None = None) -> IngestReport:
    """Add a user's file (reviews, items, interactions, tags or dialogues) to the workspace.

    Validates the whole file first; with `skip_bad` bad rows and rows of unknown items are
    skipped and listed in the report, otherwise the first problem raises `InputError` and
    nothing is written.
    """
    path = Path(path)
    loaded = datasets.load(path, fmt=fmt, skip_bad=skip_bad, kind=kind)
    kind = loaded.report.kind
    frame = loaded.data
    rep = IngestReport()
    items = ws.df("SELECT * FROM items")
    if kind == "items":
        rep.notes.append(loaded.report.summary())
        new = _new_items(frame, items, rep)
        with ws.transaction() as cur:
            insert_frame(cur, "items", new)
        rep.counts["items_added"] = len(new)
        return rep
    if kind == "dialogues":
        rep.notes.append(loaded.report.summary())
        name = dataset or path.stem
        turns = TurnResolver(items).frame(frame, name)
        with ws.transaction() as cur:
            cur.execute("DELETE FROM dialogue_turns WHERE dataset = ?", [name])
            insert_frame(cur, "dialogue_turns", turns)
        rep.counts[f"turns_{name}"] = len(turns)
        return rep
    source = str(frame["source"].iloc[0]) if len(frame) else "user"
    items = items.assign(source_key=items["item_id"].str.split(":", n=1).str[-1])
    key_column = "imdb_id" if frame["item_key"].astype(str).str.startswith("tt").all() else "source_key"
    if source == "movielens":
        key_column = "movielens_id"
    frame = _attach_items(frame, items, key_column, kind, rep, skip_unknown=skip_bad, path=str(path),
                          load_report=loaded.report)
    rep.notes.append(loaded.report.summary())  # kept / skipped after every check, in one line
    table = {"reviews": "reviews", "interactions": "interactions", "tags": "tags"}.get(kind)
    if table is None:
        raise InputError(f"cannot ingest {kind} files", str(path))
    frame = frame.assign(ts=frame["timestamp"])
    columns = {"reviews": ["review_id", "item_id", "user_id", "text", "rating", "ts", "source"],
               "interactions": ["user_id", "item_id", "rating", "ts", "source"],
               "tags": ["user_id", "item_id", "tag", "ts", "source"]}[table]
    if table == "reviews":
        clash = ws.df("SELECT review_id FROM reviews WHERE review_id IN (SELECT unnest(?))",
                      [frame["review_id"].tolist()])
        if len(clash):
            raise InputError(f"{len(clash)} review ids already exist in the workspace, e.g. "
                             f"{clash['review_id'].head(3).tolist()}", str(path))
    with ws.transaction() as cur:
        insert_frame(cur, table, frame[columns])
    rep.counts[f"{table}_added"] = len(frame)
    return rep


def _new_items(frame: pd.DataFrame, items: pd.DataFrame, rep: IngestReport) -> pd.DataFrame:
    builder = CatalogBuilder()
    existing = set(items["item_id"])
    for row in frame.to_dict("records"):
        item_id = row.get("imdb_id") or f"{row['source']}:{row['item_key']}"
        if item_id in existing or item_id in builder.items:
            continue
        item = builder._new(item_id, row["title"] or str(row["item_key"]), row.get("year"), row["source"])
        item["imdb_id"] = row.get("imdb_id")
        builder._fill(item, row, row["source"])
    new = builder.frame()
    skipped = len(frame) - len(new)
    if skipped:
        rep.notes.append(f"{skipped:,} items already in the catalog were left unchanged")
    return new


def ingest_summary(ws: Workspace) -> dict:
    raw = ws.get_meta("ingest_report")
    return json.loads(raw) if raw else {}


__all__ = ["IngestReport", "ingest_default", "ingest_file", "build_catalog", "catalog_matcher",
           "TurnResolver", "display_title", "BUNDLED"]
