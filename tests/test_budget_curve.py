"""crs_core.budget_curve on the small real workspace (bundled data, MiniLM embeddings, real
selection, synthesis, NBCRS and evaluation) against the OpenAI-compatible test server."""

from __future__ import annotations

import hashlib

import pytest

from conftest import copy_workspace
from crs_core.budget_curve import (BudgetCurveError, budget_curve_frame, describe_params, list_experiments,
                                   run_budget_curve)
from crs_core.cli import main
from crs_core.evaluate import EvalError, evaluate
from crs_core.recommenders import NBCRS, training_set_from_synthetic
from crs_core.selections import load_selection, run_selection
from crs_core.store import Workspace
from crs_core.teacher import Budget, Teacher, TeacherConfig
from openai_stub_server import OpenAIStubServer

KEY = "sk-test-budget-curve"
TEST_SET = "inspired_test"
TURNS = 40
WORDS = ["heist", "courtroom", "space", "road-trip", "haunted-house", "boxing", "time-travel", "wedding"]


@pytest.fixture()
def ws_path(studio_workspace_file, tmp_path):
    return copy_workspace(studio_workspace_file, tmp_path / "bc.duckdb")


@pytest.fixture()
def ws(ws_path):
    w = Workspace(ws_path)
    yield w
    w.close()


def _listing(ws) -> str:
    titles = ws.df("SELECT title, year FROM items WHERE year IS NOT NULL AND item_id IN "
                   "(SELECT item_id FROM reviews) ORDER BY item_id LIMIT 12")
    return "\n".join(f"{n}. {t} ({int(y)})" for n, (t, y) in enumerate(zip(titles["title"], titles["year"]), 1))


@pytest.fixture()
def stub(ws):
    listing = _listing(ws)

    def reply(messages):
        user = messages[-1]["content"]
        if user.startswith("Pretend you are a movie recommender system"):
            return listing
        # a different, plausible query per prompt (the prompt holds the item's reviews)
        h = int(hashlib.sha1(user.encode()).hexdigest(), 16)
        a, b = WORDS[h % len(WORDS)], WORDS[(h // 8) % len(WORDS)]
        return f"Could you suggest a {a} film with some {b} moments and characters I can root for? (#{h % 997})"

    with OpenAIStubServer(reply=reply) as server:
        yield server


def teacher_for(stub, ws, **budget) -> Teacher:
    cfg = TeacherConfig.openai(stub.base_url, "gpt-4o-mini", api_key=KEY, timeout=10.0, max_attempts=2,
                               backoff_base=0.01, backoff_max=0.05, concurrency=1)
    return Teacher(cfg, cache=ws, budget=Budget(**budget) if budget else None)


def run(ws, teacher, **kw):
    args = dict(strategies=["RANDOM_UNIFORM", "JS", "FISHER"], budgets=[2, 5], datasets=[TEST_SET],
                turn_sample=TURNS, gt_mode="llm", k=4)
    args.update(kw)
    return run_budget_curve(ws, teacher, **args)


def state(ws) -> dict:
    return {t: ws.count(t) for t in ("selections", "synthetic_queries", "budget_curve_points",
                                     "budget_curve_experiments", "runs", "llm_cache")}


def test_points_are_stored_and_a_second_run_reuses_them(ws, stub):
    with teacher_for(stub, ws) as teacher:
        rep = run(ws, teacher)
    assert rep.complete, rep.errors
    assert rep.computed == 6 and rep.reused == 0
    assert rep.teacher_calls == stub.chat_requests > 0
    pts = budget_curve_frame(ws, rep.experiment_id)
    assert set(pts["strategy"]) == {"RANDOM_UNIFORM", "JS", "FISHER"} and set(pts["budget"]) == {2, 5}
    assert {"recall@5", "ndcg@5", "recall@50"} <= set(pts["metric"])
    assert (pts["dataset"] == TEST_SET).all() and (pts["n_turns"] == TURNS).all()
    assert (pts["teacher"] == "openai:gpt-4o-mini").all() and (pts["gt_mode"] == "llm").all()
    assert pts["value"].between(0, 1).all() and pts["stderr"].notna().all()
    per_point = pts.drop_duplicates(["strategy", "budget"]).set_index(["strategy", "budget"])["n_train"]
    for strategy in ("RANDOM_UNIFORM", "JS", "FISHER"):
        assert 0 < per_point[(strategy, 2)] <= 2 and per_point[(strategy, 2)] <= per_point[(strategy, 5)] <= 5
    # K = 1 and llm ground truth: a query and a list per item; an item picked by two strategies
    # is the same prompt, so the teacher's cache answers the second time
    items = ws.scalar("SELECT count(DISTINCT item_id) FROM synthetic_queries WHERE selection_id IN "
                      "(SELECT unnest(?::VARCHAR[]))", [list(rep.selections.values())])
    assert stub.chat_requests == 2 * items
    assert list_experiments(ws)["experiment_id"].tolist() == [rep.experiment_id]

    before, requests = state(ws), stub.chat_requests
    stamps = budget_curve_frame(ws, rep.experiment_id)[["strategy", "budget", "metric", "created_at"]]
    with teacher_for(stub, ws) as teacher:
        again = run(ws, teacher)
    assert again.experiment_id == rep.experiment_id
    assert again.computed == 0 and again.reused == 6 and again.teacher_calls == 0
    assert stub.chat_requests == requests and state(ws) == before
    assert budget_curve_frame(ws, rep.experiment_id)[["strategy", "budget", "metric", "created_at"]].equals(stamps)


def test_a_point_is_nbcrs_trained_on_the_first_b_picks(ws, stub):
    with teacher_for(stub, ws) as teacher:
        rep = run(ws, teacher, strategies=["JS"], budgets=[3, 6])
    sel = rep.selections["JS"]
    picks = load_selection(ws, sel)["unit_id"].tolist()
    assert len(picks) == 6
    # prefix consistency: a selection with the smaller budget picks the same first items
    small = run_selection(ws, "JS", 3, unit="item", k=4, seed=0)
    assert load_selection(ws, small)["unit_id"].tolist() == picks[:3]
    # the B=3 point is NBCRS trained on the queries of exactly those items
    train = training_set_from_synthetic(ws, statuses=("pending", "approved"), selection_id=sel)
    items = dict(ws.cursor().execute("SELECT query_id, item_id FROM synthetic_queries WHERE selection_id = ?",
                                     [sel]).fetchall())
    rec = NBCRS(ws)
    rec.fit([e for e in train.examples if items[e.example_id] in set(picks[:3])])
    direct = evaluate(ws, rec, TEST_SET, turn_sample=TURNS, seed=0)
    pts = budget_curve_frame(ws, rep.experiment_id, budgets=[3], metrics=["recall@5", "ndcg@5"])
    assert pts.set_index("metric")["value"].to_dict() == pytest.approx(
        {m: direct.value(m) for m in ("recall@5", "ndcg@5")})
    assert pts["n_train"].iloc[0] == rec.n_train


def test_a_larger_budget_later_only_synthesises_the_new_items(ws, stub):
    with teacher_for(stub, ws) as teacher:
        first = run(ws, teacher, strategies=["FISHER"], budgets=[2])
        calls = stub.chat_requests
        more = run(ws, teacher, strategies=["FISHER"], budgets=[2, 4])
    assert more.experiment_id == first.experiment_id
    assert more.reused == 1 and more.computed == 1
    assert more.teacher_calls == stub.chat_requests - calls == 2 * 2  # two new items, query + list each
    assert sorted(budget_curve_frame(ws, first.experiment_id)["budget"].unique()) == [2, 4]


def test_a_teacher_budget_that_runs_out_stores_no_point_then_a_rerun_completes(ws, stub):
    with teacher_for(stub, ws, max_calls=3) as teacher:
        rep = run(ws, teacher, strategies=["RANDOM_UNIFORM"], budgets=[4])
    assert not rep.complete and "budget" in rep.errors["RANDOM_UNIFORM"]
    assert ws.count("budget_curve_points") == 0
    with teacher_for(stub, ws) as teacher:
        rep = run(ws, teacher, strategies=["RANDOM_UNIFORM"], budgets=[4])
    assert rep.complete and rep.computed == 1
    assert stub.chat_requests == 8  # 4 items x (query + list); the first run's 3 calls were cached


def test_a_stopped_run_keeps_its_points_and_a_rerun_resumes(ws, stub):
    """The studio's Stop: checked before every strategy and point and passed to the synthesis;
    points stored before it are kept, and the same settings resume without paying a call twice."""
    import threading

    stop = threading.Event()
    seen = []
    with teacher_for(stub, ws) as teacher:
        rep = run(ws, teacher, strategies=["RANDOM_UNIFORM"], budgets=[2], stop=stop,
                  on_experiment=lambda exp: (seen.append(exp), stop.set()))
    assert seen == [rep.experiment_id] and rep.stopped and not rep.complete
    assert rep.computed == 0 and ws.count("budget_curve_points") == 0 and stub.chat_requests == 0
    assert "run it again to resume" in "\n".join(rep.lines())

    stop.clear()
    with teacher_for(stub, ws) as teacher:  # stops during the second strategy's synthesis
        def progress(done, total):
            if ws.count("budget_curve_points") and stub.chat_requests > 4:
                stop.set()
        rep = run(ws, teacher, strategies=["RANDOM_UNIFORM", "FISHER"], budgets=[2], stop=stop, progress=progress)
    assert rep.stopped and rep.computed == 1
    kept = budget_curve_frame(ws, rep.experiment_id)[["strategy", "budget"]].drop_duplicates()
    assert kept.values.tolist() == [["RANDOM_UNIFORM", 2]]
    paid = stub.chat_requests
    with teacher_for(stub, ws) as teacher:
        again = run(ws, teacher, strategies=["RANDOM_UNIFORM", "FISHER"], budgets=[2])
    assert again.complete and again.experiment_id == rep.experiment_id
    assert again.reused == 1 and again.computed == 1
    # only FISHER's second item is left (query + list): its first was stored before the stop
    assert again.teacher_calls == stub.chat_requests - paid == 2


@pytest.mark.parametrize("kw, message", [
    ({"budgets": [0, 5]}, "positive whole numbers"),
    ({"budgets": [-3]}, "positive whole numbers"),
    ({"budgets": [2, 100_000]}, "larger than the"),
    ({"strategies": ["JS", "MAGIC"]}, "unknown strategy 'MAGIC'"),
    ({"strategies": []}, "at least one selection strategy"),
    ({"set_id": "review:nothing"}, "does not exist yet"),
    ({"queries_per_item": 0}, "at least 1"),
    ({"gt_mode": "guess"}, "ground-truth mode"),
    ({"turn_sample": 0}, "at least 1"),
    ({"datasets": []}, "at least one test set"),
    ({"student": "magic"}, "unknown student 'magic'"),
    ({"student_config": {"epochs": 1}}, "student settings are for"),
    ({"student": "retriever", "student_config": {"epochs": 0}}, "epochs must be >= 1"),
    ({"student": "retriever", "student_config": {"learning_rate": 1}}, "unknown RetrieverConfig option"),
    ({"student": "retriever-hybrid", "student_config": {"labels": "two_stage"}}, "labels='real'"),
])
def test_bad_input_is_refused_before_anything_is_stored(ws, stub, kw, message):
    before = state(ws)
    with teacher_for(stub, ws) as teacher, pytest.raises(BudgetCurveError, match=message):
        run(ws, teacher, **kw)
    assert state(ws) == before and stub.chat_requests == 0


def test_the_retriever_student_fine_tunes_per_point_and_is_an_experiment_of_its_own(ws, stub):
    """A point of the retriever student is the bi-encoder fine-tuned on the queries of its first
    B picks (train_retriever), evaluated like NBCRS; its item vectors never enter the workspace's
    embedding cache, and a different student over the same picks is a different experiment whose
    queries the teacher's cache answers."""
    # two steps and short texts: the 1.6k INSPIRED candidates are encoded by the fine-tuned model
    tiny = {"epochs": 1, "max_steps": 2, "batch_size": 8, "item_max_len": 32, "query_max_len": 32}
    cached_models = "SELECT count(DISTINCT model) FROM embedding_cache"
    # retrieved ground truth: the stub's one listing would make every item a label of every query
    with teacher_for(stub, ws) as teacher:
        nbcrs = run(ws, teacher, strategies=["JS"], budgets=[3], gt_mode="retrieve")
        models_before, calls = ws.scalar(cached_models), stub.chat_requests
        rep = run(ws, teacher, strategies=["JS"], budgets=[3], gt_mode="retrieve", student="retriever",
                  student_config=tiny)
    assert rep.complete and rep.computed == 1, (rep.errors, rep.notes)
    assert rep.experiment_id != nbcrs.experiment_id
    assert rep.teacher_calls == 0 and stub.chat_requests == calls  # the same items: every call cached
    assert rep.params["recommender"] == {"kind": "retriever", "train": {"seed": 0, **tiny}}
    pts = budget_curve_frame(ws, rep.experiment_id)
    assert set(pts["strategy"]) == {"JS"} and set(pts["budget"]) == {3} and (pts["n_turns"] == TURNS).all()
    assert {"recall@5", "ndcg@5"} <= set(pts["metric"]) and pts["value"].between(0, 1).all()
    n_queries = ws.scalar("SELECT count(*) FROM synthetic_queries WHERE selection_id = ?", [rep.selections["JS"]])
    assert (pts["n_train"] == n_queries).all() and n_queries > 0
    assert ws.scalar(cached_models) == models_before
    assert "student retriever" in list_experiments(ws).pipe(
        lambda e: describe_params(e.set_index("experiment_id").loc[rep.experiment_id, "params"]))


def test_unknown_test_set_and_zero_teacher_budget_are_refused(ws, stub):
    before = state(ws)
    with teacher_for(stub, ws) as teacher, pytest.raises(EvalError, match="no dialogue turns"):
        run(ws, teacher, datasets=["nope_test"])
    with teacher_for(stub, ws, max_calls=0) as teacher, pytest.raises(BudgetCurveError, match="budget is 0"):
        run(ws, teacher)
    assert state(ws) == before and stub.chat_requests == 0


def test_a_workspace_without_embeddings_is_refused(tmp_path, stub, studio_workspace_file):
    path = copy_workspace(studio_workspace_file, tmp_path / "noemb.duckdb")
    with Workspace(path) as w:
        with w.transaction() as cur:
            for table in ("embedding_rows", "embedding_sets", "projections", "cluster_assignments", "clusterings"):
                cur.execute(f"DELETE FROM {table}")
        before = state(w)
        with teacher_for(stub, w) as teacher, pytest.raises(BudgetCurveError, match="run `python -m crs_core init`"):
            run(w, teacher)
        assert state(w) == before and stub.chat_requests == 0


def test_cli_prints_the_table_and_stores_runs(ws_path, stub, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    argv = ["--workspace", str(ws_path), "budget-curve", "--strategies", "random_uniform", "fisher",
            "--budgets", "3", "2", "--datasets", TEST_SET, "--turn-sample", "30", "--gt-mode", "llm",
            "--base-url", stub.base_url, "--model", "gpt-4o-mini", "--store-runs"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 point(s) computed now, 0 reused" in out
    assert "B=2" in out and "B=3" in out and "recall@5" in out and "ndcg@5" in out and "FISHER" in out
    with Workspace(ws_path) as w:
        runs = w.df("SELECT run_id, selection_strategy, budget FROM runs WHERE selection_strategy IS NOT NULL")
        assert sorted(zip(runs["selection_strategy"], runs["budget"])) == [
            ("FISHER", 2), ("FISHER", 3), ("RANDOM_UNIFORM", 2), ("RANDOM_UNIFORM", 3)]
        assert w.scalar("SELECT count(*) FROM budget_curve_points WHERE run_id IS NULL") == 0
    assert main(argv) == 0
    assert "0 point(s) computed now, 4 reused" in capsys.readouterr().out
    assert main(argv[:7] + ["0"] + argv[9:]) == 1
    assert "budgets must be positive" in capsys.readouterr().err
    assert main(argv + ["--student", "retriever", "--student-config", '{"epochs": 0}']) == 1
    assert "epochs must be >= 1" in capsys.readouterr().err
