"""crs_core.review: approve / edit / reject persist, version conflicts, undo, bulk, history."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

from crs_core import review
from crs_core.review import ConflictError, QueueFilter, ReviewError
from crs_core.store import Workspace

from conftest import insert_synthetic_queries


@pytest.fixture()
def ws(tmp_path):
    w = Workspace(tmp_path / "review.duckdb")
    with w.transaction() as cur:
        cur.executemany(
            "INSERT INTO items (item_id, title, year, genres, sources) VALUES (?, ?, ?, ?, 'test')",
            [(f"tt{i:07d}", f"Film {i}", 1990 + i, "drama|comedy" if i % 2 else "horror") for i in range(1, 31)],
        )
        cur.executemany(
            "INSERT INTO reviews (review_id, item_id, text, rating, source) VALUES (?, ?, ?, ?, 'test')",
            [(f"r{i}", f"tt{i:07d}", f"Review {i} <script>alert(1)</script>", 7.0) for i in range(1, 31)],
        )
        cur.execute("INSERT INTO selections (selection_id, strategy, unit, set_id, budget) "
                    "VALUES ('sel-js', 'JS', 'review', 'review:minilm', 3)")
    insert_synthetic_queries(w, n=4, selection_id="sel-js", teacher="gpt-test")
    yield w
    w.close()


def _gt(ws, qid):
    return ws.df("SELECT rank, title_raw, item_id, match_score, flagged, note FROM ground_truth "
                 "WHERE query_id = ? ORDER BY rank", [qid])


def test_queue_lists_dialogues_with_grounding_and_filters(ws):
    q = review.review_queue(ws)
    assert list(q["query_id"]) == ["q000", "q001", "q002", "q003"]
    row = q.iloc[0]
    assert row["status"] == "pending" and row["version"] == 1
    assert row["n_gt"] == 5 and row["n_flagged"] == 1 and row["grounding_rate"] == pytest.approx(0.8)
    assert row["teacher"] == "gpt-test" and row["strategy"] == "JS" and row["item_title"] == "Film 1"
    assert review.review_queue(ws, {"statuses": ["approved"]}).empty
    assert len(review.review_queue(ws, QueueFilter(teachers=["gpt-test"], strategies=["JS"]))) == 4
    assert len(review.review_queue(ws, {"search": "film 2"})) == 1
    assert review.review_queue(ws, {"min_grounding": 0.9}).empty
    assert review.queue_facets(ws) == {"teacher": ["gpt-test"], "strategy": ["JS"], "selection_id": ["sel-js"]}
    with pytest.raises(ReviewError):
        review.review_queue(ws, {"statuses": ["done"]})


def test_dialogue_has_query_reviews_and_catalog_details(ws):
    d = review.get_dialogue(ws, "q000")
    assert d.query.startswith("I want") and d.version == 1 and d.teacher == "gpt-test"
    assert list(d.reviews["review_id"]) == ["r1", "r2", "r3"]
    assert "<script>" in d.reviews["text"].iloc[0]  # kept as text; pages render it as text
    assert list(d.ground_truth["rank"]) == [1, 2, 3, 4, 5]
    assert d.ground_truth["title"].iloc[0] == "Film 1" and d.ground_truth["flagged"].iloc[-1]
    assert d.item["title"] == "Film 1"
    with pytest.raises(ReviewError):
        review.get_dialogue(ws, "nope")


def test_approve_and_reject_persist_with_history(ws, tmp_path):
    versions = review.set_status(ws, ["q000"], "approved", "ann")
    assert versions == {"q000": 2}
    assert review.set_status(ws, "q001", "rejected", "bob", note="off-topic") == {"q001": 2}
    # unchanged status: no new version
    assert review.set_status(ws, ["q000"], "approved", "ann") == {"q000": 2}
    path = ws.path
    ws.close()
    again = Workspace(path)
    try:
        q = review.review_queue(again).set_index("query_id")
        assert q.loc["q000", "status"] == "approved" and q.loc["q000", "version"] == 2
        assert q.loc["q001", "status"] == "rejected" and q.loc["q001", "last_annotator"] == "bob"
        h = review.history(again, "q001")
        assert list(h["version"]) == [2, 1] and list(h["action"]) == ["reject", "created"]
        assert h["note"].iloc[0] == "off-topic" and list(h["status"]) == ["rejected", "pending"]
    finally:
        again.close()


def test_edit_query_and_list_persists(ws):
    d = review.get_dialogue(ws, "q000")
    gt = d.ground_truth.copy()
    gt = gt.iloc[[1, 0, 2]].copy()  # reorder, drop the last two (incl. the flagged one)
    gt.loc[gt.index[0], "note"] = "better first"
    added = pd.DataFrame([{"item_id": "tt0000020"}, {"item_id": None, "title_raw": None}])  # + a blank row
    rows = pd.concat([gt, added], ignore_index=True)
    v = review.save_edit(ws, "q000", d.version, "  I want a calm drama  ", rows, note="fixed", annotator="ann")
    assert v == 2
    after = review.get_dialogue(ws, "q000")
    assert after.query == "I want a calm drama" and after.version == 2 and after.status == "pending"
    assert list(after.ground_truth["item_id"]) == ["tt0000002", "tt0000001", "tt0000003", "tt0000020"]
    assert after.ground_truth["note"].iloc[0] == "better first"
    added_row = after.ground_truth.iloc[3]
    assert added_row["title_raw"] == "Film 20 (2010)" and added_row["match_score"] == 1.0 and not added_row["flagged"]
    h = review.history(ws, "q000")
    assert list(h["action"]) == ["edit", "created"] and h["note"].iloc[0] == "fixed"
    # saving the same content again writes nothing
    assert review.save_edit(ws, "q000", 2, "I want a calm drama", after.ground_truth, annotator="ann") == 2
    # save and approve in one version
    assert review.save_edit(ws, "q000", 2, "I want a calm drama!", after.ground_truth, status="approved") == 3
    assert review.get_dialogue(ws, "q000").status == "approved"
    assert review.history(ws, "q000")["action"].iloc[0] == "edit+approve"


def test_bad_edits_are_refused_and_write_nothing(ws):
    d = review.get_dialogue(ws, "q000")
    with pytest.raises(ReviewError, match="not in the catalog"):
        review.save_edit(ws, "q000", 1, "x", [{"item_id": "tt9999999"}])
    with pytest.raises(ReviewError, match="twice"):
        review.save_edit(ws, "q000", 1, "x", [{"item_id": "tt0000001"}, {"item_id": "tt0000001"}])
    with pytest.raises(ReviewError, match="empty"):
        review.save_edit(ws, "q000", 1, "   ", d.ground_truth)
    assert review.get_dialogue(ws, "q000").version == 1
    assert ws.count("query_history") == 0


def test_version_conflict_is_refused_and_nothing_is_lost(ws):
    a = review.get_dialogue(ws, "q002")
    b = review.get_dialogue(ws, "q002")  # a second annotator loaded the same version
    va = review.save_edit(ws, "q002", a.version, "Alice's wording", a.ground_truth.iloc[:2], annotator="alice")
    before_gt = _gt(ws, "q002")
    with pytest.raises(ConflictError) as info:
        review.save_edit(ws, "q002", b.version, "Bob's wording", b.ground_truth.iloc[:1], annotator="bob")
    assert "alice" in str(info.value) and "version 2" in str(info.value)
    assert info.value.conflicts == {"q002": (1, 2, "alice")}
    now = review.get_dialogue(ws, "q002")
    assert now.query == "Alice's wording" and now.version == va  # alice's save is intact
    pd.testing.assert_frame_equal(_gt(ws, "q002"), before_gt)
    # status changes are checked the same way, all or nothing
    with pytest.raises(ConflictError):
        review.set_status(ws, ["q001", "q002"], "approved", "bob", expected_versions={"q001": 1, "q002": 1})
    assert review.get_dialogue(ws, "q001").status == "pending"
    # bob reloads and saves on top of the new version
    assert review.save_edit(ws, "q002", now.version, "Bob's wording", b.ground_truth.iloc[:1], annotator="bob") == 3


def test_concurrent_saves_from_threads_one_wins(ws):
    d = review.get_dialogue(ws, "q003")
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def attempt(n: int) -> None:
        barrier.wait()
        try:
            review.save_edit(ws, "q003", d.version, f"text {n}", d.ground_truth, annotator=f"a{n}")
            outcomes.append("ok")
        except ConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 3 + ["ok"]
    assert review.get_dialogue(ws, "q003").version == 2
    assert list(review.history(ws, "q003")["version"]) == [2, 1]


def test_undo_walks_back_and_is_itself_versioned(ws):
    d = review.get_dialogue(ws, "q001")
    original_gt = _gt(ws, "q001")
    with pytest.raises(ReviewError, match="nothing to undo"):
        review.undo(ws, "q001", "ann")
    v2 = review.save_edit(ws, "q001", 1, "edited", d.ground_truth.iloc[:2], annotator="ann")
    v3 = review.set_status(ws, ["q001"], "approved", "ann")["q001"]
    assert (v2, v3) == (2, 3)
    assert review.undo(ws, "q001", "ann") == 4  # undoes the approval
    d4 = review.get_dialogue(ws, "q001")
    assert d4.status == "pending" and d4.query == "edited" and len(d4.ground_truth) == 2
    assert review.undo(ws, "q001", "ann") == 5  # undoes the edit: back to the synthesized state
    d5 = review.get_dialogue(ws, "q001")
    assert d5.query == d.query and d5.status == "pending"
    pd.testing.assert_frame_equal(_gt(ws, "q001"), original_gt)
    with pytest.raises(ReviewError, match="nothing to undo"):
        review.undo(ws, "q001", "ann")
    h = review.history(ws, "q001")
    assert list(h["action"]) == ["undo", "undo", "approve", "edit", "created"]
    assert list(h["restored_from"].astype(object)) == [1, 2, pd.NA, pd.NA, pd.NA]
    # undo checks the version like any write
    with pytest.raises(ConflictError):
        review.undo(ws, "q001", "ann", expected_version=4)


def test_bulk_over_a_filter(ws):
    review.set_status(ws, ["q000"], "rejected", "ann")
    done = review.bulk_set_status(ws, {"statuses": ["pending"], "search": "horror"}, "approved", "lead")
    assert set(done) == {"q001", "q003"}  # queries about even items ask for horror
    q = review.review_queue(ws).set_index("query_id")
    assert list(q["status"]) == ["rejected", "approved", "pending", "approved"]
    assert q.loc["q001", "last_action"] == "approve" and q.loc["q001", "last_annotator"] == "lead"
    # bulk undo-ability: every dialogue got its own history entries
    assert list(review.history(ws, "q003")["action"]) == ["approve", "created"]
    assert review.bulk_set_status(ws, {"statuses": ["approved"]}, "pending", "lead") == {"q001": 3, "q003": 3}
