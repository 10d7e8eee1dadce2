"""The studio in team mode (CRS_STUDIO_MODE=team) with streamlit.testing.v1.AppTest: sign-in,
role checks on page actions, the annotator's keyboard loop and the curator's team views."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from conftest import ROOT, copy_workspace
from crs_core import judging, review
from crs_core.accounts import Accounts, User
from crs_core.store import Workspace

PASSWORDS = {"olga": "owner-password-1", "cura": "curator-password-1", "ann": "annotator-password-1",
             "bob": "annotator-password-2", "vic": "viewer-password-1"}


@pytest.fixture()
def team(monkeypatch, studio_workspace_file, tmp_path):
    path = copy_workspace(studio_workspace_file, tmp_path / "team.duckdb")
    book = Accounts(tmp_path / "accounts.json")
    owner = book.add("olga", "owner", PASSWORDS["olga"])
    for name, role in (("cura", "curator"), ("ann", "annotator"), ("bob", "annotator"), ("vic", "viewer")):
        book.add(name, role, PASSWORDS[name], actor=owner)
    monkeypatch.setenv("CRS_STUDIO_MODE", "team")
    monkeypatch.setenv("CRS_ACCOUNTS", str(book.path))
    monkeypatch.setenv("CRS_WORKSPACE", str(path))
    monkeypatch.setenv("CRS_JOBS_ROOT", str(tmp_path / "jobs"))
    return path


def visit(page: str = "pages/home.py") -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page(page)
    at.run()
    return at


def sign_in(at: AppTest, name: str, password: str | None = None) -> AppTest:
    at.text_input(key="sign_in_name").set_value(name)
    at.text_input(key="sign_in_password").set_value(password or PASSWORDS[name])
    at.button[0].click().run()  # the form's submit button
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_every_page_asks_for_sign_in_and_a_wrong_password_gets_no_session(team):
    at = visit("pages/review.py")
    assert at.title[0].value == "Sign in"
    assert "workspace_picker" not in [s.key for s in at.sidebar.selectbox]  # nothing of the studio shown
    sign_in(at, "ann", "not-her-password")
    assert [e.value for e in at.error] == ["wrong name or password"]
    assert at.title[0].value == "Sign in" and "signed_in" not in at.session_state
    sign_in(at, "ann")
    assert at.title[0].value == "Review" and at.session_state["signed_in"] == User("ann", "annotator")
    assert any("Signed in as **ann** (annotator)" in c.value for c in at.sidebar.caption)


def test_team_mode_without_accounts_says_how_to_make_the_first_owner(team, monkeypatch, tmp_path):
    monkeypatch.setenv("CRS_ACCOUNTS", str(tmp_path / "none.json"))
    at = visit()
    assert any("users add NAME --role owner" in i.value for i in at.info)


def test_a_viewer_cannot_start_synthesis_or_change_dialogues(team):
    at = sign_in(visit("pages/synthesis.py"), "vic")
    at.button(key="syn_start").click().run()
    assert not at.exception
    assert any("vic (viewer) may not start synthesis" in e.value for e in at.error)
    from pages import _shared
    assert _shared.background_run(f"synthesis:{team.resolve()}") is None
    at.switch_page("pages/review.py")
    at.run()
    assert any("can look at the studio's data and results but not review" in i.value for i in at.info)
    assert not [b for b in at.button if b.key in ("rv_approve", "jl_approve")]


def test_an_annotator_judges_assigned_dialogues_with_keys_and_overlap_decides(team):
    with Workspace(team) as ws:
        task = judging.assign(ws, User("cura", "curator"), None, ["ann", "bob"], overlap=2)
        first = judging.next_dialogue(ws, User("ann", "annotator"))[1]
    at = sign_in(visit("pages/review.py"), "ann")
    approve = at.button(key="jl_approve")
    assert (approve.proto.shortcut.upper(), at.button(key="jl_reject").proto.shortcut.upper()) == ("A", "X")
    assert not [b for b in at.button if b.key == "rv_approve"]  # no free queue for annotators
    approve.click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(s.value.startswith("Approved:") for s in at.success)
    with Workspace(team) as ws:
        assert review.get_dialogue(ws, first).status == "pending"  # one of two judgements
        second = judging.next_dialogue(ws, User("ann", "annotator"))[1]
    assert second != first
    at.button(key="jl_undo").click().run()  # take it back: the first dialogue is shown again
    with Workspace(team) as ws:
        assert judging.next_dialogue(ws, User("ann", "annotator"))[1] == first
        assert judging.progress(ws, task.assignment_id)["annotators"].empty


def test_a_curator_assigns_from_the_review_page_and_sees_agreement(team):
    at = sign_in(visit("pages/review.py"), "cura")
    at.multiselect(key="jl_assign_people").set_value(["ann", "bob"])
    at.number_input(key="jl_overlap").set_value(2)
    at.button[[b.label for b in at.button].index("Assign")].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Assigned" in s.value and "(k = 2)" in s.value for s in at.success)
    with Workspace(team) as ws:
        (task,) = judging.assignments(ws)
        for name, verdict in (("ann", "approved"), ("bob", "rejected")):
            user = User(name, "annotator")
            aid, qid = judging.next_dialogue(ws, user)
            judging.judge(ws, user, aid, qid, verdict, based_on_version=review.get_dialogue(ws, qid).version)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    tables = [df.value for df in at.dataframe]
    disputes = next(t for t in tables if "reason" in t.columns)
    assert list(disputes["verdicts"]) == ["ann: approved; bob: rejected"]
    assert disputes["reason"].iloc[0].startswith("verdicts differ")
    pairs = next(t for t in tables if "annotator_a" in t.columns)
    assert list(pairs["annotator_a"]) == ["ann"] and pairs["percent_agreement"].iloc[0] == 0.0


@pytest.mark.parametrize("page,button,says", [
    ("pages/selection.py", "sel_run", "may not run a selection"),
    ("pages/evaluation.py", "ev_go", "may not run an evaluation"),
])
def test_an_annotator_cannot_spend_compute_from_any_page(team, page, button, says):
    with Workspace(team) as ws:
        runs_before = ws.count("runs")
        selections_before = ws.count("selections")
    at = sign_in(visit(page), "ann")
    at.button(key=button).click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(f"ann (annotator) {says}" in e.value for e in at.error)
    with Workspace(team) as ws:
        assert (ws.count("runs"), ws.count("selections")) == (runs_before, selections_before)


def test_writes_record_the_signed_in_user(team):
    at = sign_in(visit("pages/selection.py"), "cura")
    at.number_input(key="sel_budget").set_value(5)
    at.button(key="sel_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    with Workspace(team) as ws:
        newest = ws.df("SELECT created_by FROM selections ORDER BY created_at DESC LIMIT 1")
    assert list(newest["created_by"]) == ["cura"]
