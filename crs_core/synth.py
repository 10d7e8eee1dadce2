"""Synthesis: Algorithm 2 of active synthesis (arXiv 2504.15476, section 3.3).

For each item of a selection (distinct items in pick order; a review selection contributes
the reviews' items), sample 5 style templates and 3 of the item's reviews (seeded), ask the
teacher for K queries with the paper's query prompt, and give every query a list of up to 20
ground-truth items. Every query is stored with its provenance as soon as it is done::

    report = run_synthesis(ws, "sel-js-200", teacher, k_queries=1, gt_mode="llm")
    export_synthetic(ws, "train.jsonl", shape="chat")

Ground truth modes (all stored alike in ``ground_truth``: rank 1..<=20, title_raw, item_id or
NULL, match_score, flagged, note). Every mode but ``llm`` is grounded by construction: no stored
row lacks a catalog item.

``choose`` (the default)
    The teacher chooses up to 20 of the top ``n_choice`` (35) catalog items retrieved for the
    query (as in ``retrieve``; the seed item is always among them), offered as a numbered list
    "n. Title (Year)"; its answer is the candidates' numbers, constrained by a JSON schema
    (``{"picks": [n, ...]}``, each an enum of 1..N) where the endpoint enforces one. Numbers
    out of range, duplicates and titles that are not candidates are dropped and counted in the
    provenance; nothing outside the candidates can be stored.
``llm`` (the paper; free-text listing)
    The teacher answers the paper's "Movie Recommendations Prompt"; every listed title is
    grounded in the catalog with ``TitleMatcher``. Unmatched titles stay as flagged rows
    (item_id NULL, note 'hallucinated: ...'); they are never turned into items. Duplicates are
    removed after grounding (two spellings of one film count once).
``retrieve``
    No LLM: the top 20 catalog items by cosine similarity between the query and the item text
    (``catalog.item_text``: title, year, genres, plot, cast), blended with collaborative
    co-occurrence: ``score = (1 - w) * cos + w * cooc``, where ``cooc`` is the cosine
    co-occurrence of the item with the seed item in ``interactions`` (users who rated both /
    sqrt(n_seed * n_item)), scaled so the best co-rated item has 1; w = ``cooc_weight``
    (default 0.2; 0 without interactions for the seed).
``retrieve+llm``
    Retrieve 50 the same way, let the teacher score each candidate 0-4 with the FNSCRS
    relevance prompt (Table 18 of "Beyond single labels", JSON answer; batches of
    ``score_batch`` candidates), keep the best 20 with score >= ``relevance_threshold``
    (default 3).

The seed item (whose reviews the query was written from) is kept as a candidate in the
retrieve modes: the query describes what its reviewers liked, so it is a relevant answer and
usually ranks near the top. It is excluded only when the query names it (a title the user
mentions is not a recommendation, as in the He et al. evaluation protocol).

Structured replies. Every teacher call carries the JSON schema of its answer (query:
``{"query": ...}``; choose: ``{"picks": [...]}``; llm: ``{"titles": [...]}``; retrieve+llm: one
score per candidate title), sent in the form the endpoint accepts (decided once per endpoint by
the teacher, see crs_core.teacher); the parsers read JSON, cut-off JSON and free text alike, so
an endpoint that refuses response_format still works.

Safety of the prompt. Reviews are data: HTML is cleaned to text, oversized reviews are cut at a
sentence boundary (``MAX_REVIEW_CHARS``), empty ones are skipped, each review sits inside
``<review>...</review>`` (tag look-alikes inside a review are removed so it cannot close its
own delimiter), and a system message states that the reviews are quoted data, not
instructions. The paper's prompts themselves are used verbatim (``QUERY_PROMPT``,
``RECS_PROMPT``, ``RELEVANCE_PROMPT``). The reply parser then refuses anything that is not a
plausible query (too short, refusal, echo of the prompt or of the system prompt, the
assistant's voice, a summary of the reviews, a reply that names the seed film, a repeated-token
degeneration, a copy of a review or of a template): such replies are flagged and counted in the
report, never stored as queries.

Resume. A query's id is ``<selection_id>:<item_id>:<k>``; a rerun skips ids that exist. Calls
go through the teacher's cache (committed before the call counts as done), so a crash between
the teacher's answer and the store makes no call twice.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .accounts import acting_name
from .llm_output import (ChoiceParse, QueryParse, normalize_query, parse_choice_reply, parse_query_reply,
                         parse_scores, parse_title_list)
from .prompts import (CHOICE_PROMPT, QUERY_PROMPT, QUERY_SCHEMA, QUERY_SYSTEM, RECS_PROMPT, RELEVANCE_PROMPT,
                      TITLES_SCHEMA, choice_schema, score_schema)
from .embed import TextEncoder
from .engines import EngineError, SynthWork, get_engine, remove_spool, run_concurrently, spool_folder
from .progress import ProgressFn, report as _report
from .style_templates import SAMPLE_SIZE, load_templates
from .teacher import Budget, BudgetExceeded, Completion, TeacherError, TeacherSetupError
from .titles import TitleMatcher
from .synth_export import (EXPORT_FORMATS, EXPORT_SHAPES, export_synthetic)
from .synth_inputs import (CHOICE_MAX_TOKENS, CHOICE_TEMPERATURE, CatalogRetriever, DEFAULT_COOC_WEIGHT,
    DEFAULT_GT_MODE, DEFAULT_RELEVANCE_THRESHOLD, DEFAULT_SCORE_BATCH, DUPLICATE_COSINE, GT_MODES, GroundedTitle,
    MAX_CONSECUTIVE_FAILURES, MAX_REVIEW_CHARS, N_CANDIDATES, N_CHOICE_CANDIDATES, N_GROUND_TRUTH, N_REVIEWS,
    QUERY_MAX_TOKENS, RECS_MAX_TOKENS, SelectionNotFound, SynthesisBudgetError, SynthesisError,
    build_choice_messages, build_query_messages, build_recs_messages, build_relevance_messages, clean_review,
    format_reviews, format_sample_queries, ground_titles, retry_messages, _query_names_item)
from .synth_report import MAX_REPORTED_ERRORS, SynthReport, calls_per_query, synthesis_estimate

__all__ = [
    "GT_MODES", "QUERY_PROMPT", "RECS_PROMPT", "RELEVANCE_PROMPT", "QUERY_SYSTEM", "SynthesisError",
    "SelectionNotFound", "SynthesisBudgetError", "SynthReport", "QueryParse", "ChoiceParse",
    "GroundedTitle", "run_synthesis", "export_synthetic", "synthesis_progress", "clean_review",
    "build_query_messages", "build_recs_messages", "build_relevance_messages", "build_choice_messages",
    "CHOICE_PROMPT", "QUERY_SCHEMA", "TITLES_SCHEMA", "choice_schema", "parse_query_reply",
    "parse_choice_reply", "parse_title_list", "ground_titles", "normalize_query", "CatalogRetriever",
    "synthesis_estimate", "calls_per_query", "CHOICE_MAX_TOKENS", "CHOICE_TEMPERATURE",
    "DEFAULT_COOC_WEIGHT", "DEFAULT_GT_MODE", "DEFAULT_RELEVANCE_THRESHOLD", "DEFAULT_SCORE_BATCH",
    "DUPLICATE_COSINE", "EXPORT_FORMATS", "EXPORT_SHAPES", "MAX_CONSECUTIVE_FAILURES",
    "MAX_REPORTED_ERRORS", "MAX_REVIEW_CHARS", "N_CANDIDATES", "N_CHOICE_CANDIDATES", "N_GROUND_TRUTH",
    "N_REVIEWS", "QUERY_MAX_TOKENS", "RECS_MAX_TOKENS", "format_reviews", "format_sample_queries",
    "retry_messages",
]
# ==============================================================================================
# the run
# ==============================================================================================
@dataclass
class _ItemPlan:
    item_id: str
    title: str
    templates: list[str]
    template_idx: list[int]
    reviews: list[dict[str, Any]]  # review_id, text (cleaned), chars, truncated, picked
    reviews_available: int
    note: str | None


@dataclass
class _Outcome:
    item_id: str
    k: int
    kind: str  # 'ok' | 'flagged' | 'failed' | 'budget' | 'cancelled'
    query: str | None = None
    rows: list[GroundedTitle] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    completions: list[Completion] = field(default_factory=list)
    seconds: float = 0.0


def query_id_for(selection_id: str, item_id: str, k: int) -> str:
    return f"{selection_id}:{item_id}:{k}"


def _selection(ws: Any, selection_id: str) -> dict[str, Any]:
    row = ws.cursor().execute(
        "SELECT selection_id, name, strategy, unit, set_id, budget FROM selections WHERE selection_id = ?",
        [selection_id],
    ).fetchone()
    if row is None:
        known = [r[0] for r in ws.cursor().execute(
            "SELECT selection_id FROM selections ORDER BY created_at DESC LIMIT 5").fetchall()]
        hint = f" (recent selections: {', '.join(known)})" if known else " (the workspace has no selections yet)"
        raise SelectionNotFound(f"selection {selection_id!r} does not exist{hint}")
    return dict(zip(("selection_id", "name", "strategy", "unit", "set_id", "budget"), row))


def _selection_items(ws: Any, sel: dict[str, Any]) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """Distinct items in pick order, the picked review ids per item, notes."""
    unit = str(sel["unit"]).lower()
    notes: list[str] = []
    picks = ws.df("SELECT rank, unit_id FROM selection_picks WHERE selection_id = ? ORDER BY rank",
                  [sel["selection_id"]])
    if picks.empty:
        raise SynthesisError(f"selection {sel['selection_id']!r} has no picks")
    picked_reviews: dict[str, list[str]] = {}
    if unit == "review":
        df = ws.df(
            "SELECT p.rank, p.unit_id, r.item_id FROM selection_picks p LEFT JOIN reviews r "
            "ON r.review_id = p.unit_id WHERE p.selection_id = ? ORDER BY p.rank", [sel["selection_id"]])
        missing = int(df["item_id"].isna().sum())
        if missing:
            notes.append(f"{missing} picked review(s) are no longer in the workspace; skipped")
        items: list[str] = []
        for unit_id, item_id in zip(df["unit_id"], df["item_id"]):
            if item_id is None or (isinstance(item_id, float) and math.isnan(item_id)):
                continue
            item_id = str(item_id)
            if item_id not in picked_reviews:
                picked_reviews[item_id] = []
                items.append(item_id)
            picked_reviews[item_id].append(str(unit_id))
    elif unit == "item":
        items = list(dict.fromkeys(str(u) for u in picks["unit_id"]))
    else:
        raise SynthesisError(f"selection {sel['selection_id']!r} has unit {sel['unit']!r}; synthesis needs 'review' or 'item'")
    known = {str(r[0]) for r in ws.cursor().execute(
        f"SELECT item_id FROM items WHERE item_id IN ({','.join('?' * len(items))})", items).fetchall()} if items else set()
    gone = [i for i in items if i not in known]
    if gone:
        notes.append(f"{len(gone)} selected item(s) are not in the catalog; skipped")
        items = [i for i in items if i in known]
    return items, picked_reviews, notes


def _plan_item(ws: Any, item_id: str, title: str, templates: list[str], picked: list[str], seed: int,
               n_templates: int, n_reviews: int, max_review_chars: int) -> _ItemPlan:
    rng = random.Random(f"crs-synth|{seed}|{item_id}")
    idx = sorted(rng.sample(range(len(templates)), min(n_templates, len(templates))))
    rng.shuffle(idx)
    rows = ws.cursor().execute(
        "SELECT review_id, text FROM reviews WHERE item_id = ? ORDER BY review_id", [item_id]).fetchall()
    usable: dict[str, tuple[str, bool]] = {}
    for rid, text in rows:
        clean, cut = clean_review(text, max_review_chars)
        if clean:
            usable[str(rid)] = (clean, cut)
    first = [r for r in dict.fromkeys(picked) if r in usable][:n_reviews]
    rest = [r for r in usable if r not in first]
    chosen = first + rng.sample(rest, min(n_reviews - len(first), len(rest)))
    reviews = [{"review_id": rid, "text": usable[rid][0], "chars": len(usable[rid][0]),
                "truncated": usable[rid][1], "picked": rid in first} for rid in chosen]
    note = None
    if len(reviews) < n_reviews:
        note = (f"only {len(reviews)} usable review(s) for this item (of {len(rows)}); "
                f"the prompt has {len(reviews)} instead of {n_reviews}")
    return _ItemPlan(item_id, title, [templates[i] for i in idx], idx, reviews, len(usable), note)


def _safe_endpoint(teacher: Any) -> str:
    try:
        ep = str(teacher.endpoint)
    except Exception:
        return "?"
    if "://" in ep:
        parts = urllib.parse.urlsplit(ep)
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    return ep


def _teacher_info(teacher: Any) -> dict[str, Any]:
    cfg = teacher.config
    return {"provider": cfg.provider, "model": teacher.model, "endpoint": _safe_endpoint(teacher),
            "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}


def _call_record(step: str, messages: list[dict[str, Any]], c: Completion, params: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "cache_key": c.cache_key, "cached": c.cached, "model": c.model,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "cost": c.cost,
            "seconds": round(c.seconds, 4), "finish_reason": c.finish_reason, "params": params, "reply": c.text}


def _budget_is_zero(b: Budget | None) -> list[str]:
    if b is None:
        return []
    return [n for n, v in (("max_calls", b.max_calls), ("max_tokens", b.max_tokens), ("max_cost", b.max_cost))
            if v is not None and v <= 0]


class _Run:
    """One run_synthesis call: shared, read-only context for the workers plus the store."""

    def __init__(self, ws: Any, teacher: Any, sel: dict[str, Any], *, gt_mode: str, seed: int,
                 stop: threading.Event, matcher: TitleMatcher | None, retriever: CatalogRetriever | None,
                 relevance_threshold: float, score_batch: int,
                 query_attempts: int, n_candidates: int, n_choice: int = N_CHOICE_CANDIDATES):
        self.ws, self.teacher, self.sel = ws, teacher, sel
        self.gt_mode, self.seed, self.stop = gt_mode, seed, stop
        self.matcher, self.retriever = matcher, retriever
        self.relevance_threshold, self.score_batch = relevance_threshold, score_batch
        self.query_attempts, self.n_candidates = query_attempts, n_candidates
        self.n_choice = n_choice
        self.teacher_info = _teacher_info(teacher)

    def _seed_for(self, item_id: str, k: int, step: str) -> int:
        return random.Random(f"crs-synth-call|{self.seed}|{item_id}|{k}|{step}").randrange(2**31 - 1)

    def produce(self, plan: _ItemPlan, k: int) -> _Outcome:
        t0 = time.monotonic()
        out = _Outcome(plan.item_id, k, "ok")
        calls: list[dict[str, Any]] = []
        prompts: dict[str, Any] = {}

        def call(step: str, messages: list[dict[str, Any]], *, max_tokens: int, temperature: float | None = None,
                 salt: str, seed: int, schema: dict[str, Any] | None = None) -> Completion:
            params = {"max_tokens": max_tokens, "seed": seed, "cache_salt": salt}
            if temperature is not None:
                params["temperature"] = temperature
            if schema is not None:
                params["json_schema"] = schema.get("title") or True
            c = self.teacher.chat(messages, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                  cache_salt=salt, stop=self.stop, json_schema=schema)
            out.completions.append(c)
            calls.append(_call_record(step, messages, c, params))
            return c

        try:
            # 1. the query
            messages = build_query_messages(plan.templates, [r["text"] for r in plan.reviews])
            prompts["query"] = messages
            parsed = QueryParse(None, "no attempt")
            attempts = []
            asked = messages
            for attempt in range(self.query_attempts):
                if attempt:  # the refused reply and why, then the same request again
                    asked = messages + retry_messages(attempts[-1]["reply"], parsed.reason, plan.title)
                    prompts.setdefault("query_retries", []).append(asked[len(messages):])
                salt = f"synth-query:k{k}" + (f":retry{attempt}" if attempt else "")
                c = call("query", asked, max_tokens=QUERY_MAX_TOKENS, salt=salt,
                         seed=self._seed_for(plan.item_id, k, f"query{attempt}"), schema=QUERY_SCHEMA)
                parsed = parse_query_reply(c.text, reviews=[r["text"] for r in plan.reviews], templates=plan.templates,
                                           seed_title=plan.title)
                attempts.append({"reply": c.text, "flag": parsed.reason})
                if parsed.ok:
                    break
            if not parsed.ok:
                out.kind, out.reason = "flagged", f"query: {parsed.reason}"
                out.provenance = {"calls": calls, "attempts": attempts}
                return out
            query = parsed.query
            out.query = query
            # 2. the ground truth
            gt: dict[str, Any] = {"mode": self.gt_mode}
            if self.gt_mode == "llm":
                rmsg = build_recs_messages(query)
                prompts["ground_truth"] = rmsg
                titles: list[str] = []
                for attempt in range(2):
                    salt = f"synth-gt:k{k}" + (f":retry{attempt}" if attempt else "")
                    c = call("ground_truth", rmsg, max_tokens=RECS_MAX_TOKENS, salt=salt,
                             seed=self._seed_for(plan.item_id, k, f"gt{attempt}"), schema=TITLES_SCHEMA)
                    titles = parse_title_list(c.text, dedupe=False)
                    if titles:
                        break
                rows, stats = ground_titles(titles, self.matcher, N_GROUND_TRUTH)
                gt.update(stats)
                gt["seed_in_gt"] = any(r.item_id == plan.item_id for r in rows)
                if not rows:
                    out.kind, out.reason = "flagged", "ground truth: no titles in the teacher's reply"
            elif self.gt_mode == "choose":
                rows = self._choose(query, plan, k, call, prompts, gt)
                if not rows:
                    out.kind, out.reason = "flagged", f"ground truth: {gt.get('problem') or 'no candidate chosen'}"
            else:
                exclude = [plan.item_id] if _query_names_item(query, plan.title) else []
                n = N_GROUND_TRUTH if self.gt_mode == "retrieve" else self.n_candidates
                cands = self.retriever.search(query, plan.item_id, n, exclude)
                gt.update({"candidates": len(cands), "seed_excluded": bool(exclude),
                           "cooc_weight": self.retriever.cooc_weight, "encoder": self.retriever.embed.name})
                if self.gt_mode == "retrieve":
                    chosen = cands[:N_GROUND_TRUTH]
                    rows = [GroundedTitle(i, c_["title"], c_["item_id"], 1.0, False,
                                          f"retrieved: score {c_['score']:.3f} (cos {c_['sim']:.3f}"
                                          + (f", cooc {c_['cooc']:.3f})" if c_["cooc"] is not None else ")"))
                            for i, c_ in enumerate(chosen, 1)]
                else:
                    scored, rel_prompts, unparsed = self._score(query, cands, call, plan, k)
                    prompts["relevance"] = rel_prompts
                    keep = [c_ for c_ in cands if scored.get(c_["item_id"]) is not None
                            and scored[c_["item_id"]] >= self.relevance_threshold]
                    order = {c_["item_id"]: i for i, c_ in enumerate(cands)}
                    keep.sort(key=lambda c_: (-scored[c_["item_id"]], order[c_["item_id"]]))
                    chosen = keep[:N_GROUND_TRUTH]
                    rows = [GroundedTitle(i, c_["title"], c_["item_id"], 1.0, False,
                                          f"relevance {scored[c_['item_id']]:g}/4; retrieved #{order[c_['item_id']] + 1} "
                                          f"(score {c_['score']:.3f})")
                            for i, c_ in enumerate(chosen, 1)]
                    gt.update({"scored": sum(v is not None for v in scored.values()), "unscored": len(cands) - len(scored),
                               "unparsed_batches": unparsed, "threshold": self.relevance_threshold,
                               "scores": {c_["item_id"]: scored.get(c_["item_id"]) for c_ in cands}})
                    if not rows:
                        out.kind = "flagged"
                        out.reason = (f"ground truth: no candidate scored >= {self.relevance_threshold:g}"
                                      if not unparsed or len(scored) else "ground truth: no relevance reply could be read")
                gt.update({"listed": len(rows), "kept": len(rows), "matched": len(rows), "hallucinated": 0,
                           "grounding_rate": 1.0 if rows else 0.0, "seed_in_gt": any(r.item_id == plan.item_id for r in rows),
                           "retrieved": cands})
            out.rows = rows
            out.provenance = {
                "version": 1, "k": k, "seed": self.seed, "selection_id": self.sel["selection_id"],
                "selection_strategy": self.sel["strategy"], "unit": self.sel["unit"],
                "item": {"item_id": plan.item_id, "title": plan.title},
                "reviews": [{k_: r[k_] for k_ in ("review_id", "chars", "truncated", "picked")} for r in plan.reviews],
                "reviews_available": plan.reviews_available, "reviews_note": plan.note,
                "templates": plan.templates, "template_indices": plan.template_idx,
                "prompts": prompts, "teacher": self.teacher_info, "calls": calls,
                "query_attempts": attempts, "raw_query_reply": attempts[-1]["reply"] if attempts else None,
                "gt": gt,
            }
        except BudgetExceeded as exc:
            out.kind, out.reason = "budget", str(exc)
        except TeacherSetupError:
            raise
        except TeacherError as exc:
            out.kind = "cancelled" if exc.kind == "cancelled" else "failed"
            out.reason = str(exc)
        finally:
            out.seconds = time.monotonic() - t0
        tokens = {"prompt": sum(c["prompt_tokens"] for c in calls), "completion": sum(c["completion_tokens"] for c in calls)}
        if out.provenance:
            out.provenance["tokens"] = tokens
            out.provenance["cost"] = (sum(c["cost"] for c in calls if c["cost"] is not None)
                                      if any(c["cost"] is not None for c in calls) else None)
            out.provenance["seconds"] = round(out.seconds, 4)
        return out

    def _choose(self, query: str, plan: _ItemPlan, k: int, call: Callable[..., Completion],
                prompts: dict[str, Any], gt: dict[str, Any]) -> list[GroundedTitle]:
        """The teacher picks among the top ``n_choice`` retrieved items (the seed item always one
        of them): grounded by construction."""
        cands = self.retriever.search(query, plan.item_id, self.n_choice)
        if cands and not any(c_["item_id"] == plan.item_id for c_ in cands):
            seed = self.retriever.describe(plan.item_id)
            if seed is not None:
                cands = cands[:-1] + [seed]
        titles = [c_["title"] for c_ in cands]
        msgs = build_choice_messages(query, titles, N_GROUND_TRUTH)
        prompts["ground_truth"] = msgs
        schema = choice_schema(len(cands), min(N_GROUND_TRUTH, len(cands)))
        parsed = ChoiceParse((), reason="no candidates")
        for attempt in range(2 if cands else 0):
            salt = f"synth-choose:k{k}" + (f":retry{attempt}" if attempt else "")
            c = call("ground_truth", msgs, max_tokens=CHOICE_MAX_TOKENS, temperature=CHOICE_TEMPERATURE, salt=salt,
                     seed=self._seed_for(plan.item_id, k, f"choose{attempt}"), schema=schema)
            parsed = parse_choice_reply(c.text, titles, N_GROUND_TRUTH)
            if parsed.ok:
                break
        rows = []
        for rank, pos in enumerate(parsed.picks, 1):
            c_ = cands[pos]
            rows.append(GroundedTitle(rank, c_["title"], c_["item_id"], 1.0, False,
                                      f"chosen: candidate {pos + 1} of {len(cands)} (retrieval score {c_['score']:.3f})"))
        gt.update({
            "candidates": len(cands), "picked": len(rows), "out_of_range": parsed.out_of_range,
            "duplicates_removed": parsed.duplicates, "off_list": parsed.off_list, "truncated": parsed.truncated,
            "problem": parsed.reason, "cooc_weight": self.retriever.cooc_weight, "encoder": self.retriever.embed.name,
            "listed": len(rows), "kept": len(rows), "matched": len(rows), "hallucinated": 0,
            "grounding_rate": 1.0 if rows else 0.0, "seed_in_gt": any(r.item_id == plan.item_id for r in rows),
            # the picks are simply the first candidates in list order: the teacher did not choose
            # (small models do this; the ground truth is then the retrieval order)
            "positional": bool(rows) and list(parsed.picks) == list(range(len(parsed.picks))),
            "offered": [c_["item_id"] for c_ in cands],
        })
        return rows

    def _score(self, query: str, cands: list[dict[str, Any]], call: Callable[..., Completion], plan: _ItemPlan,
               k: int) -> tuple[dict[str, float | None], list[Any], int]:
        scored: dict[str, float | None] = {}
        prompts: list[Any] = []
        unparsed = 0
        for b in range(0, len(cands), self.score_batch):
            batch = cands[b:b + self.score_batch]
            titles = [c["title"] for c in batch]
            msgs = build_relevance_messages(query, titles)
            prompts.append(msgs)
            c = call("relevance", msgs, max_tokens=150 + 25 * len(batch), temperature=0.0,
                     salt=f"synth-rel:k{k}:b{b // self.score_batch}",
                     seed=self._seed_for(plan.item_id, k, f"rel{b}"), schema=score_schema(titles))
            parsed = parse_scores(c.text, titles)  # the augmentation step's parser: one reading of replies
            if parsed.unparsable:
                unparsed += 1
                continue
            for pos, score in parsed.scores.items():
                scored.setdefault(batch[pos]["item_id"], score)
        return scored, prompts, unparsed


@dataclass
class SynthSpec:
    """What a synthesis worker away from the workspace needs: picklable, with no workspace and
    no API key (a worker's key comes from its own environment)."""

    teacher_config: dict[str, Any]
    sel: dict[str, Any]
    gt_mode: str
    seed: int
    relevance_threshold: float
    score_batch: int
    query_attempts: int
    n_candidates: int
    n_choice: int
    limit: int  # teacher calls in flight per worker
    catalog: pd.DataFrame
    encoder: Any  # None: the project's MiniLM; else the encoder object run_synthesis was given
    cooc_weight: float
    item_matrix: np.ndarray | None  # the retriever's item vectors, as the driver computed them
    known_replies: dict[str, dict[str, Any]]  # the workspace's cache entries of this teacher


class SynthWorker:
    """Produces blocks of units away from the workspace with the same ``_Run`` as a local run
    (see ``crs_core.engines``): returns outcomes, writes nothing but its teacher cache."""

    def __init__(self, spec: SynthSpec, cache: Any):
        from .teacher import Teacher, TeacherConfig

        self.spec = spec
        self.teacher = Teacher(TeacherConfig.from_dict(spec.teacher_config), cache=cache)
        catalog = spec.catalog
        matcher = retriever = None
        if spec.gt_mode == "llm":
            matcher = TitleMatcher(zip(catalog["item_id"].astype(str), catalog["title"], catalog["year"]))
        else:
            retriever = CatalogRetriever(None, catalog, TextEncoder(None, spec.encoder), spec.cooc_weight,
                                         matrix=spec.item_matrix)
        self.run = _Run(None, self.teacher, spec.sel, gt_mode=spec.gt_mode, seed=spec.seed, stop=threading.Event(),
                        matcher=matcher, retriever=retriever, relevance_threshold=spec.relevance_threshold,
                        score_batch=spec.score_batch, query_attempts=spec.query_attempts,
                        n_candidates=spec.n_candidates, n_choice=spec.n_choice)

    def produce_block(self, payload: dict[str, Any], budget: Budget | None) -> list[_Outcome]:
        """The outcomes of ``payload['units']`` in unit order; the block stops early once the
        budget (its share of the run's) or a cancellation stops a unit."""
        self.teacher.set_budget(budget)
        if self.run.retriever is not None:
            self.run.retriever.remember_cooc(payload["cooc"])
        plans, units = payload["plans"], [tuple(u) for u in payload["units"]]
        halted: list[str] = []

        def produce(item_id: str, k: int) -> _Outcome:
            out = self.run.produce(plans[item_id], k)
            if out.kind in ("budget", "cancelled"):
                halted.append(out.kind)
            return out

        order = {u: i for i, u in enumerate(units)}
        outcomes = run_concurrently(produce, units, self.spec.limit, lambda: bool(halted))
        return sorted(outcomes, key=lambda o: order[(o.item_id, o.k)])


class _DuplicateIndex:
    """Earlier queries of the workspace: exact (normalised text) and near (embedding cosine)."""

    def __init__(self, ws: Any, embedder: TextEncoder | None, threshold: float = DUPLICATE_COSINE):
        self.embedder, self.threshold = embedder, threshold
        df = ws.df("SELECT query_id, query FROM synthetic_queries ORDER BY created_at, query_id")
        self.ids: list[str] = [str(x) for x in df["query_id"]]
        self.by_norm: dict[str, str] = {}
        for qid, q in zip(self.ids, df["query"]):
            self.by_norm.setdefault(normalize_query(q), qid)
        self.matrix = None
        if embedder is not None and self.ids:
            self.matrix = embedder([str(q) for q in df["query"]])

    def check(self, query: str) -> tuple[str | None, str | None, float | None, np.ndarray | None]:
        norm = normalize_query(query)
        vec = self.embedder([query])[0] if self.embedder is not None else None
        if norm in self.by_norm:
            return self.by_norm[norm], "text", 1.0, vec
        if vec is not None and self.matrix is not None and len(self.matrix):
            sims = self.matrix @ vec
            best = int(np.argmax(sims))
            if sims[best] >= self.threshold:
                return self.ids[best], "embedding", float(sims[best]), vec
        return None, None, None, vec

    def add(self, qid: str, query: str, vec: np.ndarray | None) -> None:
        self.ids.append(qid)
        self.by_norm.setdefault(normalize_query(query), qid)
        if vec is not None:
            self.matrix = vec[None, :] if self.matrix is None else np.vstack([self.matrix, vec[None, :]])


def _store(ws: Any, sel_id: str, gt_mode: str, out: _Outcome, dup: _DuplicateIndex,
           created_by: str) -> tuple[str, bool, str | None]:
    """Insert the query and its ground truth in one transaction.
    Returns (query_id, stored?, the earlier query it duplicates or None)."""
    qid = query_id_for(sel_id, out.item_id, out.k)
    dup_of, how, cos, vec = dup.check(out.query)
    prov = dict(out.provenance)
    prov["duplicate_of"] = dup_of
    if dup_of is not None:
        prov["duplicate_by"] = how
        prov["duplicate_cosine"] = None if cos is None else round(cos, 4)
    with ws.transaction() as cur:
        if cur.execute("SELECT 1 FROM synthetic_queries WHERE query_id = ?", [qid]).fetchone():
            return qid, False, None  # another run stored it meanwhile
        cur.execute(
            "INSERT INTO synthetic_queries (query_id, selection_id, item_id, query, provenance, gt_mode, status, version, "
            "created_by) VALUES (?, ?, ?, ?, ?, ?, 'pending', 1, ?)",
            [qid, sel_id, out.item_id, out.query, json.dumps(prov, ensure_ascii=False, default=str), gt_mode,
             created_by],
        )
        if out.rows:
            cur.executemany(
                "INSERT INTO ground_truth (query_id, rank, title_raw, item_id, match_score, flagged, note) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [[qid, r.rank, r.title_raw, r.item_id, r.match_score, r.flagged, r.note] for r in out.rows],
            )
    dup.add(qid, out.query, vec)
    return qid, True, dup_of


def synthesis_progress(ws: Any, selection_id: str, k_queries: int = 1, items_limit: int | None = None) -> dict[str, int]:
    """How many (item, k) units of a selection are planned and already stored (for resume UIs)."""
    sel = _selection(ws, selection_id)
    items, _, _ = _selection_items(ws, sel)
    if items_limit is not None:
        items = items[: max(0, int(items_limit))]
    ids = [query_id_for(selection_id, i, k) for i in items for k in range(1, k_queries + 1)]
    done = 0
    for c in range(0, len(ids), 500):
        chunk = ids[c:c + 500]
        done += int(ws.scalar(f"SELECT count(*) FROM synthetic_queries WHERE query_id IN ({','.join('?' * len(chunk))})", chunk) or 0)
    return {"items": len(items), "planned": len(ids), "done": done}


def run_synthesis(
    ws: Any,
    selection_id: str,
    teacher: Any,
    *,
    k_queries: int = 1,
    gt_mode: str = DEFAULT_GT_MODE,
    items_limit: int | None = None,
    budget: Budget | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    stop_event: threading.Event | None = None,
    templates: Sequence[str] | None = None,
    encoder: Any = None,
    concurrency: int | None = None,
    cooc_weight: float = DEFAULT_COOC_WEIGHT,
    relevance_threshold: float = DEFAULT_RELEVANCE_THRESHOLD,
    score_batch: int = DEFAULT_SCORE_BATCH,
    n_candidates: int = N_CANDIDATES,
    n_choice: int = N_CHOICE_CANDIDATES,
    query_attempts: int = 3,
    n_templates: int = SAMPLE_SIZE,
    n_reviews: int = N_REVIEWS,
    max_review_chars: int = MAX_REVIEW_CHARS,
    dedup_embeddings: bool = True,
    engine: Any = None,
) -> SynthReport:
    """Algorithm 2 over a selection; see the module docstring.

    budget: replaces the teacher's budget for this run (counted from now); None keeps the
    teacher's own. A budget of 0 raises SynthesisBudgetError before anything happens; a budget
    that runs out stops the run (``report.stopped``), keeping every query finished so far.
    stop_event: checked between queries (and during the teacher's retry waits).
    encoder: an object with ``.encode(texts) -> array`` (and ``.name``) for retrieval and
    near-duplicate detection; None = the project's MiniLM (via crs_core.embed when present).
    dedup_embeddings: False = exact-text duplicates only (no encoder needed in 'llm' mode).
    concurrency: queries in flight at once (None: the teacher's default, 1 for the local model);
    with the ray engine, per worker.
    engine: where the queries are produced (``crs_core.engines``; None: in this process). This
    process stores them either way, each as its block finishes.
    """
    t_start = time.monotonic()
    if gt_mode not in GT_MODES:
        raise SynthesisError(f"unknown ground-truth mode {gt_mode!r}; use one of {', '.join(GT_MODES)}")
    if int(k_queries) < 1:
        raise SynthesisError(f"k_queries must be at least 1, got {k_queries}")
    if items_limit is not None and int(items_limit) < 0:
        raise SynthesisError(f"items_limit must be >= 0, got {items_limit}")
    if score_batch < 1 or n_candidates < 1 or query_attempts < 1 or n_choice < 1:
        raise SynthesisError("score_batch, n_candidates, n_choice and query_attempts must be at least 1")
    k_queries = int(k_queries)
    zero = _budget_is_zero(budget) or (_budget_is_zero(teacher.budget) if budget is None else [])
    if zero:
        raise SynthesisBudgetError(
            f"the budget is 0 ({', '.join(z + ' = 0' for z in zero)}): no teacher call can be made, so nothing "
            "is synthesized; raise the budget")
    sel = _selection(ws, selection_id)
    items, picked_reviews, notes = _selection_items(ws, sel)
    if items_limit is not None:
        items = items[: int(items_limit)]
    templates = list(templates) if templates is not None else load_templates()
    from .style_templates import validate_templates

    templates = validate_templates(templates)
    rep = SynthReport(selection_id=selection_id, gt_mode=gt_mode, k_queries=k_queries, items=len(items))
    rep.notes.extend(notes)
    if budget is not None:
        teacher.set_budget(budget)

    # what is already done
    done_ids: set[str] = set()
    if items:
        rows = ws.cursor().execute(
            "SELECT query_id FROM synthetic_queries WHERE selection_id = ?", [selection_id]).fetchall()
        done_ids = {str(r[0]) for r in rows}
    units: list[tuple[str, int]] = []
    for item in items:
        for k in range(1, k_queries + 1):
            if query_id_for(selection_id, item, k) in done_ids:
                rep.skipped_existing += 1
            else:
                units.append((item, k))
    rep.planned = len(items) * k_queries
    total = rep.planned
    done_count = rep.skipped_existing
    _report(progress, done_count, total)
    if not units:
        rep.seconds = time.monotonic() - t_start
        return rep

    catalog = ws.df("SELECT item_id, title, year, genres, plot, cast_names FROM items")
    catalog["year"] = [None if pd.isna(y) else int(y) for y in catalog["year"]]
    info = {str(r["item_id"]): r for r in catalog.to_dict("records")}
    need_embed = gt_mode != "llm" or dedup_embeddings
    embedder = TextEncoder(ws, encoder) if need_embed and encoder is not False else None
    if gt_mode != "llm" and embedder is None:
        raise SynthesisError(f"ground-truth mode {gt_mode!r} needs an encoder")
    matcher = TitleMatcher(zip(catalog["item_id"].astype(str), catalog["title"], catalog["year"])) if gt_mode == "llm" else None
    retriever = CatalogRetriever(ws, catalog, embedder, cooc_weight) if gt_mode != "llm" else None
    dup = _DuplicateIndex(ws, embedder if dedup_embeddings else None)

    user_stop = stop_event or threading.Event()  # the teacher's retry waits end when it is set
    run = _Run(ws, teacher, sel, gt_mode=gt_mode, seed=seed, stop=user_stop, matcher=matcher, retriever=retriever,
               relevance_threshold=relevance_threshold, score_batch=score_batch,
               query_attempts=query_attempts, n_candidates=n_candidates, n_choice=n_choice)
    plans: dict[str, _ItemPlan] = {}
    no_reviews: set[str] = set()

    def plan_for(item_id: str) -> _ItemPlan:
        if item_id not in plans:
            plans[item_id] = _plan_item(ws, item_id, str(info[item_id]["title"]), templates,
                                        picked_reviews.get(item_id, []), seed, n_templates, n_reviews, max_review_chars)
        return plans[item_id]

    consecutive_failures = 0

    def should_stop() -> bool:
        if user_stop.is_set() and rep.stopped is None:
            rep.stopped = "stopped by the user"
        return rep.stopped is not None

    created_by = acting_name()  # read here: the calls' callbacks may run in other threads

    def handle(out: _Outcome) -> None:
        nonlocal consecutive_failures, done_count
        for c in out.completions:
            if c.cached:
                rep.cached_hits += 1
            else:
                rep.calls += 1
                rep.prompt_tokens += c.prompt_tokens
                rep.completion_tokens += c.completion_tokens
                rep.cost += c.cost or 0.0
                rep.teacher_seconds += c.seconds
        if out.kind == "ok":
            consecutive_failures = 0
            qid, stored, dup_of = _store(ws, selection_id, gt_mode, out, dup, created_by)
            if stored:
                rep.stored += 1
                rep.query_ids.append(qid)
                rep.gt_rows += len(out.rows)
                rep.gt_matched += sum(1 for r in out.rows if r.item_id is not None)
                rep.gt_hallucinated += sum(1 for r in out.rows if r.flagged)
                rep.duplicates += int(dup_of is not None)
            else:
                rep.skipped_existing += 1
        elif out.kind == "flagged":
            consecutive_failures = 0
            rep.flagged_replies += 1
            replies = [c.text for c in out.completions]
            attempts = out.provenance.get("attempts") or out.provenance.get("query_attempts") or []
            rep.flagged.append({"item_id": out.item_id, "k": out.k, "reason": out.reason,
                                "reply": (replies[-1] if replies else "")[:300],
                                "query_attempts": [{"reply": str(a.get("reply") or "")[:300], "flag": a.get("flag")}
                                                   for a in attempts]})
        elif out.kind == "budget":
            if rep.stopped is None:
                rep.stopped = f"budget: {out.reason}"
        elif out.kind == "cancelled":
            if rep.stopped is None:
                rep.stopped = "stopped by the user"
        else:
            rep.failed += 1
            consecutive_failures += 1
            rep.errors.append(f"{out.item_id} k={out.k}: {out.reason}")
            if consecutive_failures >= MAX_CONSECUTIVE_FAILURES and rep.stopped is None:
                rep.stopped = f"the teacher failed {consecutive_failures} times in a row; last error: {out.reason}"
        if out.kind in ("ok", "flagged", "failed"):
            done_count += 1
        _report(progress, done_count, total)

    def produce(item_id: str, k: int) -> _Outcome:
        return run.produce(plan_for(item_id), k)

    # items without usable reviews cannot be turned into queries
    runnable: list[tuple[str, int]] = []
    for item_id, k in units:
        p = plan_for(item_id)
        if not p.reviews:
            if item_id not in no_reviews:
                no_reviews.add(item_id)
                rep.items_without_reviews += 1
                rep.notes.append(f"item {item_id} ({p.title}) has no usable review; skipped")
            done_count += 1
            continue
        runnable.append((item_id, k))
    _report(progress, done_count, total)

    limit = max(1, int(concurrency or teacher.config.default_concurrency))
    spool = spool_folder(ws.path, f"synth|{selection_id}")
    budget_at_start = teacher.budget

    def spec() -> SynthSpec:
        if teacher.config.api_key is not None:
            raise EngineError("a remote engine's workers never receive a typed API key: give them the key in their "
                              "environment ($OPENAI_API_KEY with $CRS_TEACHER_BASE_URL), or use the local engine")
        if teacher.provider.free:
            raise EngineError(f"the {teacher.config.provider} teacher runs on this machine; a remote engine needs an "
                              "endpoint its workers can reach (--base-url, e.g. a vLLM server)")
        from .teacher.cache import WorkspaceCache

        return SynthSpec(teacher.config.to_dict(), sel, gt_mode, seed, relevance_threshold, score_batch,
                         query_attempts, n_candidates, n_choice, limit, catalog,
                         None if encoder is False else encoder, cooc_weight,
                         None if retriever is None else retriever.matrix,
                         WorkspaceCache(ws).entries_for(teacher.config.provider, teacher.model))

    def payload(block: list[tuple[str, int]]) -> dict[str, Any]:
        items = list(dict.fromkeys(i for i, _ in block))
        cooc = {i: retriever.cooc(i) for i in items} if retriever is not None and retriever.cooc_weight > 0 else {}
        return {"units": block, "plans": {i: plan_for(i) for i in items}, "cooc": cooc}

    def remaining() -> Budget | None:
        b = budget_at_start
        if b is None or (b.max_calls is None and b.max_tokens is None and b.max_cost is None):
            return None
        tokens = rep.prompt_tokens + rep.completion_tokens
        return Budget(max_calls=None if b.max_calls is None else max(0, b.max_calls - rep.calls),
                      max_tokens=None if b.max_tokens is None else max(0, b.max_tokens - tokens),
                      max_cost=None if b.max_cost is None else max(0.0, b.max_cost - rep.cost))

    def commit_replies(entries: list[tuple[str, dict[str, Any]]]) -> None:
        from .teacher.cache import import_cache_entries

        if entries:
            import_cache_entries(ws, entries)

    runner = engine if engine is not None else get_engine()
    try:
        runner.synthesize(SynthWork(runnable, limit, produce, handle, should_stop, spec, payload, commit_replies,
                                    remaining, spool))
        should_stop()
        if rep.stopped is None:
            remove_spool(spool)  # every reply is in the workspace now
    finally:
        rep.seconds = time.monotonic() - t_start
        _note_interrupted(rep, teacher)
    return rep


def _note_interrupted(rep: SynthReport, teacher: Any) -> None:
    """Requests a killed earlier run left in flight, and how many this run sent again."""
    count = getattr(teacher, "interrupted_calls", None)
    rep.interrupted = int(count()) if count is not None else 0
    rep.resent = int(getattr(teacher.tally(), "resent", 0)) if rep.interrupted else 0

