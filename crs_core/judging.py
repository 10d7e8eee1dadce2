"""Review work for a team: assignments with an overlap, independent judgements, the final
status rule, disputes and agreement.

A curator *assigns* the dialogues a review-queue filter matches now (pending ones) to a set of
annotators with an *overlap* k: each dialogue needs k independent judgements (approve or reject,
optionally with an edited query and ground-truth list). Any listed annotator may judge any
dialogue of the assignment until it has k judgements; an annotator is shown only their next
dialogue (the ones closest to complete first, so finished dialogues accumulate), and nobody sees
another's judgement of a dialogue before submitting their own.

When the k-th judgement arrives the *rule* decides, in the same transaction:

- ``unanimous`` (default): all k verdicts equal -> that status; otherwise disputed;
- ``majority``: a strict majority of verdicts -> that status; a tie is disputed.

An approval carries content: the approving judgements' query and list must agree (after the
catalogue normalisation of `review.normalize_gt_rows`), and that content is written with the
status; approvals with different edits are disputed too. A dialogue that changed (someone edited
it directly) while it was being judged is disputed rather than overwritten. A curator settles a
dispute by choosing the status (and the content of one of the judgements, or the current one).
Every decision is a new version in the dialogue's history (review.py), naming the annotators.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from . import agreement, review
from .accounts import PermissionDenied, User, require
from .errors import CRSError
from .store import Workspace

__all__ = ["RULES", "VERDICTS", "JudgingError", "Assignment", "assign", "assignments", "next_dialogue",
           "judge", "withdraw", "judgements_for", "disputes", "settle", "progress", "agreement_report", "judgement_table"]

RULES = ("unanimous", "majority")
VERDICTS = ("approved", "rejected")


class JudgingError(CRSError):
    """A judging request that cannot be applied (unknown assignment, not assigned, judged twice)."""


@dataclass(frozen=True)
class Assignment:
    assignment_id: str
    name: str
    annotators: tuple[str, ...]
    overlap: int
    rule: str
    created_by: str
    size: int


def assign(ws: Workspace, actor: User, filters: review.QueueFilter | Mapping[str, Any] | None,
           annotators: Sequence[str], *, overlap: int = 1, rule: str = "unanimous",
           name: str | None = None) -> Assignment:
    """Assign the pending dialogues the filter matches now to `annotators`, each needing `overlap`
    independent judgements. Dialogues already in another open assignment are left out."""
    require(actor, "assign_review")
    names = tuple(dict.fromkeys(a.strip() for a in annotators if a and a.strip()))
    if not names:
        raise JudgingError("name at least one annotator")
    if rule not in RULES:
        raise JudgingError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if not 1 <= int(overlap) <= len(names):
        raise JudgingError(f"an overlap of {overlap} needs at least {overlap} annotators; {len(names)} named")
    flt = review.QueueFilter.coerce(filters)
    flt = review.QueueFilter(**{**flt.__dict__, "statuses": ["pending"]})
    queue = review.review_queue(ws, flt)
    taken = set(ws.df("SELECT query_id FROM assignment_items WHERE outcome IS NULL OR outcome = 'disputed'")["query_id"])
    ids = [q for q in queue["query_id"] if q not in taken]
    if not ids:
        raise JudgingError("no pending dialogue matches this filter outside open assignments")
    aid = uuid.uuid4().hex[:12]
    label = (name or "").strip() or f"{len(ids)} dialogues for {', '.join(names)}"
    with ws.transaction() as cur:
        cur.execute("INSERT INTO review_assignments (assignment_id, name, filters, annotators, overlap, rule, "
                    "created_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [aid, label, json.dumps({k: (list(v) if isinstance(v, (list, tuple)) else v)
                                             for k, v in flt.__dict__.items()}),
                     json.dumps(list(names)), int(overlap), rule, actor.name])
        cur.executemany("INSERT INTO assignment_items (assignment_id, query_id, position) VALUES (?, ?, ?)",
                        [[aid, q, n] for n, q in enumerate(ids)])
    return Assignment(aid, label, names, int(overlap), rule, actor.name, len(ids))


def assignments(ws: Workspace) -> list[Assignment]:
    frame = ws.df("SELECT a.*, (SELECT count(*) FROM assignment_items i WHERE i.assignment_id = a.assignment_id) "
                  "AS size FROM review_assignments a ORDER BY created_at")
    return [Assignment(r.assignment_id, r.name, tuple(json.loads(r.annotators)), int(r.overlap), r.rule,
                       r.created_by, int(r.size)) for r in frame.itertuples()]


def _assignment(cur, assignment_id: str) -> Assignment:
    row = cur.execute("SELECT name, annotators, overlap, rule, created_by FROM review_assignments "
                      "WHERE assignment_id = ?", [assignment_id]).fetchone()
    if row is None:
        raise JudgingError(f"no review assignment {assignment_id!r}")
    return Assignment(assignment_id, row[0], tuple(json.loads(row[1])), int(row[2]), row[3], row[4], 0)


def next_dialogue(ws: Workspace, user: User, *, skip: Sequence[str] = ()) -> tuple[str, str] | None:
    """(assignment_id, query_id) of the user's next dialogue to judge, or None when done.

    Open dialogues of the assignments naming the user that the user has not judged, fewest
    judgements still missing first, then in assignment order; `skip` leaves some out (this
    session's "skip" key)."""
    require(user, "judge")
    frame = ws.df(
        """
        SELECT i.assignment_id, i.query_id, a.overlap - count(j.annotator) AS missing, a.created_at, i.position
        FROM assignment_items i
        JOIN review_assignments a ON a.assignment_id = i.assignment_id
        LEFT JOIN judgements j ON j.assignment_id = i.assignment_id AND j.query_id = i.query_id
        WHERE i.outcome IS NULL AND list_contains(CAST(json_extract_string(a.annotators, '$[*]') AS VARCHAR[]), ?)
          AND NOT EXISTS (SELECT 1 FROM judgements m WHERE m.assignment_id = i.assignment_id
                          AND m.query_id = i.query_id AND m.annotator = ?)
        GROUP BY i.assignment_id, i.query_id, a.overlap, a.created_at, i.position
        HAVING a.overlap - count(j.annotator) > 0
        ORDER BY missing, a.created_at, i.position
        """, [user.name, user.name])
    frame = frame[~frame["query_id"].isin(set(skip))]
    return None if frame.empty else (str(frame.iloc[0]["assignment_id"]), str(frame.iloc[0]["query_id"]))


def judge(ws: Workspace, user: User, assignment_id: str, query_id: str, verdict: str, *,
          based_on_version: int, query: str | None = None, ground_truth: Any = None,
          note: str | None = None) -> str | None:
    """Record the user's judgement; returns the dialogue's outcome when this judgement completed
    it (approved / rejected / disputed), else None.

    `query` / `ground_truth` are the annotator's edits (None keeps what they were shown)."""
    require(user, "judge")
    if verdict not in VERDICTS:
        raise JudgingError(f"a verdict is one of {', '.join(VERDICTS)}, not {verdict!r}")
    if query is not None and not query.strip():
        raise JudgingError("the query is empty; write the user's request or reject the dialogue")
    rows = review.normalize_gt_rows(ws, ground_truth) if ground_truth is not None else None
    note = note.strip() if isinstance(note, str) and note.strip() else None
    with ws.transaction() as cur:
        task = _assignment(cur, assignment_id)
        if user.name not in task.annotators:
            raise PermissionDenied(f"{user.name} is not an annotator of the assignment {task.name!r}")
        item = cur.execute("SELECT outcome FROM assignment_items WHERE assignment_id = ? AND query_id = ?",
                           [assignment_id, query_id]).fetchone()
        if item is None:
            raise JudgingError(f"{query_id} is not part of the assignment {task.name!r}")
        if item[0] is not None:
            raise JudgingError(f"{query_id} is already decided ({item[0]}); nothing was recorded")
        done = cur.execute("SELECT annotator FROM judgements WHERE assignment_id = ? AND query_id = ?",
                           [assignment_id, query_id]).fetchall()
        if user.name in {d[0] for d in done}:
            raise JudgingError(f"{user.name} already judged {query_id}")
        if len(done) >= task.overlap:
            raise JudgingError(f"{query_id} already has its {task.overlap} judgements")
        shown = review.current_state(cur, query_id)
        cur.execute("INSERT INTO judgements (assignment_id, query_id, annotator, verdict, query, ground_truth, note, "
                    "based_on_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [assignment_id, query_id, user.name, verdict, query.strip() if query else shown["query"],
                     json.dumps(rows if rows is not None else shown["ground_truth"], default=str), note,
                     int(based_on_version)])
        if len(done) + 1 < task.overlap:
            return None
        return _decide(cur, task, query_id)


def withdraw(ws: Workspace, user: User, assignment_id: str, query_id: str) -> None:
    """Take back one's own judgement (the review loop's undo). A decision it completed is undone
    too (a new version restoring the state before it), unless the dialogue changed since or a
    curator settled it; the dialogue is then open for judging again."""
    require(user, "judge")
    with ws.transaction() as cur:
        item = cur.execute("SELECT outcome, decided_version, settled_by FROM assignment_items "
                           "WHERE assignment_id = ? AND query_id = ?", [assignment_id, query_id]).fetchone()
        if item is None:
            raise JudgingError(f"{query_id} is not part of this assignment")
        outcome, decided_version, settled_by = item
        if settled_by is not None:
            raise JudgingError(f"{query_id} was settled by {settled_by}; ask a curator to change it")
        gone = cur.execute("DELETE FROM judgements WHERE assignment_id = ? AND query_id = ? AND annotator = ? "
                           "RETURNING query_id", [assignment_id, query_id, user.name]).fetchall()
        if not gone:
            raise JudgingError(f"{user.name} has no judgement of {query_id} to take back")
        if outcome in VERDICTS:
            version = review.current_state(cur, query_id)["version"]
            if version != decided_version:
                raise JudgingError(f"{query_id} changed after it was decided ({outcome}); ask a curator")
            restored = review.undo_in(cur, query_id, user.name, expected_version=version)
            # the others judged the state the undo restored: their judgements still stand
            cur.execute("UPDATE judgements SET based_on_version = ? WHERE assignment_id = ? AND query_id = ? "
                        "AND based_on_version = ?", [restored, assignment_id, query_id, decided_version - 1])
        if outcome is not None:
            cur.execute("UPDATE assignment_items SET outcome = NULL, reason = NULL, decided_at = NULL, "
                        "decided_version = NULL WHERE assignment_id = ? AND query_id = ?", [assignment_id, query_id])


def _decide(cur, task: Assignment, query_id: str) -> str:
    marks = cur.execute("SELECT annotator, verdict, query, ground_truth, based_on_version FROM judgements "
                        "WHERE assignment_id = ? AND query_id = ? ORDER BY annotator",
                        [task.assignment_id, query_id]).fetchall()
    current = cur.execute("SELECT version, query FROM synthetic_queries WHERE query_id = ?", [query_id]).fetchone()
    votes = Counter(m[1] for m in marks)
    top, n_top = votes.most_common(1)[0]
    reason = None
    if any(int(m[4]) != int(current[0]) for m in marks):
        reason = "the dialogue changed while it was being judged"
    elif task.rule == "unanimous" and len(votes) > 1:
        reason = f"verdicts differ ({_tally(votes)})"
    elif task.rule == "majority" and n_top * 2 <= len(marks):
        reason = f"no majority ({_tally(votes)})"
    content = None
    if reason is None and top == "approved":
        approvals = [(m[2], json.loads(m[3])) for m in marks if m[1] == "approved"]
        if len({_content_key(*a) for a in approvals}) > 1:
            reason = "approved with different edits"
        else:
            content = approvals[0]
    if reason is not None:
        cur.execute("UPDATE assignment_items SET outcome = 'disputed', reason = ?, decided_at = current_timestamp "
                    "WHERE assignment_id = ? AND query_id = ?", [reason, task.assignment_id, query_id])
        return "disputed"
    names = ", ".join(m[0] for m in marks)
    query, gt = content if content else (None, None)
    version = review.write_decision(cur, query_id, top, annotator=names,
                                    note=f"{task.rule}: {_tally(votes)} ({task.name})", query=query, ground_truth=gt)
    cur.execute("UPDATE assignment_items SET outcome = ?, decided_at = current_timestamp, decided_version = ? "
                "WHERE assignment_id = ? AND query_id = ?", [top, version, task.assignment_id, query_id])
    return top


def _content_key(query: str, rows: list[dict[str, Any]]) -> tuple:
    """What two approvals must share: the query and the list's titles and catalogue ids in order."""
    return query.strip(), tuple((r.get("item_id"), (r.get("title_raw") or "").strip(), bool(r.get("flagged")))
                                for r in sorted(rows, key=lambda r: r.get("rank") or 0))


def _tally(votes: Counter) -> str:
    return ", ".join(f"{n} {v}" for v, n in sorted(votes.items()))


def judgements_for(ws: Workspace, viewer: User, assignment_id: str, query_id: str) -> pd.DataFrame:
    """The judgements of one dialogue, for a curator or for an annotator who already submitted
    their own (nobody sees another's judgement first)."""
    require(viewer, "judge")
    frame = ws.df("SELECT annotator, verdict, query, ground_truth, note, based_on_version, created_at "
                  "FROM judgements WHERE assignment_id = ? AND query_id = ? ORDER BY created_at",
                  [assignment_id, query_id])
    if not viewer.may("settle_dispute") and viewer.name not in set(frame["annotator"]):
        raise PermissionDenied("submit your own judgement of this dialogue before seeing the others'")
    return frame


def disputes(ws: Workspace, viewer: User) -> pd.DataFrame:
    """Disputed dialogues awaiting a curator: assignment, query, reason, the verdicts."""
    require(viewer, "settle_dispute")
    return ws.df(
        """
        SELECT i.assignment_id, a.name AS assignment, i.query_id, q.query, i.reason,
               string_agg(j.annotator || ': ' || j.verdict, '; ' ORDER BY j.annotator) AS verdicts
        FROM assignment_items i
        JOIN review_assignments a USING (assignment_id)
        JOIN synthetic_queries q USING (query_id)
        LEFT JOIN judgements j ON j.assignment_id = i.assignment_id AND j.query_id = i.query_id
        WHERE i.outcome = 'disputed' AND i.settled_by IS NULL
        GROUP BY i.assignment_id, a.name, i.query_id, q.query, i.reason, i.decided_at
        ORDER BY i.decided_at
        """)


def settle(ws: Workspace, curator: User, assignment_id: str, query_id: str, status: str, *,
           content_of: str | None = None, note: str | None = None) -> int:
    """Settle a disputed dialogue: set `status`, with the query and list of the judgement by
    `content_of` (an annotator's name) or the dialogue as it stands. Returns the new version."""
    require(curator, "settle_dispute")
    if status not in VERDICTS:
        raise JudgingError(f"settle with one of {', '.join(VERDICTS)}, not {status!r}")
    with ws.transaction() as cur:
        item = cur.execute("SELECT outcome, settled_by FROM assignment_items WHERE assignment_id = ? "
                           "AND query_id = ?", [assignment_id, query_id]).fetchone()
        if item is None or item[0] != "disputed" or item[1] is not None:
            raise JudgingError(f"{query_id} is not an open dispute of this assignment")
        query = gt = None
        if content_of is not None:
            row = cur.execute("SELECT query, ground_truth FROM judgements WHERE assignment_id = ? AND query_id = ? "
                              "AND annotator = ?", [assignment_id, query_id, content_of]).fetchone()
            if row is None:
                raise JudgingError(f"{content_of} did not judge {query_id}")
            query, gt = row[0], json.loads(row[1])
        version = review.write_decision(cur, query_id, status, annotator=curator.name, query=query,
                                        ground_truth=gt, note=(note or "").strip() or "settled a dispute")
        cur.execute("UPDATE assignment_items SET settled_by = ?, outcome = ? WHERE assignment_id = ? "
                    "AND query_id = ?", [curator.name, status, assignment_id, query_id])
    return version


def progress(ws: Workspace, assignment_id: str) -> dict[str, Any]:
    """Per-annotator judgement counts and the assignment's outcome counts."""
    per = ws.df("SELECT annotator, count(*) AS judged, count(*) FILTER (WHERE verdict = 'approved') AS approved "
                "FROM judgements WHERE assignment_id = ? GROUP BY annotator ORDER BY annotator", [assignment_id])
    outcomes = ws.df("SELECT coalesce(outcome, 'open') AS outcome, count(*) AS n FROM assignment_items "
                     "WHERE assignment_id = ? GROUP BY 1", [assignment_id])
    return {"annotators": per, "outcomes": dict(zip(outcomes["outcome"], outcomes["n"].astype(int)))}


def judgement_table(ws: Workspace, viewer: User, assignment_id: str | None = None) -> pd.DataFrame:
    """Every judgement (optionally of one assignment) with the catalogue ids of the list the
    annotator left: the input of the agreement figures. Curators only."""
    require(viewer, "settle_dispute")
    where, params = ("WHERE j.assignment_id = ?", [assignment_id]) if assignment_id else ("", [])
    frame = ws.df(f"SELECT j.assignment_id, j.query_id, j.annotator, j.verdict, j.ground_truth FROM judgements j "
                  f"{where} ORDER BY j.assignment_id, j.query_id, j.annotator", params)
    frame["dialogue"] = frame["assignment_id"] + "/" + frame["query_id"]
    frame["items"] = [[r["item_id"] for r in json.loads(gt) if r.get("item_id")] for gt in frame["ground_truth"]]
    return frame.drop(columns=["ground_truth"])


def agreement_report(ws: Workspace, viewer: User, assignment_id: str | None = None
                     ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(per annotator pair, overall) agreement; see crs_core.agreement for the formulas."""
    table = judgement_table(ws, viewer, assignment_id)
    return agreement.pairwise_agreement(table), agreement.overall_agreement(table)
