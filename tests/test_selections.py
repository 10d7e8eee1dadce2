"""Selections over a real (small) embedded workspace: every strategy, rounds, summaries, bad input."""

import json

import numpy as np
import pytest

from crs_core.embed import build_embedding_set, get_encoder
from crs_core.select import SelectionError
from crs_core.strategies import names as strategy_names
from crs_core.selections import (item_factors, list_selections, load_selection, run_selection,
                                 selection_info)
from crs_core.store import Workspace

MOVIES = [
    ("tt0133093", "The Matrix", 1999, "action|sci-fi", "A hacker learns reality is a simulation."),
    ("tt0076759", "Star Wars", 1977, "adventure|sci-fi", "A farm boy joins a rebellion against an empire."),
    ("tt0114709", "Toy Story", 1995, "animation|comedy", "Toys come to life when their owner is away."),
    ("tt0109830", "Forrest Gump", 1994, "drama|romance", "A kind man witnesses decades of American history."),
    ("tt0111161", "The Shawshank Redemption", 1994, "drama", "Two prisoners form a friendship over years."),
    ("tt0110912", "Pulp Fiction", 1994, "crime|drama", "Interlocking stories of Los Angeles criminals."),
    ("tt0120338", "Titanic", 1997, "drama|romance", "A romance aboard the doomed ocean liner."),
    ("tt0088763", "Back to the Future", 1985, "adventure|comedy|sci-fi", "A teenager travels back to 1955."),
]
REVIEW_LINES = [
    "Mind-bending action and philosophy; the effects changed cinema.",
    "A fun space adventure with unforgettable characters and music.",
    "Charming and funny for kids and adults alike.",
    "Moving and sweet, with a great lead performance.",
    "Hopeful prison drama that stays with you.",
    "Sharp dialogue, violent and darkly funny.",
    "An epic love story with a tragic ending.",
    "Time travel comedy that never gets old.",
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("sel") / "w.duckdb")
    with ws.transaction() as cur:
        for item_id, title, year, genres, plot in MOVIES:
            cur.execute("INSERT INTO items (item_id, title, year, genres, plot, imdb_id) VALUES (?, ?, ?, ?, ?, ?)",
                        [item_id, title, year, genres, plot, item_id])
        rng = np.random.default_rng(0)
        for i, (item_id, *_rest) in enumerate(MOVIES):
            for j in range(5):
                cur.execute("INSERT INTO reviews VALUES (?, ?, NULL, ?, ?, NULL, 'test')",
                            [f"r{i}{j}", item_id, f"{REVIEW_LINES[i]} Viewing number {j + 1}.", 8.0])
        for user in range(12):  # ratings for all but the last movie
            for item_id, *_rest in MOVIES[:-1]:
                if rng.random() < 0.6:
                    cur.execute("INSERT INTO interactions VALUES (?, ?, ?, NULL, 'test')",
                                [f"u{user}", item_id, float(rng.integers(1, 6))])
    frame = ws.df("SELECT review_id, text FROM reviews ORDER BY review_id")
    build_embedding_set(ws, "review", frame["review_id"].tolist(), frame["text"].tolist(), get_encoder("minilm"))
    yield ws
    ws.close()


@pytest.mark.parametrize("strategy", strategy_names())
def test_every_strategy_stores_a_selection(ws, strategy):
    sid = run_selection(ws, strategy, 6, k=4)
    picks = load_selection(ws, sid)
    assert picks["rank"].tolist() == list(range(1, 7))
    assert picks["unit_id"].is_unique
    info = selection_info(ws, sid)
    assert info["strategy"] == strategy and info["budget"] == 6 and info["unit"] == "review"
    assert 0 < info["summary"]["cluster_coverage"] <= 1
    assert info["summary"]["item_coverage"] > 0
    assert sid in set(list_selections(ws)["selection_id"])


def test_rounds_continue_the_greedy_sequence(ws):
    for strategy in ("JS", "FISHER", "USER_FISHER"):
        first = run_selection(ws, strategy, 5, k=4, seed=3)
        continued = run_selection(ws, strategy, 7, parent_id=first)
        whole = run_selection(ws, strategy, 12, k=4, seed=3)
        assert load_selection(ws, continued)["unit_id"].tolist() == load_selection(ws, whole)["unit_id"].tolist()
        assert load_selection(ws, continued)["round"].tolist() == [1] * 5 + [2] * 7
        assert selection_info(ws, continued)["parent_id"] == first


def selected_items(ws, selection_id: str) -> list[str]:
    """The distinct items synthesis takes from a selection, in pick order."""
    from crs_core.synth import _selection_items

    return _selection_items(ws, selection_info(ws, selection_id))[0]


def test_item_unit_and_items_in_pick_order(ws):
    sid = run_selection(ws, "FISHER", 4, unit="item")
    items = selected_items(ws, sid)
    assert items == load_selection(ws, sid)["unit_id"].tolist()
    review_sel = run_selection(ws, "FISHER", 10)
    items = selected_items(ws, review_sel)
    assert len(items) == len(set(items)) and set(items) <= {m[0] for m in MOVIES}


def test_item_without_interactions_gets_the_neutral_factor(ws):
    factors = item_factors(ws, [MOVIES[0][0], MOVIES[-1][0]], dims=3)
    assert np.all(np.isfinite(factors)) and np.linalg.norm(factors[1]) > 0


def test_weights_are_stored_and_zero_extra_weights_equal_base(ws):
    variant = run_selection(ws, "METADATA_FISHER", 6, weights=(1.0, 0.0, 0.0))
    base = run_selection(ws, "FISHER", 6)
    assert load_selection(ws, variant)["unit_id"].tolist() == load_selection(ws, base)["unit_id"].tolist()
    assert selection_info(ws, variant)["params"]["weights"] == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "positive"),
    ({"budget": 41}, "larger than"),
    ({"budget": 5, "k": 100}, "k \\(100\\)"),
    ({"budget": 5, "strategy": "MAGIC"}, "unknown strategy"),
    ({"budget": 5, "set_id": "review:nope"}, "does not exist"),
    ({"budget": 5, "lam": -1.0}, "lam"),
])
def test_bad_input_is_refused_and_nothing_is_stored(ws, kwargs, message):
    before = ws.count("selections")
    kwargs = {"strategy": "JS", **kwargs}
    strategy = kwargs.pop("strategy")
    budget = kwargs.pop("budget")
    with pytest.raises(SelectionError, match=message):
        run_selection(ws, strategy, budget, **{"k": 4, **kwargs})
    assert ws.count("selections") == before


def test_user_variants_need_interactions(tmp_path):
    with Workspace(tmp_path / "w.duckdb") as empty:
        with empty.transaction() as cur:
            cur.execute("INSERT INTO items (item_id, title) VALUES ('tt1', 'A'), ('tt2', 'B')")
            for i in range(6):
                cur.execute("INSERT INTO reviews VALUES (?, ?, NULL, ?, NULL, NULL, 'test')",
                            [f"r{i}", f"tt{i % 2 + 1}", f"review text number {i}"])
        frame = empty.df("SELECT review_id, text FROM reviews")
        build_embedding_set(empty, "review", frame["review_id"].tolist(), frame["text"].tolist(), get_encoder())
        with pytest.raises(SelectionError, match="interactions"):
            run_selection(empty, "USER_FISHER", 2, k=2)
        assert empty.count("selections") == 0


def test_summary_is_json(ws):
    sid = run_selection(ws, "RANDOM_UNIFORM", 5, seed=1)
    raw = ws.scalar("SELECT summary FROM selections WHERE selection_id = ?", [sid])
    assert json.loads(raw)["n_selected"] == 5
