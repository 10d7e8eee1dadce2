"""Label augmentation's inputs: constants, errors, the dialogue turns and catalogue items it works
on, dense retrieval of candidates, and the scoring prompt's rendering. Used through
`crs_core.augment`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .embed import TextEncoder
from .errors import CRSError
from .llm_output import json_list
from .progress import ProgressFn, report, scaled
from .prompts import RELEVANCE_PROMPT


if TYPE_CHECKING:  # pragma: no cover
    from .store import Workspace



# ----------------------------------------------------------------------------- constants

SCORERS = ("teacher", "distilled", "similarity")
DEFAULT_TOP_N = 50
DEFAULT_THRESHOLD = 3.5
DEFAULT_TEACHER_PAIRS = 300
DEFAULT_SCORE_BATCH = 10
PAIRS_PER_TURN = 5          # distillation: candidates of one turn scored per teacher call
HOLDOUT_SHARE = 0.2         # distillation: share of sampled turns held out for the agreement
SCORE_TEMPERATURE = 0.0
RETRY_TEMPERATURE = 0.7
PROMPT_TURNS = 6
PROMPT_MAX_CHARS = 1200     # keeps a 10-candidate prompt + answer inside a 2,048-token context
BRIEF_MAX_CHARS = 160       # plot opening shown next to a candidate in the scoring prompt
HEAD_SHARE = 0.2
PAPER_TAIL_MENTIONS = 4     # the paper's long-tail rule: mentioned fewer than 4 times
HIST_BIN = 0.5
RENDER_VERSION = "v1: 'User:/Recommender:' lines; '1. Title (Year) — genres; plot opening'"
SYNTHETIC_DATASETS: dict[str, tuple[str, ...]] = {
    "synthetic": ("approved",),
    "synthetic:approved": ("approved",),
    "synthetic:all": ("approved", "pending"),
}
META_PREFIX = "augment:"

PROMPT_HASH = hashlib.sha256(f"{RELEVANCE_PROMPT}\n{RENDER_VERSION}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- errors


class AugmentError(CRSError):
    """Augmentation cannot run as asked (unknown dataset, bad parameters, nothing to score)."""


class NothingKeptError(AugmentError):
    """No pair reached the threshold: nothing was stored, earlier labels are kept."""


class AugmentIncomplete(AugmentError):
    """The run did not finish (teacher failures, budget, cancel): nothing was stored."""


# ----------------------------------------------------------------------------- turns


@dataclass(frozen=True)
class AugTurn:
    turn_id: str
    context: tuple[str, ...]        # utterances, oldest first
    positives: tuple[str, ...]      # the turn's own ground-truth catalog items
    mentioned: frozenset[str]       # items mentioned earlier (never candidates)




def _utterances(context: Sequence[Any]) -> tuple[str, ...]:
    return tuple(" ".join(str(u).split()) for u in context if u is not None and str(u).strip())


def _datasets(ws: "Workspace") -> list[str]:
    return [str(d) for d in ws.df("SELECT DISTINCT dataset FROM dialogue_turns ORDER BY dataset")["dataset"]]


def load_turns(ws: "Workspace", dataset: str, *, limit_turns: int | None = None,
               allow_test: bool = False) -> tuple[list[AugTurn], dict[str, int]]:
    """The turns of a dataset to augment, in a fixed order, and counts of what was skipped.

    Positives are catalog items only; turns without any non-empty utterance are skipped
    (``turns_without_context``). ``limit_turns`` keeps the first usable turns."""
    if limit_turns is not None and limit_turns < 1:
        raise AugmentError(f"limit_turns must be >= 1, got {limit_turns}")
    catalog = set(ws.df("SELECT item_id FROM items")["item_id"].astype(str))
    stats = {"turns_total": 0, "turns_without_context": 0, "turns_without_positives": 0}
    rows: list[tuple[str, list, list, list]] = []
    if dataset in SYNTHETIC_DATASETS:
        statuses = SYNTHETIC_DATASETS[dataset]
        df = ws.df(
            "SELECT q.query_id, q.query, g.item_id FROM synthetic_queries q "
            "LEFT JOIN ground_truth g ON g.query_id = q.query_id AND NOT g.flagged AND g.item_id IS NOT NULL "
            f"WHERE q.status IN ({', '.join('?' * len(statuses))}) "
            "ORDER BY q.created_at, q.query_id, g.rank", list(statuses))
        for qid, group in df.groupby("query_id", sort=False):
            rows.append((str(qid), [group["query"].iloc[0]], list(group["item_id"].dropna()), []))
        if not rows:
            raise AugmentError(
                f"no {'/'.join(statuses)} synthetic queries in the workspace; synthesize and review some first")
    else:
        if dataset.endswith("_test") and not allow_test:
            raise AugmentError(
                f"{dataset!r} is a test split: its labels are what evaluation measures, so it is not "
                "augmented (pass allow_test=True to do it anyway)")
        df = ws.df("SELECT turn_id, context, rec_items, mentioned_items FROM dialogue_turns "
                   "WHERE dataset = ? ORDER BY dialog_id, turn_id", [dataset])
        if df.empty:
            known = _datasets(ws)
            raise AugmentError(
                f"dataset {dataset!r} has no dialogue turns in the workspace; known: "
                f"{', '.join(known + list(SYNTHETIC_DATASETS)) or 'none'}")
        for r in df.itertuples(index=False):
            rows.append((str(r.turn_id), json_list(r.context), json_list(r.rec_items),
                         json_list(r.mentioned_items)))
    turns: list[AugTurn] = []
    for turn_id, context, rec, mentioned in rows:
        stats["turns_total"] += 1
        utts = _utterances(context)
        if not utts:
            stats["turns_without_context"] += 1
            continue
        if limit_turns is not None and len(turns) >= limit_turns:
            continue
        ment = frozenset(str(x) for x in mentioned)
        pos = tuple(str(x) for x in dict.fromkeys(rec) if str(x) in catalog and str(x) not in ment)
        if not pos:
            stats["turns_without_positives"] += 1
        turns.append(AugTurn(turn_id, utts, pos, ment))
    stats["turns_used"] = len(turns)
    if not turns:
        raise AugmentError(f"dataset {dataset!r} has no turn with a dialogue context to augment")
    return turns, stats


# ----------------------------------------------------------------------------- items


@dataclass
class ItemPool:
    """Catalog items that can be retrieved (they have text beyond a title)."""

    item_ids: list[str]
    texts: list[str]                # encoder text (catalog.item_text)
    displays: list[str]             # "Title (Year)"
    briefs: list[str]               # "genres; plot opening" for the scoring prompt
    index: dict[str, int]
    catalog_ids: set[str]           # every catalog item, with or without text
    items_without_text: int
    interaction_users: dict[str, int]


def _clean(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _brief(genres: str, plot: str) -> str:
    parts = []
    if genres:
        parts.append(", ".join(g for g in genres.split("|") if g))
    if plot:
        p = " ".join(plot.split())
        if len(p) > BRIEF_MAX_CHARS:
            cut = p[:BRIEF_MAX_CHARS].rsplit(" ", 1)[0]
            p = cut.rstrip(",;:") + "…"
        parts.append(p)
    return "; ".join(parts)


def load_item_pool(ws: "Workspace") -> ItemPool:
    from .catalog import display_title, item_text

    items = ws.df("SELECT item_id, title, year, genres, plot, directors, cast_names FROM items ORDER BY item_id")
    if items.empty:
        raise AugmentError("the workspace has no items; import a catalog first")
    ids, texts, displays, briefs = [], [], [], []
    without = 0
    for r in items.to_dict("records"):
        title = _clean(r["title"])
        fields_ = {k: _clean(r[k]) for k in ("genres", "plot", "directors", "cast_names")}
        if not title or not any(fields_.values()):
            without += 1
            continue
        year = r["year"] if r["year"] is not None and not pd.isna(r["year"]) else None
        row = {"title": title, "year": int(year) if year is not None else None, **fields_}
        ids.append(str(r["item_id"]))
        texts.append(item_text(row))
        displays.append(display_title(title, year))
        briefs.append(_brief(fields_["genres"], fields_["plot"]))
    users = ws.df("SELECT item_id, count(DISTINCT user_id) AS n FROM interactions GROUP BY item_id")
    return ItemPool(ids, texts, displays, briefs, {i: k for k, i in enumerate(ids)},
                    set(items["item_id"].astype(str)), without,
                    dict(zip(users["item_id"].astype(str), users["n"].astype(int))))


# ----------------------------------------------------------------------------- retrieval


@dataclass
class Retrieval:
    """Top-n candidates per turn (mentioned items excluded), best first, plus the positives."""

    turns: list[AugTurn]
    pool: ItemPool
    encoder_name: str
    top_n: int
    retrieved: list[list[str]]      # per turn: retrieved item ids, best first
    sims: list[np.ndarray]          # per turn: their cosines
    ctx_vecs: np.ndarray            # (T, d) context embeddings
    item_vecs: np.ndarray           # (N, d) pool item embeddings

    def candidates(self, i: int) -> list[dict[str, Any]]:
        """Turn i's candidate list: the retrieved items (rank 1..n) with positives flagged, then
        positives that were not retrieved (rank None)."""
        pos = set(self.turns[i].positives)
        out = [{"item_id": it, "rank": r + 1, "similarity": float(s), "positive": it in pos}
               for r, (it, s) in enumerate(zip(self.retrieved[i], self.sims[i]))]
        got = set(self.retrieved[i])
        out += [{"item_id": p, "rank": None, "similarity": None, "positive": True}
                for p in self.turns[i].positives if p not in got]
        return out

    def to_score(self, i: int) -> list[tuple[int, str, float]]:
        """(rank, item_id, cosine) of turn i's retrieved non-positive candidates."""
        pos = set(self.turns[i].positives)
        return [(r + 1, it, float(s)) for r, (it, s) in enumerate(zip(self.retrieved[i], self.sims[i]))
                if it not in pos]

    @property
    def positives_retrieved(self) -> int:
        return sum(len(set(t.positives) & set(r)) for t, r in zip(self.turns, self.retrieved))

    @property
    def positives_total(self) -> int:
        return sum(len(t.positives) for t in self.turns)


def _retrieve(turns: list[AugTurn], pool: ItemPool, embed: TextEncoder, top_n: int,
              progress: ProgressFn | None = None) -> Retrieval:
    from .recommenders import CONTEXT_MAX_CHARS, CONTEXT_TURNS, context_text

    if top_n < 1:
        raise AugmentError(f"top_n must be >= 1, got {top_n}")
    if not pool.item_ids:
        raise AugmentError("no catalog item has text (genres, plot, cast or directors) to retrieve")
    item_vecs = embed(pool.texts, scaled(progress, 0.0, 0.8))
    ctx_texts = [context_text(list(t.context), CONTEXT_TURNS, CONTEXT_MAX_CHARS) for t in turns]
    ctx_vecs = embed(ctx_texts, scaled(progress, 0.8, 0.9))
    retrieved: list[list[str]] = []
    sims: list[np.ndarray] = []
    ids = np.asarray(pool.item_ids, dtype=object)
    step = 256
    for start in range(0, len(turns), step):
        block = ctx_vecs[start:start + step] @ item_vecs.T          # (b, N)
        for r, turn in enumerate(turns[start:start + step]):
            row = block[r].astype(np.float64)
            excl = [pool.index[m] for m in turn.mentioned if m in pool.index]
            if excl:
                row[excl] = -np.inf
            k = min(top_n, int(np.isfinite(row).sum()))
            if k <= 0:
                retrieved.append([])
                sims.append(np.zeros(0))
                continue
            part = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
            order = part[np.lexsort((part, -row[part]))]            # score desc, then catalog order
            order = order[np.isfinite(row[order])][:k]
            retrieved.append(ids[order].tolist())
            sims.append(row[order])
        report(scaled(progress, 0.9, 1.0), min(start + step, len(turns)), len(turns))
    return Retrieval(turns, pool, embed.name, top_n, retrieved, sims, ctx_vecs, item_vecs)


def retrieve_candidates(ws: "Workspace", dataset: str, *, top_n: int = DEFAULT_TOP_N,
                        limit_turns: int | None = None, encoder: Any = None, allow_test: bool = False,
                        progress: ProgressFn | None = None) -> Retrieval:
    """Step 1 alone: the top-n candidates of each usable turn of ``dataset``."""
    turns, _ = load_turns(ws, dataset, limit_turns=limit_turns, allow_test=allow_test)
    return _retrieve(turns, load_item_pool(ws), TextEncoder(ws, encoder), top_n, progress)


# ----------------------------------------------------------------------------- prompts


def render_dialogue(context: Sequence[str], *, max_turns: int = PROMPT_TURNS,
                    max_chars: int = PROMPT_MAX_CHARS) -> str:
    """'User: ...' / 'Recommender: ...' lines of the last ``max_turns`` utterances; the last
    utterance is the user's, speakers alternate backwards. Older lines are dropped to stay
    within ``max_chars``; a too-long latest utterance keeps its end."""
    utts = list(_utterances(context))[-max_turns:] if max_turns > 0 else list(_utterances(context))
    lines: list[str] = []
    used = 0
    for back, utt in enumerate(reversed(utts)):
        line = ("User: " if back % 2 == 0 else "Recommender: ") + utt
        if lines and used + len(line) + 1 > max_chars:
            break
        if not lines and len(line) > max_chars:
            head = "User: "
            tail = utt[-(max_chars - len(head) - 1):]
            cut = tail.find(" ")
            line = head + "…" + (tail[cut + 1:] if 0 <= cut < 40 else tail)
        lines.append(line)
        used += len(line) + 1
    return "\n".join(reversed(lines))


def render_candidate(display: str, brief: str = "") -> str:
    return f"{display} — {brief}" if brief else display


def build_scoring_messages(context: Sequence[str] | str, candidates: Sequence[str]) -> list[dict[str, str]]:
    """The paper's relevance prompt for one dialogue and a numbered list of candidates."""
    ctx = render_dialogue([context] if isinstance(context, str) else list(context))
    rec = "\n".join(f"{i}. {c}" for i, c in enumerate(candidates, 1))
    before, rest = RELEVANCE_PROMPT.split("{context}")
    middle, after = rest.split("{rec}")
    return [{"role": "user", "content": before + ctx + middle + rec + after}]
