"""crs_core.strategies: the registry's rules, and a strategy registered once reaching the CLI, the
pages and a stored selection without editing them."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from conftest import ROOT, copy_workspace
from crs_core import cli, strategies
from crs_core.selections import run_selection, selection_info
from crs_core.store import Workspace
from crs_core.strategies import Strategy

NEW = Strategy("TEST_METADATA_FISHER", "Test: Fisher + metadata", "fisher", ("review", "metadata"))


def _choices(parser, command: str, option: str) -> list[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return list(next(a for a in sub._actions if option in a.option_strings).choices)


def test_builtin_strategies_say_what_they_need():
    assert strategies.names() == ("RANDOM_UNIFORM", "JS", "FISHER", "METADATA_JS", "METADATA_FISHER",
                                  "USER_JS", "USER_FISHER")
    js, user_fisher = strategies.get("js"), strategies.get("USER_FISHER")
    assert js.needs_centres and not js.uses_metadata
    assert not user_fisher.needs_centres and user_fisher.uses_metadata and user_fisher.uses_users
    with pytest.raises(KeyError, match="unknown strategy"):
        strategies.get("LOUDEST")
    for bad in (Strategy("lower", "x", "js"), Strategy("X", "x", "magic"), Strategy("X", "x", "js", ("metadata",)),
                Strategy("X", "x", "js", ("review", "user"))):
        with pytest.raises(ValueError):
            strategies.register(bad)


def test_a_registered_strategy_reaches_the_cli_the_pages_and_runs(monkeypatch, studio_workspace_file, tmp_path):
    monkeypatch.setitem(strategies._STRATEGIES, NEW.name, NEW)
    parser = cli.build_parser()
    assert NEW.name in _choices(parser, "select", "--strategy")
    assert NEW.name in _choices(parser, "budget-curve", "--strategies")
    path = copy_workspace(studio_workspace_file, tmp_path / "strategy.duckdb")
    with Workspace(path) as ws:
        sel = run_selection(ws, NEW.name, 5, unit="item", k=4)
        info = selection_info(ws, sel)
    assert info["strategy"] == NEW.name and info["params"]["weights"] == [1.0, 1.0, 1.0]
    monkeypatch.setenv("CRS_WORKSPACE", str(path))
    monkeypatch.setenv("CRS_JOBS_ROOT", str(tmp_path / "jobs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("pages/selection.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert NEW.label in at.selectbox(key="sel_strategy").options
    at.switch_page("pages/evaluation.py")
    at.run()
    assert NEW.label in at.multiselect(key="ev_bc_strategies").options
