"""Evaluation of trained and generative models (crs_core.model_eval) on the small real workspace
(bundled ReDial / INSPIRED test sets, full catalog): model references and their errors, the
turn sample of an LM evaluation, and the import of a generation job (grounding, scoring,
storing once). The generation job and the LM itself run for real in tests/test_cli.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conftest import copy_workspace  # noqa: E402
from crs_core import jobs, model_eval  # noqa: E402
from crs_core.evaluate import EvalError, load_eval_turns, sample_turns  # noqa: E402
from crs_core.errors import CRSError  # noqa: E402
from crs_core.store import Workspace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def ws(studio_workspace_file, tmp_path):
    w = Workspace(copy_workspace(studio_workspace_file, tmp_path / "ws.duckdb"))
    yield w
    w.close()


# ----------------------------------------------------------------------------- model references


def test_unknown_job_and_missing_folder_are_clear_errors(ws, tmp_path):
    with pytest.raises(model_eval.ModelNotFoundError, match="no job 'train_retriever-nope'"):
        model_eval.resolve_model(ws, "train_retriever-nope", model_eval.KIND_RETRIEVER)
    with pytest.raises(model_eval.ModelNotFoundError, match="does not exist"):
        model_eval.dense_retriever(ws, str(tmp_path / "gone" / "model"))
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(model_eval.ModelNotFoundError, match="not a trained retriever folder"):
        model_eval.dense_retriever(ws, str(empty))
    assert issubclass(model_eval.ModelNotFoundError, CRSError)


def test_a_failed_or_running_job_is_not_evaluated(ws, tmp_path, monkeypatch):
    root = tmp_path / "jobs"
    # a real retriever job whose inputs cannot be used: the worker fails
    failed = jobs.launch_job(ws, model_eval.KIND_RETRIEVER, {},
                             {"train": [{"context": ["a query"], "labels": ["x"]}], "items": []}, root)
    st = jobs.wait_for_job(jobs.job_folder(ws, failed), timeout=300)
    assert st.state == "failed"
    with pytest.raises(model_eval.ModelNotReadyError, match=f"{failed} failed"):
        model_eval.resolve_model(ws, failed, model_eval.KIND_RETRIEVER)
    # a running job (the conftest runner, slow steps)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    running = jobs.launch_job(ws, model_eval.KIND_SFT, {"steps": 500, "delay": 0.5}, {"train": []}, root,
                              runner="conftest:fake_training_runner")
    folder = jobs.job_folder(ws, running)
    try:
        with pytest.raises(model_eval.ModelNotReadyError, match="still (queued|running)"):
            model_eval.launch_lm_eval(ws, running, ["inspired_test"], turn_sample=1)
        # a job of the other kind is refused by name
        with pytest.raises(EvalError, match="is a train_lm job"):
            model_eval.resolve_model(ws, running, model_eval.KIND_RETRIEVER)
    finally:
        jobs.cancel_job(folder, grace_seconds=5, wait=True)
    assert ws.count("runs") == 1  # only the fixture's baseline: nothing was stored


# ----------------------------------------------------------------------------- LM evaluation plan


def test_lm_plan_is_a_fixed_seeded_sample_and_a_larger_sample_is_the_whole_set(ws):
    plan, contexts = model_eval.plan_lm_eval(ws, ["inspired_test", "redial_test"], 5, seed=3)
    again, _ = model_eval.plan_lm_eval(ws, ["inspired_test", "redial_test"], 5, seed=3)
    other, _ = model_eval.plan_lm_eval(ws, ["inspired_test"], 5, seed=4)
    assert plan == again and plan["inspired_test"]["turn_ids"] != other["inspired_test"]["turn_ids"]
    assert [len(p["turn_ids"]) for p in plan.values()] == [5, 5]
    assert plan["inspired_test"]["turn_sample"] == 5
    assert len(contexts) == 10 and all(isinstance(c, list) and c for c in contexts.values())
    # the sample is the one `evaluate` would take for the same seed
    turns, _, _ = load_eval_turns(ws, "inspired_test")
    assert [t.turn_id for t in sample_turns(turns, 5, 3)[0]] == plan["inspired_test"]["turn_ids"]

    whole, _ = model_eval.plan_lm_eval(ws, ["inspired_test"], 10**6)
    assert len(whole["inspired_test"]["turn_ids"]) == len(turns)
    assert whole["inspired_test"]["turn_sample"] is None  # recorded as the full set
    with pytest.raises(EvalError, match="turn_sample must be >= 1"):
        model_eval.plan_lm_eval(ws, ["inspired_test"], 0)
    with pytest.raises(EvalError, match="no dialogue turns"):
        model_eval.plan_lm_eval(ws, ["nope_test"], 5)


def _finished_generation(tmp_path: Path, plan: dict, titles: dict[str, list[str]], job_id: str = "lm_generate-t1"):
    """The folder and state of a finished generation job as `run_generate_job` leaves them."""
    folder = tmp_path / job_id
    folder.mkdir()
    with open(folder / "generations.jsonl", "w") as fh:
        for cid, t in titles.items():
            fh.write(json.dumps({"id": cid, "titles": t}) + "\n")
    config = {"n": 20, "model_name": "test-lm", "lm": "zero-shot", "training_data": "none", "seed": 0,
              "evaluation": plan}
    return SimpleNamespace(job_id=job_id, folder=folder, config=config, state="succeeded",
                           result={"model_dir": "/models/test", "seconds_per_context": 1.0})


def test_import_grounds_titles_scores_and_stores_once(ws, tmp_path):
    plan, contexts = model_eval.plan_lm_eval(ws, ["inspired_test"], 4, seed=0)
    turns = {t.turn_id: t for t in load_eval_turns(ws, "inspired_test")[0]}
    titles = ws.df("SELECT item_id, title, year FROM items")
    by_id = {r["item_id"]: r["title"] if pd.isna(r["year"]) else f"{r['title']} ({int(r['year'])})"
             for r in titles.to_dict("records")}
    gens = {}
    for i, tid in enumerate(plan["inspired_test"]["turn_ids"]):
        label = by_id[turns[tid].labels[0]]
        # turn 0: the right film first; turn 1: at rank 3 behind a made-up title and another film;
        # turns 2-3: nothing that matches the catalog
        gens[f"inspired_test/{tid}"] = ([label, "Heat (1995)"] if i == 0 else
                                        ["Zzzq Not A Film (2031)", "Heat (1995)", label] if i == 1 else
                                        ["Qqqx Imaginary Movie (2040)", "1. ???"])
    state = _finished_generation(tmp_path, plan, gens)
    run_id = model_eval.store_lm_eval(ws, state)
    assert run_id == model_eval.lm_run_id(state.job_id)
    res = model_eval.run_results(ws, run_id)["inspired_test"]
    n_labels = [len(turns[t].labels) for t in plan["inspired_test"]["turn_ids"][:2]]
    assert res["recall@1"][0] == pytest.approx((1 / n_labels[0]) / 4)
    assert res["recall@20"][0] == pytest.approx((1 / n_labels[0] + 1 / n_labels[1]) / 4)
    assert res["recall@20"][2] == 4  # n_turns
    cfg = json.loads(ws.scalar("SELECT config FROM runs WHERE run_id = ?", [run_id]))
    assert cfg["grounding"]["inspired_test"]["contexts"] == 4
    assert cfg["generation_job"] == state.job_id and cfg["evaluation"]["inspired_test"]["turn_sample"] == 4
    # importing again stores nothing twice
    assert model_eval.store_lm_eval(ws, state) == run_id
    assert ws.scalar("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]) == 1


def test_titles_that_match_nothing_give_recall_zero(ws, tmp_path):
    plan, _ = model_eval.plan_lm_eval(ws, ["redial_test"], 3, seed=1)
    gens = {f"redial_test/{t}": ["Qqqx Imaginary Movie (2040)", "Zzzq Not A Film"] for t in plan["redial_test"]["turn_ids"]}
    gens.pop(next(iter(gens)))  # and one turn without any generation
    state = _finished_generation(tmp_path, plan, gens, "lm_generate-t2")
    results, grounding = model_eval.lm_eval_results(ws, state)
    r = results["redial_test"]
    assert r.n_turns == 3 and r.value("recall@50") == 0.0 and r.value("ndcg@20") == 0.0
    assert grounding["redial_test"] == {"contexts": 3, "titles": 4, "matched": 0, "without_generation": 1}


def test_import_refuses_a_job_that_is_not_an_lm_evaluation(ws, tmp_path):
    state = _finished_generation(tmp_path, {}, {}, "lm_generate-t3")
    with pytest.raises(EvalError, match="not an LM evaluation"):
        model_eval.store_lm_eval(ws, state)
    with pytest.raises(model_eval.ModelNotFoundError, match="no job"):
        model_eval.wait_for_lm_eval(ws, "lm_generate-none")


# ----------------------------------------------------------------------------- one loader everywhere


def test_the_page_and_the_cli_rank_identically_with_a_trained_retriever(monkeypatch, studio_workspace_file, tmp_path):
    """A tiny retriever trained by a real job: the Evaluation page's drill-down and the CLI's
    `eval --retriever` path give the same rankings turn by turn (the page used to load the folder
    as a plain SentenceTransformer: another query text and truncation, other rankings)."""
    from streamlit.testing.v1 import AppTest

    from crs_core import train
    from crs_core.evaluate import evaluate
    from crs_core.recommenders import Catalog, training_set_from_turns

    path = copy_workspace(studio_workspace_file, tmp_path / "ws.duckdb")
    with Workspace(path) as w:
        turns = [e for e in training_set_from_turns(w, "inspired_train").examples if e.context][:12]
        catalog = Catalog.from_workspace(w)
        items = {i: catalog.texts[catalog.index[i]] for e in turns for i in e.labels if i in catalog.index}
        cfg = {"batch_size": 4, "max_steps": 2, "query_turns": 2, "query_max_len": 24, "item_max_len": 24}
        job_id = train.launch_training(w, train.KIND_RETRIEVER, [{"context": e.context, "labels": e.labels}
                                                                  for e in turns], items, cfg,
                                       jobs_root=tmp_path / "jobs")
        st = jobs.wait_for_job(jobs.job_folder(w, job_id), timeout=600, poll=0.5)
        assert st.state == "succeeded", jobs.read_log(st.folder)
        rec, _ref = model_eval.dense_retriever(w, job_id, ["inspired_test"])  # what `eval --retriever` runs
        cli = evaluate(w, rec, "inspired_test", turn_sample=25)

    monkeypatch.setenv("CRS_WORKSPACE", str(path))
    monkeypatch.setenv("CRS_JOBS_ROOT", str(tmp_path / "jobs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/evaluation.py")
    at.run()
    at.selectbox(key="ev_kind").set_value(f"trained:{job_id}")
    at.selectbox(key="ev_test").set_value("inspired_test")
    at.number_input(key="ev_sample").set_value(25)
    at.button(key="ev_go").click().run()
    assert not at.exception and not at.error, [e.value for e in list(at.exception) + list(at.error)]
    page = at.session_state["ev_result"]
    assert [t.turn_id for t in page.turns] == [t.turn_id for t in cli.turns] and len(cli.turns) == 25
    assert [t.ranked for t in page.turns] == [t.ranked for t in cli.turns]
    assert page.value("recall@50") == cli.value("recall@50")


def test_supervised_training_data_never_holds_a_test_turn(ws):
    """What the supervised bench rows (and `train --data`) fit on: a train split, checked
    against every test dialogue; a test split, or a train split with a test dialogue in it, is refused."""
    from crs_core.evaluate import LeakageError

    examples, items = model_eval.supervised_training_data(ws, "inspired_train")
    assert len(examples) > 1000 and all(e["context"] for e in examples)
    assert {i for e in examples for i in e["labels"]} == set(items)
    test_contexts = {tuple(t.context) for t in load_eval_turns(ws, "inspired_test")[0]}
    assert not test_contexts & {tuple(e["context"]) for e in examples}
    with pytest.raises(EvalError, match="test split"):
        model_eval.supervised_training_data(ws, "inspired_test")
    turn = next(t for t in load_eval_turns(ws, "inspired_test")[0] if len(t.context) >= 4)
    with ws.transaction() as cur:  # a test dialogue's turn slipped into the train split
        cur.execute("INSERT INTO dialogue_turns SELECT 'inspired_train', turn_id || '-copy', dialog_id, context, "
                    "resp, rec_items, rec_titles, mentioned_items FROM dialogue_turns "
                    "WHERE dataset = 'inspired_test' AND turn_id = ?", [turn.turn_id])
    with pytest.raises(LeakageError, match="repeat test dialogues"):
        model_eval.supervised_training_data(ws, "inspired_train")
