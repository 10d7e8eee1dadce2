"""crs_core.agreement: percent agreement, Cohen's and Fleiss' kappa, list overlap, checked against
hand-computed examples."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from crs_core import agreement


def test_cohen_kappa_on_a_hand_computed_table():
    # 50 dialogues: both approve 20, A approves / B rejects 5, A rejects / B approves 10, both reject 15.
    # p_o = 35/50 = .70; A approves 25/50, B approves 30/50: p_e = .5*.6 + .5*.4 = .50; kappa = .2/.5 = .40
    a = ["approved"] * 20 + ["approved"] * 5 + ["rejected"] * 10 + ["rejected"] * 15
    b = ["approved"] * 20 + ["rejected"] * 5 + ["approved"] * 10 + ["rejected"] * 15
    assert agreement.percent_agreement(a, b) == pytest.approx(0.70)
    assert agreement.cohen_kappa(a, b) == pytest.approx(0.40)


def test_kappa_is_undefined_when_everyone_always_agrees_on_one_verdict():
    assert agreement.percent_agreement(["approved"] * 3, ["approved"] * 3) == 1.0
    assert math.isnan(agreement.cohen_kappa(["approved"] * 3, ["approved"] * 3))
    assert math.isnan(agreement.fleiss_kappa([{"approved": 3}] * 4))
    with pytest.raises(ValueError):
        agreement.cohen_kappa(["approved"], [])


def test_fleiss_kappa_on_a_hand_computed_table():
    # 4 dialogues, 3 judgements each.
    # P_i: (3*2)/6=1, (2*1)/6=1/3, (2*1)/6=1/3, 1  -> P = (1 + 1/3 + 1/3 + 1)/4 = 2/3
    # p_approved = (3+2+1+0)/12 = .5, p_rejected = .5 -> P_e = .5;  kappa = (2/3 - .5)/.5 = 1/3
    rows = [{"approved": 3}, {"approved": 2, "rejected": 1}, {"approved": 1, "rejected": 2}, {"rejected": 3}]
    assert agreement.fleiss_kappa(rows) == pytest.approx(1 / 3)
    # dialogues with a single judgement say nothing about agreement and are left out
    assert agreement.fleiss_kappa(rows + [{"approved": 1}]) == pytest.approx(1 / 3)


def test_fleiss_equals_the_published_example():
    # Fleiss (1971)-style worked example (10 subjects, 14 raters, 5 categories): kappa = 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    kappa = agreement.fleiss_kappa([dict(enumerate(row)) for row in table])
    assert kappa == pytest.approx(0.2099, abs=5e-4)


def test_jaccard_of_lists():
    assert agreement.jaccard(["a", "b", "c"], ["b", "c", "d"]) == pytest.approx(0.5)
    assert agreement.jaccard([], []) == 1.0
    assert agreement.jaccard(["a"], []) == 0.0


def test_pairwise_and_overall_tables():
    judgements = pd.DataFrame([
        {"dialogue": "d1", "annotator": "ann", "verdict": "approved", "items": ["i1", "i2"]},
        {"dialogue": "d1", "annotator": "bob", "verdict": "approved", "items": ["i1"]},
        {"dialogue": "d2", "annotator": "ann", "verdict": "approved", "items": []},
        {"dialogue": "d2", "annotator": "bob", "verdict": "rejected", "items": []},
        {"dialogue": "d3", "annotator": "cy", "verdict": "rejected", "items": []},
    ])
    pairs = agreement.pairwise_agreement(judgements)
    assert len(pairs) == 1  # cy shares no dialogue with anyone
    row = pairs.iloc[0]
    assert (row["annotator_a"], row["annotator_b"], row["shared"]) == ("ann", "bob", 2)
    assert row["percent_agreement"] == pytest.approx(0.5)
    # ann always approves: p_e = 1*.5 + 0*.5 = .5, p_o = .5 -> kappa 0
    assert row["cohen_kappa"] == pytest.approx(0.0)
    assert row["gt_overlap"] == pytest.approx((0.5 + 1.0) / 2)
    overall = agreement.overall_agreement(judgements)
    assert overall["dialogues"] == 2 and overall["unanimous"] == pytest.approx(0.5)
