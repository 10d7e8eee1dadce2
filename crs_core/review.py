"""Human review of synthetic dialogues: the queue, edits, approve / reject, history and undo.

Every change of a synthetic query (its text, its status or its ground-truth list) is one new
*version*: `synthetic_queries.version` goes up by one and a full snapshot of the new state is
written to `query_history` in the same transaction, so the table and its history never
disagree. The state a dialogue had before its first change (as synthesis wrote it) is recorded
as version 1 ("created") the first time it is changed.

Concurrency (two annotators on one dialogue): every write names the version it was based on
(`expected_version`); when the stored version has moved on, the write is refused with a
`ConflictError` naming who changed it, and nothing is written — the caller still holds the
refused edit and can show it, reload, and apply it again. The check and the write happen under
the workspace's write lock inside one transaction, so two sessions of the studio cannot both
pass the check.

Undo restores the state before the last change as a new version (history is append-only).
Undoing repeatedly walks further back: an undo that restored version r counts as being at r.

Who: `annotator` is a signed-in `accounts.User` (the studio's pages: the role is checked here,
"review_directly" for one dialogue, "bulk_review" for a filter) or a plain name from a local
caller that already owns the workspace file (the CLI, scripts, tests). In a team, annotators
judge through assignments (crs_core.judging), not here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from .accounts import User, require
from .errors import CRSError
from .store import Workspace, contains_clause, insert_frame

__all__ = [
    "STATUSES",
    "ReviewError",
    "ConflictError",
    "QueueFilter",
    "Dialogue",
    "review_queue",
    "queue_facets",
    "get_dialogue",
    "save_edit",
    "set_status",
    "bulk_set_status",
    "history",
    "undo",
    "normalize_gt_rows",
    "write_decision",
    "current_state",
    "undo_in",
]

STATUSES: tuple[str, ...] = ("pending", "approved", "rejected")
_ACTION_OF_STATUS = {"approved": "approve", "rejected": "reject", "pending": "reset"}
GT_FIELDS = ("title_raw", "item_id", "match_score", "flagged", "note")


class ReviewError(CRSError):
    """A review action that cannot be applied as asked (unknown query, bad list, nothing to undo)."""


class ConflictError(ReviewError):
    """The dialogue changed since the caller loaded it; nothing was written.

    `conflicts` maps each query id to (the version the caller expected, the stored version,
    who made the stored version)."""

    def __init__(self, message: str, conflicts: dict[str, tuple[int, int, str | None]]):
        super().__init__(message)
        self.conflicts = conflicts


# ----------------------------------------------------------------------------------- queue
@dataclass
class QueueFilter:
    """Which dialogues the queue shows. Empty sequences mean "any"."""

    statuses: Sequence[str] = ()
    teachers: Sequence[str] = ()
    strategies: Sequence[str] = ()
    selection_ids: Sequence[str] = ()
    min_grounding: float | None = None  # share of ground-truth rows matched and not flagged
    max_grounding: float | None = None
    search: str = ""  # case-insensitive substring of the query or the item title
    limit: int | None = None

    @classmethod
    def coerce(cls, value: "QueueFilter | Mapping[str, Any] | None") -> "QueueFilter":
        if value is None:
            return cls()
        if isinstance(value, QueueFilter):
            return value
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ReviewError(f"unknown queue filter(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(value))


# The teacher of a query as synthesis recorded it in provenance: {"teacher": {"model": ...}},
# {"teacher": "name"} or {"model": ...}.
_TEACHER_SQL = """coalesce(
    json_extract_string(q.provenance, '$.teacher.model'),
    CASE WHEN json_type(q.provenance, '$.teacher') = 'VARCHAR'
         THEN json_extract_string(q.provenance, '$.teacher') END,
    json_extract_string(q.provenance, '$.model'))"""

_QUEUE_SQL = f"""
WITH gt AS (
    SELECT query_id, count(*) AS n_gt,
           count(*) FILTER (WHERE item_id IS NOT NULL AND NOT flagged) AS n_grounded,
           count(*) FILTER (WHERE flagged) AS n_flagged
    FROM ground_truth GROUP BY query_id),
last AS (
    SELECT query_id, arg_max(annotator, version) AS last_annotator,
           arg_max(action, version) AS last_action, max(created_at) AS updated_at
    FROM query_history GROUP BY query_id),
queue AS (
    SELECT q.query_id, q.status, q.version, q.query, q.item_id, i.title AS item_title,
           i.year AS item_year, q.selection_id,
           coalesce(s.strategy, json_extract_string(q.provenance, '$.selection_strategy'),
                    json_extract_string(q.provenance, '$.strategy')) AS strategy,
           {_TEACHER_SQL} AS teacher, q.gt_mode,
           coalesce(gt.n_gt, 0) AS n_gt, coalesce(gt.n_grounded, 0) AS n_grounded,
           coalesce(gt.n_flagged, 0) AS n_flagged,
           CASE WHEN coalesce(gt.n_gt, 0) = 0 THEN NULL ELSE gt.n_grounded / gt.n_gt END AS grounding_rate,
           last.last_annotator, last.last_action, last.updated_at, q.created_at
    FROM synthetic_queries q
    LEFT JOIN gt ON gt.query_id = q.query_id
    LEFT JOIN last ON last.query_id = q.query_id
    LEFT JOIN items i ON i.item_id = q.item_id
    LEFT JOIN selections s ON s.selection_id = q.selection_id)
SELECT * FROM queue
"""


def _check_statuses(statuses: Iterable[str]) -> list[str]:
    out = [str(s) for s in statuses]
    bad = [s for s in out if s not in STATUSES]
    if bad:
        raise ReviewError(f"unknown review status {bad}; use one of {', '.join(STATUSES)}")
    return out


def review_queue(ws: Workspace, filters: QueueFilter | Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Synthetic dialogues with their review state, oldest first.

    Columns: query_id, status, version, query, item_id, item_title, item_year, selection_id,
    strategy, teacher, gt_mode, n_gt, n_grounded, n_flagged, grounding_rate (None without a
    list), last_annotator, last_action, updated_at, created_at.
    """
    f = QueueFilter.coerce(filters)
    where: list[str] = []
    params: list[Any] = []
    for column, values in (("status", _check_statuses(f.statuses)), ("teacher", f.teachers),
                           ("strategy", f.strategies), ("selection_id", f.selection_ids)):
        values = [str(v) for v in values]
        if values:
            where.append(f"{column} IN (SELECT unnest(?::VARCHAR[]))")
            params.append(values)
    if f.min_grounding is not None:
        where.append("coalesce(grounding_rate, 0) >= ?")
        params.append(float(f.min_grounding))
    if f.max_grounding is not None:
        where.append("coalesce(grounding_rate, 0) <= ?")
        params.append(float(f.max_grounding))
    if f.search and f.search.strip():
        clause, args = contains_clause(f.search, "query", "coalesce(item_title, '')")
        where.append(clause)
        params += args
    sql = _QUEUE_SQL + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY created_at, query_id"
    if f.limit is not None:
        sql += f" LIMIT {max(0, int(f.limit))}"
    return ws.df(sql, params)


def queue_facets(ws: Workspace) -> dict[str, list[str]]:
    """The distinct teachers, strategies and selections present, for filter widgets."""
    frame = ws.df(
        "SELECT DISTINCT teacher, strategy, selection_id FROM (" + _QUEUE_SQL + ")"
    )
    return {col: sorted(str(v) for v in frame[col].dropna().unique())
            for col in ("teacher", "strategy", "selection_id")}


# -------------------------------------------------------------------------------- dialogue
@dataclass
class Dialogue:
    """One synthetic dialogue as the review page shows it."""

    query_id: str
    query: str
    status: str
    version: int
    item_id: str | None
    item: dict[str, Any]
    selection_id: str | None
    strategy: str | None
    teacher: str | None
    gt_mode: str | None
    provenance: dict[str, Any]
    reviews: pd.DataFrame  # review_id, item_id, title, rating, text
    ground_truth: pd.DataFrame  # rank, title_raw, item_id, title, year, genres, match_score, flagged, note
    created_at: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _json(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return value
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return None


def _source_reviews(provenance: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Review ids (and any texts) the teacher was shown, from the query's provenance."""
    ids: list[str] = []
    texts: dict[str, str] = {}
    for key in ("reviews", "review_ids", "source_reviews"):
        value = provenance.get(key)
        if not isinstance(value, list):
            continue
        for entry in value:
            if isinstance(entry, Mapping):
                rid = entry.get("review_id") or entry.get("id")
                if rid is None:
                    continue
                rid = str(rid)
                if entry.get("text"):
                    texts[rid] = str(entry["text"])
            else:
                rid = str(entry)
            if rid not in ids:
                ids.append(rid)
    return ids, texts


def get_dialogue(ws: Workspace, query_id: str) -> Dialogue:
    """The query, its item, the source reviews and the ground-truth list with catalog details."""
    row = ws.df(
        f"SELECT q.*, s.strategy, {_TEACHER_SQL} AS teacher FROM synthetic_queries q "
        "LEFT JOIN selections s ON s.selection_id = q.selection_id WHERE q.query_id = ?",
        [query_id],
    )
    if row.empty:
        raise ReviewError(f"no synthetic query {query_id!r} in the workspace")
    r = row.iloc[0]
    provenance = _json(r["provenance"]) or {}
    if not isinstance(provenance, dict):
        provenance = {"value": provenance}
    item = {}
    if r["item_id"] is not None:
        items = ws.df("SELECT * FROM items WHERE item_id = ?", [r["item_id"]])
        if len(items):
            item = {k: _plain(v) for k, v in items.iloc[0].items()}
    review_ids, texts = _source_reviews(provenance)
    reviews = ws.df(
        "SELECT r.review_id, r.item_id, i.title, r.rating, r.text FROM reviews r "
        "LEFT JOIN items i ON i.item_id = r.item_id WHERE r.review_id IN (SELECT unnest(?::VARCHAR[]))",
        [review_ids],
    )
    found = set(reviews["review_id"])
    missing = [{"review_id": rid, "item_id": None, "title": None, "rating": None, "text": texts[rid]}
               for rid in review_ids if rid not in found and rid in texts]
    if missing:
        reviews = pd.concat([reviews, pd.DataFrame(missing)], ignore_index=True)
    order = {rid: n for n, rid in enumerate(review_ids)}
    reviews = reviews.sort_values("review_id", key=lambda s: s.map(order)).reset_index(drop=True)
    gt = ws.df(
        "SELECT g.rank, g.title_raw, g.item_id, i.title, i.year, i.genres, g.match_score, g.flagged, g.note "
        "FROM ground_truth g LEFT JOIN items i ON i.item_id = g.item_id WHERE g.query_id = ? ORDER BY g.rank",
        [query_id],
    )
    return Dialogue(
        query_id=str(r["query_id"]), query=str(r["query"]), status=str(r["status"]),
        version=int(r["version"]), item_id=_plain(r["item_id"]), item=item,
        selection_id=_plain(r["selection_id"]), strategy=_plain(r["strategy"]),
        teacher=_plain(r["teacher"]), gt_mode=_plain(r["gt_mode"]), provenance=provenance,
        reviews=reviews, ground_truth=gt, created_at=r["created_at"],
    )


def _plain(value: Any) -> Any:
    """numpy / pandas scalars -> Python values; NaN / NA -> None."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (ValueError, AttributeError):
            return value
    return value


# ------------------------------------------------------------------------------ snapshots
def _gt_rows(cur, query_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    frame = cur.execute(
        "SELECT query_id, rank, title_raw, item_id, match_score, flagged, note FROM ground_truth "
        "WHERE query_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY query_id, rank",
        [list(query_ids)],
    ).df()
    out: dict[str, list[dict[str, Any]]] = {qid: [] for qid in query_ids}
    for rec in frame.to_dict("records"):
        out[rec["query_id"]].append({k: _plain(rec[k]) for k in ("rank",) + GT_FIELDS})
    return out


def _snapshots(cur, query_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Current state per query: {"version", "query", "status", "ground_truth": [...]}."""
    frame = cur.execute(
        "SELECT query_id, query, status, version FROM synthetic_queries "
        "WHERE query_id IN (SELECT unnest(?::VARCHAR[]))",
        [list(query_ids)],
    ).df()
    missing = sorted(set(query_ids) - set(frame["query_id"]))
    if missing:
        raise ReviewError(f"no synthetic quer{'y' if len(missing) == 1 else 'ies'} "
                          f"{', '.join(map(repr, missing[:5]))} in the workspace")
    gts = _gt_rows(cur, query_ids)
    return {
        rec["query_id"]: {"version": int(rec["version"]), "query": rec["query"], "status": rec["status"],
                          "ground_truth": gts[rec["query_id"]]}
        for rec in frame.to_dict("records")
    }


def _state(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a snapshot that a version restores (without bookkeeping keys)."""
    return {"query": snapshot["query"], "status": snapshot["status"],
            "ground_truth": [{k: row.get(k) for k in ("rank",) + GT_FIELDS} for row in snapshot["ground_truth"]]}


def _last_authors(cur, query_ids: Sequence[str]) -> dict[str, str | None]:
    frame = cur.execute(
        "SELECT query_id, arg_max(annotator, version) AS who FROM query_history "
        "WHERE query_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY query_id",
        [list(query_ids)],
    ).df()
    return dict(zip(frame["query_id"], frame["who"]))


def _check_versions(cur, current: Mapping[str, Mapping[str, Any]], expected: Mapping[str, int]) -> None:
    moved = {qid: (int(v), current[qid]["version"]) for qid, v in expected.items()
             if qid in current and int(v) != current[qid]["version"]}
    if not moved:
        return
    who = _last_authors(cur, list(moved))
    conflicts = {qid: (exp, now, who.get(qid)) for qid, (exp, now) in moved.items()}
    parts = [f"{qid} is at version {now} (you loaded version {exp}"
             + (f"; last changed by {who_}" if who_ else "") + ")"
             for qid, (exp, now, who_) in list(conflicts.items())[:5]]
    more = f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
    raise ConflictError(
        "not saved: someone else changed this dialogue meanwhile — " + "; ".join(parts) + more
        + ". Your changes were not written; reload the dialogue and apply them again.",
        conflicts,
    )


def _history_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["query_id", "version", "action", "snapshot", "annotator", "note"]).astype(
        {"query_id": "object", "version": "int64", "action": "object", "snapshot": "object",
         "annotator": "object", "note": "object"})


def _ensure_base(cur, current: Mapping[str, Mapping[str, Any]]) -> None:
    """Record the state before the first change of each query as its current version."""
    have = cur.execute(
        "SELECT DISTINCT query_id FROM query_history WHERE query_id IN (SELECT unnest(?::VARCHAR[]))",
        [list(current)],
    ).df()["query_id"]
    rows = [{"query_id": qid, "version": snap["version"], "action": "created",
             "snapshot": json.dumps(_state(snap)), "annotator": None, "note": None}
            for qid, snap in current.items() if qid not in set(have)]
    insert_frame(cur, "query_history", _history_frame(rows))


def _write_versions(cur, changes: list[dict[str, Any]]) -> dict[str, int]:
    """Apply new states: each change has query_id, old (snapshot), new (state), action,
    annotator, note and optionally restored_from. Returns the new versions."""
    if not changes:
        return {}
    ids = [c["query_id"] for c in changes]
    new_versions = {c["query_id"]: c["old"]["version"] + 1 for c in changes}
    updates = pd.DataFrame({
        "query_id": ids,
        "query": [c["new"]["query"] for c in changes],
        "status": [c["new"]["status"] for c in changes],
        "version": [new_versions[q] for q in ids],
    })
    cur.register("_review_updates", updates)
    try:
        cur.execute(
            "UPDATE synthetic_queries AS q SET query = u.query, status = u.status, version = u.version "
            "FROM _review_updates u WHERE q.query_id = u.query_id"
        )
    finally:
        cur.unregister("_review_updates")
    gt_changed = [c for c in changes if c["new"]["ground_truth"] != c["old"]["ground_truth"]]
    if gt_changed:
        cur.execute("DELETE FROM ground_truth WHERE query_id IN (SELECT unnest(?::VARCHAR[]))",
                    [[c["query_id"] for c in gt_changed]])
        gt_rows = [{"query_id": c["query_id"], **row} for c in gt_changed for row in c["new"]["ground_truth"]]
        frame = pd.DataFrame(gt_rows, columns=["query_id", "rank", *GT_FIELDS])
        if len(frame):
            frame = frame.astype({"query_id": "object", "rank": "int64", "title_raw": "object",
                                  "item_id": "object", "match_score": "float64", "flagged": "bool",
                                  "note": "object"})
        insert_frame(cur, "ground_truth", frame)
    history_rows = []
    for c in changes:
        snap = _state(c["new"])
        if c.get("restored_from") is not None:
            snap["restored_from"] = int(c["restored_from"])
        history_rows.append({"query_id": c["query_id"], "version": new_versions[c["query_id"]],
                             "action": c["action"], "snapshot": json.dumps(snap),
                             "annotator": c.get("annotator"), "note": c.get("note")})
    insert_frame(cur, "query_history", _history_frame(history_rows))
    return new_versions


# ---------------------------------------------------------------------------------- edits
def _who(annotator: "User | str | None", action: str) -> str | None:
    if isinstance(annotator, User):
        return require(annotator, action).name
    return annotator


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        if pd.isna(value):
            return True
    except (TypeError, ValueError):
        pass
    return isinstance(value, str) and not value.strip()


def normalize_gt_rows(ws: Workspace, gt_rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """An edited ground-truth list -> rows in rank order (the order given), validated.

    Each row may carry item_id (a catalog id), title_raw (the title as the teacher wrote it),
    match_score, flagged and note; other keys (e.g. catalog details shown in an editor) are
    ignored. Rows with neither item_id nor title_raw are blank editor rows and are dropped.
    A row without a catalog item is always flagged; a row whose item was added by hand gets
    match_score 1.0 and its display title as title_raw.
    """
    records = gt_rows.to_dict("records") if isinstance(gt_rows, pd.DataFrame) else [dict(r) for r in gt_rows]
    clean: list[dict[str, Any]] = []
    for rec in records:
        item_id = None if _is_blank(rec.get("item_id")) else str(rec["item_id"]).strip()
        title_raw = None if _is_blank(rec.get("title_raw")) else str(rec["title_raw"]).strip()
        if item_id is None and title_raw is None:
            continue
        score = rec.get("match_score")
        score = None if _is_blank(score) else float(score)
        flagged = rec.get("flagged")
        flagged = bool(flagged) if not _is_blank(flagged) else False
        note = None if _is_blank(rec.get("note")) else str(rec["note"])
        clean.append({"item_id": item_id, "title_raw": title_raw, "match_score": score,
                      "flagged": flagged or item_id is None, "note": note})
    ids = [r["item_id"] for r in clean if r["item_id"] is not None]
    seen: dict[str, int] = {}
    for rank, row in enumerate(clean, 1):
        if row["item_id"] is None:
            continue
        if row["item_id"] in seen:
            raise ReviewError(f"item {row['item_id']} is in the list twice (ranks {seen[row['item_id']]} and {rank}); "
                              "remove one of them")
        seen[row["item_id"]] = rank
    known = ws.df(
        "SELECT item_id, title, year FROM items WHERE item_id IN (SELECT unnest(?::VARCHAR[]))", [ids]
    ) if ids else pd.DataFrame(columns=["item_id", "title", "year"])
    unknown = [i for i in ids if i not in set(known["item_id"])]
    if unknown:
        raise ReviewError(f"item id(s) {unknown[:5]} are not in the catalog; pick items from the catalog search")
    titles = {r.item_id: (f"{r.title} ({int(r.year)})" if not _is_blank(r.year) else r.title)
              for r in known.itertuples(index=False)}
    for rank, row in enumerate(clean, 1):
        row["rank"] = rank
        if row["item_id"] is not None:
            if row["title_raw"] is None:
                row["title_raw"] = titles[row["item_id"]]
            if row["match_score"] is None:
                row["match_score"] = 1.0
    return [{k: row[k] for k in ("rank",) + GT_FIELDS} for row in clean]


def save_edit(ws: Workspace, query_id: str, expected_version: int, query_text: str,
              gt_rows: pd.DataFrame | Iterable[Mapping[str, Any]], note: str | None = None,
              annotator: User | str | None = None, *, status: str | None = None) -> int:
    """Save an edited query and ground-truth list as a new version; returns it.

    Refused with `ConflictError` (nothing written) when the dialogue is no longer at
    `expected_version`. `status` optionally sets the review status in the same version
    ("approve with my edits"; action "approve" when nothing else changed). Saving an unchanged
    dialogue without a note writes nothing and returns the current version.
    """
    annotator = _who(annotator, "review_directly")
    text = (query_text or "").strip()
    if not text:
        raise ReviewError("the query is empty; write the user's request or reject the dialogue")
    if status is not None:
        _check_statuses([status])
    rows = normalize_gt_rows(ws, gt_rows)
    note = note.strip() if isinstance(note, str) and note.strip() else None
    with ws.transaction() as cur:
        current = _snapshots(cur, [query_id])
        _check_versions(cur, current, {query_id: expected_version})
        old = current[query_id]
        new = {"query": text, "status": status or old["status"], "ground_truth": rows}
        if new == _state(old) and note is None:
            return old["version"]
        _ensure_base(cur, current)
        if new["status"] == old["status"]:
            action = "edit"
        elif {**new, "status": old["status"]} == _state(old):
            action = _ACTION_OF_STATUS[new["status"]]  # only the status changed
        else:
            action = f"edit+{_ACTION_OF_STATUS[new['status']]}"
        return _write_versions(cur, [{"query_id": query_id, "old": old, "new": new, "action": action,
                                      "annotator": annotator, "note": note}])[query_id]


def set_status(ws: Workspace, query_ids: Sequence[str] | str, status: str, annotator: User | str | None = None,
               expected_versions: Mapping[str, int] | None = None, note: str | None = None) -> dict[str, int]:
    """Approve / reject / reset dialogues, all or nothing; returns {query_id: version}.

    With `expected_versions`, any dialogue that moved on refuses the whole call
    (`ConflictError`). Dialogues already in `status` keep their version (no new history)."""
    annotator = _who(annotator, "review_directly")
    (status,) = _check_statuses([status])
    ids = [query_ids] if isinstance(query_ids, str) else list(dict.fromkeys(str(q) for q in query_ids))
    if not ids:
        return {}
    note = note.strip() if isinstance(note, str) and note.strip() else None
    with ws.transaction() as cur:
        current = _snapshots(cur, ids)
        if expected_versions:
            _check_versions(cur, current, {q: v for q, v in expected_versions.items() if q in current})
        changes = []
        for qid in ids:
            old = current[qid]
            if old["status"] == status:
                continue
            new = {**_state(old), "status": status}
            changes.append({"query_id": qid, "old": old, "new": new, "action": _ACTION_OF_STATUS[status],
                            "annotator": annotator, "note": note})
        _ensure_base(cur, {c["query_id"]: c["old"] for c in changes})
        written = _write_versions(cur, changes)
    return {qid: written.get(qid, current[qid]["version"]) for qid in ids}


def bulk_set_status(ws: Workspace, filters: QueueFilter | Mapping[str, Any] | None, status: str,
                    annotator: User | str | None = None, note: str | None = None) -> dict[str, int]:
    """Set `status` on every dialogue the filter matches (as listed now), all or nothing."""
    annotator = _who(annotator, "bulk_review")
    queue = review_queue(ws, filters)
    expected = dict(zip(queue["query_id"], queue["version"].astype(int)))
    return set_status(ws, list(expected), status, annotator, expected_versions=expected, note=note)


def current_state(cur, query_id: str) -> dict[str, Any]:
    """Inside the caller's transaction: {"version", "query", "status", "ground_truth": [rows]}."""
    return _snapshots(cur, [query_id])[query_id]


def write_decision(cur, query_id: str, status: str, *, annotator: str, note: str,
                   query: str | None = None, ground_truth: list[dict[str, Any]] | None = None) -> int:
    """Inside the caller's transaction, give a dialogue the status a group of judgements decided
    (and, with `query` / `ground_truth` from `normalize_gt_rows`, the content they agreed on)."""
    (status,) = _check_statuses([status])
    current = _snapshots(cur, [query_id])
    old = current[query_id]
    new = {**_state(old), "status": status}
    if query is not None:
        new["query"] = query
    if ground_truth is not None:
        new["ground_truth"] = ground_truth
    if new == _state(old):
        return old["version"]
    _ensure_base(cur, current)
    edited = {**new, "status": old["status"]} != _state(old)
    action = (f"edit+{_ACTION_OF_STATUS[status]}" if edited else _ACTION_OF_STATUS[status])
    return _write_versions(cur, [{"query_id": query_id, "old": old, "new": new, "action": action,
                                  "annotator": annotator, "note": note}])[query_id]


# -------------------------------------------------------------------------- history / undo
def history(ws: Workspace, query_id: str) -> pd.DataFrame:
    """Versions of one dialogue, newest first: version, action, annotator, note, created_at,
    status, query, n_gt, restored_from."""
    frame = ws.df(
        "SELECT version, action, annotator, note, created_at, snapshot FROM query_history "
        "WHERE query_id = ? ORDER BY version DESC",
        [query_id],
    )
    snaps = [json.loads(s) for s in frame["snapshot"]]
    frame = frame.drop(columns=["snapshot"])
    frame["status"] = [s.get("status") for s in snaps]
    frame["query"] = [s.get("query") for s in snaps]
    frame["n_gt"] = [len(s.get("ground_truth") or []) for s in snaps]
    frame["restored_from"] = pd.array([s.get("restored_from") for s in snaps], dtype="Int64")
    return frame


def undo(ws: Workspace, query_id: str, annotator: User | str | None = None,
         expected_version: int | None = None) -> int:
    """Restore the state before the dialogue's last change as a new version; returns it."""
    annotator = _who(annotator, "review_directly")
    with ws.transaction() as cur:
        return undo_in(cur, query_id, annotator, expected_version)


def undo_in(cur, query_id: str, annotator: str | None, expected_version: int | None = None) -> int:
    """`undo` inside the caller's transaction (for crs_core.judging taking back a decision)."""
    current = _snapshots(cur, [query_id])
    if expected_version is not None:
        _check_versions(cur, current, {query_id: expected_version})
    rows = cur.execute(
        "SELECT version, action, snapshot FROM query_history WHERE query_id = ?", [query_id]
    ).fetchall()
    snaps = {int(v): (a, json.loads(s)) for v, a, s in rows}
    effective = current[query_id]["version"]
    seen = set()
    while effective in snaps and snaps[effective][1].get("restored_from") is not None and effective not in seen:
        seen.add(effective)
        effective = int(snaps[effective][1]["restored_from"])
    target = effective - 1
    if effective not in snaps or target not in snaps:
        raise ReviewError(f"nothing to undo for {query_id}: it is at its first recorded version")
    old = current[query_id]
    new = _state(snaps[target][1])
    return _write_versions(cur, [{"query_id": query_id, "old": old, "new": new, "action": "undo",
                                  "annotator": annotator, "note": f"restored version {target}",
                                  "restored_from": target}])[query_id]
