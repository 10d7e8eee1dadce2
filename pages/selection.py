"""Selection: pick B seeds with a strategy (random, JS, Fisher and their metadata / user-aware
variants), see their coverage, compare two selections."""

import streamlit as st

from crs_core import strategies, views
from crs_core.errors import CRSError
from pages._shared import StreamlitProgress, authorized, cached, ensure_navigation, needs, show_error, workspace

ensure_navigation()

LABELS = strategies.labels()

st.title("Selection")
st.write("Choose which seed reviews the teacher sees, within a budget B. JS prefers reviews whose "
         "cluster membership is uncertain and unlike what is already picked; Fisher prefers reviews "
         "that add new directions to the embedding space (arXiv 2504.15476, §3.2).")
ws = workspace()
sets = cached(views.embedding_sets, "review")
if sets.empty:
    needs("No review embeddings yet: build the default workspace on Home or run "
          "`python -m crs_core embed` first.", "pages/home.py", "Home")
    st.stop()

with st.form("selection_form", border=True):
    c1, c2, c3, c4 = st.columns(4)
    set_id = c1.selectbox("Review embedding set", sets["set_id"].tolist(), key="sel_set")
    unit = c2.selectbox("Pick", ["review", "item"], key="sel_unit",
                        format_func={"review": "reviews", "item": "items (mean of their reviews)"}.get)
    strategy = c3.selectbox("Strategy", list(LABELS), format_func=LABELS.get, key="sel_strategy",
                            help=strategies.help_text())
    n_rows = int(sets.set_index("set_id").loc[set_id, "n"])
    budget = c4.number_input("Budget B (picks)", 1, max(1, n_rows), min(100, n_rows), step=10, key="sel_budget")
    c5, c6, c7 = st.columns(3)
    lam = c5.number_input("λ (JS trade-off)", 0.0, 100.0, 1.0, step=0.1, key="sel_lambda",
                          help="JS only: entropy + λ · JS divergence to the picks so far.")
    k = c6.number_input("K (K-means clusters for JS)", 2, 500, 20, key="sel_k")
    seed = c7.number_input("Seed", 0, 2**31 - 1, 0, key="sel_seed")
    st.caption("Variant weights (metadata / user-aware strategies): how much each signal counts.")
    w1, w2, w3 = st.columns(3)
    weights = (w1.slider("review", 0.0, 3.0, 1.0, 0.1, key="sel_w_review"),
               w2.slider("item metadata", 0.0, 3.0, 1.0, 0.1, key="sel_w_meta"),
               w3.slider("users (ratings)", 0.0, 3.0, 1.0, 0.1, key="sel_w_user"))
    c8, c9 = st.columns(2)
    name = c8.text_input("Name (optional)", key="sel_name")
    existing = cached(views.selections)
    parent = c9.selectbox("Continue from (next round: same strategy and set)",
                          [None] + existing["selection_id"].tolist(),
                          key="sel_parent", format_func=lambda s: "(start fresh)" if s is None else s)
    run = st.form_submit_button("Run selection", type="primary", icon=":material/play_arrow:", key="sel_run")

if run and authorized("select"):
    # a status box with a spinner, the bar inside it and a toast at the end: the run takes seconds
    # (12 s for B = 500 on the default workspace) and the page must show that it is working
    with st.status(f"Selecting B = {int(budget):,} with {LABELS[strategy]}…", expanded=True) as box:
        bar = StreamlitProgress(f"Selecting with {LABELS[strategy]}")
        try:
            from crs_core.selections import run_selection

            new_id = run_selection(ws, strategy, int(budget), unit=unit, set_id=set_id, k=int(k), lam=float(lam),
                                   seed=int(seed), weights=weights, name=name.strip() or None, parent_id=parent,
                                   progress=bar)
        except CRSError as exc:
            box.update(label="Selection failed", state="error")
            show_error(exc)
        else:
            previous = st.session_state.get("sel_compare_a")
            st.session_state["sel_compare_a"] = new_id
            if previous and previous != new_id:
                st.session_state["sel_compare_b"] = previous  # the new one against the one shown before
            box.update(label=f"Stored selection {new_id}", state="complete", expanded=False)
            st.toast(f"Stored selection {new_id}", icon=":material/check_circle:")
            st.success(f"Stored selection {new_id}.")
        finally:
            bar.done()

existing = cached(views.selections)
if existing.empty:
    needs("No selections yet: set a budget above and run one. Synthesis turns a selection into dialogues.")
    st.stop()

st.subheader("Selections")
st.dataframe(existing.drop(columns=["params", "summary"]), hide_index=True, width="stretch", key="sel_table")

SCORE_HELP = ("The strategy's gain when this pick was made (greedy, so it shrinks pick by pick): "
              "JS — entropy of the row's cluster distribution + λ·JS divergence to the mean of the picks "
              "before it; Fisher — log(1 + xᵀΛx), the information the row adds; random — 0. Close "
              "scores (2.9956 vs 2.9957) mean the picks were almost equally good.")
st.subheader("Compare two selections")
clus = cached(views.clusterings, set_id)
clustering = st.selectbox("Measure coverage with clustering", [None] + clus["clustering_id"].tolist(),
                          index=1 if len(clus) else 0, key="sel_clustering",
                          format_func=lambda c: "(none)" if c is None else c,
                          help="The same stored K-means clusters for both selections, so they compare fairly.")
ids = existing["selection_id"].tolist()
# two different selections by default (the newest and the one before), never A = B unasked
if st.session_state.get("sel_compare_a") not in ids:
    st.session_state["sel_compare_a"] = ids[0]
others = [i for i in ids if i != st.session_state["sel_compare_a"]]
if st.session_state.get("sel_compare_b") not in ids or (
        st.session_state.get("sel_compare_b") == st.session_state["sel_compare_a"] and others
        and not st.session_state.get("sel_compare_b_chosen")):
    st.session_state["sel_compare_b"] = others[0] if others else ids[0]
a_col, b_col = st.columns(2)
chosen = [a_col.selectbox("Selection A", ids, key="sel_compare_a")]
if others:
    chosen.append(b_col.selectbox("Selection B", ids, key="sel_compare_b",
                                  on_change=lambda: st.session_state.update(sel_compare_b_chosen=True)))
    if chosen[0] == chosen[1]:
        st.caption("A and B are the same selection.")
else:
    b_col.info("Only one selection so far: run another (another strategy or budget) to compare them.",
               icon=":material/compare_arrows:")
for n, (col, sid) in enumerate(zip((a_col, b_col), chosen)):
    cov = cached(views.selection_coverage, sid, clustering)
    row = existing.set_index("selection_id").loc[sid]
    col.text(f"{LABELS.get(row['strategy'], row['strategy'])}, B = {row['budget']}")
    m1, m2, m3 = col.columns(3)
    m1.metric("Clusters hit", "—" if cov["cluster_coverage"] is None else f"{cov['cluster_coverage']:.0%}",
              help="Share of the K-means clusters with at least one pick.")
    m2.metric("Cluster entropy", "—" if cov["cluster_entropy_norm"] is None else f"{cov['cluster_entropy_norm']:.2f}",
              help="Entropy of the picks' cluster histogram / log K (1 = evenly spread).")
    m3.metric("Items covered", "—" if cov["item_coverage"] is None else f"{cov['item_coverage']:.1%}",
              help=f"{cov['items']:,} distinct items among the picks, as a share of the set's items.")
    engine = cached(views.selection_summary, sid)
    if engine.get("mean_pairwise_distance") is not None:
        col.caption(f"Mean distance between picks {engine['mean_pairwise_distance']:.3f} "
                    f"(all rows {engine.get('mean_pairwise_distance_all') or 0:.3f})"
                    + (f"; users covered {engine['user_coverage']:.1%}"
                       if engine.get("user_coverage") is not None else ""))
    picks = cached(views.selection_picks, sid, clustering)
    col.dataframe(picks[["rank", "title", "year", "cluster", "score", "text"]], hide_index=True,
                  height=min(300, 35 * (len(picks) + 1) + 3), width="stretch", key=f"sel_picks_{'ab'[n]}",
                  column_config={"score": st.column_config.NumberColumn(
                      "score", format="%.4f", help=SCORE_HELP)})

if len(chosen) == 2 and chosen[0] != chosen[1]:
    pa = set(cached(views.selection_picks, chosen[0])["unit_id"])
    pb = set(cached(views.selection_picks, chosen[1])["unit_id"])
    st.caption(f"{len(pa & pb):,} picks in common; {len(pa - pb):,} only in A; {len(pb - pa):,} only in B.")

if clustering:
    hist = cached(views.selection_cluster_histogram, tuple(dict.fromkeys(chosen)), clustering)
    st.markdown(f"**Coverage of the clusters of `{clustering}`** (share of picks per cluster)")
    # a built-in (Vega-Lite) chart: Plotly's bundle alone takes seconds to start in a new page
    st.bar_chart(hist, x="cluster", y="share", color="selection_id", stack=False, height=380,
                 x_label="cluster", y_label="share of picks")
else:
    needs("Pick a clustering above to see cluster coverage charts.")
