"""crs_core.strategies: the registry's rules, and a strategy registered once reaching the CLI, the
pages and a stored selection without editing them."""

from __future__ import annotations

import pytest

from conftest import cli_choices, copy_workspace, studio_page
from crs_core import strategies
from crs_core.selections import run_selection, selection_info
from crs_core.store import Workspace
from crs_core.strategies import Strategy

NEW = Strategy("TEST_METADATA_FISHER", "Test: Fisher + metadata", "fisher", ("review", "metadata"),
               help="A test entry.")


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
    assert NEW.name in cli_choices("select", "--strategy")
    assert NEW.name in cli_choices("budget-curve", "--strategies")
    path = copy_workspace(studio_workspace_file, tmp_path / "strategy.duckdb")
    with Workspace(path) as ws:
        sel = run_selection(ws, NEW.name, 5, unit="item", k=4)
        info = selection_info(ws, sel)
    assert info["strategy"] == NEW.name and info["params"]["weights"] == [1.0, 1.0, 1.0]
    assert NEW.name in strategies.with_block("metadata") and NEW.name not in strategies.with_block("user")
    choice = studio_page(monkeypatch, path, "pages/selection.py").selectbox(key="sel_strategy")
    assert NEW.label in choice.options and f"**{NEW.label}**: {NEW.help}" in choice.help
    at = studio_page(monkeypatch, path, "pages/evaluation.py")
    assert NEW.label in at.multiselect(key="ev_bc_strategies").options
