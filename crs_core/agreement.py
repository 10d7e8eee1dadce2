"""Inter-annotator agreement on approve / reject, and overlap of edited ground-truth lists.

- Percent agreement: the share of dialogues two annotators both judged on which their verdicts
  are equal.
- Cohen's kappa (two annotators): kappa = (p_o - p_e) / (1 - p_e), with p_o the observed agreement
  and p_e = sum over verdicts c of p_a(c) * p_b(c), each annotator's own verdict shares.
- Fleiss' kappa (any number of annotators): for dialogue i with n_i >= 2 judgements of which
  n_ij have verdict j, P_i = sum_j n_ij (n_ij - 1) / (n_i (n_i - 1)); P = mean_i P_i;
  p_j = sum_i n_ij / sum_i n_i; P_e = sum_j p_j^2; kappa = (P - P_e) / (1 - P_e). With the same
  n on every dialogue this is Fleiss (1971) exactly; with unequal n (an overlap that was raised,
  or a dialogue not yet complete) it is the usual generalisation, and dialogues with a single
  judgement are left out.
- Both kappas are undefined (NaN, shown as "—") when chance agreement is 1: every judgement used
  the same verdict, so agreement cannot be told from chance.
- Ground-truth overlap: Jaccard |A ∩ B| / |A ∪ B| of the catalogue ids of the two annotators'
  final lists (their edit, or the list as the teacher wrote it), averaged over shared dialogues;
  two empty lists count as identical.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from itertools import combinations

import pandas as pd

__all__ = ["percent_agreement", "cohen_kappa", "fleiss_kappa", "jaccard", "pairwise_agreement",
           "overall_agreement"]


def percent_agreement(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    _same_length(a, b)
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else math.nan


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    _same_length(a, b)
    if not a:
        return math.nan
    n = len(a)
    p_o = percent_agreement(a, b)
    share_a, share_b = Counter(a), Counter(b)
    p_e = sum(share_a[c] * share_b[c] for c in share_a) / (n * n)
    return math.nan if math.isclose(p_e, 1.0) else (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(counts: Iterable[Mapping[Hashable, int]]) -> float:
    """Fleiss' kappa from one {verdict: count} mapping per dialogue (see the module note)."""
    rows = [{k: int(v) for k, v in row.items() if v} for row in counts]
    rows = [row for row in rows if sum(row.values()) >= 2]
    if not rows:
        return math.nan
    agreement = []
    totals: Counter = Counter()
    for row in rows:
        n = sum(row.values())
        agreement.append(sum(c * (c - 1) for c in row.values()) / (n * (n - 1)))
        totals.update(row)
    p_bar = sum(agreement) / len(agreement)
    all_judgements = sum(totals.values())
    p_e = sum((c / all_judgements) ** 2 for c in totals.values())
    return math.nan if math.isclose(p_e, 1.0) else (p_bar - p_e) / (1.0 - p_e)


def jaccard(a: Iterable[Hashable], b: Iterable[Hashable]) -> float:
    a, b = set(a), set(b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def pairwise_agreement(judgements: pd.DataFrame) -> pd.DataFrame:
    """One row per annotator pair that judged at least one dialogue in common.

    `judgements` has columns dialogue (any key), annotator, verdict, items (the final list's
    catalogue ids). Columns out: annotator_a, annotator_b, shared, percent_agreement,
    cohen_kappa, gt_overlap."""
    rows = []
    by_annotator = {name: group.set_index("dialogue") for name, group in judgements.groupby("annotator")}
    for a, b in combinations(sorted(by_annotator), 2):
        ja, jb = by_annotator[a], by_annotator[b]
        shared = ja.index.intersection(jb.index)
        if shared.empty:
            continue
        va, vb = list(ja.loc[shared, "verdict"]), list(jb.loc[shared, "verdict"])
        overlap = [jaccard(x, y) for x, y in zip(ja.loc[shared, "items"], jb.loc[shared, "items"])]
        rows.append({"annotator_a": a, "annotator_b": b, "shared": len(shared),
                     "percent_agreement": percent_agreement(va, vb), "cohen_kappa": cohen_kappa(va, vb),
                     "gt_overlap": sum(overlap) / len(overlap)})
    return pd.DataFrame(rows, columns=["annotator_a", "annotator_b", "shared", "percent_agreement",
                                       "cohen_kappa", "gt_overlap"])


def overall_agreement(judgements: pd.DataFrame) -> dict[str, float | int]:
    """Dialogues with two or more judgements, the share of them judged unanimously, Fleiss' kappa."""
    per_dialogue = [Counter(group["verdict"]) for _, group in judgements.groupby("dialogue")]
    multi = [c for c in per_dialogue if sum(c.values()) >= 2]
    return {"dialogues": len(multi),
            "unanimous": (sum(len(c) == 1 for c in multi) / len(multi)) if multi else math.nan,
            "fleiss_kappa": fleiss_kappa(multi)}


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"two annotators' verdicts must pair up: {len(a)} vs {len(b)}")
