"""What a synthesis run costs and did: the estimate before it (calls per query, seconds per call
measured in the workspace) and the report after it (counts, refusal reasons, errors and timings,
as lines for the CLI and the pages). Used through `crs_core.synth`.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .synth_inputs import DEFAULT_SCORE_BATCH, N_CANDIDATES


# ==============================================================================================
# the estimate
# ==============================================================================================
def calls_per_query(gt_mode: str, *, n_candidates: int = N_CANDIDATES, score_batch: int = DEFAULT_SCORE_BATCH) -> int:
    """Teacher calls one query costs when every reply is usable (a refused reply adds one)."""
    if gt_mode == "retrieve":
        return 1
    if gt_mode == "retrieve+llm":
        return 1 + math.ceil(n_candidates / score_batch)
    return 2


def measured_seconds_per_call(ws: Any, model: str, limit: int = 200) -> tuple[float | None, int]:
    """(median seconds of the real calls to ``model`` recorded in the last ``limit`` stored
    queries' provenance, how many calls) -- (None, 0) when there are none."""
    rows = ws.cursor().execute(
        "SELECT provenance FROM synthetic_queries WHERE json_extract_string(provenance, '$.teacher.model') = ? "
        "ORDER BY created_at DESC LIMIT ?", [model, int(limit)]).fetchall()
    secs = []
    for (prov,) in rows:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            secs += [float(c["seconds"]) for c in json.loads(prov).get("calls", []) if not c.get("cached")]
    if not secs:
        return None, 0
    return float(np.median(secs)), len(secs)


def synthesis_estimate(ws: Any, model: str, gt_mode: str, queries: int, *, stated_seconds_per_call: float | None = None,
                       n_candidates: int = N_CANDIDATES, score_batch: int = DEFAULT_SCORE_BATCH) -> dict[str, Any] | None:
    """How long ``queries`` new queries will take: seconds per call measured in this workspace
    (median of earlier calls to ``model``), else the stated figure (the local teachers', see
    crs_core.models.SECONDS_PER_CALL), times the calls per query; None when neither is known."""
    measured, n = measured_seconds_per_call(ws, model)
    per_call = measured if measured is not None else stated_seconds_per_call
    if per_call is None:
        return None
    per_query = per_call * calls_per_query(gt_mode, n_candidates=n_candidates, score_batch=score_batch)
    basis = (f"measured: median of {n} call{'s' if n != 1 else ''} in this workspace" if measured is not None
             else "stated for 2 idle threads")
    return {"seconds_per_call": per_call, "seconds_per_query": per_query, "total_seconds": per_query * max(0, queries),
            "basis": basis, "calls_per_query": calls_per_query(gt_mode, n_candidates=n_candidates, score_batch=score_batch)}


# ==============================================================================================
# the report
# ==============================================================================================
MAX_REPORTED_ERRORS = 5  # error lines SynthReport.lines() shows (all are in .errors)


@dataclass
class SynthReport:
    """What a synthesis run did (this run only)."""

    selection_id: str
    gt_mode: str
    k_queries: int
    items: int = 0                # distinct items taken from the selection (after items_limit)
    items_without_reviews: int = 0
    planned: int = 0              # (item, k) units
    skipped_existing: int = 0     # already stored by an earlier run
    stored: int = 0               # new queries stored now
    flagged_replies: int = 0      # replies refused by the parser (not stored)
    failed: int = 0               # units lost to teacher errors (after retries)
    gt_rows: int = 0
    gt_matched: int = 0
    gt_hallucinated: int = 0
    duplicates: int = 0
    calls: int = 0                # real teacher calls made now
    cached_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0             # US dollars of the calls made now (priced models)
    teacher_seconds: float = 0.0  # wall time inside the calls made now (retries included)
    seconds: float = 0.0
    stopped: str | None = None    # None: ran to the end; else why it stopped early
    interrupted: int = 0          # requests an earlier run had in flight when it was killed
    resent: int = 0               # ... of them sent again now (an endpoint may bill them twice)
    query_ids: list[str] = field(default_factory=list)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def grounding_rate(self) -> float | None:
        return self.gt_matched / self.gt_rows if self.gt_rows else None

    @property
    def duplicate_rate(self) -> float | None:
        return self.duplicates / self.stored if self.stored else None

    @property
    def seconds_per_query(self) -> float | None:
        return self.seconds / self.stored if self.stored else None

    @property
    def complete(self) -> bool:
        return self.stopped is None and self.failed == 0

    def reason(self) -> str | None:
        """One line saying why the run is not complete (None when it is): for exit codes."""
        if self.complete:
            return None
        done = f"{self.skipped_existing + self.stored} of {self.planned} queries stored"
        if self.stopped:
            return f"synthesis stopped early ({done}): {self.stopped}"
        last = f"; last error: {self.errors[-1]}" if self.errors else ""
        return f"synthesis incomplete ({done}): {self.failed} failed{last}"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(grounding_rate=self.grounding_rate, duplicate_rate=self.duplicate_rate,
                 seconds_per_query=self.seconds_per_query)
        return d

    def lines(self) -> list[str]:
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.1%}"

        out = [
            f"selection {self.selection_id}, ground truth '{self.gt_mode}', K = {self.k_queries}",
            f"items: {self.items} ({self.items_without_reviews} without usable reviews); "
            f"queries planned: {self.planned}, already done: {self.skipped_existing}, stored now: {self.stored}",
            f"flagged replies (not stored): {self.flagged_replies}; failed: {self.failed}",
            f"ground truth rows: {self.gt_rows}, grounded: {self.gt_matched} ({pct(self.grounding_rate)}), "
            f"hallucinated (flagged): {self.gt_hallucinated}",
            f"duplicate queries: {self.duplicates} ({pct(self.duplicate_rate)})",
            f"teacher: {self.calls} calls, {self.cached_hits} cached, {self.prompt_tokens + self.completion_tokens:,} "
            f"tokens, ${self.cost:.4f}",
            f"time: {self.seconds:.1f} s, {self.teacher_seconds:.1f} s of it in teacher calls"
            + (f" ({self.seconds_per_query:.2f} s per stored query)" if self.stored else ""),
        ]
        if self.stopped:
            out.append(f"stopped early: {self.stopped}")
        if self.errors:
            out.append(f"errors ({len(self.errors)}):")
            out += [f"  {e}" for e in self.errors[:MAX_REPORTED_ERRORS]]
            if len(self.errors) > MAX_REPORTED_ERRORS:
                out.append(f"  … and {len(self.errors) - MAX_REPORTED_ERRORS} more")
        if self.stopped and self.calls:
            out.append(f"the {self.calls} replies paid for in this run are cached in the workspace"
                       + (" (none became a stored query yet)" if not self.stored else "")
                       + ": the next run reuses them without paying again")
        if self.interrupted:
            out.append(f"{self.interrupted} teacher request(s) were in flight when an earlier run was killed (their "
                       f"replies never arrived); {self.resent} of them were sent again now, and an endpoint may "
                       "bill those twice")
        return out + self.notes
