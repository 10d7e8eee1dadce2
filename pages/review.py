"""Review: the annotators' queue of synthetic dialogues — approve, reject or edit the query and
its ground-truth list; bulk actions over a filter; history with undo. All logic: crs_core.review."""

import pandas as pd
import streamlit as st

from crs_core import accounts, review, views
from crs_core.errors import CRSError
from pages._shared import cached, current_user, ensure_navigation, needs, show_error, workspace
from pages._team_review import annotator_loop, curator_panel

ensure_navigation()

ss = st.session_state
st.title("Review")
ws = workspace()
who = current_user()  # every write below records (and crs_core checks) this account
counts = views.review_counts(ws)
if sum(counts.values()) == 0:
    needs("No synthetic dialogues to review yet: run Synthesis on a selection first.",
          "pages/synthesis.py", "Synthesis")
    st.stop()
if not who.may("review_directly"):  # team mode: annotators judge their assignments, viewers read
    if who.may("judge"):
        annotator_loop(ws, who)
    else:
        st.info(f"Your role ({who.role}) can look at the studio's data and results but not review dialogues.")
    st.stop()
m = st.columns(3)
for col, status in zip(m, review.STATUSES):
    col.metric(status.capitalize(), f"{counts[status]:,}")

facets = cached(review.queue_facets)
with st.expander("Filters", expanded=True):
    f1, f2, f3 = st.columns(3)
    statuses = f1.multiselect("Status", list(review.STATUSES), default=["pending"], key="rv_f_status")
    teachers = f2.multiselect("Teacher", facets["teacher"], key="rv_f_teacher")
    strategies = f3.multiselect("Selection strategy", facets["strategy"], key="rv_f_strategy")
    f4, f5 = st.columns(2)
    grounding = f4.slider("Grounding rate", 0.0, 1.0, (0.0, 1.0), 0.05, key="rv_f_grounding")
    search = f5.text_input("Search query or item title", key="rv_f_search")
filters = review.QueueFilter(statuses=statuses, teachers=teachers, strategies=strategies,
                             min_grounding=grounding[0], max_grounding=grounding[1], search=search)
queue = review.review_queue(ws, filters)
if accounts.studio_mode() == "team":
    curator_panel(ws, who, filters, len(queue))

with st.expander(f"Bulk action over this filter ({len(queue):,} dialogues)"):
    sure = st.checkbox(f"Yes, change all {len(queue):,} dialogues matching the filter", key="rv_bulk_sure")
    b1, b2, b3 = st.columns(3)
    for col, status, label in ((b1, "approved", "Approve all"), (b2, "rejected", "Reject all"),
                               (b3, "pending", "Back to pending")):
        if col.button(label, key=f"rv_bulk_{status}", disabled=not sure or queue.empty):
            try:
                with st.spinner(f"Setting {len(queue):,} dialogues to {status}…"):
                    done = review.bulk_set_status(ws, filters, status, who, note=f"bulk {status}")
                ss["rv_flash"] = f"{len(done):,} dialogues set to {status}."
                st.rerun()
            except CRSError as exc:
                show_error(exc)

if queue.empty:
    needs("No dialogue matches these filters (by default only pending ones are shown).")
    st.stop()

ids = queue["query_id"].tolist()
short = dict(zip(ids, (f"[{s}] {q[:90]}" for s, q in zip(queue["status"], queue["query"]))))


def pick_from_table() -> None:
    rows = ss["rv_queue_table"].selection.rows
    if rows:
        ss["rv_current"] = ids[rows[0]]


st.dataframe(queue[["status", "query", "item_title", "teacher", "strategy", "grounding_rate", "n_gt", "version",
                    "last_annotator"]], hide_index=True, width="stretch", height=220, key="rv_queue_table",
             on_select=pick_from_table, selection_mode="single-row",
             column_config={"query": st.column_config.TextColumn(width="large"),
                            "grounding_rate": st.column_config.ProgressColumn("grounded", format="percent",
                                                                              min_value=0, max_value=1, width="small"),
                            "n_gt": st.column_config.NumberColumn("list", width=50),
                            "version": st.column_config.NumberColumn("v", width=40)})
if ss.get("rv_current") not in ids:
    ss["rv_current"] = ids[0]
qid = st.selectbox("Dialogue", ids, key="rv_current", format_func=short.get)
if "rv_flash" in ss:
    st.success(ss.pop("rv_flash"))

d = review.get_dialogue(ws, qid)
base_key = f"rv_base_{qid}"
if base_key not in ss:
    ss[base_key] = d.version  # the version this annotator is editing
    ss[f"rv_orig_{qid}_{d.version}"] = (d.query, d.ground_truth)
base = ss[base_key]
tag = f"{qid}_{base}"


def forget() -> None:
    """Drop this annotator's working copy of the dialogue (after a save or an undo)."""
    for key in [k for k in ss if isinstance(k, str) and (k.endswith(tag) or f"{tag}_" in k)] + [base_key]:
        ss.pop(key, None)


def has_edits() -> bool:
    orig = ss.get(f"rv_orig_{tag}")
    latest = ss.get(f"rv_latest_{tag}")
    return (orig is None or ss.get(f"rv_qtext_{tag}", orig[0]) != orig[0] or bool(ss.get(f"rv_note_{tag}"))
            or (latest is not None and not latest.reset_index(drop=True).equals(orig[1].reset_index(drop=True))))


if d.version != base and not has_edits():
    forget()  # someone else changed it and this annotator has nothing unsaved: show the latest
    st.rerun()
if d.version != base:
    st.warning(f"This dialogue changed since you opened it (now version {d.version}); saving your "
               "changes will be refused. Your edits are kept below until you load the latest version.")
    if st.button("Load the latest version (discard my edits)", key="rv_reload"):
        ss.pop(base_key)
        st.rerun()

with st.container(border=True):
    st.text(f"Status: {d.status} · version {d.version} · teacher: {d.teacher or '?'} · "
            f"strategy: {d.strategy or '?'} · ground truth: {d.gt_mode or '?'}")
    if d.item:
        st.text(f"Written from reviews of: {d.item.get('title')} ({d.item.get('year') or '?'}) — {d.item_id}")
    qkey, qstore = f"rv_qinput_{tag}", f"rv_qtext_{tag}"
    if qkey not in ss:
        ss[qkey] = ss.get(qstore, d.query)
    query_text = st.text_area("User query", key=qkey, height=100)
    ss[qstore] = query_text

    with st.expander(f"Source reviews the teacher saw ({len(d.reviews)})"):
        with st.container(height=360, border=False):
            for r in d.reviews.itertuples(index=False):
                st.text(f"— review {r.review_id} · rating {r.rating} —")
                st.text(r.text)

    st.markdown("**Ground-truth list** — edit ranks to reorder, delete rows, add titles or catalog items; "
                "flagged rows are titles not grounded in the catalog.")
    gen = ss.get(f"rv_gen_{tag}", 0)
    ek, bk, lk = f"rv_editor_{tag}_{gen}", f"rv_editor_base_{tag}", f"rv_latest_{tag}"
    if ek not in ss or bk not in ss:
        ss[bk] = ss.get(lk, d.ground_truth)
    edited = st.data_editor(
        ss[bk], key=ek, num_rows="dynamic", hide_index=True, width="stretch",
        column_order=["rank", "title_raw", "item_id", "title", "year", "genres", "match_score", "flagged", "note"],
        disabled=["title", "year", "genres", "match_score"],
        column_config={"rank": st.column_config.NumberColumn("rank", min_value=1, step=1, width=60),
                       "title_raw": st.column_config.TextColumn("teacher's title", width="medium"),
                       "item_id": st.column_config.TextColumn("catalog id", width=95),
                       "title": st.column_config.TextColumn("catalog title", width="medium"),
                       "year": st.column_config.NumberColumn("year", format="%d", width=60),
                       "genres": st.column_config.TextColumn("genres", width="small"),
                       "match_score": st.column_config.NumberColumn("match", format="%.2f", width=60),
                       "flagged": st.column_config.CheckboxColumn("flagged", width=65),
                       "note": st.column_config.TextColumn("note", width="medium")})
    ss[lk] = edited
    n_ok = int((edited["item_id"].notna() & ~edited["flagged"].fillna(False).astype(bool)).sum()) if len(edited) else 0
    st.caption(f"{n_ok} of {len(edited)} rows grounded in the catalog.")

    a1, a2, a3 = st.columns([0.45, 0.4, 0.15], vertical_alignment="bottom")
    wanted = a1.text_input("Add from the catalog: search a title", key=f"rv_search_{tag}")
    found = cached(views.catalog_search, wanted)
    titles = {r.item_id: f"{r.title} ({'' if pd.isna(r.year) else int(r.year)}) — {r.item_id}"
              for r in found.itertuples()}
    to_add = a2.selectbox("Catalog item", list(titles), format_func=titles.get,  # a new widget per search
                          key=f"rv_add_pick_{tag}_{abs(hash(wanted.strip().lower()))}")
    if a3.button("Add", key=f"rv_add_{tag}", disabled=to_add is None):
        row = found[found["item_id"] == to_add].iloc[0]
        new = {"rank": (pd.to_numeric(edited["rank"]).max() if len(edited) else 0) + 1, "item_id": to_add,
               "title_raw": titles[to_add].rsplit(" — ", 1)[0], "match_score": 1.0, "note": f"added by {who.name}",
               "title": row["title"], "year": row["year"], "genres": row["genres"], "flagged": False}
        ss[bk] = ss[lk] = pd.concat([edited, pd.DataFrame([new])], ignore_index=True)
        ss[f"rv_gen_{tag}"] = gen + 1
        st.rerun()

    note = st.text_input("Note (why; kept in the history)", key=f"rv_note_{tag}")


def save(status=None) -> None:
    rows = edited.assign(_order=pd.to_numeric(edited["rank"], errors="coerce")).sort_values("_order", kind="stable",
                                                                                            na_position="last")
    try:
        version = review.save_edit(ws, qid, base, query_text, rows, note, who, status=status)
    except review.ConflictError as exc:
        show_error(exc)
        st.info("Your edits are still here (query and list above); copy what you need, then load the latest version.")
        return
    except CRSError as exc:
        show_error(exc)
        return
    forget()
    ss["rv_flash"] = f"Saved {qid} as version {version}" + (f" ({status})." if status else ".")
    st.rerun()


c1, c2, c3, c4 = st.columns(4)
if c1.button("Approve", type="primary", key="rv_approve", icon=":material/check:"):
    save("approved")
if c2.button("Reject", key="rv_reject", icon=":material/close:"):
    save("rejected")
if c3.button("Save edits", key="rv_save", icon=":material/save:"):
    save()
if c4.button("Undo last change", key="rv_undo", icon=":material/undo:"):
    try:
        version = review.undo(ws, qid, who, expected_version=base)
        forget()
        ss["rv_flash"] = f"Restored the previous state of {qid} as version {version}."
        st.rerun()
    except CRSError as exc:
        show_error(exc)

with st.expander("History"):
    hist = review.history(ws, qid)
    if hist.empty:
        st.caption("No changes yet: this is the dialogue as synthesis wrote it.")
    else:
        st.dataframe(hist, hide_index=True, width="stretch", key="rv_history")
