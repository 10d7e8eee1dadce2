"""Every page of the studio with streamlit.testing.v1.AppTest, on the small real workspace and on
an empty one; and the main interactions: approve / edit / conflict on Review, a selection run,
a file upload, an evaluation drill-down."""

from __future__ import annotations

import base64
import json

import pytest
from streamlit.testing.v1 import AppTest

from conftest import ROOT, XSS_TEXT, add_item_selection, copy_workspace
from crs_core import review
from crs_core.store import Workspace

PAGES = ["pages/home.py", "pages/seeds.py", "pages/map.py", "pages/selection.py", "pages/synthesis.py",
         "pages/review.py", "pages/augmentation.py", "pages/training.py", "pages/evaluation.py"]


def open_page(monkeypatch, workspace_path, page: str) -> AppTest:
    monkeypatch.setenv("CRS_WORKSPACE", str(workspace_path))
    monkeypatch.setenv("CRS_JOBS_ROOT", str(workspace_path.parent / "jobs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page(page)
    at.run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


@pytest.fixture()
def own_workspace(studio_workspace_file, tmp_path):
    """A private copy of the small workspace for a test that changes it."""
    return copy_workspace(studio_workspace_file, tmp_path / "own.duckdb")


def _query(path, qid):
    with Workspace(path) as ws:
        row = ws.cursor().execute("SELECT query, status, version FROM synthetic_queries WHERE query_id = ?",
                                  [qid]).fetchone()
        gt = [r[0] for r in ws.cursor().execute(
            "SELECT item_id FROM ground_truth WHERE query_id = ? ORDER BY rank", [qid]).fetchall()]
    return row, gt


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_on_the_small_workspace(monkeypatch, studio_workspace, page):
    at = open_page(monkeypatch, studio_workspace, page)
    assert at.title, "every page has a title"
    assert "workspace_picker" in [s.key for s in at.sidebar.selectbox], "rendered through app.py's navigation"
    assert not at.error, [e.value for e in at.error]


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_on_an_empty_workspace_and_says_what_to_do(monkeypatch, empty_workspace, page):
    at = open_page(monkeypatch, empty_workspace, page)
    if page == "pages/home.py":
        assert at.button(key="home_build").label == "Build default workspace"
    else:
        assert at.info, f"{page} shows a helpful empty state"


def test_home_shows_pipeline_status(monkeypatch, studio_workspace):
    at = open_page(monkeypatch, studio_workspace, "pages/home.py")
    texts = [t.value for t in at.text]
    assert any("items" in t and "reviews" in t for t in texts)
    assert "home_build" not in [b.key for b in at.button]  # nothing left to build


def test_studio_started_by_studio_sh_finishes_its_workspace_unasked(monkeypatch, tmp_path):
    """studio.sh sets CRS_BUILD_DEFAULT: the first page answers at once and what the start-up
    workspace lacks is built in the background (here embeddings, clusters and map of 24 reviews)."""
    from crs_core.pipeline import REVIEW_SET, default_build_pending

    from pages import _shared

    path = tmp_path / "unfinished.duckdb"
    with Workspace(path) as ws, ws.transaction() as cur:
        cur.execute("INSERT INTO items (item_id, title, year) VALUES ('tt01', 'A Film', 1999)")
        cur.executemany("INSERT INTO reviews (review_id, item_id, text, source) VALUES (?, 'tt01', ?, 'test')",
                        [(f"r{i}", f"Review number {i}: {'great' if i % 2 else 'dull'} film, scene {i}.")
                         for i in range(24)])
    monkeypatch.setenv(_shared.ENV_BUILD_DEFAULT, "1")
    at = open_page(monkeypatch, path, "pages/seeds.py")  # any page starts it
    run = _shared.background_run(f"build:{path}")
    assert run is not None, "the build started without a click"
    run.thread.join(300)
    assert run.error is None, run.error
    assert run.result == ["embed", "cluster", "project"]
    assert "none of the workspace's texts" in run.extra["notes"][0]  # not the bundled reviews
    at.switch_page("pages/home.py").run()
    assert_clean(at)
    assert "home_build" not in [b.key for b in at.button]
    with Workspace(path) as ws:
        assert not default_build_pending(ws)
        assert ws.scalar("SELECT count(*) FROM projections WHERE set_id = ?", [REVIEW_SET]) == 24


def test_studio_started_without_the_flag_waits_for_the_button(monkeypatch, empty_workspace):
    from pages import _shared

    monkeypatch.delenv(_shared.ENV_BUILD_DEFAULT, raising=False)
    at = open_page(monkeypatch, empty_workspace, "pages/home.py")
    assert _shared.background_run(f"build:{empty_workspace}") is None
    assert at.button(key="home_build").label == "Build default workspace"


def test_review_approve_persists(monkeypatch, own_workspace):
    at = open_page(monkeypatch, own_workspace, "pages/review.py")
    assert at.selectbox(key="rv_current").value == "q000"
    at.button(key="rv_approve").click().run()
    assert_clean(at)
    assert "Saved q000 as version 2 (approved)." in [s.value for s in at.success]
    assert at.selectbox(key="rv_current").value == "q001"  # the queue moves on to the next pending one
    (query, status, version), _ = _query(own_workspace, "q000")
    assert (status, version) == ("approved", 2)


def test_review_edit_query_and_add_item_persist(monkeypatch, own_workspace):
    at = open_page(monkeypatch, own_workspace, "pages/review.py")
    at.selectbox(key="rv_current").set_value("q001").run()
    at.text_area(key="rv_qinput_q001_1").set_value("Something funny and silent, please").run()
    at.text_input(key="rv_search_q001_1").set_value("Titanic").run()
    picked = next(s for s in at.selectbox if s.label == "Catalog item").value
    assert picked is not None
    at.button(key="rv_add_q001_1").click().run()
    assert_clean(at)
    at.text_input(key="rv_note_q001_1").set_value("clearer request").run()
    at.button(key="rv_save").click().run()
    assert_clean(at)
    (query, status, version), gt = _query(own_workspace, "q001")
    assert (query, status, version) == ("Something funny and silent, please", "pending", 2)
    assert gt[-1] == picked and len(gt) == 6
    with Workspace(own_workspace) as ws:
        h = review.history(ws, "q001")
    assert list(h["action"]) == ["edit", "created"] and h["note"].iloc[0] == "clearer request"


def test_review_conflict_is_refused_and_edits_are_kept(monkeypatch, own_workspace):
    at = open_page(monkeypatch, own_workspace, "pages/review.py")
    at.selectbox(key="rv_current").set_value("q002").run()
    at.text_area(key="rv_qinput_q002_1").set_value("my wording").run()
    with Workspace(own_workspace) as ws:  # a second annotator saves first
        d = review.get_dialogue(ws, "q002")
        review.save_edit(ws, "q002", d.version, "their wording", d.ground_truth, annotator="other")
    at.button(key="rv_save").click().run()
    assert_clean(at)
    assert any("someone else changed this dialogue" in e.value for e in at.error)
    assert at.text_area(key="rv_qinput_q002_1").value == "my wording"  # nothing lost on screen
    (query, _, version), _ = _query(own_workspace, "q002")
    assert (query, version) == ("their wording", 2)  # nor in the workspace
    at.button(key="rv_reload").click().run()
    assert at.text_area(key="rv_qinput_q002_2").value == "their wording"
    # without unsaved edits, a change by someone else simply shows the latest version
    with Workspace(own_workspace) as ws:
        d = review.get_dialogue(ws, "q002")
        review.save_edit(ws, "q002", d.version, "third wording", d.ground_truth, annotator="other")
    at.run()
    assert_clean(at)
    assert at.text_area(key="rv_qinput_q002_3").value == "third wording" and not at.warning


def test_review_renders_review_html_as_text(monkeypatch, studio_workspace):
    at = open_page(monkeypatch, studio_workspace, "pages/review.py")
    assert XSS_TEXT in [t.value for t in at.text]
    assert not any("<script" in m.value for m in at.markdown)
    assert not any("<script" in str(c.value) for c in at.caption)


def test_map_overlays_an_item_selection_made_from_review_embeddings(monkeypatch, own_workspace):
    add_item_selection(own_workspace)
    at = open_page(monkeypatch, own_workspace, "pages/map.py")
    assert at.selectbox(key="map_overlay").value == "test-items"  # the newest selection is overlaid
    assert not at.error, [e.value for e in at.error]
    traces = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    xs = traces[-1]["x"]  # plotly sends numeric arrays as base64 float64 ("bdata")
    assert traces[-1]["name"] == "selection (pick order)" and len(base64.b64decode(xs["bdata"])) == 3 * 8


def test_map_hover_shows_each_clusters_top_terms_and_the_cluster_table_is_whole(monkeypatch, studio_workspace):
    from crs_core import views

    at = open_page(monkeypatch, studio_workspace, "pages/map.py")
    clustering = at.selectbox(key="map_clustering").value
    with Workspace(studio_workspace) as ws:
        terms = views.cluster_top_terms(ws, clustering, 8, 3000)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    clusters = [t for t in spec["data"] if t["name"].startswith("cluster ")]
    assert len(clusters) == len(terms) == 8  # the small workspace's K
    expected = dict(zip(terms["cluster"], terms["top_terms"]))
    for trace in clusters:
        n = int(trace["name"].split()[1])
        assert trace["hovertemplate"].startswith("%{hovertext}<br>")
        assert f"<b>cluster {n}</b>: {expected[n]}" in trace["hovertemplate"]
    table = at.table[0].value  # st.table: as tall as its rows, text wrapped
    assert len(table) == 8 and list(table["top_terms"]) == [expected[n] for n in table.index]
    assert table["share"].str.endswith("%").all()


def test_map_past_the_point_cap_draws_a_fixed_sample_and_says_so(monkeypatch, studio_workspace):
    from crs_core import views

    monkeypatch.setattr(views, "MAP_MAX_POINTS", 10)
    at = open_page(monkeypatch, studio_workspace, "pages/map.py")
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    drawn = [u for t in spec["data"] if t["name"].startswith("cluster ") for u in t["customdata"]]
    with Workspace(studio_workspace) as ws:
        n_mapped = ws.scalar("SELECT count(*) FROM projections")
    assert len(drawn) == 10 < n_mapped
    assert any(f"A fixed sample of 10 of the {n_mapped:,} points" in c.value for c in at.caption)


def test_seeds_reviews_table_pages_through_every_review(monkeypatch, studio_workspace):
    from crs_core import views

    at = open_page(monkeypatch, studio_workspace, "pages/seeds.py")
    at.session_state["seeds_tab"] = "Reviews"
    at.run()
    at.number_input(key="seeds_review_page").set_value(2).run()
    assert_clean(at)
    with Workspace(studio_workspace) as ws:
        expected = views.reviews_table(ws, limit=500, offset=500)
        total = ws.count("reviews")
    assert list(at.dataframe(key="seeds_reviews_table").value["review_id"]) == list(expected["review_id"])
    assert any(c.value.startswith(f"Rows 501–1,000 of {total:,} matching reviews (page 2 of ") for c in at.caption)


def test_seeds_reviews_tab_lists_snippets_as_text(monkeypatch, studio_workspace):
    at = open_page(monkeypatch, studio_workspace, "pages/seeds.py")
    assert at.get("arrow_data_frame") or at.dataframe, "the Items tab shows its table"
    at.session_state["seeds_tab"] = "Reviews"
    at.run()
    assert_clean(at)
    table = at.dataframe(key="seeds_reviews_table").value
    assert len(table) > 0 and table["text"].str.len().max() <= 301  # REVIEW_SNIPPET + the ellipsis
    at.text_input(key="seeds_review_search").set_value("window.__crs_xss").run()
    assert list(at.dataframe(key="seeds_reviews_table").value["text"]) == [XSS_TEXT]
    assert not any("<script" in m.value for m in at.markdown)


@pytest.mark.parametrize("strategy", ["FISHER", "JS"])
def test_a_selection_run_stores_a_selection(monkeypatch, own_workspace, strategy):
    pytest.importorskip("crs_core.embed", reason="crs_core.selections loads embeddings through crs_core.embed")
    at = open_page(monkeypatch, own_workspace, "pages/selection.py")
    at.selectbox(key="sel_strategy").set_value(strategy)
    at.number_input(key="sel_budget").set_value(7)
    at.button(key="sel_run").click().run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    with Workspace(own_workspace) as ws:
        sel = ws.df("SELECT selection_id, strategy, budget FROM selections WHERE strategy = ?", [strategy])
        assert len(sel) == 1 and sel["budget"].iloc[0] == 7
        picks = ws.df("SELECT rank, unit_id FROM selection_picks WHERE selection_id = ? ORDER BY rank",
                      [sel["selection_id"].iloc[0]])
    assert list(picks["rank"]) == list(range(1, 8)) and picks["unit_id"].is_unique
    assert at.selectbox(key="sel_compare_a").value == sel["selection_id"].iloc[0]


def test_selection_compare_starts_with_two_different_selections_and_a_run_shows_it_is_busy(monkeypatch,
                                                                                            own_workspace):
    with Workspace(own_workspace) as ws:
        (first,) = ws.df("SELECT selection_id FROM selections")["selection_id"].tolist()
    at = open_page(monkeypatch, own_workspace, "pages/selection.py")
    assert at.selectbox(key="sel_compare_a").value == first
    assert "sel_compare_b" not in [s.key for s in at.selectbox]  # one selection: nothing to compare it with
    assert any("Only one selection so far" in i.value for i in at.info)
    at.selectbox(key="sel_strategy").set_value("FISHER")
    at.number_input(key="sel_budget").set_value(5)
    at.button(key="sel_run").click().run()
    assert_clean(at)
    new = at.selectbox(key="sel_compare_a").value
    assert new != first and at.selectbox(key="sel_compare_b").value == first  # the new one against the old
    assert [t.proto.body for t in at.get("toast")] == [f"Stored selection {new}"]
    box = next(e for e in at.main if type(e).__name__ == "Status")  # st.status: a spinner while it runs
    assert box.label == f"Stored selection {new}" and box.state == "complete"
    at.run()  # a later rerun keeps them apart
    assert (at.selectbox(key="sel_compare_a").value, at.selectbox(key="sel_compare_b").value) == (new, first)


def test_seeds_upload_validates_first_and_writes_nothing_on_error(monkeypatch, own_workspace):
    with Workspace(own_workspace) as ws:
        before = ws.count("reviews")
        imdb = ws.scalar("SELECT imdb_id FROM items WHERE imdb_id IS NOT NULL ORDER BY imdb_id LIMIT 1")
    at = open_page(monkeypatch, own_workspace, "pages/seeds.py")
    assert not at.get("file_uploader"), "only the open tab (Items) runs"
    at.session_state["seeds_tab"] = "Add your own file"
    at.run()
    good = json.dumps({"review_id": "mine-1", "imdb_id": imdb, "text": "Loved it.", "rating": 9})
    bad = good.replace("mine-1", "mine-2") + "\n{not json\n"
    at.file_uploader(key="seeds_upload").upload("mine.jsonl", bad.encode()).run()
    at.button(key="seeds_add").click().run()
    assert_clean(at)
    assert at.error and any("line 2" in e.value for e in at.error)
    with Workspace(own_workspace) as ws:
        assert ws.count("reviews") == before
    at.file_uploader(key="seeds_upload").upload("mine.jsonl", (good + "\n").encode()).run()
    at.button(key="seeds_add").click().run()
    assert_clean(at)
    assert not at.error and any("Added" in s.value for s in at.success)
    with Workspace(own_workspace) as ws:
        assert ws.count("reviews") == before + 1


def test_evaluation_drill_down(monkeypatch, own_workspace):
    at = open_page(monkeypatch, own_workspace, "pages/evaluation.py")
    assert at.get("plotly_chart"), "the stored run is charted"
    at.number_input(key="ev_sample").set_value(25)
    at.button(key="ev_go").click().run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    turn = at.selectbox(key="ev_turn")
    assert turn.value is not None and len(turn.options) == 25
    bars = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "this evaluation and stored runs" in c.proto.spec)
    names = {t["name"] for t in bars["data"]}
    assert names == {"popularity-interactions (this evaluation)", "test-popularity"}, names  # side by side
    for trace in bars["data"]:
        assert len(_plotly_array(trace["error_y"]["array"])) == 5  # Recall@1..50 with standard errors


def test_a_run_stored_from_the_evaluation_form_joins_the_chart_of_runs(monkeypatch, own_workspace):
    """The chart at the top follows the runs picked in its multiselect; a run stored from the
    form below (or from Training) since the page was drawn joins it without being picked."""
    at = open_page(monkeypatch, own_workspace, "pages/evaluation.py")
    at.number_input(key="ev_sample").set_value(25)
    at.checkbox(key="ev_store").check()
    at.button(key="ev_go").click().run()
    assert_clean(at)
    stored = [s.value for s in at.success if s.value.startswith("Stored run ")]
    assert len(stored) == 1, [s.value for s in at.success]
    run_id = stored[0].removeprefix("Stored run ").rstrip(".")
    assert run_id in at.multiselect(key="ev_runs").value
    top = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "Recall@k on inspired_test" in c.proto.spec
               and "this evaluation" not in c.proto.spec)
    assert {t["name"] for t in top["data"]} == {"test-popularity", run_id}


def test_synthesis_runs_in_the_background_against_an_openai_compatible_endpoint(monkeypatch, own_workspace):
    from openai_stub_server import OpenAIStubServer

    from pages import _shared

    key = "sk-test-APP-KEY-NEVER-STORED-9c2"
    with Workspace(own_workspace) as ws:
        titles = ws.df("SELECT title, year FROM items WHERE year IS NOT NULL AND item_id IN "
                       "(SELECT item_id FROM reviews) ORDER BY item_id LIMIT 8")
        before = ws.count("synthetic_queries")
    listing = "\n".join(f"{n}. {t} ({int(y)})" for n, (t, y) in enumerate(zip(titles["title"], titles["year"]), 1))

    def reply(messages):
        user = messages[-1]["content"]
        if user.startswith("Pretend you are a movie recommender system"):
            return listing + "\n9. A Film That Does Not Exist (1901)"
        return "Can you recommend a quiet old comedy with a lot of physical gags and a sweet ending?"

    with OpenAIStubServer(reply=reply) as stub:
        at = open_page(monkeypatch, own_workspace, "pages/synthesis.py")
        at.radio(key="syn_provider").set_value("openai").run()
        at.text_input(key="syn_base_url").set_value(stub.base_url)
        at.text_input(key="syn_model").set_value("gpt-4o-mini")
        at.text_input(key="syn_api_key").set_value(key)
        at.number_input(key="syn_items").set_value(2)
        at.selectbox(key="syn_gt_mode").set_value("llm")  # the paper's listing: no catalog embedding in a test
        at.checkbox(key="syn_dedup").uncheck()
        at.button(key="syn_start").click().run()
        assert_clean(at)
        run = _shared.background_run(f"synthesis:{own_workspace.resolve()}")
        assert run is not None
        run.thread.join(120)
        assert run.error is None, run.error
        at.run()
        assert_clean(at)
        assert stub.chat_requests >= 4  # a query and a list per item
    report = "\n".join(c.value for c in at.code)
    assert "stored now: 2" in report
    with Workspace(own_workspace) as ws:
        assert ws.count("synthetic_queries") == before + 2
        leaked = ws.scalar("SELECT count(*) FROM llm_cache WHERE request::VARCHAR LIKE ? OR response::VARCHAR LIKE ?",
                           [f"%{key}%", f"%{key}%"])
        leaked += ws.scalar("SELECT count(*) FROM synthetic_queries WHERE provenance::VARCHAR LIKE ?", [f"%{key}%"])
    assert leaked == 0


def test_synthesis_page_counters_agree_with_the_workspace_at_every_poll(monkeypatch, own_workspace):
    """While a run stores queries, every refresh of the page shows one state of the workspace:
    the plan's "stored", the run's "stored" and "Synthetic queries" move together, and none is
    behind what was committed before the refresh (issue 17: "1 / 20" beside "0 stored")."""
    import re
    import time

    from openai_stub_server import OpenAIStubServer

    from pages import _shared

    with Workspace(own_workspace) as ws:
        titles = ws.df("SELECT title, year FROM items WHERE year IS NOT NULL AND item_id IN "
                       "(SELECT item_id FROM reviews) ORDER BY item_id LIMIT 8")
        others = ws.count("synthetic_queries")
    listing = "\n".join(f"{n}. {t} ({int(y)})" for n, (t, y) in enumerate(zip(titles["title"], titles["year"]), 1))
    counter = iter(range(10_000))

    def reply(messages):
        if messages[-1]["content"].startswith("Pretend you are a movie recommender system"):
            return listing
        return f"Can you recommend a quiet old comedy with physical gags and a sweet ending, take {next(counter)}?"

    def shown(at):
        bars = [p.proto.text for p in at.get("progress")]
        plan = next(re.search(r"([\d,]+) of ([\d,]+) queries of this plan stored", b) for b in bars
                    if "of this plan stored" in b)
        metric = {m.label: m.value for m in at.metric}["Synthetic queries"]
        run = next((re.search(r"([\d,]+) / ([\d,]+) queries stored · ([\d,]+) processed", b) for b in bars
                    if "processed" in b), None)
        num = lambda v: int(v.replace(",", ""))  # noqa: E731
        return (num(plan[1]), num(plan[2]), num(metric), None if run is None else tuple(map(num, run.groups())))

    def stored_now():
        with Workspace(own_workspace) as ws:
            return ws.count("synthetic_queries")

    with OpenAIStubServer(reply=reply, latency=0.4) as stub:
        at = open_page(monkeypatch, own_workspace, "pages/synthesis.py")
        at.radio(key="syn_provider").set_value("openai").run()
        at.text_input(key="syn_base_url").set_value(stub.base_url)
        at.text_input(key="syn_api_key").set_value("sk-test-counters")
        at.number_input(key="syn_items").set_value(0)  # the whole selection: its 5 items
        at.selectbox(key="syn_gt_mode").set_value("llm")
        at.checkbox(key="syn_dedup").uncheck()
        at.run()
        stored, planned, total, _ = shown(at)
        assert (stored, total) == (0, others) and planned == 5
        at.button(key="syn_start").click().run()
        run = _shared.background_run(f"synthesis:{own_workspace.resolve()}")
        polls = []
        while True:
            before = stored_now()
            finished = not run.running
            at.run()
            assert_clean(at)
            after = stored_now()
            stored, planned, total, in_run = shown(at)
            assert total == others + stored and before <= total <= after, (before, total, after)
            assert in_run is not None and in_run[0] == stored and in_run[1] == planned and in_run[2] >= stored
            polls.append(stored)
            if finished:
                break
            time.sleep(0.3)
    assert run.error is None, run.error
    assert polls[-1] == 5 and len(set(polls)) >= 2, polls  # seen while it ran, and at the end
    # a finished plan offers no "Resume" that would do nothing
    assert at.button(key="syn_start").disabled and "stored" in at.button(key="syn_start").label


def _launch_fake_job(monkeypatch, path, **config):
    from crs_core import jobs

    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # the worker imports conftest's runner
    with Workspace(path) as ws:
        job_id = jobs.launch_job(ws, "train_retriever", config, {"train": [{"context": ["hi"], "labels": ["x"]}]},
                                 path.parent / "jobs", runner="conftest:fake_training_runner")
        return job_id, jobs.job_folder(ws, job_id)


def test_training_page_follows_a_finished_job(monkeypatch, own_workspace):
    from crs_core import jobs

    job_id, folder = _launch_fake_job(monkeypatch, own_workspace, steps=4)
    assert jobs.wait_for_job(folder, timeout=60).state == "succeeded"
    at = open_page(monkeypatch, own_workspace, "pages/training.py")
    assert at.selectbox(key="tr_job").value == job_id
    assert at.get("vega_lite_chart"), "the loss curve is drawn"
    assert "step 4: loss 0.250" in "\n".join(c.value for c in at.code)  # the log
    with Workspace(own_workspace) as ws:
        assert ws.scalar("SELECT status FROM jobs WHERE job_id = ?", [job_id]) == "succeeded"


def test_training_page_cancels_and_resumes_a_job(monkeypatch, own_workspace):
    from crs_core import jobs

    job_id, folder = _launch_fake_job(monkeypatch, own_workspace, steps=400, delay=0.1)
    deadline = __import__("time").monotonic() + 60
    while jobs.job_state(folder).step < 2:
        assert __import__("time").monotonic() < deadline, "the fake job did not start"
        __import__("time").sleep(0.2)
    at = open_page(monkeypatch, own_workspace, "pages/training.py")
    at.button(key="tr_cancel").click().run()
    assert_clean(at)
    assert jobs.wait_for_job(folder, timeout=60).state == "cancelled"
    at.run()
    at.button(key="tr_resume").click().run()
    assert_clean(at)
    try:
        assert jobs.job_state(folder).state in ("queued", "running") and jobs.job_state(folder).attempt == 2
    finally:
        jobs.cancel_job(folder, wait=True, grace_seconds=20)
    assert jobs.job_state(folder).state == "cancelled"


def test_training_page_charts_loss_and_learning_rate_from_the_progress_file(monkeypatch, own_workspace):
    from crs_core import jobs

    job_id, folder = _launch_fake_job(monkeypatch, own_workspace, steps=5)
    assert jobs.wait_for_job(folder, timeout=60).state == "succeeded"
    at = open_page(monkeypatch, own_workspace, "pages/training.py")
    specs = [c.proto.spec for c in at.get("vega_lite_chart")]
    assert len(specs) == 2 and '"field": "loss"' in specs[0] and '"field": "learning_rate"' in specs[1]
    markdown = [m.value for m in at.markdown]
    assert "**Training loss** per step" in markdown and "**Learning rate** per step" in markdown


def test_training_page_follows_a_running_job_to_its_end(monkeypatch, own_workspace):
    """A running job shows Cancel; once progress.jsonl holds every step the page shows the end."""
    import time

    from crs_core import jobs

    job_id, folder = _launch_fake_job(monkeypatch, own_workspace, steps=30, delay=0.1)
    deadline = time.monotonic() + 60
    while jobs.job_state(folder).step < 2:
        assert time.monotonic() < deadline, "the fake job did not start"
        time.sleep(0.2)
    at = open_page(monkeypatch, own_workspace, "pages/training.py")
    first = jobs.job_state(folder).step
    assert at.button(key="tr_cancel"), "a running job can be cancelled"
    # the jobs table and the job's panel are one read of the folder: the same step
    table_step = int(next(d.value for d in at.dataframe if "job_id" in d.value)["step"].iloc[0])
    assert at.metric[0].label == "Step" and at.metric[0].value.startswith(f"{table_step:,} / ")
    assert jobs.wait_for_job(folder, timeout=60).state == "succeeded"
    at.run()
    assert_clean(at)
    assert "tr_cancel" not in [b.key for b in at.button]
    points = jobs.read_progress(folder)
    assert len(points) == 30 > first


def test_training_page_evaluates_a_finished_retriever_in_one_click(monkeypatch, own_workspace):
    """A tiny retriever trained by a real job; one click on the Training page evaluates it (the
    CLI's loader, model_eval.dense_retriever) in the background and stores the run."""
    from crs_core import jobs, train
    from crs_core.recommenders import Catalog, training_set_from_turns

    from pages import _shared

    with Workspace(own_workspace) as w:
        turns = [e for e in training_set_from_turns(w, "inspired_train").examples if e.context][:12]
        catalog = Catalog.from_workspace(w)
        items = {i: catalog.texts[catalog.index[i]] for e in turns for i in e.labels if i in catalog.index}
        cfg = {"batch_size": 4, "max_steps": 2, "query_turns": 2, "query_max_len": 24, "item_max_len": 24}
        job_id = train.launch_training(w, train.KIND_RETRIEVER, [{"context": e.context, "labels": e.labels}
                                                                  for e in turns], items, cfg,
                                       jobs_root=own_workspace.parent / "jobs")
        state = jobs.wait_for_job(jobs.job_folder(w, job_id), timeout=600, poll=0.5)
        assert state.state == "succeeded", jobs.read_log(state.folder)
        runs_before = w.count("runs")
    at = open_page(monkeypatch, own_workspace, "pages/training.py")
    assert at.selectbox(key="tr_job").value == job_id
    at.selectbox(key="tr_ev_test").set_value("inspired_test")
    at.number_input(key="tr_ev_sample").set_value(20)
    at.button(key="tr_evaluate").click().run()
    assert_clean(at)
    run = _shared.background_run(f"train-eval:{own_workspace.resolve()}:{job_id}")
    assert run is not None
    run.thread.join(300)
    assert run.error is None, run.error
    at.run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    table = next(d.value for d in at.dataframe if "metric" in d.value)  # AppTest keeps no key of a plain table
    assert "recall@5" in set(table["metric"]) and set(table["n_turns"]) == {20}
    assert any(run.result["run_id"] in s.value for s in at.success)
    with Workspace(own_workspace) as w:
        assert w.count("runs") == runs_before + 1
        model = w.scalar("SELECT model FROM runs WHERE run_id = ?", [run.result["run_id"]])
    assert model.startswith("dense-retriever:")


def test_training_page_evaluates_a_finished_lm_through_its_generation_job(monkeypatch, own_workspace):
    """An SFT job (its model: the real SmolLM2 student folder) is evaluated with one click: the
    page launches the generation job of `eval --model lm --lm <job>`, follows it, and the run is
    stored when it is imported."""
    from crs_core import jobs, model_eval, models, train

    student = models.student_model_dir()
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    with Workspace(own_workspace) as ws:
        job_id = jobs.launch_job(ws, train.KIND_SFT, {"steps": 2, "method": "lora", "result": {"model_dir": str(student)}},
                                 {"train": [{"context": ["hi"], "labels": ["x"]}]}, own_workspace.parent / "jobs",
                                 runner="conftest:fake_training_runner")
        folder = jobs.job_folder(ws, job_id)
    assert jobs.wait_for_job(folder, timeout=60).state == "succeeded"
    at = open_page(monkeypatch, own_workspace, "pages/training.py")
    assert at.selectbox(key="tr_job").value == job_id
    at.selectbox(key="tr_ev_test").set_value("inspired_test")
    at.number_input(key="tr_ev_sample").set_value(2)
    at.button(key="tr_evaluate").click().run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    eval_job = at.session_state[f"tr_lm_eval:{job_id}"]
    assert any(f"Generation job {eval_job}" in p.proto.text for p in at.get("progress"))
    with Workspace(own_workspace) as ws:
        eval_folder = jobs.job_folder(ws, eval_job)
    state = jobs.wait_for_job(eval_folder, timeout=600)
    assert state.state == "succeeded", jobs.read_log(eval_folder)
    at.run()  # the page imports the finished evaluation
    assert_clean(at)
    with Workspace(own_workspace) as ws:
        run = ws.df("SELECT run_id, model FROM runs WHERE run_id = ?", [model_eval.lm_run_id(eval_job)])
        turns = ws.scalar("SELECT max(n_turns) FROM metrics WHERE run_id = ?", [model_eval.lm_run_id(eval_job)])
    assert len(run) == 1 and run["model"].iloc[0] == f"lm-lora:{job_id}" and turns == 2
    assert any("See the run on the Evaluation page" in str(p.proto) for p in at.get("page_link"))


def _augment_page(monkeypatch, tmp_path):
    """The Augmentation page on test_augment's small workspace (40 films with plots, INSPIRED-style
    training turns): MiniLM retrieval over 41 items instead of the whole catalog."""
    from test_augment import build_workspace

    path = tmp_path / "aug.duckdb"
    build_workspace(path).close()
    return path, open_page(monkeypatch, path, "pages/augmentation.py")


def test_augmentation_page_runs_augmentation_then_two_stage_training(monkeypatch, tmp_path):
    from crs_core import jobs

    from pages import _shared

    path, at = _augment_page(monkeypatch, tmp_path)
    assert not any("python -m crs_core augment" in i.value for i in at.info), "a button, not a command"
    at.selectbox(key="aug_new_dataset").set_value("inspired_train")
    at.selectbox(key="aug_new_scorer").set_value("similarity")
    at.number_input(key="aug_new_threshold").set_value(3.0)
    at.selectbox(key="aug_new_kind").set_value("train_retriever")
    at.selectbox(key="aug_new_mode").set_value("two_stage")
    at.number_input(key="aug_new_alpha").set_value(0.5)
    at.number_input(key="aug_new_max_steps").set_value(1)
    at.button(key="aug_start").click().run()
    assert_clean(at)
    run = _shared.background_run(f"augment:{path.resolve()}")
    assert run is not None
    run.thread.join(300)
    assert run.error is None, run.error
    at.run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    rep, job_id = run.result["report"], run.result["job_id"]
    assert any(f"Stored {rep.labels_kept:,} augmented labels (inspired_train, similarity)" in s.value
               for s in at.success)
    assert {m.label: m.value for m in at.metric}["Labels added"] == f"{rep.labels_kept:,}"  # the stored run's view
    with Workspace(path) as w:
        stored = w.scalar("SELECT count(*) FROM augmented_labels WHERE dataset = 'inspired_train' "
                          "AND scorer = 'similarity'")
        folder = jobs.job_folder(w, job_id)
    assert stored == rep.labels_kept > 0
    try:
        config = jobs.job_state(folder).config
        assert (config["labels"], config["alpha"], config["augmentation"]) == \
            ("two_stage", 0.5, "inspired_train:similarity")
        assert any(f"Training job {job_id}" in p.proto.text for p in at.get("progress"))
    finally:
        jobs.cancel_job(folder, grace_seconds=60, wait=True)


def test_augmentation_page_stops_and_resumes_without_paying_a_call_twice(monkeypatch, tmp_path):
    from openai_stub_server import OpenAIStubServer
    from test_augment import StubTeacherReply

    import time

    from pages import _shared

    with OpenAIStubServer(reply=StubTeacherReply(), latency=0.3) as stub:
        monkeypatch.setenv("CRS_TEACHER_BASE_URL", stub.base_url)
        monkeypatch.setenv("CRS_TEACHER_MODEL", "gpt-4o-mini")
        path, at = _augment_page(monkeypatch, tmp_path)
        at.selectbox(key="aug_new_scorer").set_value("teacher")
        at.checkbox(key="aug_new_train").uncheck()
        at.button(key="aug_start").click().run()
        run = _shared.background_run(f"augment:{path.resolve()}")
        deadline = time.monotonic() + 120
        while stub.chat_requests < 3:
            assert time.monotonic() < deadline and run.running, run.error
            time.sleep(0.1)
        at.run()
        assert_clean(at)
        at.button(key="aug_stop").click().run()
        assert_clean(at)
        run.thread.join(120)
        paid_before = stub.chat_requests
        at.run()
        assert_clean(at)
        assert at.error and "nothing" in at.error[0].value.lower(), "a stopped augmentation says what it kept"
        with Workspace(path) as w:
            assert w.count("augmented_labels") == 0
        assert at.button(key="aug_start").label == "Resume augmentation"
        at.button(key="aug_start").click().run()
        run = _shared.background_run(f"augment:{path.resolve()}")
        run.thread.join(300)
        assert run.error is None, run.error
        at.run()
        assert_clean(at)
        rep = run.result["report"]
        assert rep.teacher["cached_hits"] > 0, rep.teacher  # the replies of the stopped run, from the cache
        assert stub.chat_requests == paid_before + rep.teacher["calls"] - rep.teacher["cached_hits"]
    with Workspace(path) as w:
        assert w.count("augmented_labels") == rep.labels_kept > 0


def test_evaluation_budget_curves_empty_state_offers_the_run(monkeypatch, studio_workspace):
    at = open_page(monkeypatch, studio_workspace, "pages/evaluation.py")
    assert at.button(key="ev_bc_start").label == "Run budget curve"  # a button first, the command as a hint
    assert any("python -m crs_core budget-curve" in c.value for c in at.caption)
    assert not any("budget" in c.proto.spec for c in at.get("plotly_chart"))


def test_evaluation_page_runs_a_budget_curve_and_its_points_appear_as_they_finish(monkeypatch, own_workspace):
    import time

    from openai_stub_server import OpenAIStubServer

    from pages import _shared

    counter = iter(range(10_000))

    def reply(messages):
        if messages[-1]["content"].startswith("Pretend you are a movie recommender system"):
            return "1. Toy Story (1995)\n2. Heat (1995)\n3. Alien (1979)"
        return f"Any suggestion for a tense thriller with a clever plot twist, number {next(counter)}?"

    def live_points(at):
        charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart") if "points as they are stored" in c.proto.spec]
        return {(t["name"], int(x)) for spec in charts for t in spec["data"] if t["xaxis"] == "x"
                for x in _plotly_array(t["x"]).tolist()}

    with OpenAIStubServer(reply=reply, latency=0.8) as stub:
        monkeypatch.setenv("CRS_TEACHER_BASE_URL", stub.base_url)
        at = open_page(monkeypatch, own_workspace, "pages/evaluation.py")
        at.multiselect(key="ev_bc_strategies").set_value(["RANDOM_UNIFORM", "FISHER"])
        at.multiselect(key="ev_bc_tests").set_value(["inspired_test"])
        at.text_input(key="ev_bc_budgets").set_value("2, 3")
        at.text_input(key="ev_bc_seeds").set_value("0")
        at.number_input(key="ev_bc_sample").set_value(20)
        at.selectbox(key="ev_bc_gt").set_value("llm")
        at.button(key="ev_bc_start").click().run()
        assert_clean(at)
        run = _shared.background_run(f"budget-curve:{own_workspace.resolve()}")
        assert run is not None
        seen = []
        while run.running:
            at.run()
            assert_clean(at)
            seen.append(live_points(at))
            time.sleep(0.2)
        run.thread.join(5)
    assert run.error is None, run.error
    (rep,) = run.result
    assert rep.complete and rep.computed == 4
    assert any(0 < len(points) < 4 for points in seen), f"no point was seen before the end: {seen}"
    at.run()
    assert_clean(at)
    assert live_points(at) == {(s, b) for s in ("RANDOM_UNIFORM", "FISHER") for b in (2, 3)}
    assert at.selectbox(key="ev_bc_experiment").value == rep.experiment_id  # and among the stored ones
    assert any("Finished." in s.value for s in at.success)


def test_evaluation_draws_budget_curves_per_strategy(monkeypatch, own_workspace):
    from openai_stub_server import OpenAIStubServer

    from crs_core.budget_curve import run_budget_curve
    from crs_core.teacher import Teacher, TeacherConfig

    counter = iter(range(10_000))

    def reply(messages):
        if messages[-1]["content"].startswith("Pretend you are a movie recommender system"):
            return "1. Toy Story (1995)\n2. Heat (1995)\n3. Alien (1979)"
        return f"Any suggestion for a tense thriller with a clever plot twist, number {next(counter)}?"

    with OpenAIStubServer(reply=reply) as stub, Workspace(own_workspace) as ws:
        cfg = TeacherConfig.openai(stub.base_url, "gpt-4o-mini", api_key="sk-test", concurrency=1)
        with Teacher(cfg, cache=ws) as teacher:
            rep = run_budget_curve(ws, teacher, strategies=["RANDOM_UNIFORM", "FISHER"], budgets=[2, 3],
                                   datasets=["inspired_test"], turn_sample=20, gt_mode="llm")
    assert rep.complete and rep.computed == 4
    at = open_page(monkeypatch, own_workspace, "pages/evaluation.py")
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="ev_bc_experiment").value == rep.experiment_id
    chart = next(c for c in at.get("plotly_chart") if "budget" in c.proto.spec)
    spec = json.loads(chart.proto.spec)
    traces = {(t["name"], t["xaxis"]) for t in spec["data"]}
    assert {name for name, _ in traces} == {"RANDOM_UNIFORM", "FISHER"}
    assert len(traces) == 4  # one line per strategy in each of the two panels (Recall@5, NDCG@5)
    for trace in spec["data"]:
        assert _plotly_array(trace["x"]).tolist() == [2, 3]
        assert (_plotly_array(trace["error_y"]["array"]) >= 0).all()  # error bars: standard errors


def _plotly_array(value):
    """A trace array from a figure's JSON (plotly writes numeric arrays as typed base64 blobs)."""
    import base64

    import numpy as np

    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value)


# -- issue 13, finding 1: the studio sends no key where a visitor points it ---------------------------
def test_the_studio_listens_on_loopback_only():
    import tomllib

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"


def test_synthesis_page_drops_a_typed_key_when_the_base_url_changes(monkeypatch, studio_workspace):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    at = open_page(monkeypatch, studio_workspace, "pages/synthesis.py")
    at.radio(key="syn_provider").set_value("openai").run()
    assert "syn_key_env" not in [w.key for w in at.text_input]  # no key is read from a variable a visitor names
    at.text_input(key="syn_base_url").set_value("https://api.openai.com/v1")
    at.text_input(key="syn_api_key").set_value("sk-test-TYPED-KEY-0123456789").run()
    assert_clean(at)
    assert not any("No API key" in w.value for w in at.warning)
    at.text_input(key="syn_base_url").set_value("https://collector.example.invalid/v1").run()
    assert_clean(at)
    assert at.text_input(key="syn_api_key").value == ""
    warnings = " ".join(w.value for w in at.warning)
    assert "enter it again" in warnings and "No API key for https://collector.example.invalid/v1" in warnings
    at.text_input(key="syn_api_key").set_value("sk-test-TYPED-KEY-0123456789").run()  # entered again: kept
    assert at.text_input(key="syn_api_key").value == "sk-test-TYPED-KEY-0123456789"
    assert not any("No API key" in w.value for w in at.warning)
