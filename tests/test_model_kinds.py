"""crs_core.model_kinds: a kind registered once appears in the CLI, the pages and the job worker
without editing them."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from conftest import ROOT, copy_workspace
from crs_core import cli, jobs, model_kinds
from crs_core.store import Workspace

TOY = model_kinds.ModelKind(
    kind="train_toy", cli_name="toy", label="Toy model (test)", short_label="Toy", default_epochs=2,
    config="crs_core.train:RetrieverConfig", trainer="crs_core.train:train_retriever",
    runner="conftest:fake_training_runner")


@pytest.fixture()
def toy_kind(monkeypatch):
    monkeypatch.setitem(model_kinds._KINDS, TOY.kind, TOY)
    return TOY


def _choices(parser, command: str, option: str) -> list[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return list(next(a for a in sub._actions if option in a.option_strings).choices)


def test_builtin_kinds_and_their_objects():
    assert [k.cli_name for k in model_kinds.kinds()][:2] == ["retriever", "sft"]
    from crs_core.train import RetrieverConfig, run_sft_job

    assert model_kinds.RETRIEVER.resolve("config") is RetrieverConfig
    assert model_kinds.SFT.resolve("runner") is run_sft_job
    assert jobs.runner_for("train_lm") == model_kinds.SFT.runner
    assert jobs.runner_for("lm_generate") == "crs_core.train:run_generate_job"
    with pytest.raises(KeyError, match="unknown model kind 'nope'"):
        model_kinds.by_cli_name("nope")
    with pytest.raises(ValueError, match="already called"):
        model_kinds.register(model_kinds.ModelKind(**{**TOY.__dict__, "kind": "other", "cli_name": "retriever"}))


def test_a_registered_kind_reaches_the_cli_the_pages_and_the_worker(toy_kind, monkeypatch, studio_workspace_file,
                                                                     tmp_path):
    assert "toy" in _choices(cli.build_parser(), "train", "--kind")
    path = copy_workspace(studio_workspace_file, tmp_path / "kinds.duckdb")
    monkeypatch.setenv("CRS_WORKSPACE", str(path))
    monkeypatch.setenv("CRS_JOBS_ROOT", str(tmp_path / "jobs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("pages/training.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Toy model (test)" in at.selectbox(key="tr_kind").options
    at.switch_page("pages/augmentation.py")
    at.run()
    assert "Toy" in at.selectbox(key="aug_new_kind").options
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # the worker imports conftest's runner
    with Workspace(path) as ws:
        job_id = jobs.launch_job(ws, "train_toy", {"steps": 2}, {"train": [{"context": ["hi"], "labels": ["x"]}]},
                                 tmp_path / "jobs")  # no runner= : the registry names it
        state = jobs.wait_for_job(jobs.job_folder(ws, job_id), timeout=120)
    assert state.state == "succeeded" and state.kind == "train_toy"
