"""crs_core.model_kinds: a kind registered once appears in the CLI, the pages and the job worker
without editing them."""

from __future__ import annotations

import pytest

from conftest import ROOT, cli_choices, copy_workspace, studio_page
from crs_core import jobs, model_kinds
from crs_core.store import Workspace

TOY = model_kinds.ModelKind(
    kind="train_toy", cli_name="toy", label="Toy model (test)", short_label="Toy", default_epochs=2,
    config="crs_core.train:RetrieverConfig", trainer="crs_core.train:train_retriever",
    planned_steps="crs_core.train_retriever:planned_steps", loader="crs_core.recommenders:load_retriever",
    evaluator="crs_core.model_eval:dense_retriever", runner="conftest:fake_training_runner")


@pytest.fixture()
def toy_kind(monkeypatch):
    monkeypatch.setitem(model_kinds._KINDS, TOY.kind, TOY)
    return TOY


def test_builtin_kinds_and_their_objects():
    assert [k.cli_name for k in model_kinds.kinds()][:2] == ["retriever", "sft"]
    from crs_core.train import RetrieverConfig, run_sft_job

    assert model_kinds.RETRIEVER.resolve("config") is RetrieverConfig
    assert model_kinds.SFT.resolve("runner") is run_sft_job
    assert model_kinds.RETRIEVER.resolve("runner") is run_sft_job  # one runner; the job's kind picks the rest
    from crs_core.model_eval import dense_retriever, launch_lm_eval
    from crs_core.recommenders import load_retriever
    from crs_core.train_lm import load_lm

    assert model_kinds.RETRIEVER.resolve("loader") is load_retriever
    assert model_kinds.SFT.resolve("loader") is load_lm
    assert model_kinds.RETRIEVER.resolve("evaluator") is dense_retriever and not model_kinds.RETRIEVER.evaluated_in_job
    assert model_kinds.SFT.resolve("evaluator") is launch_lm_eval and model_kinds.SFT.evaluated_in_job
    assert jobs.runner_for("train_lm") == model_kinds.SFT.runner
    assert jobs.runner_for("lm_generate") == "crs_core.train:run_generate_job"
    with pytest.raises(KeyError, match="unknown model kind 'nope'"):
        model_kinds.by_cli_name("nope")
    with pytest.raises(ValueError, match="already called"):
        model_kinds.register(model_kinds.ModelKind(**{**TOY.__dict__, "kind": "other", "cli_name": "retriever"}))


def test_a_registered_kind_reaches_the_cli_the_pages_and_the_worker(toy_kind, monkeypatch, studio_workspace_file,
                                                                     tmp_path):
    assert "toy" in cli_choices("train", "--kind")
    path = copy_workspace(studio_workspace_file, tmp_path / "kinds.duckdb")
    at = studio_page(monkeypatch, path, "pages/training.py")
    assert "Toy model (test)" in at.selectbox(key="tr_kind").options
    at = studio_page(monkeypatch, path, "pages/augmentation.py")
    assert "Toy" in at.selectbox(key="aug_new_kind").options
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # the worker imports conftest's runner
    with Workspace(path) as ws:
        job_id = jobs.launch_job(ws, "train_toy", {"steps": 2, "result": {"model_dir": str(tmp_path)}},
                                 {"train": [{"context": ["hi"], "labels": ["x"]}]},
                                 tmp_path / "jobs")  # no runner= : the registry names it
        state = jobs.wait_for_job(jobs.job_folder(ws, job_id), timeout=120)
    assert state.state == "succeeded" and state.kind == "train_toy"
    # a finished model of a kind evaluated in process is offered beside the baselines
    at = studio_page(monkeypatch, path, "pages/evaluation.py")
    assert f"Trained toy {job_id}" in at.selectbox(key="ev_kind").options
