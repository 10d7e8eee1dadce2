"""crs_core.judging: assignment with overlap, hidden judgements, the final-status rules, disputes,
agreement on a real workspace."""

from __future__ import annotations

import pytest

from crs_core import judging, review
from crs_core.accounts import PermissionDenied, User
from crs_core.judging import JudgingError
from crs_core.store import Workspace

from conftest import insert_synthetic_queries

CURATOR = User("cura", "curator")
ANN, BOB, CY = User("ann", "annotator"), User("bob", "annotator"), User("cy", "annotator")
VIEWER = User("vic", "viewer")


@pytest.fixture()
def ws(tmp_path):
    w = Workspace(tmp_path / "judging.duckdb")
    with w.transaction() as cur:
        cur.executemany("INSERT INTO items (item_id, title, year, genres, sources) VALUES (?, ?, ?, ?, 'test')",
                        [(f"tt{i:07d}", f"Film {i}", 1990 + i, "drama") for i in range(1, 31)])
        cur.executemany("INSERT INTO reviews (review_id, item_id, text, rating, source) VALUES (?, ?, ?, ?, 'test')",
                        [(f"r{i}", f"tt{i:07d}", f"Review {i}", 7.0) for i in range(1, 31)])
    insert_synthetic_queries(w, n=4)
    yield w
    w.close()


def _judge(ws, user, verdict, task, qid=None, **edits):
    aid, q = (task.assignment_id, qid) if qid else judging.next_dialogue(ws, user)
    version = review.get_dialogue(ws, q).version
    return q, judging.judge(ws, user, aid, q, verdict, based_on_version=version, **edits)


def test_only_curators_assign_and_overlap_needs_enough_annotators(ws):
    for who in (ANN, VIEWER):
        with pytest.raises(PermissionDenied):
            judging.assign(ws, who, None, ["ann"])
    with pytest.raises(JudgingError, match="overlap of 3"):
        judging.assign(ws, CURATOR, None, ["ann", "bob"], overlap=3)
    with pytest.raises(JudgingError, match="rule"):
        judging.assign(ws, CURATOR, None, ["ann"], rule="loudest")
    task = judging.assign(ws, CURATOR, {"search": "film 1"}, ["ann"])
    assert task.size == 1
    with pytest.raises(JudgingError, match="no pending dialogue"):  # already in an open assignment
        judging.assign(ws, CURATOR, {"search": "film 1"}, ["bob"])


def test_overlap_one_decides_at_once_and_records_the_annotator(ws):
    task = judging.assign(ws, CURATOR, None, ["ann"])
    qid, outcome = _judge(ws, ANN, "approved", task)
    assert outcome == "approved" and review.get_dialogue(ws, qid).status == "approved"
    assert review.history(ws, qid).iloc[0]["annotator"] == "ann"
    with pytest.raises(PermissionDenied):  # bob is not on this assignment
        judging.judge(ws, BOB, task.assignment_id, "q001", "approved", based_on_version=1)
    with pytest.raises(PermissionDenied):
        judging.next_dialogue(ws, VIEWER)


def test_unanimous_with_overlap_two_and_hidden_judgements(ws):
    task = judging.assign(ws, CURATOR, {"search": "film 1"}, ["ann", "bob", "cy"], overlap=2)
    qid, outcome = _judge(ws, ANN, "approved", task)
    assert outcome is None and review.get_dialogue(ws, qid).status == "pending"
    assert judging.next_dialogue(ws, ANN) is None  # ann judged it; nothing else for her
    with pytest.raises(PermissionDenied, match="before seeing"):
        judging.judgements_for(ws, BOB, task.assignment_id, qid)
    assert len(judging.judgements_for(ws, CURATOR, task.assignment_id, qid)) == 1
    with pytest.raises(JudgingError, match="already judged"):
        judging.judge(ws, ANN, task.assignment_id, qid, "rejected", based_on_version=1)
    _, outcome = _judge(ws, BOB, "approved", task)
    assert outcome == "approved" and review.get_dialogue(ws, qid).status == "approved"
    assert len(judging.judgements_for(ws, BOB, task.assignment_id, qid)) == 2
    assert judging.next_dialogue(ws, CY) is None  # complete: no third judgement asked for
    with pytest.raises(JudgingError, match="already decided"):
        judging.judge(ws, CY, task.assignment_id, qid, "approved", based_on_version=2)


def test_disagreement_goes_to_the_curator_who_settles_it(ws):
    task = judging.assign(ws, CURATOR, {"search": "film 1"}, ["ann", "bob"], overlap=2)
    qid, _ = _judge(ws, ANN, "approved", task, query="I want a heist film with a twist")
    _, outcome = _judge(ws, BOB, "rejected", task)
    assert outcome == "disputed" and review.get_dialogue(ws, qid).status == "pending"
    with pytest.raises(PermissionDenied):
        judging.disputes(ws, ANN)
    open_ = judging.disputes(ws, CURATOR)
    assert list(open_["query_id"]) == [qid] and "verdicts differ" in open_.iloc[0]["reason"]
    with pytest.raises(PermissionDenied):
        judging.settle(ws, ANN, task.assignment_id, qid, "approved")
    judging.settle(ws, CURATOR, task.assignment_id, qid, "approved", content_of="ann")
    d = review.get_dialogue(ws, qid)
    assert d.status == "approved" and d.query == "I want a heist film with a twist"
    assert judging.disputes(ws, CURATOR).empty
    with pytest.raises(JudgingError):
        judging.settle(ws, CURATOR, task.assignment_id, qid, "rejected")


def test_majority_rule_and_approvals_with_different_edits(ws):
    task = judging.assign(ws, CURATOR, {"search": "film 1"}, ["ann", "bob", "cy"], overlap=3, rule="majority")
    qid, _ = _judge(ws, ANN, "rejected", task)
    _judge(ws, BOB, "rejected", task)
    _, outcome = _judge(ws, CY, "approved", task)
    assert outcome == "rejected" and review.get_dialogue(ws, qid).status == "rejected"

    task2 = judging.assign(ws, CURATOR, {"search": "film 2"}, ["ann", "bob"], overlap=2)
    q2, _ = _judge(ws, ANN, "approved", task2, query="a quiet drama please")
    _, outcome = _judge(ws, BOB, "approved", task2, query="a loud comedy please")
    assert outcome == "disputed"
    assert "different edits" in judging.disputes(ws, CURATOR).iloc[0]["reason"]


def test_same_edit_by_all_approvers_is_written_with_the_status(ws):
    task = judging.assign(ws, CURATOR, {"search": "film 3"}, ["ann", "bob"], overlap=2)
    gt = review.get_dialogue(ws, "q002").ground_truth.iloc[:2]
    for who in (ANN, BOB):
        qid, outcome = _judge(ws, who, "approved", task, query="two films only", ground_truth=gt)
    d = review.get_dialogue(ws, qid)
    assert outcome == "approved" and d.query == "two films only" and len(d.ground_truth) == 2
    assert review.history(ws, qid).iloc[0]["action"] == "edit+approve"


def test_a_dialogue_edited_during_judging_is_disputed_not_overwritten(ws):
    task = judging.assign(ws, CURATOR, {"search": "film 1"}, ["ann", "bob"], overlap=2)
    qid, _ = _judge(ws, ANN, "approved", task)
    d = review.get_dialogue(ws, qid)
    review.save_edit(ws, qid, d.version, "edited meanwhile", d.ground_truth, annotator="cura")
    _, outcome = _judge(ws, BOB, "approved", task)
    assert outcome == "disputed" and review.get_dialogue(ws, qid).query == "edited meanwhile"


def test_agreement_report_and_progress(ws):
    task = judging.assign(ws, CURATOR, None, ["ann", "bob"], overlap=2)
    verdicts = {"ann": ["approved", "approved", "rejected", "rejected"],
                "bob": ["approved", "rejected", "rejected", "rejected"]}
    for n in range(4):
        qid = f"q{n:03d}"
        for who in (ANN, BOB):
            judging.judge(ws, who, task.assignment_id, qid, verdicts[who.name][n],
                          based_on_version=review.get_dialogue(ws, qid).version)
    pairs, overall = judging.agreement_report(ws, CURATOR, task.assignment_id)
    row = pairs.iloc[0]
    # p_o = 3/4; ann approves 2/4, bob 1/4: p_e = .5*.25 + .5*.75 = .5; kappa = .25/.5 = .5
    assert row["percent_agreement"] == pytest.approx(0.75) and row["cohen_kappa"] == pytest.approx(0.5)
    assert row["gt_overlap"] == pytest.approx(1.0)
    assert overall["dialogues"] == 4 and overall["unanimous"] == pytest.approx(0.75)
    stats = judging.progress(ws, task.assignment_id)
    assert stats["outcomes"] == {"approved": 1, "rejected": 2, "disputed": 1}
    assert list(stats["annotators"]["judged"]) == [4, 4]
    with pytest.raises(PermissionDenied):
        judging.agreement_report(ws, ANN)


def test_withdraw_a_judgement_and_the_decision_it_completed(ws):
    task = judging.assign(ws, CURATOR, {"search": "film 1"}, ["ann", "bob"], overlap=2)
    qid, _ = _judge(ws, ANN, "rejected", task)
    judging.withdraw(ws, ANN, task.assignment_id, qid)
    assert judging.next_dialogue(ws, ANN) == (task.assignment_id, qid)  # hers to judge again
    with pytest.raises(JudgingError, match="no judgement"):
        judging.withdraw(ws, BOB, task.assignment_id, qid)
    _judge(ws, ANN, "approved", task)
    _, outcome = _judge(ws, BOB, "approved", task)
    assert outcome == "approved"
    judging.withdraw(ws, BOB, task.assignment_id, qid)  # bob's undo takes the approval back
    d = review.get_dialogue(ws, qid)
    assert d.status == "pending" and review.history(ws, qid).iloc[0]["action"] == "undo"
    assert judging.next_dialogue(ws, BOB) == (task.assignment_id, qid)
    _, outcome = _judge(ws, BOB, "approved", task)
    assert outcome == "approved"
    d = review.get_dialogue(ws, qid)
    review.save_edit(ws, qid, d.version, "changed by a curator", d.ground_truth, annotator="cura")
    with pytest.raises(JudgingError, match="changed after it was decided"):
        judging.withdraw(ws, ANN, task.assignment_id, qid)
    assert len(judging.judgements_for(ws, ANN, task.assignment_id, qid)) == 2  # nothing was taken back


def test_a_settled_dispute_cannot_be_withdrawn(ws):
    task = judging.assign(ws, CURATOR, {"search": "film 1"}, ["ann", "bob"], overlap=2)
    qid, _ = _judge(ws, ANN, "approved", task)
    _judge(ws, BOB, "rejected", task)
    judging.settle(ws, CURATOR, task.assignment_id, qid, "rejected")
    with pytest.raises(JudgingError, match="settled by cura"):
        judging.withdraw(ws, ANN, task.assignment_id, qid)


def test_direct_review_checks_the_signed_in_role(ws):
    for who in (ANN, VIEWER):
        with pytest.raises(PermissionDenied):
            review.set_status(ws, ["q000"], "approved", who)
        with pytest.raises(PermissionDenied):
            review.bulk_set_status(ws, None, "rejected", who)
        with pytest.raises(PermissionDenied):
            review.undo(ws, "q000", who)
    assert review.get_dialogue(ws, "q000").status == "pending"
    assert review.set_status(ws, ["q000"], "approved", CURATOR) == {"q000": 2}
    assert review.history(ws, "q000").iloc[0]["annotator"] == "cura"
