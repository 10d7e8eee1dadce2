"""Evaluation protocol (He et al. 2023): metrics on hand-computed examples, mentioned-item
exclusion, skipped turns, standard errors, run storage and the test-leakage guard."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from crs_core.errors import CRSError  # noqa: E402
from crs_core.evaluate import (  # noqa: E402
    EvalError,
    LeakageError,
    aggregate,
    candidate_items,
    check_no_test_leakage,
    evaluate,
    metrics_frame,
    ndcg_at_k,
    recall_at_k,
    store_run,
    titles_to_item_ids,
    turn_metrics,
)
from crs_core.store import Workspace  # noqa: E402
from crs_core.titles import TitleMatcher  # noqa: E402

L2 = math.log2


# ----------------------------------------------------------------------------- metrics


def test_recall_and_ndcg_hand_computed():
    ranked = ["a", "b", "c", "d", "e", "f"]
    labels = {"b", "e", "z"}
    assert recall_at_k(ranked, labels, 1) == 0.0
    assert recall_at_k(ranked, labels, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, labels, 5) == pytest.approx(2 / 3)
    # hits at ranks 2 and 5; ideal: 3 hits at ranks 1..3 (k=5 > |labels|)
    assert ndcg_at_k(ranked, labels, 5) == pytest.approx(
        (1 / L2(3) + 1 / L2(6)) / (1 + 1 / L2(3) + 1 / L2(4)))
    # k=2 < |labels|: the ideal DCG only has 2 hits
    assert ndcg_at_k(ranked, labels, 2) == pytest.approx((1 / L2(3)) / (1 + 1 / L2(3)))
    assert ndcg_at_k(["x", "b"], {"b"}, 5) == pytest.approx(1 / L2(3))
    assert ndcg_at_k(["b"], {"b"}, 10) == 1.0
    with pytest.raises(ValueError):
        recall_at_k(ranked, set(), 5)


def test_turn_metrics_remove_mentioned_items_from_labels_and_ranking():
    # "m" was mentioned earlier: it leaves the labels AND the ranking (a and b move up)
    m = turn_metrics(["m", "a", "x", "b"], labels=["a", "m", "b"], mentioned=["m"], k_max=5)
    assert m["recall@1"] == 0.5          # top-1 is "a" after removing "m"
    assert m["recall@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 + 1 / L2(4)) / (1 + 1 / L2(3)))
    assert set(m) == {"recall@1", "recall@5", "ndcg@5"}  # k > k_max is not computed
    # duplicates in a ranking count once, at their first position
    d = turn_metrics(["x", "x", "a"], labels=["a"], k_max=5)
    assert d["recall@1"] == 0.0 and d["ndcg@5"] == pytest.approx(1 / L2(3))
    # every label mentioned before: the turn is skipped
    assert turn_metrics(["a"], labels=["m"], mentioned=["m"]) is None


def test_aggregate_mean_and_standard_error():
    per_turn = [{"recall@1": v} for v in (0.0, 1.0, 1.0, 0.0)]
    mean, se = aggregate(per_turn)["recall@1"]
    assert mean == 0.5
    assert se == pytest.approx(math.sqrt(1 / 3) / 2)  # sample std sqrt(1/3), n = 4
    one = aggregate([{"recall@1": 1.0}])["recall@1"]
    assert one[0] == 1.0 and math.isnan(one[1])


def test_titles_are_mapped_to_the_catalog_dropping_unmatched_and_duplicates():
    matcher = TitleMatcher([("i1", "The Matrix", 1999), ("i2", "Alien", 1979)])
    got = titles_to_item_ids(["Matrix, The (1999)", "Nonexistent Film (2001)", "Alien (1979)",
                              "The Matrix", ""], matcher)
    assert got == ["i1", "i2"]


# ----------------------------------------------------------------------------- evaluate


N_ITEMS = 60
# (turn_id, dialog_id, context, rec, mentioned)
TURNS = [
    ("t1", "d1", ["", "Hi, I am looking for a movie like Item Zero"], ["i1", "i2"], ["i0"]),
    ("t2", "d1", ["", "Hi, I am looking for a movie like Item Zero", "Try Item One",
                  "Seen it. Anything else like Item Zero?"], ["i1", "i3"], ["i0", "i1"]),
    ("t3", "d2", ["hello", "I want a sad film with a happy ending please"], ["i4"], []),
    ("t4", "d2", ["hello", "I want a sad film with a happy ending please", "what about Item Four?",
                  "I already know Item Four"], ["i4"], ["i4"]),  # skipped: label was mentioned
    ("t5", "d3", ["hi", "recommend me something"], [], []),  # skipped: no label in the catalog
]
# what the fake recommender answers, keyed by the last utterance
ANSWERS = {
    "Hi, I am looking for a movie like Item Zero": ["i0", "i2", "i9", "i1"],
    "Seen it. Anything else like Item Zero?": ["i1", "i9", "i3"],
    "I want a sad film with a happy ending please": ["i9", "i8", "i7", "i6", "i5", "i4"],
}


class FakeRecommender:
    """Answers from a table; ignores `exclude` unless told (evaluate must clean anyway)."""

    name = "fake"

    def __init__(self, honour_exclude: bool = False):
        self.honour_exclude = honour_exclude
        self.calls = []

    def fit(self, train):
        pass

    def recommend(self, contexts, k, exclude=None):
        self.calls.append((len(contexts), k, exclude))
        out = []
        for ctx, ex in zip(contexts, exclude or [set()] * len(contexts)):
            ranked = ANSWERS[ctx[-1]] + [f"i{j}" for j in range(10, N_ITEMS)]
            if self.honour_exclude:
                ranked = [r for r in ranked if r not in ex]
            out.append(ranked[:k])
        return out


def _workspace(path: Path, n_items: int = N_ITEMS) -> Workspace:
    ws = Workspace(path)
    with ws.transaction() as cur:
        cur.executemany("INSERT INTO items (item_id, title) VALUES (?, ?)",
                        [[f"i{j}", f"Item {j}"] for j in range(n_items)])
        cur.executemany(
            "INSERT INTO dialogue_turns VALUES ('toy_test', ?, ?, ?, 'resp', ?, '[]', ?)",
            [[tid, did, json.dumps(ctx), json.dumps(rec), json.dumps(men)]
             for tid, did, ctx, rec, men in TURNS],
        )
    return ws


@pytest.fixture
def ws(tmp_path):
    w = _workspace(tmp_path / "ws.duckdb")
    yield w
    w.close()


def test_evaluate_applies_the_protocol(ws):
    seen = []
    rec = FakeRecommender()
    res = evaluate(ws, rec, "toy_test", progress=lambda d, t: seen.append((d, t)))
    assert (res.n_total, res.n_skipped, res.n_turns) == (5, 2, 3)
    assert res.skipped_reasons == {"mentioned": 1, "no_labels": 1}
    assert rec.calls[0][1] == 50 and rec.calls[0][2][0] == {"i0"}  # mentioned passed as exclude
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    by_turn = {t.turn_id: t for t in res.turns}
    # t1: i0 (mentioned) removed -> [i2, i9, i1, ...]; labels {i1, i2}
    t1 = by_turn["t1"]
    assert t1.ranked[:3] == ["i2", "i9", "i1"] and t1.hit_ranks == [1, 3] and t1.hits == ["i2", "i1"]
    assert t1.metrics["recall@1"] == 0.5 and t1.metrics["recall@5"] == 1.0
    assert t1.metrics["ndcg@5"] == pytest.approx((1 + 1 / L2(4)) / (1 + 1 / L2(3)))
    # t2: labels {i1, i3} minus mentioned i1 -> {i3}; ranking without i1 -> [i9, i3]
    t2 = by_turn["t2"]
    assert t2.labels == ["i3"] and t2.ranked[:2] == ["i9", "i3"]
    assert len(t2.ranked) == 49  # the fake ignored `exclude`: its 50 included i1
    assert t2.metrics["recall@1"] == 0.0 and t2.metrics["recall@5"] == 1.0
    assert t2.metrics["ndcg@5"] == pytest.approx(1 / L2(3))
    # t3: i4 at rank 6
    t3 = by_turn["t3"]
    assert t3.metrics["recall@5"] == 0.0 and t3.metrics["recall@10"] == 1.0
    assert t3.metrics["ndcg@10"] == pytest.approx(1 / L2(7))
    # means and standard errors over the 3 turns
    r1 = [0.5, 0.0, 0.0]
    mean = sum(r1) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in r1) / 2) / math.sqrt(3)
    assert res.metrics["recall@1"] == (pytest.approx(mean), pytest.approx(se))
    assert res.value("recall@5") == pytest.approx(2 / 3)
    assert res.value("recall@50") == 1.0 and res.stderr("recall@50") == 0.0
    assert list(res.metrics) == ["recall@1", "recall@5", "recall@10", "recall@20", "recall@50",
                                 "ndcg@5", "ndcg@10", "ndcg@20"]
    # an honest recommender that applies `exclude` itself gets the same numbers
    res2 = evaluate(ws, FakeRecommender(honour_exclude=True), "toy_test")
    assert res2.metrics == res.metrics
    frame = res.turns_frame()
    assert list(frame["turn_id"]) == ["t1", "t2", "t3"] and "recall@10" in frame
    assert set(res.to_frame()["metric"]) == set(res.metrics)


def test_evaluate_turn_sample_is_seeded_and_fixed(ws):
    a = evaluate(ws, FakeRecommender(), "toy_test", turn_sample=2, seed=7)
    b = evaluate(ws, FakeRecommender(), "toy_test", turn_sample=2, seed=7)
    assert a.n_turns == 2 and [t.turn_id for t in a.turns] == [t.turn_id for t in b.turns]
    assert a.n_skipped == 2 and a.turn_sample == 2
    seeds = {tuple(t.turn_id for t in evaluate(ws, FakeRecommender(), "toy_test",
                                               turn_sample=2, seed=s).turns) for s in range(20)}
    assert len(seeds) > 1
    whole = evaluate(ws, FakeRecommender(), "toy_test", turn_sample=99)
    assert whole.n_turns == 3 and whole.turn_sample is None  # larger than the set: the whole set


def test_evaluate_errors(ws, tmp_path):
    with pytest.raises(EvalError, match="larger than the catalog"):
        evaluate(ws, FakeRecommender(), "toy_test", k_max=61)
    small = _workspace(tmp_path / "small.duckdb", n_items=30)
    with pytest.raises(EvalError, match=r"k_max=50 is larger than the catalog \(30 candidate items"):
        evaluate(small, FakeRecommender(), "toy_test")
    res = evaluate(small, FakeRecommender(), "toy_test", k_max=20)  # fine with a smaller k
    assert "recall@50" not in res.metrics and "ndcg@20" in res.metrics
    small.close()
    with pytest.raises(EvalError, match="no dialogue turns.*toy_test"):
        evaluate(ws, FakeRecommender(), "redial_test")
    with ws.transaction() as cur:
        cur.execute("INSERT INTO dialogue_turns VALUES ('all_mentioned', 'x', 'd', '[\"hi\"]', '', "
                    "'[\"i1\"]', '[]', '[\"i1\"]')")
    with pytest.raises(EvalError, match=r"none of its 1 turns.*mentioned earlier \(1\)"):
        evaluate(ws, FakeRecommender(), "all_mentioned")

    class Broken(FakeRecommender):
        def recommend(self, contexts, k, exclude=None):
            return [[]]

    with pytest.raises(EvalError, match="returned 1 rankings for 3"):
        evaluate(ws, Broken(), "toy_test")
    assert issubclass(EvalError, CRSError)


def test_candidates_limit_the_rankings(ws):
    everything_but_i9 = {f"i{j}" for j in range(N_ITEMS)} - {"i9"}
    res = evaluate(ws, FakeRecommender(), "toy_test", candidates=everything_but_i9)
    by_turn = {t.turn_id: t for t in res.turns}
    assert by_turn["t2"].ranked[0] == "i3" and by_turn["t2"].metrics["recall@1"] == 1.0
    assert all("i9" not in t.ranked for t in res.turns)
    assert res.candidates == "custom (59 items)"

    class Accepting(FakeRecommender):
        def recommend(self, contexts, k, exclude=None, candidates=None):
            self.got = candidates
            return super().recommend(contexts, k, exclude)

    rec = Accepting()
    evaluate(ws, rec, "toy_test", candidates=everything_but_i9)
    assert rec.got == everything_but_i9
    # "dataset": a ReDial-named dataset ranks ReDial's items (+ those its turns name)
    with ws.transaction() as cur:
        cur.execute("UPDATE items SET redial_id = item_id WHERE CAST(substr(item_id, 2) AS INT) >= 5")
        cur.execute("INSERT INTO dialogue_turns SELECT 'redial_test', turn_id, dialog_id, context, "
                    "resp, rec_items, rec_titles, mentioned_items FROM dialogue_turns "
                    "WHERE dataset = 'toy_test'")
    own = candidate_items(ws, "redial_test")
    assert own == {f"i{j}" for j in range(5, N_ITEMS)} | {"i0", "i1", "i2", "i3", "i4"}
    assert candidate_items(ws, "redial_test", "all") == {f"i{j}" for j in range(N_ITEMS)}
    assert candidate_items(ws, "toy_test") == candidate_items(ws, "toy_test", None)
    with ws.transaction() as cur:
        cur.execute("UPDATE items SET redial_id = NULL WHERE item_id IN ('i5', 'i6', 'i7')")
    res = evaluate(ws, FakeRecommender(), "redial_test")
    assert res.candidates == "dataset (57 items)"
    t3 = {t.turn_id: t for t in res.turns}["t3"]
    assert t3.ranked[:3] == ["i9", "i8", "i4"]  # i7, i6, i5 are not ReDial movies
    with pytest.raises(EvalError, match="candidates must be"):
        candidate_items(ws, "redial_test", "everything")


# ----------------------------------------------------------------------------- runs


def test_store_run_and_metrics_frame(ws):
    res = evaluate(ws, FakeRecommender(), "toy_test")
    one = evaluate(ws, FakeRecommender(), "toy_test", turn_sample=1)
    run_id = store_run(ws, {"model": "fake", "training_data": "none", "seed": 3,
                            "config": {"k": 1}}, {"toy_test": res})
    assert run_id.startswith("fake-")
    store_run(ws, {"model": "fake", "run_id": "r2", "budget": 100}, {"toy_test": one})
    df = metrics_frame(ws)
    assert len(df) == 16 and set(df["run_id"]) == {run_id, "r2"}
    assert list(df["metric"][:8]) == list(res.metrics)  # recall@1 ... ndcg@20, in that order
    row = df[(df.run_id == run_id) & (df.metric == "recall@1")].iloc[0]
    assert row["value"] == pytest.approx(res.value("recall@1"))
    assert row["stderr"] == pytest.approx(res.stderr("recall@1")) and row["n_turns"] == 3
    assert row["model"] == "fake" and row["seed"] == 3
    config = json.loads(row["config"])
    assert config["k"] == 1 and config["evaluation"]["toy_test"]["n_skipped"] == 2
    # one turn: no standard error (NULL), value still stored
    r2 = df[(df.run_id == "r2") & (df.metric == "recall@1")].iloc[0]
    assert math.isnan(r2["stderr"])
    wide = metrics_frame(ws, wide=True)
    assert len(wide) == 2 and "recall@10" in wide and "recall@10_se" in wide
    # atomic: a clashing run id writes nothing
    with pytest.raises(EvalError, match="already exists"):
        store_run(ws, {"model": "fake", "run_id": "r2"}, {"toy_test": res})
    assert ws.count("runs") == 2 and ws.count("metrics") == 16
    with pytest.raises(EvalError, match="model"):
        store_run(ws, {}, {"toy_test": res})
    rows = metrics_frame(ws)
    assert len(rows) == 16 and {"run_id", "model", "dataset", "metric", "value", "stderr"} <= set(rows.columns)


# ----------------------------------------------------------------------------- leakage guard


LEAK_TURNS = [
    # (dataset, turn_id, dialog_id, context, resp)
    ("redial_test", "r1", "dA", ["", "Hi! What kind of movies do you like?",
                                 "I really enjoyed Super Troopers, anything with that silly humour?"],
     "You should watch Police Academy"),
    ("redial_test", "r2", "dB", ["Hi! What kind of movies do you like?",
                                 "Something with dinosaurs and a theme park going wrong",
                                 "Have you seen it before", "No, never, tell me more about it please"],
     "Jurassic Park is great"),
    ("inspired_test", "s1", "dC", ["hello", "I am here to help you find a trailer",
                                   "I mostly watch documentaries about nature and wild animals"],
     "How about Planet Earth?"),
    ("inspired_train", "x1", "dT", ["This is a training dialogue about westerns and cowboys"],
     "Try Unforgiven"),
]


@pytest.fixture
def leak_ws(tmp_path):
    w = Workspace(tmp_path / "leak.duckdb")
    with w.transaction() as cur:
        cur.executemany(
            "INSERT INTO dialogue_turns VALUES (?, ?, ?, ?, ?, '[\"i1\"]', '[]', '[]')",
            [[ds, tid, did, json.dumps(ctx), resp] for ds, tid, did, ctx, resp in LEAK_TURNS],
        )
    yield w
    w.close()


def test_leakage_guard_passes_clean_training_data(leak_ws):
    clean = [
        # stock phrases shared with several test dialogues prove nothing
        ["Hi! What kind of movies do you like?", "I like westerns with cowboys and horses"],
        "Hi! What kind of movies do you like?",
        # one distinctive test sentence inside a real, different dialogue is not a copy
        ["hey", "Something with dinosaurs and a theme park going wrong", "Try The Lost World"],
        "I enjoyed Super Troopers, anything else?",          # overlaps, but not the same text
        "This is a training dialogue about westerns and cowboys",  # a train set is not a test set
        "short",
    ]
    check_no_test_leakage(leak_ws, clean)
    check_no_test_leakage(leak_ws, [])


@pytest.mark.parametrize("training, rule", [
    # a whole test context (normalised: case, punctuation and spacing differ)
    ([["hi what kind of movies do you like",
       "I really enjoyed SUPER TROOPERS -- anything with that silly humour"]], "whole test context"),
    # the same as one string with one utterance per line
    (["Hi! What kind of movies do you like?\nI really enjoyed Super Troopers, anything with "
      "that silly humour?\nYou should watch Police Academy"], "whole test context"),
    # two distinctive utterances of one test dialogue (here the response and a context line)
    ([["No, never, tell me more about it please", "jurassic park is great!"]], "utterances of one"),
    # a synthetic query that copies a test utterance
    (["I mostly watch documentaries about nature and wild animals"], "copying a test utterance"),
])
def test_leakage_guard_catches_copies_of_test_dialogues(leak_ws, training, rule):
    with pytest.raises(LeakageError, match=rule) as info:
        check_no_test_leakage(leak_ws, ["an unrelated query about space movies"] + training)
    assert info.value.leaks[0]["training_index"] == 1
    assert issubclass(LeakageError, CRSError)


def test_leakage_guard_scope_and_threshold(leak_ws):
    copy = ["I mostly watch documentaries about nature and wild animals"]
    check_no_test_leakage(leak_ws, copy, test_datasets=["redial_test"])  # other test set
    with pytest.raises(LeakageError, match="inspired_test"):
        check_no_test_leakage(leak_ws, copy, test_datasets=["inspired_test"])
    check_no_test_leakage(leak_ws, copy, min_chars=200)  # nothing is long enough to count
