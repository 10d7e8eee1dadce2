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


# -- issue 16: tables page from DuckDB, big maps draw a sample --------------------------------------
def test_reviews_page_reads_one_page_and_counts_every_match(ws):
    every = views.reviews_table(ws, limit=100_000, snippet=30)
    second = views.reviews_page(ws, page=1, page_size=7, snippet=30)
    assert second.total == len(every) == ws.count("reviews") and second.pages == -(-len(every) // 7)
    assert list(second.rows["review_id"]) == list(every["review_id"][7:14])
    assert list(second.rows["text"]) == list(every["text"][7:14])
    assert second.caption("reviews") == f"Rows 8–14 of {len(every):,} matching reviews (page 2 of {second.pages:,})"


def test_reviews_page_counts_the_filtered_rows_and_clamps_a_page_past_the_end(ws):
    word = "good"
    matches = views.reviews_table(ws, search=word, limit=100_000)
    assert 3 < len(matches) < ws.count("reviews")
    last = views.reviews_page(ws, search=word, page=10_000, page_size=3)
    assert last.total == len(matches) and last.page == last.pages - 1
    assert list(last.rows["review_id"]) == list(matches["review_id"][last.page * 3:])
    none = views.reviews_page(ws, search="no review says zxqv", page=4)
    assert none.total == 0 and none.page == 0 and none.rows.empty and none.caption("reviews") == "No matching reviews"


def test_reviews_page_filters_by_cluster_like_the_table(ws):
    clustering = ws.scalar("SELECT clustering_id FROM clusterings LIMIT 1")
    page = views.reviews_page(ws, clustering_id=clustering, clusters=(0,), page_size=1000)
    expected = ws.scalar("SELECT count(*) FROM cluster_assignments WHERE clustering_id = ? AND cluster = 0",
                         [clustering])
    assert page.total == len(page.rows) == expected > 0 and set(page.rows["cluster"]) == {0}


def test_items_page_reads_one_page_in_a_stable_order(ws):
    every = views.items_table(ws, only_reviewed=True, limit=100_000)
    page = views.items_page(ws, only_reviewed=True, page=2, page_size=5)
    assert page.total == len(every) == ws.scalar("SELECT count(DISTINCT item_id) FROM reviews")
    assert list(page.rows["item_id"]) == list(every["item_id"][10:15])


def test_a_page_of_no_rows_is_an_error(ws):
    with pytest.raises(views.ViewError, match="page size"):
        views.reviews_page(ws, page_size=0)


def test_map_points_past_the_cap_are_a_fixed_sample_of_the_map(ws):
    set_id = ws.scalar("SELECT set_id FROM projections LIMIT 1")
    clustering = ws.scalar("SELECT clustering_id FROM clusterings WHERE set_id = ?", [set_id])
    every = views.map_points(ws, set_id, clustering)
    assert len(every) == views.embedding_sets(ws).set_index("set_id").loc[set_id, "n_projected"] > 10
    sample = views.map_points(ws, set_id, clustering, max_points=10)
    assert len(sample) == 10 and sample["unit_id"].is_unique
    assert list(sample["unit_id"]) == sorted(sample["unit_id"])
    assert sample.equals(views.map_points(ws, set_id, clustering, max_points=10))  # the same points every time
    full = every.set_index("unit_id").loc[sample["unit_id"]]
    assert list(full["x"]) == list(sample["x"]) and list(full["cluster"]) == list(sample["cluster"])
    assert list(full["hover"]) == list(sample["hover"])
    assert views.map_points(ws, set_id, clustering, max_points=len(every)).equals(every)
