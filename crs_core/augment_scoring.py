"""Scoring candidates: the teacher LLM in batches with a retry for unscored pairs, the distilled
head trained on a teacher-scored sample, and the statistics of a run (agreement, coverage,
histograms, the report). Used through `crs_core.augment`.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .llm_output import normalize_label, parse_scores
from .progress import ProgressFn, report, scaled
from .prompts import score_schema
from .augment_data import (AugmentError, AugmentIncomplete, HEAD_SHARE, HIST_BIN, ItemPool, PAPER_TAIL_MENTIONS,
    RETRY_TEMPERATURE, SCORE_TEMPERATURE, build_scoring_messages, render_candidate)

if TYPE_CHECKING:  # pragma: no cover
    from .teacher import Teacher



# ----------------------------------------------------------------------------- teacher scoring


@dataclass
class _PairScore:
    score: float
    flags: tuple[str, ...] = ()


@dataclass
class _TeacherStats:
    calls: int = 0              # requests made (first asks + retries), cached or not
    cached_hits: int = 0
    retried_batches: int = 0
    pairs_asked: int = 0
    pairs_scored: int = 0
    pairs_clipped: int = 0
    pairs_unscored: int = 0     # still without a score after the retry
    constrained_json: bool = False
    unparsable_replies: int = 0  # replies from which no score at all could be read
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0


def _batches(entries: list[tuple[str, str]], size: int) -> list[list[tuple[str, str]]]:
    """Split (item_id, display) entries into batches of <= size with distinct displays."""
    out: list[list[tuple[str, str]]] = []
    seen: list[set[str]] = []
    for entry in entries:
        key = normalize_label(entry[1])
        for b, s in zip(out, seen):
            if len(b) < size and key not in s:
                b.append(entry)
                s.add(key)
                break
        else:
            out.append([entry])
            seen.append({key})
    return out




def _score_with_teacher(teacher: "Teacher", jobs: list[tuple[int, Sequence[str], list[str]]],
                        pool: ItemPool, *, score_batch: int, progress: ProgressFn | None,
                        stop: threading.Event | None, constrained: bool = False,
                        seed: int = 0) -> tuple[dict[tuple[int, str], _PairScore], _TeacherStats]:
    """Score (turn index, context, candidate item ids) jobs; returns scores by (turn, item).

    Candidates of a call are listed in a seeded random order (an LLM judge favours list
    positions; the order must not carry the retrieval rank into the scores)."""
    from .teacher import BudgetExhausted, ChatRequest, Completion

    if score_batch < 1:
        raise AugmentError(f"score_batch must be >= 1, got {score_batch}")
    stats = _TeacherStats(constrained_json=constrained)
    scores: dict[tuple[int, str], _PairScore] = {}
    batches: list[tuple[int, Sequence[str], list[tuple[str, str]]]] = []
    rng = np.random.default_rng(seed)
    for t, ctx, items in jobs:
        entries = [(it, pool.displays[pool.index[it]]) for it in items]
        for b in _batches(entries, score_batch):
            batches.append((t, ctx, [b[i] for i in rng.permutation(len(b))]))
    stats.pairs_asked = sum(len(b) for _, _, b in batches)

    def request(ctx: Sequence[str], batch: list[tuple[str, str]], retry: bool) -> ChatRequest:
        lines = [render_candidate(d, pool.briefs[pool.index[it]]) for it, d in batch]
        fmt = {"type": "json_object", "schema": score_schema([d for _, d in batch])} if constrained else None
        return ChatRequest(build_scoring_messages(list(ctx), lines),
                           temperature=RETRY_TEMPERATURE if retry else SCORE_TEMPERATURE,
                           max_tokens=160 + 30 * len(batch), response_format=fmt,
                           cache_salt="augment-retry" if retry else None)

    def run(reqs: list[ChatRequest], share: tuple[float, float]) -> list[Any]:
        results = teacher.chat_many(reqs, progress=scaled(progress, *share), stop=stop)
        failed = [r for r in results if not isinstance(r, Completion)]
        for r in results:
            stats.calls += 1
            if isinstance(r, Completion):
                stats.cached_hits += int(r.cached)
                if not r.cached:
                    stats.prompt_tokens += r.prompt_tokens
                    stats.completion_tokens += r.completion_tokens
                    stats.cost += r.cost or 0.0
        if failed:
            if stop is not None and stop.is_set():
                raise AugmentIncomplete("augmentation cancelled; nothing was stored (finished teacher "
                                        "calls are cached: a rerun continues from there)")
            budget = sum(isinstance(r, BudgetExhausted) for r in failed)
            first = next((r for r in failed if not isinstance(r, BudgetExhausted)), failed[0])
            raise AugmentIncomplete(
                f"{len(failed)} of {len(reqs)} teacher calls did not complete "
                f"({budget} stopped by the budget; first: {first}); nothing was stored. Finished "
                "calls are cached, so a rerun (with a larger budget) repeats none of them")
        return results

    flags: dict[tuple[int, str], list[str]] = defaultdict(list)

    def absorb(t: int, batch: list[tuple[str, str]], text: str, retried: bool) -> list[int]:
        """Record the scores a reply gives; returns the batch positions it left unscored."""
        parsed = parse_scores(text, [d for _, d in batch])
        if parsed.unparsable:
            stats.unparsable_replies += 1
        for pos, (it, _) in enumerate(batch):
            if pos in parsed.scores:
                flags[(t, it)] += (["retried"] if retried else []) + (["clipped"] if pos in parsed.clipped else [])
                scores[(t, it)] = _PairScore(parsed.scores[pos], tuple(flags[(t, it)]))
            elif not retried:
                flags[(t, it)].append("unparsable" if parsed.unparsable else "missing")
        return sorted(parsed.missing)

    first = run([request(ctx, b, False) for _, ctx, b in batches], (0.0, 0.9))
    retry: list[tuple[int, Sequence[str], list[tuple[str, str]]]] = []
    for (t, ctx, batch), res in zip(batches, first):
        missing = [batch[p] for p in absorb(t, batch, res.text, retried=False)]
        if missing:
            retry.append((t, ctx, missing))
    stats.retried_batches = len(retry)
    if retry:
        second = run([request(ctx, b, True) for _, ctx, b in retry], (0.9, 1.0))
        for (t, _, batch), res in zip(retry, second):
            absorb(t, batch, res.text, retried=True)
    report(progress, 1, 1)
    stats.pairs_scored = len(scores)
    stats.pairs_clipped = sum("clipped" in s.flags for s in scores.values())
    stats.pairs_unscored = stats.pairs_asked - stats.pairs_scored
    return scores, stats


# ----------------------------------------------------------------------------- distillation


def pair_features(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[u, v, u*v, |u-v|] for rows of context (u) and item (v) embeddings."""
    u = np.asarray(u, np.float32)
    v = np.asarray(v, np.float32)
    return np.hstack([u, v, u * v, np.abs(u - v)])


class DistilledScorer:
    """A regression head on frozen embeddings of (context, item), trained with MSE on teacher
    scores (appendix A, with MiniLM features instead of Gemma2-9b's last hidden state)."""

    def __init__(self, kind: str = "ridge", seed: int = 0):
        if kind not in ("ridge", "mlp"):
            raise AugmentError(f"distill_model must be 'ridge' or 'mlp', got {kind!r}")
        self.kind = kind
        self.seed = seed
        self.model: Any = None

    def fit(self, u: np.ndarray, v: np.ndarray, y: Sequence[float]) -> "DistilledScorer":
        X = pair_features(u, v)
        y = np.asarray(y, np.float64)
        if self.kind == "ridge":
            from sklearn.linear_model import RidgeCV

            self.model = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(X, y)
        else:
            from sklearn.neural_network import MLPRegressor

            self.model = MLPRegressor(hidden_layer_sizes=(64,), alpha=1e-2, learning_rate_init=1e-3,
                                      max_iter=800, early_stopping=len(y) >= 50, random_state=self.seed).fit(X, y)
        return self

    def predict(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise AugmentError("the distilled scorer is not trained")
        if len(u) == 0:
            return np.zeros(0)
        return np.clip(self.model.predict(pair_features(u, v)), 0.0, 4.0)

    def describe(self) -> str:
        if self.kind == "ridge" and self.model is not None:
            return f"ridge(alpha={float(self.model.alpha_):g}) on [u, v, u*v, |u-v|]"
        return f"{self.kind} on [u, v, u*v, |u-v|]"


def agreement(teacher_scores: Sequence[float], predicted: Sequence[float], threshold: float,
              train_scores: Sequence[float] | None = None) -> dict[str, Any]:
    """How well predictions agree with the teacher on held-out pairs."""
    from scipy import stats as st

    y = np.asarray(teacher_scores, np.float64)
    p = np.asarray(predicted, np.float64)
    out: dict[str, Any] = {"n": int(len(y))}
    if not len(y):
        return out
    const = float(np.std(y)) == 0.0 or float(np.std(p)) == 0.0
    out["pearson"] = None if const or len(y) < 3 else float(st.pearsonr(y, p)[0])
    out["spearman"] = None if const or len(y) < 3 else float(st.spearmanr(y, p)[0])
    out["mae"] = float(np.mean(np.abs(y - p)))
    out["rmse"] = float(np.sqrt(np.mean((y - p) ** 2)))
    yt, pt = y >= threshold, p >= threshold
    out["threshold_accuracy"] = float(np.mean(yt == pt))
    out["teacher_positive_rate"] = float(np.mean(yt))
    out["predicted_positive_rate"] = float(np.mean(pt))
    out["majority_accuracy"] = float(max(np.mean(yt), 1 - np.mean(yt)))
    tp = int(np.sum(yt & pt))
    out["precision"] = float(tp / pt.sum()) if pt.sum() else None
    out["recall"] = float(tp / yt.sum()) if yt.sum() else None
    if train_scores is not None and len(train_scores):
        out["mean_baseline_mae"] = float(np.mean(np.abs(y - float(np.mean(train_scores)))))
    out["teacher_mean"] = float(np.mean(y))
    out["teacher_std"] = float(np.std(y))
    return out


# ----------------------------------------------------------------------------- statistics


def score_histogram(scores: Sequence[float], *, bin_width: float = HIST_BIN, lo: float = 0.0,
                    hi: float = 4.0) -> list[dict[str, Any]]:
    """Counts of scores in [lo, lo+w), ..., [hi-w, hi] (the last bin includes hi)."""
    n_bins = max(1, int(round((hi - lo) / bin_width)))
    counts = [0] * n_bins
    for s in scores:
        if s is None or not math.isfinite(float(s)):
            continue
        b = int((float(s) - lo) // bin_width)
        counts[min(max(b, 0), n_bins - 1)] += 1
    return [{"lo": round(lo + i * bin_width, 4), "hi": round(lo + (i + 1) * bin_width, 4), "count": c}
            for i, c in enumerate(counts)]


def _head(counts: Mapping[str, int], share: float = HEAD_SHARE) -> set[str]:
    """The top ``share`` of items with a count > 0, ranked by count (ties at the cut-off in)."""
    ranked = sorted((c for c in counts.values() if c > 0), reverse=True)
    if not ranked:
        return set()
    cutoff = ranked[max(1, math.ceil(share * len(ranked))) - 1]
    return {i for i, c in counts.items() if c >= cutoff and c > 0}


def compute_coverage(turn_positives: Mapping[str, Sequence[str]],
                     augmented: Mapping[str, Sequence[str]], *, catalog_size: int,
                     interaction_users: Mapping[str, int]) -> dict[str, Any]:
    """Table-6-style statistics of one augmentation (see the module docstring)."""
    n_turns = len(turn_positives)
    aug_pairs = [(t, i) for t, items in augmented.items() for i in items]
    real_pairs = [(t, i) for t, items in turn_positives.items() for i in items]
    per_turn = [len(augmented.get(t, ())) for t in turn_positives]
    before = {i for _, i in real_pairs}
    aug_items = {i for _, i in aug_pairs}
    after = before | aug_items
    label_freq = Counter(i for _, i in real_pairs)
    heads = {"interactions": _head(dict(interaction_users)), "labels": _head(dict(label_freq))}

    def tail_share(pairs, head):
        return float(np.mean([i not in head for _, i in pairs])) if pairs else None

    long_tail: dict[str, Any] = {}
    for name, head in heads.items():
        long_tail[name] = {
            "head_items": len(head),
            "augmented_tail_share": tail_share(aug_pairs, head),
            "real_tail_share": tail_share(real_pairs, head),
            "distinct_tail_items_added": len({i for i in aug_items - before if i not in head}),
        }
    rare = {i for i, c in label_freq.items() if c >= PAPER_TAIL_MENTIONS}  # the non-tail
    long_tail["paper_lt4_mentions"] = {
        "augmented_tail_share": tail_share(aug_pairs, rare),
        "real_tail_share": tail_share(real_pairs, rare),
    }
    return {
        "turns": n_turns,
        "turns_with_labels": int(sum(1 for c in per_turn if c)),
        "labels_added": len(aug_pairs),
        "real_labels": len(real_pairs),
        "labels_per_turn": float(np.mean(per_turn)) if per_turn else 0.0,
        "labels_per_labelled_turn": float(np.mean([c for c in per_turn if c])) if any(per_turn) else 0.0,
        "median_labels_per_turn": float(np.median(per_turn)) if per_turn else 0.0,
        "catalog_items": catalog_size,
        "distinct_items_before": len(before),
        "distinct_items_after": len(after),
        "distinct_items_augmented": len(aug_items),
        "new_items": len(aug_items - before),
        "coverage_before": len(before) / catalog_size if catalog_size else 0.0,
        "coverage_after": len(after) / catalog_size if catalog_size else 0.0,
        "long_tail": long_tail,
    }


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:,.3f}" if isinstance(x, float) else f"{x:,}"


def format_coverage(cov: Mapping[str, Any]) -> list[str]:
    lt = cov.get("long_tail", {})
    lines = [
        f"labels added            {_fmt(cov['labels_added'])} over {_fmt(cov['turns'])} turns "
        f"({_fmt(cov['turns_with_labels'])} with at least one); real labels {_fmt(cov['real_labels'])}",
        f"labels per turn         {cov['labels_per_turn']:.2f} (median {cov['median_labels_per_turn']:.0f}; "
        f"{cov['labels_per_labelled_turn']:.2f} per labelled turn)",
        f"distinct items          before {_fmt(cov['distinct_items_before'])} "
        f"({_fmt(cov['coverage_before'], True)} of {_fmt(cov['catalog_items'])}), after "
        f"{_fmt(cov['distinct_items_after'])} ({_fmt(cov['coverage_after'], True)}); "
        f"{_fmt(cov['new_items'])} new",
    ]
    for name, label in (("interactions", "by interactions"), ("labels", "by label frequency")):
        if name in lt:
            d = lt[name]
            lines.append(f"long-tail share {label:<20} augmented {_fmt(d['augmented_tail_share'], True)}, "
                         f"real {_fmt(d['real_tail_share'], True)} (head = {d['head_items']:,} items)")
    if "paper_lt4_mentions" in lt:
        d = lt["paper_lt4_mentions"]
        lines.append(f"long-tail share (<4 mentions)        augmented {_fmt(d['augmented_tail_share'], True)}, "
                     f"real {_fmt(d['real_tail_share'], True)}")
    hist = cov.get("histogram_all") or cov.get("histogram_kept")
    if hist:
        lines.append("score histogram         " + "  ".join(f"[{h['lo']:g},{h['hi']:g}):{h['count']}" for h in hist))
    return lines
