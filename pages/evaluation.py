"""Evaluation: Recall@k / NDCG@k of runs side by side (error bars = standard errors), budget
curves per selection strategy, and a per-turn drill-down of a fresh evaluation."""

import plotly.express as px
import streamlit as st

from crs_core import budget_curve, evaluate, model_eval, recommenders, train, views
from crs_core.errors import CRSError
from pages._shared import StreamlitProgress, cached, ensure_navigation, needs, show_error, workspace

ensure_navigation()

st.title("Evaluation")
st.write("Recommendation turns of ReDial / INSPIRED test dialogues (He et al. protocol: items mentioned "
         "earlier are excluded). Error bars are standard errors over turns.")
ws = workspace()
turn_sets = cached(views.dialogue_datasets)
tests = [d for d in turn_sets["dataset"].tolist() if d.endswith("_test")]

metrics = cached(evaluate.metrics_frame)
if metrics.empty:
    needs("No evaluated runs yet. Evaluate a baseline below, or train a model on the Training page "
          "and evaluate it (`python -m crs_core eval`).")
else:
    c1, c2, c3 = st.columns([0.25, 0.25, 0.5])
    dataset = c1.selectbox("Test set", sorted(metrics["dataset"].unique()), key="ev_dataset")
    family = c2.radio("Metric", ["recall", "ndcg"], horizontal=True, key="ev_family",
                      format_func={"recall": "Recall@k", "ndcg": "NDCG@k"}.get)
    frame = metrics[(metrics["dataset"] == dataset) & metrics["metric"].str.startswith(family + "@")].copy()
    frame["run"] = frame["run_id"]  # ids name the model (e.g. "popularity-interactions-20260101-...")
    runs = list(dict.fromkeys(frame["run"]))
    chosen = c3.multiselect("Runs", runs, default=runs[-6:], key="ev_runs")
    frame = frame[frame["run"].isin(chosen)]
    if frame.empty:
        st.caption("Pick at least one run.")
    else:
        frame["k"] = frame["metric"].str.split("@").str[1].astype(int)
        fig = px.bar(frame.sort_values("k"), x="k", y="value", color="run", barmode="group", error_y="stderr",
                     hover_data=["model", "n_turns"], labels={"value": f"{family}@k"},
                     title=f"{family.capitalize()}@k on {dataset}")
        fig.update_xaxes(type="category")
        fig.update_layout(height=420, legend_title_text="", margin={"t": 50, "b": 10})
        st.plotly_chart(fig, key="ev_bars")
        st.dataframe(evaluate.metrics_frame(ws, wide=True).query("dataset == @dataset").drop(columns=["config"]),
                     hide_index=True, width="stretch", key="ev_table")
    # trained runs that name their selection strategy and budget (the budget-curve experiments
    # below are the cheap NBCRS version of the same comparison)
    if not cached(views.budget_curves, "recall@10", dataset).empty:
        curve_metric = st.selectbox("Metric of runs by selection budget", sorted(metrics["metric"].unique()),
                                    key="ev_curve_metric",
                                    index=sorted(metrics["metric"].unique()).index("recall@10")
                                    if "recall@10" in set(metrics["metric"]) else 0)
        curves = cached(views.budget_curves, curve_metric, dataset)
        fig = px.line(curves, x="budget", y="value", color="strategy", error_y="stderr", markers=True,
                      title=f"{curve_metric} of trained runs vs the budget B of their selection, on {dataset}")
        st.plotly_chart(fig, key="ev_curves")

st.subheader("Budget curves")
experiments = cached(budget_curve.list_experiments)
experiments = experiments[experiments["n_points"] > 0]
if experiments.empty:
    needs("No budget-curve experiment yet. It selects with each strategy, synthesises queries for the picks, "
          "trains NBCRS on the first B picks and evaluates every budget B. Run it from the command line, e.g. "
          "`python -m crs_core budget-curve --budgets 10 25 50 100 --turn-sample 500`.")
else:
    c1, c2 = st.columns([0.5, 0.5])
    params = dict(zip(experiments["experiment_id"], experiments["params"]))
    experiment = c1.selectbox("Experiment", list(params), key="ev_bc_experiment",
                              format_func=lambda e: f"{e} — {budget_curve.describe_params(params[e])}")
    points = cached(budget_curve.budget_curve_frame, experiment, metrics=budget_curve.CHART_METRICS)
    bc_dataset = c2.selectbox("Test set", sorted(points["dataset"].unique()), key="ev_bc_dataset")
    shown = points[points["dataset"] == bc_dataset]
    fig = px.line(shown, x="budget", y="value", color="strategy", facet_col="metric", error_y="stderr",
                  markers=True, hover_data=["n_train", "n_turns", "selection_id"],
                  labels={"budget": "budget B (picks)", "value": ""},
                  title=f"Recall@5 and NDCG@5 vs budget on {bc_dataset} (NBCRS trained on the first B picks)")
    fig.update_yaxes(matches=None, showticklabels=True)
    fig.update_layout(height=420, legend_title_text="", margin={"t": 60, "b": 10})
    st.plotly_chart(fig, key="ev_budget_curves")
    st.caption(f"{budget_curve.describe_params(params[experiment])}. Error bars: standard errors over "
               f"{int(shown['n_turns'].max())} test turns.")

st.subheader("Evaluate a recommender now (with per-turn drill-down)")
if not tests:
    needs("No test dialogues in this workspace: build the default workspace (it ingests the ReDial and "
          "INSPIRED test sets) on Home.", "pages/home.py", "Home")
    st.stop()
with st.form("ev_form", border=True):
    c1, c2, c3 = st.columns(3)
    trained = {f"trained:{m['job_id']}": m for m in train.trained_models(ws, train.KIND_RETRIEVER)
               if m.get("model_dir")}
    kinds = {**recommenders.RECOMMENDER_KINDS,
             **{k: f"Trained retriever {m['job_id']}" for k, m in trained.items()}}
    kind = c1.selectbox("Recommender", list(kinds), key="ev_kind", format_func=kinds.get,
                        help="Baselines, and retrievers trained on the Training page. Fine-tuned LMs are "
                             "evaluated through a generation job, not from this page yet.")
    test = c2.selectbox("Test set", tests, key="ev_test")
    sample = c3.number_input("Turns (sample; 0 = all)", 0, 100_000, 200, key="ev_sample")
    store = st.checkbox("Store as a run (appears in the charts above)", key="ev_store")
    go = st.form_submit_button("Evaluate", type="primary", icon=":material/analytics:", key="ev_go")
if go:
    bar = StreamlitProgress(f"Evaluating {kind} on {test}")
    try:
        with st.spinner("Preparing the recommender…"):
            meta = {"model": kind, "training_data": None}
            if kind in trained:
                job = trained[kind]
                # the CLI's code path (`python -m crs_core eval --retriever`): the model loaded by
                # recommenders.load_retriever (query text, truncation and lengths as trained),
                # items of the test set embedded through the workspace cache
                rec, _ref = model_eval.dense_retriever(ws, job["job_id"], [test])
                rec.fit(None, progress=bar)
                meta = {"model": rec.name, "config": {"job_id": job["job_id"]},
                        **{k: job["config"].get(k) for k in ("training_data", "selection_strategy", "budget")}}
            else:
                rec = recommenders.make_recommender(kind, ws)
                if kind in ("nbcrs", "popularity-labels", "hybrid"):
                    rec.fit(recommenders.training_set_from_synthetic(ws))
                    meta["training_data"] = "synthetic[approved]"
                meta["model"] = rec.name
        result = evaluate.evaluate(ws, rec, test, turn_sample=int(sample) or None, progress=bar)
        if store:
            run_id = evaluate.store_run(ws, meta, {test: result})
            st.success(f"Stored run {run_id}.")
        st.session_state["ev_result"] = result
    except CRSError as exc:
        show_error(exc)
    finally:
        bar.done()

result = st.session_state.get("ev_result")
if result is None:
    st.caption("Run an evaluation to browse its turns.")
    st.stop()
st.dataframe(result.to_frame(), hide_index=True, width="stretch", key="ev_result_table")
turns = result.turns_frame()
hits_only = st.toggle("Only turns with a hit in the top 10", key="ev_hits_only")
if hits_only:
    turns = turns[turns["hit_ranks"].map(lambda r: any(p <= 10 for p in r))]
if turns.empty:
    st.caption("No turn matches.")
    st.stop()
turn_id = st.selectbox("Turn", turns["turn_id"].tolist(), key="ev_turn")
turn = next(t for t in result.turns if t.turn_id == turn_id)
context = cached(views.turn_context, result.dataset, turn_id)
left, right = st.columns(2)
with left:
    st.markdown("**Dialogue context**")
    for utterance in context:
        st.text(utterance)
with right:
    names = cached(views.item_titles, tuple(turn.labels + turn.ranked[:10]))
    st.markdown("**Ground truth**")
    st.dataframe({"item": [names.get(i, i) for i in turn.labels]}, hide_index=True, width="stretch")
    st.markdown("**Top 10** (hits marked)")
    st.dataframe({"rank": list(range(1, len(turn.ranked[:10]) + 1)),
                  "item": [names.get(i, i) for i in turn.ranked[:10]],
                  "hit": [i in set(turn.labels) for i in turn.ranked[:10]]}, hide_index=True, width="stretch")
    st.caption(" · ".join(f"{k} {v:.3f}" for k, v in turn.metrics.items()))
