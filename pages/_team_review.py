"""The Review page's team views (team mode): the annotator's keyboard-first loop over assigned
dialogues, and the curator's assignments, disputes and agreement. All logic: crs_core.judging."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from crs_core import accounts, judging, review
from crs_core.errors import CRSError
from pages._shared import show_error

KEYS = {"approved": "A", "rejected": "X", "skip": "S", "undo": "U"}  # R and C are reserved by Streamlit


@st.fragment
def annotator_loop(ws, user: accounts.User) -> None:
    """One assigned dialogue at a time; A approve, X reject, S skip, U undo. The buttons act in
    callbacks and a key press reruns only this fragment, so the next dialogue replaces the
    current one without a page reload."""
    ss = st.session_state
    skipped = ss.setdefault("jl_skipped", [])
    done = ss.setdefault("jl_done", [])  # (assignment_id, query_id) judged in this session, for undo
    if "jl_error" in ss:
        show_error(ss.pop("jl_error"))
    if "jl_flash" in ss:
        st.success(ss.pop("jl_flash"))
    st.caption(f"Judged in this session: {len(done)} · keys: {KEYS['approved']} approve · {KEYS['rejected']} reject · "
               f"{KEYS['skip']} skip · {KEYS['undo']} undo your last judgement")
    nxt = judging.next_dialogue(ws, user, skip=skipped)
    if nxt is None:
        if skipped:
            st.info(f"Nothing left but the {len(skipped)} dialogue(s) you skipped.")
            st.button("Show the skipped dialogues again", key="jl_unskip", on_click=skipped.clear)
        else:
            st.success("Nothing left to judge in your assignments. Thank you!")
        _undo_button(ws, user, done)
        return
    aid, qid = nxt
    d = review.get_dialogue(ws, qid)
    with st.container(border=True):
        if d.item:
            st.text(f"Written from reviews of: {d.item.get('title')} ({d.item.get('year') or '?'})")
        edit = st.toggle("Edit the query or the list before judging", key=f"jl_edit_{qid}")
        if edit:
            st.text_area("User query", d.query, key=f"jl_query_{qid}", height=90)
            st.data_editor(d.ground_truth, key=f"jl_gt_{qid}", num_rows="dynamic", hide_index=True, width="stretch",
                           column_order=["rank", "title_raw", "item_id", "title", "year", "flagged", "note"],
                           disabled=["title", "year"])
        else:
            st.markdown("**User query**")
            st.text(d.query)
            st.dataframe(d.ground_truth[["rank", "title_raw", "title", "year", "flagged"]], hide_index=True,
                         width="stretch", height=260, key=f"jl_gt_view_{qid}")
        with st.expander(f"Source reviews the teacher saw ({len(d.reviews)})"):
            for r in d.reviews.itertuples(index=False):
                st.text(f"— review {r.review_id} · rating {r.rating} —")
                st.text(r.text)
        st.text_input("Note (optional)", key=f"jl_note_{qid}")

    def submit(verdict: str) -> None:
        query = gt = None
        if ss.get(f"jl_edit_{qid}"):
            query = ss.get(f"jl_query_{qid}", d.query)
            gt = _edited_list(d.ground_truth, ss.get(f"jl_gt_{qid}"))
        try:
            outcome = judging.judge(ws, user, aid, qid, verdict, based_on_version=d.version, query=query,
                                    ground_truth=gt, note=ss.get(f"jl_note_{qid}"))
        except CRSError as exc:
            ss["jl_error"] = exc
            return
        done.append((aid, qid))
        ss["jl_flash"] = f"{verdict.capitalize()}: {d.query[:80]}" + (f" — decided: {outcome}" if outcome else "")

    c1, c2, c3, c4 = st.columns(4)
    c1.button("Approve", type="primary", key="jl_approve", shortcut=KEYS["approved"], icon=":material/check:",
              on_click=submit, args=("approved",))
    c2.button("Reject", key="jl_reject", shortcut=KEYS["rejected"], icon=":material/close:",
              on_click=submit, args=("rejected",))
    c3.button("Skip", key="jl_skip", shortcut=KEYS["skip"], icon=":material/skip_next:",
              on_click=skipped.append, args=(qid,))
    with c4:
        _undo_button(ws, user, done)


def _edited_list(shown: pd.DataFrame, edits) -> pd.DataFrame:
    """The list after st.data_editor's edits (its session value holds only the changes)."""
    if not edits:
        return shown
    rows = shown.copy()
    for index, changes in edits.get("edited_rows", {}).items():
        for column, value in changes.items():
            rows.loc[rows.index[int(index)], column] = value
    rows = rows.drop(index=[rows.index[int(i)] for i in edits.get("deleted_rows", [])])
    added = pd.DataFrame(edits.get("added_rows", []))
    return pd.concat([rows, added], ignore_index=True) if len(added) else rows.reset_index(drop=True)


def _undo_button(ws, user, done: list) -> None:
    def undo() -> None:
        aid, qid = done[-1]
        try:
            judging.withdraw(ws, user, aid, qid)
        except CRSError as exc:
            st.session_state["jl_error"] = exc
            return
        done.pop()
        st.session_state["jl_flash"] = f"Took back your judgement of {qid}; it is shown again."

    st.button("Undo", key="jl_undo", shortcut=KEYS["undo"], icon=":material/undo:", disabled=not done, on_click=undo)


def curator_panel(ws, user: accounts.User, filters: review.QueueFilter, n_matching: int) -> None:
    """Assign the filter's pending dialogues, follow assignments, settle disputes, read agreement."""
    with st.expander("Team review: assign, disputes, agreement"):
        assign_tab, follow_tab, dispute_tab, agree_tab = st.tabs(["Assign", "Assignments", "Disputes", "Agreement"])
        with assign_tab:
            _assign_form(ws, user, filters, n_matching)
        with follow_tab:
            _assignments(ws)
        with dispute_tab:
            _disputes(ws, user)
        with agree_tab:
            _agreement(ws, user)


def _assign_form(ws, user, filters, n_matching) -> None:
    try:
        people = [u.name for u in accounts.Accounts().users() if u.may("judge")]
    except CRSError as exc:
        show_error(exc)
        return
    with st.form("jl_assign"):
        st.caption(f"The pending dialogues among the {n_matching:,} this filter shows, not already in an open "
                   "assignment.")
        names = st.multiselect("Annotators", people, key="jl_assign_people")
        c1, c2, c3 = st.columns(3)
        overlap = c1.number_input("Judgements per dialogue (overlap)", 1, max(1, len(people)), 1, key="jl_overlap")
        rule = c2.selectbox("Final status", judging.RULES, key="jl_rule",
                            help="unanimous: all verdicts equal, else disputed; majority: a strict majority, "
                                 "a tie is disputed. Approvals must agree on any edits.")
        label = c3.text_input("Name (optional)", key="jl_assign_name")
        go = st.form_submit_button("Assign", type="primary")
    if go:
        try:
            task = judging.assign(ws, user, filters, names, overlap=int(overlap), rule=rule, name=label)
        except CRSError as exc:
            show_error(exc)
        else:
            st.success(f"Assigned {task.size:,} dialogues to {', '.join(task.annotators)} (k = {task.overlap}).")


def _assignments(ws) -> None:
    tasks = judging.assignments(ws)
    if not tasks:
        st.caption("No assignments yet.")
        return
    rows = []
    for t in tasks:
        stats = judging.progress(ws, t.assignment_id)
        per = ", ".join(f"{r.annotator} {r.judged}" for r in stats["annotators"].itertuples())
        rows.append({"assignment": t.name, "annotators": ", ".join(t.annotators), "k": t.overlap, "rule": t.rule,
                     "dialogues": t.size, **{k: stats["outcomes"].get(k, 0) for k in
                                             ("open", "approved", "rejected", "disputed")},
                     "judged per annotator": per, "by": t.created_by})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="jl_assignments")


def _disputes(ws, user) -> None:
    open_ = judging.disputes(ws, user)
    if open_.empty:
        st.caption("No open disputes.")
        return
    st.dataframe(open_[["assignment", "query", "reason", "verdicts"]], hide_index=True, width="stretch",
                 key="jl_disputes")
    labels = {f"{r.assignment_id}/{r.query_id}": f"{r.query[:70]} — {r.reason}" for r in open_.itertuples()}
    pick = st.selectbox("Dispute", list(labels), format_func=labels.get, key="jl_dispute_pick")
    aid, qid = pick.split("/", 1)
    marks = judging.judgements_for(ws, user, aid, qid)
    for m in marks.itertuples():
        items = [r.get("title_raw") for r in json.loads(m.ground_truth)][:8]
        st.text(f"{m.annotator}: {m.verdict} — “{m.query}” — list: {'; '.join(map(str, items))}"
                + (f" — note: {m.note}" if m.note else ""))
    c1, c2, c3 = st.columns(3)
    status = c1.selectbox("Settle as", judging.VERDICTS, key="jl_settle_status")
    content = c2.selectbox("With the query and list of", ["(the dialogue as it stands)", *marks["annotator"]],
                           key="jl_settle_content")
    if c3.button("Settle", type="primary", key="jl_settle"):
        try:
            judging.settle(ws, user, aid, qid, status,
                           content_of=None if content.startswith("(") else content)
        except CRSError as exc:
            show_error(exc)
        else:
            st.rerun()


def _agreement(ws, user) -> None:
    pairs, overall = judging.agreement_report(ws, user)
    if overall["dialogues"] == 0:
        st.caption("Agreement appears once two annotators have judged the same dialogues (overlap ≥ 2).")
        return
    c1, c2, c3 = st.columns(3)
    c1.metric("Dialogues with ≥ 2 judgements", f"{overall['dialogues']:,}")
    c2.metric("Unanimous", f"{overall['unanimous']:.0%}")
    c3.metric("Fleiss' κ", "—" if pd.isna(overall["fleiss_kappa"]) else f"{overall['fleiss_kappa']:.2f}",
              help="Chance-corrected agreement on approve / reject over all annotators; — when every "
                   "judgement used one verdict (agreement cannot be told from chance).")
    st.dataframe(pairs, hide_index=True, width="stretch", key="jl_pairs",
                 column_config={"percent_agreement": st.column_config.NumberColumn("agreement", format="percent"),
                                "cohen_kappa": st.column_config.NumberColumn("Cohen's κ", format="%.2f"),
                                "gt_overlap": st.column_config.NumberColumn("list overlap (Jaccard)",
                                                                            format="%.2f")})
    st.download_button("Export agreement (CSV)", pairs.to_csv(index=False), "agreement.csv", "text/csv",
                       key="jl_export")
