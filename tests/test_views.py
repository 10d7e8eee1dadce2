"""crs_core.views on the small real workspace: the review table's snippets and one review's full text."""

from __future__ import annotations

import pytest

from conftest import XSS_TEXT, add_item_selection
from crs_core import views
from crs_core.store import Workspace


@pytest.fixture()
def ws(studio_workspace):
    with Workspace(studio_workspace) as workspace:
        yield workspace


def test_reviews_table_cuts_texts_to_the_snippet_and_marks_the_cut(ws):
    full = views.reviews_table(ws, limit=50)
    cut = views.reviews_table(ws, limit=50, snippet=40)
    assert list(full["review_id"]) == list(cut["review_id"])
    for whole, part in zip(full["text"], cut["text"]):
        if len(whole) > 40:
            assert part == whole[:40] + "…"
        else:
            assert part == whole
    assert any(len(t) > 40 for t in full["text"]), "the sample has long reviews"


def test_reviews_table_search_looks_at_the_whole_text_not_the_snippet(ws):
    long_one = ws.df("SELECT review_id, text FROM reviews WHERE length(text) > 400 ORDER BY review_id LIMIT 1")
    word = long_one["text"].iloc[0][-60:].strip()  # beyond any 40-character snippet
    hits = views.reviews_table(ws, search=word, snippet=40)
    assert long_one["review_id"].iloc[0] in set(hits["review_id"])


def test_review_text_returns_the_full_text_or_none(ws):
    assert views.review_text(ws, "xss-review") == XSS_TEXT
    assert views.review_text(ws, "no-such-review") is None


def test_hover_texts_of_no_points_is_empty():
    assert len(views.hover_texts([], [], [])) == 0


def test_item_picks_over_a_review_map_sit_at_the_centroid_of_their_reviews(studio_workspace_file, tmp_path):
    from conftest import copy_workspace

    path = copy_workspace(studio_workspace_file, tmp_path / "items.duckdb")
    set_id, items = add_item_selection(path)
    with Workspace(path) as w:
        picks = views.selection_picks(w, "test-items")
        assert list(picks["unit_id"]) == items and picks["x"].notna().all()
        first = w.df("SELECT avg(q.x) AS x, avg(q.y) AS y FROM projections q JOIN reviews r "
                     "ON r.review_id = q.unit_id WHERE q.set_id = ? AND r.item_id = ?", [set_id, items[0]])
        assert picks["x"].iloc[0] == pytest.approx(first["x"].iloc[0])
        assert picks["y"].iloc[0] == pytest.approx(first["y"].iloc[0])


@pytest.mark.parametrize("n", [1, 10, 20, 26, 40])
def test_cluster_palette_gives_every_cluster_its_own_colour(n):
    from crs_core.views import cluster_palette

    colours = cluster_palette(n)
    assert len(colours) == n and len(set(colours)) == n


# -- issue 17: what the pages chart and show in full ----------------------------------------------
def test_item_detail_has_every_stored_field_of_the_item(ws):
    item = ws.scalar("SELECT item_id FROM items WHERE plot IS NOT NULL ORDER BY item_id LIMIT 1")
    detail = views.item_detail(ws, item)
    assert detail["item_id"] == item and detail["plot"] == ws.scalar("SELECT plot FROM items WHERE item_id = ?", [item])
    assert all(v is not None for v in detail.values())
    assert views.item_detail(ws, "no-such-item") is None


def test_progress_frame_keeps_what_a_job_logs_one_row_per_step():
    lines = [{"step": 1, "epoch": 0.5, "loss": 2.0, "lr": None, "time": 1.0},
             {"step": 2, "epoch": 1.0, "loss": 1.0, "lr": None, "time": 2.0},
             {"step": 2, "epoch": 1.0, "loss": 0.9, "lr": None, "time": 3.0}]
    frame = views.progress_frame(lines)
    assert list(frame.columns) == ["step", "epoch", "loss"]  # no learning rate logged: no column, no chart
    assert frame["step"].tolist() == [1, 2] and frame["loss"].tolist() == [2.0, 0.9]  # the later line wins
    with_lr = views.progress_frame([{"step": 1, "loss": 1.0, "lr": 1e-3}])
    assert with_lr["learning_rate"].tolist() == [1e-3]
    assert list(views.progress_frame([]).columns) == ["step"]


def test_cluster_hover_lines_escape_the_terms():
    import pandas as pd

    terms = pd.DataFrame({"cluster": [0, 1], "top_terms": ["love, story", "<b>x</b>, 50%, %{y}"]})
    lines = views.cluster_hover_lines(terms)
    assert lines[0] == "<b>cluster 0</b>: love, story"
    assert "<b>x" not in lines[1] and "%{" not in lines[1] and "&lt;b&gt;x&lt;/b&gt;" in lines[1]
    assert views.cluster_hover_lines(None) == {}
