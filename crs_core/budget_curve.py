"""Budget curves: Recall@5 / NDCG@5 against the selection budget B for each selection strategy
(the experiment behind Figures 3-7 of active synthesis, arXiv 2504.15476, section 4.4-4.6).

For every strategy the experiment

1. selects once with the largest budget (`crs_core.selections.run_selection`). The greedy
   strategies are prefix-consistent (JS, Fisher and their variants continue the same greedy
   sequence, RANDOM_UNIFORM takes the first rows of one seeded permutation), so the first B picks
   of that selection are exactly what a selection with budget B picks (tested);
2. synthesises K queries per selected item once (`crs_core.synth.run_synthesis`; the teacher's
   call cache makes a rerun, or a longer selection over the same items, free);
3. for each budget B trains the cheap recommender on the queries of the first B picks and
   evaluates it with the He et al. protocol (`crs_core.evaluate.evaluate`), storing Recall@k /
   NDCG@k with standard errors in ``budget_curve_points``.

Choices (the paper leaves them open or they are not affordable here):

- Unit: by default a pick is an *item* (the mean of its review embeddings). The paper's seed
  sample is an item with its reviews, metadata and users, D = {(m_i, r_i, u_i, a_i)}, and with
  item picks B is exactly the number of synthesis units (B * K queries: the teacher cost), and a
  point's training set is exactly what synthesising a B-selection would give. ``unit="review"``
  is available: then B reviews give at most B items, and an item whose reviews are picked both
  before and after B was prompted with all its picked reviews of the largest selection (the
  synthesis of the largest selection is reused), a small, documented approximation.
- Student (the recommender trained per point, ``student=``; see `STUDENTS`): NBCRS by default
  (`crs_core.recommenders.NBCRS`, 50 neighbours), trained and evaluated in seconds and reacting
  to the same thing as any student (which items and queries the selection brought in);
  ``retriever``: the dense bi-encoder fine-tuned on the point's queries (`crs_core.train.
  train_retriever`, the default recipe with the experiment's seed, ``student_config`` overrides
  it), minutes per point on CPU; ``retriever-hybrid``: the hybrid ranker over that fine-tuned
  retriever; ``hybrid``: the hybrid over zero-shot MiniLM. Not the paper's per-point LLM
  fine-tuning, which is not affordable for strategies x budgets points on CPU. A fine-tuned
  retriever lives in a temporary folder for its point only, and its item vectors stay in memory
  (never in the workspace's embedding cache: one set of ~8k vectors per point would swell it).
- Training data: the experiment's queries whose review status is pending or approved (an
  annotator's rejection removes a query from later points; existing points are kept).
- Ground truth: ``gt_mode="retrieve"`` by default (dense retrieval, no LLM call), so a point
  costs one teacher call per query.
- Reuse: the experiment id is a hash of everything that defines a point except the strategy,
  the budget and the test set (unit, embedding set, seed, k, lambda, K, ground-truth mode,
  teacher provider / model / temperature, evaluation sample, student and its training settings). A rerun with the same
  parameters reuses every stored point and computes only the missing ones; a larger budget
  re-selects (same prefix) and synthesises only the new items with real calls.
- Completeness: points are computed only from a complete synthesis; if the teacher's budget
  runs out or it keeps failing, that strategy gets no new point (rerun to resume) and the
  report names the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from .errors import CRSError
from .progress import ProgressFn, report, scaled
from .store import Workspace

DEFAULT_BUDGETS = (10, 25, 50, 100)
DEFAULT_DATASETS = ("redial_test", "inspired_test")
CHART_METRICS = ("recall@5", "ndcg@5")
TRAIN_STATUSES = ("pending", "approved")
N_NEIGHBORS = 50
DEFAULT_STUDENT = "nbcrs"
RETRIEVER_STUDENTS = ("retriever", "retriever-hybrid")  # fine-tune a dense retriever per point


class BudgetCurveError(CRSError):
    """A budget-curve experiment cannot run as asked (raised before anything is stored)."""


@dataclass
class BudgetCurveReport:
    experiment_id: str
    params: dict[str, Any]
    computed: int = 0                 # (strategy, budget) points evaluated now
    reused: int = 0                   # (strategy, budget) points already stored
    teacher_calls: int = 0            # real teacher calls made now
    cached_calls: int = 0
    selections: dict[str, str] = field(default_factory=dict)   # strategy -> selection id
    errors: dict[str, str] = field(default_factory=dict)       # strategy -> why it has no new points
    notes: list[str] = field(default_factory=list)
    points: pd.DataFrame = field(default_factory=pd.DataFrame)
    stopped: bool = False             # stopped by the caller; the stored points are kept

    @property
    def complete(self) -> bool:
        return not self.errors and not self.stopped

    def lines(self, metrics: Sequence[str] = CHART_METRICS) -> list[str]:
        out = [f"experiment {self.experiment_id}: {self.computed} point(s) computed now, {self.reused} reused; "
               f"teacher: {self.teacher_calls} calls, {self.cached_calls} cached"]
        out.append(points_table(self.points, metrics))
        out += [f"{s}: no new points: {e}" for s, e in self.errors.items()]
        if self.stopped:
            out.append("stopped before the end: the points above are stored; run it again to resume")
        return out + self.notes


def points_table(points: pd.DataFrame, metrics: Sequence[str] = CHART_METRICS) -> str:
    """A text table: one row per (dataset, metric, strategy), one column per budget, cells
    'value ± stderr' (n training examples in the last column's header line)."""
    if points is None or points.empty:
        return "(no points)"
    frame = points[points["metric"].isin(metrics)].copy()
    if frame.empty:
        return "(no points for " + ", ".join(metrics) + ")"
    frame["cell"] = [f"{v:.3f}±{0.0 if s is None or pd.isna(s) else s:.3f}"
                     for v, s in zip(frame["value"], frame["stderr"])]
    table = frame.pivot_table(index=["dataset", "metric", "strategy"], columns="budget", values="cell",
                              aggfunc="first")
    table.columns = [f"B={b}" for b in table.columns]
    train = (points.drop_duplicates(["strategy", "budget"]).pivot_table(index="strategy", columns="budget",
                                                                        values="n_train", aggfunc="first"))
    train.columns = [f"B={b}" for b in train.columns]
    return (table.to_string() + "\n\ntraining examples per point:\n" + train.to_string())


# --------------------------------------------------------------------------------- helpers
class _MemoEncoder:
    """The project encoder with an in-memory memo in front of the workspace embedding cache.

    NBCRS encodes the test contexts on every `recommend`; across the points of an experiment
    those contexts are the same, so each is encoded once (and persisted under the encoder's
    name, so a later run reads it back). Same vectors and name as the wrapped encoder."""

    def __init__(self, ws: Workspace, base: Any):
        self._ws, self._base = ws, base
        self.name = base.name
        self._memo: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str], **_: Any) -> np.ndarray:
        from .embed import embed_texts

        texts = [str(t) for t in texts]
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            self._memo.update(zip(missing, embed_texts(self._ws, self._base, missing)))
        if not texts:
            return np.zeros((0, int(self._base.dim)), np.float32)
        return np.stack([self._memo[t] for t in texts])


def _canonical_budgets(budgets: Iterable[Any]) -> list[int]:
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or int(b) <= 0:
            raise BudgetCurveError(f"budgets must be positive whole numbers, got {b!r}")
        out.append(int(b))
    if not out:
        raise BudgetCurveError("give at least one budget")
    return sorted(set(out))


def _canonical_strategies(strategies: Iterable[str]) -> list[str]:
    from . import strategies as registry

    out = [str(s).upper() for s in strategies]
    if not out:
        raise BudgetCurveError("give at least one selection strategy")
    unknown = [s for s in out if s not in registry.names()]
    if unknown:
        raise BudgetCurveError(f"unknown strategy {', '.join(map(repr, unknown))}; "
                               f"choose from {', '.join(registry.names())}")
    return list(dict.fromkeys(out))


def students() -> dict[str, str]:
    """The recommenders a point can train (name -> label): NBCRS and the hybrid of the
    recommenders registry, the fine-tuned dense retriever of the model-kinds registry, and the
    hybrid over that retriever."""
    from .model_kinds import RETRIEVER
    from .recommenders import RECOMMENDERS

    return {"nbcrs": RECOMMENDERS["nbcrs"].label,
            "retriever": f"{RETRIEVER.label}, fine-tuned on the point's queries",
            "retriever-hybrid": f"{RECOMMENDERS['hybrid'].label}, over the retriever fine-tuned on the point's queries",
            "hybrid": RECOMMENDERS["hybrid"].label + " (zero-shot MiniLM)"}


def _student_params(student: str, student_config: dict[str, Any] | None, encoder_name: str,
                    seed: int) -> dict[str, Any]:
    """The experiment's "recommender" parameters (NBCRS keeps the dict of the experiments stored
    before students existed, so their ids do not change)."""
    if student not in students():
        raise BudgetCurveError(f"unknown student {student!r}; choose from {', '.join(students())}")
    if student_config and student not in RETRIEVER_STUDENTS:
        raise BudgetCurveError(f"student settings are for {' / '.join(RETRIEVER_STUDENTS)} (a training recipe), "
                               f"not {student!r}")
    if student == "nbcrs":
        return {"kind": "nbcrs", "n_neighbors": N_NEIGHBORS, "encoder": encoder_name}
    if student == "hybrid":
        return {"kind": "hybrid", "encoder": encoder_name, "val_seed": seed}
    from .train import KIND_RETRIEVER, validate_config
    from .train_data import TrainingError

    overrides = {"seed": seed, **dict(student_config or {})}
    try:
        cfg = validate_config(KIND_RETRIEVER, overrides)
    except (TrainingError, TypeError, ValueError) as exc:
        raise BudgetCurveError(f"retriever settings: {exc}") from None
    if cfg.labels != "real":
        raise BudgetCurveError(f"retriever settings: a point trains on its synthetic labels only (labels='real'), "
                               f"got labels={cfg.labels!r}")
    return {"kind": student, "train": overrides, **({"val_seed": seed} if student == "retriever-hybrid" else {})}


def teacher_label(teacher: Any) -> str:
    return f"{teacher.config.provider}:{teacher.model}"


def experiment_id(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, default=str)
    return "bc-" + hashlib.sha1(blob.encode()).hexdigest()[:10]


def selection_name(exp_id: str, strategy: str) -> str:
    return f"budget-curve {exp_id} {strategy}"


def _items_of_picks(ws: Workspace, unit: str, picks: list[str]) -> list[str]:
    """The item of each pick, in pick order (None for a review no longer in the workspace)."""
    if unit == "item":
        return list(picks)
    frame = ws.df("SELECT review_id, item_id FROM reviews WHERE review_id IN (SELECT unnest(?::VARCHAR[]))", [picks])
    by_review = dict(zip(frame["review_id"], frame["item_id"]))
    return [by_review.get(p) for p in picks]


def _validate(ws: Workspace, teacher: Any, strategies: list[str], budgets: list[int], *, unit: str, set_id: str,
              k: int, lam: float, queries_per_item: int, gt_mode: str, datasets: list[str],
              turn_sample: int | None) -> None:
    """Every check that can fail, before anything is written."""
    from .evaluate import load_eval_turns
    from .selections import UNITS, unit_matrix
    from .synth import GT_MODES

    if unit not in UNITS:
        raise BudgetCurveError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if gt_mode not in GT_MODES:
        raise BudgetCurveError(f"unknown ground-truth mode {gt_mode!r}; use one of {', '.join(GT_MODES)}")
    if isinstance(queries_per_item, bool) or int(queries_per_item) < 1:
        raise BudgetCurveError(f"queries per item must be at least 1, got {queries_per_item!r}")
    if turn_sample is not None and int(turn_sample) < 1:
        raise BudgetCurveError(f"turn sample must be at least 1, got {turn_sample!r}")
    if lam < 0:
        raise BudgetCurveError(f"lambda must be >= 0, got {lam}")
    if not datasets:
        raise BudgetCurveError("give at least one test set")
    for dataset in datasets:
        load_eval_turns(ws, dataset)  # EvalError naming the available sets
    if not ws.scalar("SELECT count(*) FROM embedding_sets WHERE set_id = ?", [set_id]):
        raise BudgetCurveError(f"embedding set {set_id!r} does not exist yet; run `python -m crs_core init` "
                               "(or `embed` then `cluster`) first")
    units, _, _ = unit_matrix(ws, set_id, unit)
    if budgets[-1] > len(units):
        raise BudgetCurveError(f"budget {budgets[-1]} is larger than the {len(units):,} {unit}s of {set_id!r}; "
                               f"use budgets up to {len(units):,}")
    from . import strategies as registry

    if any(registry.get(s).needs_centres for s in strategies) and k > len(units):
        raise BudgetCurveError(f"k ({k}) is larger than the number of {unit}s ({len(units)})")
    users = [s for s in strategies if registry.get(s).uses_users]
    if users and not ws.scalar("SELECT count(*) FROM interactions WHERE rating IS NOT NULL"):
        raise BudgetCurveError(f"{', '.join(users)} need user-item interactions; the workspace has none")
    b = teacher.budget
    zero = [n for n in ("max_calls", "max_tokens", "max_cost") if getattr(b, n, None) is not None and getattr(b, n) <= 0]
    if zero:
        raise BudgetCurveError(f"the teacher budget is 0 ({', '.join(zero)}): no query can be synthesised")


def _done_points(ws: Workspace, exp_id: str, strategy: str) -> set[tuple[int, str]]:
    frame = ws.df("SELECT DISTINCT budget, dataset FROM budget_curve_points WHERE experiment_id = ? AND strategy = ?",
                  [exp_id, strategy])
    return {(int(b), str(d)) for b, d in zip(frame["budget"], frame["dataset"])}


def _selection_for(ws: Workspace, exp_id: str, strategy: str, budget: int) -> str | None:
    """The experiment's stored selection for a strategy with at least `budget` picks."""
    return ws.scalar("SELECT selection_id FROM selections WHERE name = ? AND budget >= ? "
                     "ORDER BY budget DESC, created_at DESC LIMIT 1", [selection_name(exp_id, strategy), budget])


def _fine_tuned_retriever(examples: Sequence[Any], catalog: Any, overrides: dict[str, Any], folder: str) -> Any:
    """A dense retriever fine-tuned on the point's queries (the one training path,
    `crs_core.train.train_retriever`), loaded with the one retriever loader."""
    from .model_kinds import RETRIEVER
    from .train import train_retriever
    from .train_data import load_examples, load_items

    labels = dict.fromkeys(i for e in examples for i in e.labels if i in catalog.index)
    result = train_retriever(
        load_examples([{"context": list(e.context), "labels": list(e.labels)} for e in examples],
                      "the point's queries"),
        load_items([{"item_id": i, "text": catalog.texts[catalog.index[i]]} for i in labels], "the point's items"),
        overrides, out_dir=folder)
    return RETRIEVER.load(result["model_dir"])


@contextlib.contextmanager
def _trained_student(ws: Workspace, student: str, recommender: dict[str, Any], examples: list[Any], *, memo: Any,
                     base_encoder: Any, catalog: Any, rankable: Any) -> Iterator[tuple[Any, int]]:
    """(the point's recommender fitted on `examples`, its number of training examples); raises
    RecommenderError / TrainingError when it cannot be trained. A fine-tuned retriever's folder
    lives until the block ends (its weights load lazily)."""
    from .recommenders import NBCRS, DenseRetrieval, TrainingSet, item_embeddings, make_recommender

    if student == "nbcrs":
        rec = NBCRS(ws, n_neighbors=N_NEIGHBORS, encoder=memo, catalog=catalog)
        rec.fit(examples)
        yield rec, rec.n_train
        return
    train = TrainingSet(examples, name="synthetic")
    if student == "hybrid":
        rec = make_recommender("hybrid", ws, encoder=base_encoder, catalog=rankable, seed=recommender["val_seed"])
        rec.fit(train)
        yield rec, len(examples)
        return
    with tempfile.TemporaryDirectory(prefix="crs-budget-curve-") as folder:
        encoder = _fine_tuned_retriever(examples, catalog, recommender["train"], folder)
        # the item vectors in memory only (ws=None): the hybrid's dense part, which would write
        # them to the workspace cache, finds them in the process's item cache instead
        item_embeddings(rankable, encoder, None)
        if student == "retriever":
            rec = DenseRetrieval(None, encoder=encoder, catalog=rankable)
        else:
            rec = make_recommender("hybrid", ws, encoder=encoder, catalog=rankable, seed=recommender["val_seed"])
        rec.fit(train)
        yield rec, len(examples)


# ------------------------------------------------------------------------------------- run
def run_budget_curve(
    ws: Workspace,
    teacher: Any,
    *,
    strategies: Sequence[str] | None = None,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    queries_per_item: int = 1,
    gt_mode: str = "retrieve",
    datasets: Sequence[str] = DEFAULT_DATASETS,
    turn_sample: int | None = None,
    seed: int = 0,
    set_id: str = "review:minilm",
    unit: str = "item",
    k: int = 20,
    lam: float = 1.0,
    store_runs: bool = False,
    student: str = DEFAULT_STUDENT,
    student_config: dict[str, Any] | None = None,
    encoder: Any = None,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    on_experiment: Callable[[str], None] | None = None,
) -> BudgetCurveReport:
    """Run (or resume) a budget-curve experiment; see the module docstring.

    `teacher`: a `crs_core.teacher.Teacher` (its budget bounds the synthesis). `store_runs`:
    also store every (strategy, budget) as a run (`crs_core.evaluate.store_run`), so it can be
    compared with other runs; off by default (one experiment is dozens of runs).
    `student`: the recommender each point trains (`students()`; default NBCRS);
    `student_config`: RetrieverConfig overrides for the retriever students (default: the
    default recipe with `seed`).
    `encoder`: for retrieval ground truth, NBCRS and the zero-shot hybrid (None: the project's MiniLM).
    `stop`: when set, the run ends after the point (or the synthesis request) in progress; the
    points stored so far are kept and a rerun resumes (`report.stopped`). `on_experiment(id)`
    is called once the experiment is recorded, before any point (a UI follows its points).
    """
    from .evaluate import evaluate, store_run
    from .evaluate import candidate_items
    from .recommenders import Catalog, RecommenderError, default_encoder, training_set_from_synthetic
    from .train_data import TrainingError
    from .selections import load_selection, run_selection
    from .strategies import names as strategy_names
    from .synth import run_synthesis

    strategies = _canonical_strategies(strategy_names() if strategies is None else strategies)
    budgets = _canonical_budgets(budgets)
    datasets = list(dict.fromkeys(str(d) for d in datasets))
    _validate(ws, teacher, strategies, budgets, unit=unit, set_id=set_id, k=k, lam=lam,
              queries_per_item=queries_per_item, gt_mode=gt_mode, datasets=datasets, turn_sample=turn_sample)
    queries_per_item = int(queries_per_item)
    base_encoder = encoder if encoder is not None else default_encoder()
    recommender = _student_params(student, student_config, base_encoder.name, int(seed))
    params = {"unit": unit, "set_id": set_id, "seed": int(seed), "k": int(k), "lam": float(lam),
              "queries_per_item": queries_per_item, "gt_mode": gt_mode, "teacher": teacher_label(teacher),
              "temperature": teacher.config.temperature, "turn_sample": turn_sample,
              "recommender": recommender,
              "train_statuses": list(TRAIN_STATUSES)}
    exp_id = experiment_id(params)
    rep = BudgetCurveReport(exp_id, params)
    with ws.transaction() as cur:
        cur.execute("INSERT OR IGNORE INTO budget_curve_experiments (experiment_id, params) VALUES (?, ?)",
                    [exp_id, json.dumps(params, sort_keys=True)])
    if on_experiment is not None:
        on_experiment(exp_id)

    memo = _MemoEncoder(ws, base_encoder)
    catalog: Catalog | None = None
    rankable: Catalog | None = None  # the items the test sets rank: dense students embed only these
    label = teacher_label(teacher)
    n = len(strategies)
    report(progress, 0, 1000)
    for s_idx, strategy in enumerate(strategies):
        if stop is not None and stop.is_set():
            rep.stopped = True
            break
        step = scaled(progress, s_idx / n, (s_idx + 1) / n)
        done = _done_points(ws, exp_id, strategy)
        todo = [b for b in budgets if any((b, d) not in done for d in datasets)]
        rep.reused += len(budgets) - len(todo)
        if not todo:
            report(step, 1, 1)
            continue
        # 1. one selection with the largest budget (prefix-consistent)
        b_max = todo[-1]
        sel_id = _selection_for(ws, exp_id, strategy, b_max)
        if sel_id is None:
            sel_id = run_selection(ws, strategy, b_max, unit=unit, set_id=set_id, k=k, lam=lam, seed=seed,
                                   name=selection_name(exp_id, strategy), progress=scaled(step, 0.0, 0.1))
        rep.selections[strategy] = sel_id
        picks = load_selection(ws, sel_id)["unit_id"].tolist()
        pick_items = _items_of_picks(ws, unit, picks)
        items_upto = {b: list(dict.fromkeys(i for i in pick_items[:b] if i is not None)) for b in todo}
        # 2. one synthesis over the items of the largest budget needed now
        syn = run_synthesis(ws, sel_id, teacher, k_queries=queries_per_item, gt_mode=gt_mode,
                            items_limit=len(items_upto[b_max]), seed=seed, encoder=encoder,
                            progress=scaled(step, 0.1, 0.7), stop_event=stop)
        rep.teacher_calls += syn.calls
        rep.cached_calls += syn.cached_hits
        if not syn.complete:
            if stop is not None and stop.is_set():
                rep.stopped = True
                break
            why = syn.stopped or f"{syn.failed} synthesis unit(s) failed ({'; '.join(syn.errors[:2])})"
            rep.errors[strategy] = f"synthesis of {sel_id} is incomplete: {why}; rerun to resume"
            continue
        if syn.flagged_replies:
            rep.notes.append(f"{strategy}: {syn.flagged_replies} teacher repl(ies) refused by the parser "
                             "(those items have no query)")
        # 3. train and evaluate per budget
        train_all = training_set_from_synthetic(ws, statuses=TRAIN_STATUSES, selection_id=sel_id)
        item_of_query = dict(ws.cursor().execute(
            "SELECT query_id, item_id FROM synthetic_queries WHERE selection_id = ?", [sel_id]).fetchall())
        if catalog is None:
            catalog = Catalog.from_workspace(ws)
            rankable = catalog.subset(set().union(*(candidate_items(ws, d) for d in datasets)))
        for b_idx, budget in enumerate(todo):
            if stop is not None and stop.is_set():
                rep.stopped = True
                break
            point_step = scaled(step, 0.7 + 0.3 * b_idx / len(todo), 0.7 + 0.3 * (b_idx + 1) / len(todo))
            wanted = set(items_upto[budget])
            examples = [e for e in train_all.examples if item_of_query.get(e.example_id) in wanted]
            missing = [d for d in datasets if (budget, d) not in done]
            try:
                with _trained_student(ws, student, recommender, examples, memo=memo, base_encoder=base_encoder,
                                      catalog=catalog, rankable=rankable) as (rec, n_train):
                    results = {}
                    for d_idx, dataset in enumerate(missing):
                        results[dataset] = evaluate(ws, rec, dataset, turn_sample=turn_sample, seed=seed,
                                                    progress=scaled(point_step, d_idx / len(missing),
                                                                    (d_idx + 1) / len(missing)))
            except (RecommenderError, TrainingError) as exc:
                rep.notes.append(f"{strategy} B={budget}: no point ({exc})")
                continue
            run_id = None
            if store_runs:
                run_id = store_run(ws, {"model": rec.name, "run_id": f"{exp_id}-{strategy}-B{budget}",
                                        "training_data": f"synthetic:{sel_id}[first {budget}]",
                                        "selection_strategy": strategy, "budget": budget, "seed": seed,
                                        "config": {"budget_curve": exp_id, "selection_id": sel_id,
                                                   "n_train": n_train, **params}}, results)
            rows = [[exp_id, strategy, budget, int(seed), dataset, metric, float(v),
                     None if s is None or math.isnan(s) else float(s), int(res.n_turns), int(n_train),
                     label, gt_mode, sel_id, run_id]
                    for dataset, res in results.items() for metric, (v, s) in res.metrics.items()]
            with ws.transaction() as cur:
                cur.executemany(
                    "INSERT INTO budget_curve_points (experiment_id, strategy, budget, seed, dataset, metric, value, "
                    "stderr, n_turns, n_train, teacher, gt_mode, selection_id, run_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            rep.computed += 1
    if not rep.stopped:
        report(progress, 1000, 1000)
    rep.points = budget_curve_frame(ws, exp_id, strategies=strategies, budgets=budgets, datasets=datasets)
    return rep


# ------------------------------------------------------------------------------- reading
def list_experiments(ws: Workspace) -> pd.DataFrame:
    """Experiments with their parameters and how many points they have, newest first."""
    return ws.df(
        "WITH p AS (SELECT experiment_id, count(DISTINCT (strategy, budget)) AS n_points, "
        "max(created_at) AS last_point FROM budget_curve_points GROUP BY experiment_id) "
        "SELECT e.experiment_id, e.params, e.created_at, coalesce(p.n_points, 0) AS n_points, p.last_point "
        "FROM budget_curve_experiments e LEFT JOIN p USING (experiment_id) "
        "ORDER BY coalesce(p.last_point, e.created_at) DESC, e.experiment_id")


def describe_params(params: str | dict[str, Any]) -> str:
    """One line for a UI: teacher, ground truth, K, unit, evaluation sample."""
    p = json.loads(params) if isinstance(params, str) else dict(params)
    sample = f"{p['turn_sample']} sampled turns" if p.get("turn_sample") else "all turns"
    student = (p.get("recommender") or {}).get("kind", DEFAULT_STUDENT)
    return (f"student {student}, teacher {p.get('teacher')}, ground truth {p.get('gt_mode')}, "
            f"K={p.get('queries_per_item')} per {p.get('unit')}, seed {p.get('seed')}, {sample}")


def budget_curve_frame(ws: Workspace, experiment_id: str | None = None, *, strategies: Sequence[str] | None = None,
                       budgets: Sequence[int] | None = None, datasets: Sequence[str] | None = None,
                       metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Stored points (long form: one row per strategy, budget, dataset, metric), ordered for
    plotting. Without an experiment id: the experiment with the most recent point."""
    if experiment_id is None:
        exps = list_experiments(ws)
        exps = exps[exps["n_points"] > 0]
        if exps.empty:
            return _empty_points()
        experiment_id = str(exps["experiment_id"].iloc[0])
    where, params = ["experiment_id = ?"], [experiment_id]
    for column, values in (("strategy", strategies), ("budget", budgets), ("dataset", datasets),
                           ("metric", metrics)):
        if values is not None:
            where.append(f"{column} IN (SELECT unnest(?))")
            params.append([int(v) for v in values] if column == "budget" else [str(v) for v in values])
    frame = ws.df("SELECT experiment_id, strategy, budget, seed, dataset, metric, value, stderr, n_turns, n_train, "
                  "teacher, gt_mode, selection_id, run_id, created_at FROM budget_curve_points WHERE "
                  + " AND ".join(where) + " ORDER BY dataset, metric, strategy, budget", params)
    return frame if not frame.empty else _empty_points()


def _empty_points() -> pd.DataFrame:
    return pd.DataFrame(columns=["experiment_id", "strategy", "budget", "seed", "dataset", "metric", "value", "stderr",
                                 "n_turns", "n_train", "teacher", "gt_mode", "selection_id", "run_id", "created_at"])
