"""Offline evaluation of conversational recommenders (Recall@k / NDCG@k, He et al. 2023).

Protocol (as in "Large Language Models as Zero-Shot Conversational Recommenders", He et al.,
CIKM 2023, which both papers follow):

- Every recommendation turn of a test set (ReDial: 3,552 turns, INSPIRED: 228) is one sample:
  the recommender sees the dialogue context before the turn and returns a ranked list of
  items from the dataset's own item set (ReDial's / INSPIRED's movies; a generative model's
  titles are mapped to the catalog first, unmatched titles are dropped, a duplicate keeps its
  first position).
- Items already mentioned earlier in the dialogue are removed from both the turn's labels and
  the ranked list. A turn whose labels are all such repeats is skipped and counted (as is a
  turn none of whose labels could be matched to the catalog at import).
- Per turn: Recall@k = |labels in the top k| / |labels| for k in 1, 5, 10, 20, 50, and
  NDCG@k (binary relevance, ideal DCG over min(k, |labels|) hits) for k in 5, 10, 20.
- Reported: the mean over turns and its standard error (sample std / sqrt(n)) per dataset.
  Slow generative models may use a fixed, seeded random subsample of the turns.

Results are stored as runs (`runs` + `metrics` tables) so that runs can be compared.
`check_no_test_leakage` guards training data against copies of test dialogues.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import math
import re
import unicodedata
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .accounts import acting_name
from .errors import CRSError
from .llm_output import json_list
from .progress import ProgressFn, report

if TYPE_CHECKING:  # pragma: no cover
    from .store import Workspace
    from .titles import TitleMatcher

__all__ = [
    "RECALL_KS",
    "NDCG_KS",
    "EvalError",
    "LeakageError",
    "TurnResult",
    "EvalResult",
    "EvalTurn",
    "recall_at_k",
    "ndcg_at_k",
    "turn_metrics",
    "aggregate",
    "titles_to_item_ids",
    "load_eval_turns",
    "sample_turns",
    "evaluate",
    "evaluate_rankings",
    "candidate_items",
    "store_run",
    "metrics_frame",
    "check_no_test_leakage",
    "find_test_leaks",
    "normalize_utterance",
]

RECALL_KS: tuple[int, ...] = (1, 5, 10, 20, 50)
NDCG_KS: tuple[int, ...] = (5, 10, 20)
DEFAULT_BATCH = 256


class EvalError(CRSError):
    """The evaluation cannot run as asked (unknown dataset, k larger than the catalog, ...)."""


class LeakageError(CRSError):
    """Training data contains (copies of) test dialogues; training on it would inflate results."""

    def __init__(self, message: str, leaks: list[dict] | None = None):
        super().__init__(message)
        self.leaks = leaks or []


# ----------------------------------------------------------------------------- metrics


def _positions(ranked: Sequence[str], labels: set[str], k: int) -> list[int]:
    """1-based positions of label items within the top k of `ranked`."""
    return [i + 1 for i, item in enumerate(ranked[:k]) if item in labels]


def recall_at_k(ranked: Sequence[str], labels: Iterable[str], k: int) -> float:
    """|labels in the top k| / |labels| (labels and ranked must already exclude mentioned items)."""
    labels = set(labels)
    if not labels:
        raise ValueError("recall is undefined for an empty label set")
    return len(_positions(ranked, labels, k)) / len(labels)


def ndcg_at_k(ranked: Sequence[str], labels: Iterable[str], k: int) -> float:
    """Binary-relevance NDCG@k; the ideal DCG has min(k, |labels|) hits at the top."""
    labels = set(labels)
    if not labels:
        raise ValueError("NDCG is undefined for an empty label set")
    dcg = sum(1.0 / math.log2(p + 1) for p in _positions(ranked, labels, k))
    idcg = sum(1.0 / math.log2(p + 1) for p in range(1, min(k, len(labels)) + 1))
    return dcg / idcg


def _metric_names(k_max: int) -> list[str]:
    return [f"recall@{k}" for k in RECALL_KS if k <= k_max] + [
        f"ndcg@{k}" for k in NDCG_KS if k <= k_max
    ]


def _clean_ranking(ranked: Iterable[str], exclude: set[str], k: int,
                   catalog: set[str] | None = None) -> list[str]:
    """Drop excluded / unknown / duplicate ids (first occurrence wins), keep the top k."""
    out: list[str] = []
    seen: set[str] = set()
    for item in ranked:
        if item is None:
            continue
        item = str(item)
        if item in seen or item in exclude or (catalog is not None and item not in catalog):
            continue
        seen.add(item)
        out.append(item)
        if len(out) >= k:
            break
    return out


def turn_metrics(ranked: Sequence[str], labels: Iterable[str], mentioned: Iterable[str] = (),
                 *, k_max: int = 50) -> dict[str, float] | None:
    """All metrics of one turn under the protocol, or None when the turn is skipped.

    Mentioned items are removed from the labels and from the ranking (later items move up).
    """
    mentioned = set(mentioned)
    label_set = set(labels) - mentioned
    if not label_set:
        return None
    clean = _clean_ranking(ranked, mentioned, k_max)
    out: dict[str, float] = {}
    for name in _metric_names(k_max):
        kind, k = name.split("@")
        fn = recall_at_k if kind == "recall" else ndcg_at_k
        out[name] = fn(clean, label_set, int(k))
    return out


def aggregate(per_turn: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and standard error (sample std / sqrt(n); NaN when n < 2) of each metric."""
    if not per_turn:
        return {}
    out: dict[str, tuple[float, float]] = {}
    for name in per_turn[0]:
        values = np.asarray([m[name] for m in per_turn], dtype=np.float64)
        n = len(values)
        stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        out[name] = (float(values.mean()), stderr)
    return out


def titles_to_item_ids(titles: Iterable[str], matcher: "TitleMatcher") -> list[str]:
    """Map a generative model's ranked titles to catalog ids: unmatched titles are dropped,
    a duplicate after mapping keeps its first position."""
    out: list[str] = []
    seen: set[str] = set()
    for title in titles:
        if not title or not str(title).strip():
            continue
        hit = matcher.match(str(title))
        if hit is None or hit.item_id in seen:
            continue
        seen.add(hit.item_id)
        out.append(hit.item_id)
    return out


# ----------------------------------------------------------------------------- results


@dataclass
class TurnResult:
    """One evaluated turn, for the app's drill-down."""

    turn_id: str
    dialog_id: str
    labels: list[str]          # rec_items minus mentioned items
    ranked: list[str]          # top-k_max after removing mentioned items
    hit_ranks: list[int]       # 1-based positions of labels in `ranked`
    metrics: dict[str, float]

    @property
    def hits(self) -> list[str]:
        return [self.ranked[p - 1] for p in self.hit_ranks]


@dataclass
class EvalResult:
    """Metrics of one recommender on one dataset."""

    dataset: str
    recommender: str
    metrics: dict[str, tuple[float, float]]   # name -> (mean, stderr)
    n_turns: int                              # turns evaluated
    n_skipped: int                            # turns left without labels (see skipped_reasons)
    n_total: int                              # turns in the dataset
    k_max: int = 50
    turn_sample: int | None = None
    seed: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)  # mentioned / no_labels
    candidates: str = ""                      # e.g. "dataset (6,945 items)"
    turns: list[TurnResult] = field(default_factory=list, repr=False)

    def value(self, metric: str) -> float:
        return self.metrics[metric][0]

    def stderr(self, metric: str) -> float:
        return self.metrics[metric][1]

    def to_frame(self) -> pd.DataFrame:
        """One row per metric: metric, value, stderr, n_turns."""
        return pd.DataFrame(
            [
                {"dataset": self.dataset, "metric": m, "value": v, "stderr": s,
                 "n_turns": self.n_turns}
                for m, (v, s) in self.metrics.items()
            ]
        )

    def turns_frame(self) -> pd.DataFrame:
        """One row per evaluated turn (ranked list, labels, hits, per-turn metrics)."""
        rows = []
        for t in self.turns:
            row = {"turn_id": t.turn_id, "dialog_id": t.dialog_id, "labels": t.labels,
                   "ranked": t.ranked, "hits": t.hits, "hit_ranks": t.hit_ranks}
            row.update(t.metrics)
            rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        return {"n_turns": self.n_turns, "n_skipped": self.n_skipped,
                "skipped_reasons": dict(self.skipped_reasons), "n_total": self.n_total,
                "k_max": self.k_max, "turn_sample": self.turn_sample, "seed": self.seed,
                "candidates": self.candidates,
                "recommender": self.recommender}


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalTurn:
    turn_id: str
    dialog_id: str
    context: list[str]
    labels: list[str]      # rec_items minus mentioned, order kept
    mentioned: set[str]




def load_eval_turns(ws: "Workspace", dataset: str) -> tuple[list[EvalTurn], dict[str, int], int]:
    """(evaluable turns, skipped turns per reason, total turns in the dataset).

    Reasons: "mentioned" (every label was mentioned earlier in the dialogue) and
    "no_labels" (the turn has no label in the catalog, e.g. unmatched titles at import).
    """
    df = ws.df(
        "SELECT turn_id, dialog_id, context, rec_items, mentioned_items FROM dialogue_turns "
        "WHERE dataset = ? ORDER BY dialog_id, turn_id",
        [dataset],
    )
    if df.empty:
        known = ws.df("SELECT DISTINCT dataset FROM dialogue_turns ORDER BY dataset")["dataset"]
        raise EvalError(
            f"dataset {dataset!r} has no dialogue turns in the workspace "
            f"(available: {', '.join(known) or 'none; import ReDial / INSPIRED first'})"
        )
    turns: list[EvalTurn] = []
    total = len(df)
    skipped = {"mentioned": 0, "no_labels": 0}
    for row in df.itertuples(index=False):
        mentioned = {str(x) for x in json_list(row.mentioned_items)}
        rec = [str(x) for x in dict.fromkeys(json_list(row.rec_items))]
        labels = [x for x in rec if x not in mentioned]
        if not labels:
            skipped["mentioned" if rec else "no_labels"] += 1
            continue
        context = [str(u) if u is not None else "" for u in json_list(row.context)]
        turns.append(EvalTurn(str(row.turn_id), str(row.dialog_id), context, labels, mentioned))
    return turns, skipped, total


def sample_turns(turns: Sequence[EvalTurn], turn_sample: int | None,
                 seed: int = 0) -> tuple[list[EvalTurn], int | None]:
    """(the fixed random subsample of `turn_sample` turns seeded by `seed`, in dataset order;
    the sample size to record). A sample as large as the set or larger is the whole set, and
    is recorded as None (no subsample)."""
    turns = list(turns)
    if turn_sample is None:
        return turns, None
    if int(turn_sample) < 1:
        raise EvalError(f"turn_sample must be >= 1, got {turn_sample}")
    if turn_sample >= len(turns):
        return turns, None
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(turns), size=int(turn_sample), replace=False))
    return [turns[i] for i in keep], int(turn_sample)


def _catalog_ids(ws: "Workspace") -> set[str]:
    return set(ws.df("SELECT item_id FROM items")["item_id"].astype(str))


# dataset name prefix -> the items column that marks the dataset's own item set
DATASET_ITEM_COLUMNS = {"redial": "redial_id", "inspired": "inspired_id"}


def candidate_items(ws: "Workspace", dataset: str,
                    candidates: str | Iterable[str] | None = "dataset") -> set[str]:
    """The items a ranking may contain when evaluating on `dataset`.

    "dataset": the dataset's own item set, as in He et al., whose candidate lists hold every
    movie of the dataset (ReDial: 6,281, INSPIRED: 1,123): catalog items with a redial_id /
    inspired_id, plus every item that turns of the dataset's splits ('inspired_test',
    'inspired_train', ...) recommend or mention (with the bundled data: INSPIRED 1,096 + 149,
    ReDial 6,924 + 1). A dataset of another name, or a catalog without such ids, uses the
    whole catalog. "all" or None: the whole catalog (for INSPIRED 10x more candidates and a
    third of the recall). Anything else: those item ids (unknown ones are ignored).
    """
    catalog = _catalog_ids(ws)
    if candidates is None or candidates == "all":
        return catalog
    if isinstance(candidates, str):
        if candidates != "dataset":
            raise EvalError(f"candidates must be 'dataset', 'all' or a list of item ids, got {candidates!r}")
        column = DATASET_ITEM_COLUMNS.get(dataset.split("_")[0].lower())
        if column is None:
            return catalog
        own = set(ws.df(f"SELECT item_id FROM items WHERE {column} IS NOT NULL")["item_id"].astype(str))
        if not own:  # the catalog does not say which items are the dataset's
            return catalog
        prefix = dataset.split("_")[0]
        turns = ws.df("SELECT rec_items, mentioned_items FROM dialogue_turns "
                      "WHERE dataset = ? OR split_part(dataset, '_', 1) = ?", [dataset, prefix])
        for row in turns.itertuples(index=False):
            own.update(str(x) for x in json_list(row.rec_items))
            own.update(str(x) for x in json_list(row.mentioned_items))
        return own & catalog
    return {str(x) for x in candidates} & catalog


def _accepts_candidates(recommender: Any) -> bool:
    try:
        params = inspect.signature(recommender.recommend).parameters
    except (TypeError, ValueError):
        return False
    return "candidates" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def evaluate(
    ws: "Workspace",
    recommender: Any,
    dataset: str,
    *,
    k_max: int = 50,
    turn_sample: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    batch_size: int | None = None,
    candidates: str | Iterable[str] | None = "dataset",
) -> EvalResult:
    """Evaluate `recommender` (see `crs_core.recommenders.Recommender`) on a test dataset.

    The recommender gets the turn contexts in batches, with the mentioned items as `exclude`
    (and the candidate set as `candidates=` if its `recommend` accepts that keyword); whatever
    it returns is cleaned again (mentioned, non-candidate and duplicate ids dropped).
    `candidates`: see `candidate_items` (default: the dataset's own item set).
    `turn_sample` evaluates a fixed random subsample (seeded by `seed`) of the evaluable turns.
    Metrics with k > `k_max` are not computed; `k_max` larger than the candidate set is an error.
    """
    if k_max < 1:
        raise EvalError(f"k_max must be >= 1, got {k_max}")
    turns, skipped, total = load_eval_turns(ws, dataset)
    catalog = candidate_items(ws, dataset, candidates)
    if k_max > len(catalog):
        raise EvalError(
            f"k_max={k_max} is larger than the catalog ({len(catalog)} candidate items for "
            f"{dataset}); evaluate with k_max <= {len(catalog)} or import more items"
        )
    label = candidates if isinstance(candidates, str) or candidates is None else "custom"
    if not turns:
        raise EvalError(
            f"dataset {dataset!r}: none of its {total} turns has a label left after removing "
            f"items mentioned earlier ({skipped['mentioned']}) or unknown to the catalog "
            f"({skipped['no_labels']}); nothing to evaluate"
        )
    turns, turn_sample = sample_turns(turns, turn_sample, seed)
    batch = int(batch_size or getattr(recommender, "batch_size", None) or DEFAULT_BATCH)
    name = str(getattr(recommender, "name", type(recommender).__name__))

    extra = {"candidates": catalog} if _accepts_candidates(recommender) else {}
    rankings: list[list[str]] = []
    report(progress, 0, len(turns))
    for start in range(0, len(turns), batch):
        chunk = turns[start : start + batch]
        out = recommender.recommend(
            [t.context for t in chunk], k_max, exclude=[set(t.mentioned) for t in chunk], **extra
        )
        if len(out) != len(chunk):
            raise EvalError(
                f"recommender {name!r} returned {len(out)} rankings for {len(chunk)} contexts"
            )
        rankings.extend(list(r) for r in out)
        report(progress, min(start + batch, len(turns)), len(turns))

    return evaluate_rankings(
        turns, rankings, dataset=dataset, recommender=name, k_max=k_max,
        n_skipped=sum(skipped.values()), skipped_reasons=skipped, n_total=total,
        catalog=catalog, turn_sample=turn_sample, seed=seed,
        candidates=f"{label or 'all'} ({len(catalog)} items)",
    )


def evaluate_rankings(
    turns: Sequence[EvalTurn],
    rankings: Sequence[Sequence[str]],
    *,
    dataset: str,
    recommender: str,
    k_max: int = 50,
    n_skipped: int = 0,
    skipped_reasons: Mapping[str, int] | None = None,
    n_total: int | None = None,
    catalog: set[str] | None = None,
    turn_sample: int | None = None,
    seed: int = 0,
    candidates: str = "",
) -> EvalResult:
    """Score precomputed rankings (e.g. from a background job) for `turns`; `catalog` (the
    candidate set), if given, drops other ids from the rankings."""
    if len(turns) != len(rankings):
        raise EvalError(f"{len(rankings)} rankings for {len(turns)} turns")
    results: list[TurnResult] = []
    per_turn: list[dict[str, float]] = []
    for t, ranked in zip(turns, rankings):
        clean = _clean_ranking(ranked, t.mentioned, k_max, catalog)
        # a turn's labels already exclude what was mentioned (load_eval_turns), so never None here
        m = turn_metrics(clean, t.labels, t.mentioned, k_max=k_max)
        per_turn.append(m)
        results.append(TurnResult(t.turn_id, t.dialog_id, list(t.labels), clean,
                                  _positions(clean, set(t.labels), k_max), m))
    return EvalResult(
        dataset=dataset, recommender=recommender, metrics=aggregate(per_turn),
        n_turns=len(results), n_skipped=n_skipped,
        skipped_reasons=dict(skipped_reasons or {"mentioned": n_skipped}),
        n_total=n_total if n_total is not None else len(results) + n_skipped,
        k_max=k_max, turn_sample=turn_sample, seed=seed, candidates=candidates, turns=results,
    )


# ----------------------------------------------------------------------------- runs


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")
    return s[:40] or "run"


def _none_if_nan(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def store_run(ws: "Workspace", run_meta: Mapping[str, Any],
              results: Mapping[str, EvalResult]) -> str:
    """Write one run (`runs`) and its metrics per dataset (`metrics`) atomically; returns run_id.

    `run_meta`: model (required), training_data, selection_strategy, budget, seed, config
    (a JSON-able dict) and optionally run_id. The per-dataset evaluation settings
    (n_turns, n_skipped, turn_sample, ...) are added to config under "evaluation".
    """
    model = run_meta.get("model")
    if not model:
        raise EvalError("run_meta needs a 'model' name")
    if not results:
        raise EvalError("no evaluation results to store")
    run_id = run_meta.get("run_id") or (
        f"{_slug(str(model))}-{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    )
    config = dict(run_meta.get("config") or {})
    config["evaluation"] = {ds: r.summary() for ds, r in results.items()}
    try:
        config_json = json.dumps(config, default=str)
    except (TypeError, ValueError) as exc:
        raise EvalError(f"run config is not JSON-serialisable: {exc}") from exc
    budget = run_meta.get("budget")
    seed = run_meta.get("seed")
    rows = []
    for ds, res in results.items():
        for metric, (value, stderr) in res.metrics.items():
            rows.append([run_id, ds, metric, float(value), _none_if_nan(stderr), int(res.n_turns)])
    with ws.transaction() as cur:
        exists = cur.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
        if exists:
            raise EvalError(f"run {run_id!r} already exists; choose another run_id")
        cur.execute(
            "INSERT INTO runs (run_id, model, training_data, selection_strategy, budget, seed, config, created_by) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, str(model), run_meta.get("training_data"), run_meta.get("selection_strategy"),
             None if budget is None else int(budget), None if seed is None else int(seed),
             config_json, acting_name()],
        )
        cur.executemany(
            "INSERT INTO metrics (run_id, dataset, metric, value, stderr, n_turns) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
    return run_id


def metrics_frame(ws: "Workspace", *, wide: bool = False) -> pd.DataFrame:
    """All stored metrics joined with their runs.

    Long form: one row per (run, dataset, metric). `wide=True`: one row per (run, dataset)
    with a column per metric and `<metric>_se` for its standard error.
    """
    df = ws.df(
        "SELECT r.run_id, r.model, r.training_data, r.selection_strategy, r.budget, r.seed, "
        "r.created_at, m.dataset, m.metric, m.value, m.stderr, m.n_turns, r.config "
        "FROM metrics m JOIN runs r USING (run_id) "
        "ORDER BY r.created_at, r.run_id, m.dataset"
    )
    if df.empty:
        return df
    rank = {m: i for i, m in enumerate(_metric_names(10**9))}
    df = (df.assign(_order=df["metric"].map(lambda m: rank.get(m, len(rank))))
            .sort_values(["created_at", "run_id", "dataset", "_order", "metric"], kind="stable")
            .drop(columns="_order").reset_index(drop=True))
    if not wide:
        return df
    info_cols = ["run_id", "model", "training_data", "selection_strategy", "budget", "seed",
                 "created_at", "config"]
    info = df.drop_duplicates(["run_id", "dataset"])[info_cols + ["dataset", "n_turns"]]
    values = df.set_index(["run_id", "dataset", "metric"])["value"].unstack("metric")
    errs = df.set_index(["run_id", "dataset", "metric"])["stderr"].unstack("metric")
    order = [m for m in _metric_names(10**9) if m in values.columns]
    order += sorted(c for c in values.columns if c not in order)
    values = values[order]
    errs = errs[order]
    errs.columns = [f"{c}_se" for c in order]
    wide_df = values.join(errs).reset_index()
    wide_df.columns.name = None
    out = info.merge(wide_df, on=["run_id", "dataset"], how="left")
    return out.sort_values(["created_at", "run_id", "dataset"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- leakage guard

_NON_WORD = re.compile(r"[\W_]+")


def normalize_utterance(text: str) -> str:
    """Leakage-matching key: NFKC, case-folded, punctuation to single spaces."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", str(text)).casefold()).strip()


def _as_utterances(ctx: str | Sequence[str]) -> list[str]:
    if isinstance(ctx, str):
        parts = ctx.splitlines() if "\n" in ctx else [ctx]
    else:
        parts = [str(u) for u in ctx if u is not None]
    return [n for n in (normalize_utterance(p) for p in parts) if n]


def find_test_leaks(
    test_turns: Iterable[tuple[str, str, str, Sequence[str], str | None]],
    training_contexts: Sequence[str | Sequence[str]],
    *,
    min_chars: int = 20,
    min_shared: int = 2,
) -> list[dict]:
    """Training examples that repeat a test dialogue; see `check_no_test_leakage`.

    `test_turns`: (dataset, dialog_id, turn_id, context utterances, response or None).
    Returns one dict per leaking training example: training_index, dataset, dialog_id,
    turn_id (for a whole-context match), rule, utterance (the longest shared one).
    """
    # utterance -> test dialogues it occurs in; test contexts as normalised utterance lists
    where: dict[str, set[tuple[str, str]]] = defaultdict(set)
    contexts: list[tuple[tuple[str, str], str, tuple[str, ...]]] = []
    for dataset, dialog_id, turn_id, context, resp in test_turns:
        key = (str(dataset), str(dialog_id))
        utts = tuple(_as_utterances(list(context)))
        for u in utts + tuple(_as_utterances([resp] if resp else [])):
            where[u].add(key)
        contexts.append((key, str(turn_id), utts))
    # distinctive: long enough and specific to one test dialogue (stock phrases such as
    # "what kind of movies do you like" occur in many dialogues and prove nothing)
    distinct: dict[str, tuple[str, str]] = {
        u: next(iter(d)) for u, d in where.items() if len(u) >= min_chars and len(d) == 1
    }
    # whole test contexts with a distinctive utterance, indexed by the first such utterance
    by_anchor: dict[str, list[tuple[tuple[str, str], str, frozenset[str]]]] = defaultdict(list)
    seen_ctx: set[tuple[str, ...]] = set()
    for key, turn_id, utts in contexts:
        anchors = [u for u in utts if u in distinct]
        if not anchors or utts in seen_ctx:
            continue
        seen_ctx.add(utts)
        by_anchor[anchors[0]].append((key, turn_id, frozenset(utts)))

    leaks: list[dict] = []
    for idx, ctx in enumerate(training_contexts):
        uset = set(_as_utterances(ctx))
        shared: dict[tuple[str, str], list[str]] = defaultdict(list)
        for u in uset:
            key = distinct.get(u)
            if key is not None:
                shared[key].append(u)
        if not shared:
            continue
        hit: dict | None = None
        # 1. every utterance of a test turn's context appears in the training example
        for u in (x for lst in shared.values() for x in lst):
            for key, turn_id, ctx_set in by_anchor.get(u, ()):
                if ctx_set <= uset:
                    hit = {"rule": "a whole test context", "dataset": key[0],
                           "dialog_id": key[1], "turn_id": turn_id, "utterance": u}
                    break
            if hit:
                break
        # 2. several distinctive utterances of one test dialogue (or the only one the
        #    example has, e.g. a synthetic query that copies a test utterance)
        if hit is None:
            need = 1 if len(uset) == 1 else min_shared
            for key, lst in shared.items():
                if len(lst) >= need:
                    rule = ("copying a test utterance" if len(lst) == 1
                            else f"{len(lst)} utterances of one test dialogue")
                    hit = {"rule": rule, "dataset": key[0], "dialog_id": key[1],
                           "turn_id": None, "utterance": max(lst, key=len)}
                    break
        if hit is not None:
            hit["training_index"] = idx
            leaks.append(hit)
    return leaks


def _test_datasets(ws: "Workspace") -> list[str]:
    names = ws.df("SELECT DISTINCT dataset FROM dialogue_turns ORDER BY dataset")["dataset"]
    return [str(n) for n in names if str(n).endswith("_test")]


def check_no_test_leakage(
    ws: "Workspace",
    training_contexts: Sequence[str | Sequence[str]],
    *,
    test_datasets: Sequence[str] | None = None,
    min_chars: int = 20,
    min_shared: int = 2,
) -> None:
    """Raise `LeakageError` when training data repeats a test dialogue.

    Training contexts are strings (a query, or utterances separated by newlines) or lists of
    utterances; text is compared after normalisation (Unicode, case, punctuation, spacing).
    A test utterance is *distinctive* when it has >= `min_chars` characters and occurs in one
    test dialogue only (of `test_datasets`, default every dataset named '*_test'). A training
    example leaks that dialogue when it

    - contains every utterance of one of its turn contexts (a context holding a distinctive
      utterance), or
    - contains >= `min_shared` of its distinctive utterances (context lines or responses), or
    - is a single utterance (e.g. a synthetic query) equal to one of them.

    Stock phrases that several test dialogues share ("hi, how are you doing today?") are not
    evidence, nor is one generic sentence inside an otherwise different dialogue: INSPIRED
    train and test share 59 such lines and no dialogue, and pass this check.
    """
    datasets = list(test_datasets) if test_datasets is not None else _test_datasets(ws)
    if not datasets:
        return
    df = ws.df(
        "SELECT dataset, dialog_id, turn_id, context, resp FROM dialogue_turns "
        f"WHERE dataset IN ({', '.join('?' * len(datasets))})",
        datasets,
    )
    test_turns = [(r.dataset, r.dialog_id, r.turn_id, json_list(r.context), r.resp)
                  for r in df.itertuples(index=False)]
    leaks = find_test_leaks(test_turns, training_contexts, min_chars=min_chars,
                            min_shared=min_shared)
    if leaks:
        first = leaks[0]
        text = first["utterance"]
        raise LeakageError(
            f"{len(leaks)} of {len(training_contexts)} training examples repeat test dialogues "
            f"(first: training example {first['training_index']} matches {first['dataset']} "
            f"dialogue {first['dialog_id']} by {first['rule']}: "
            f"\"{text[:80]}{'...' if len(text) > 80 else ''}\"); "
            "remove them before training",
            leaks,
        )
