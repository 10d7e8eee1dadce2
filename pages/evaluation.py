"""Evaluation: Recall@k / NDCG@k of runs side by side (error bars = standard errors), budget
curves per selection strategy, and a per-turn drill-down of a fresh evaluation."""

import pandas as pd
import plotly.express as px
import streamlit as st

from crs_core import budget_curve, evaluate, model_kinds, recommenders, strategies, studio_actions, train, views
from crs_core.errors import CRSError
from crs_core.teacher import TeacherConfig
from pages._shared import (StreamlitProgress, authorized, background_run, cached, ensure_navigation, needs,
                           show_error, show_progress, start_background, workspace)

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
    # the newest six at first; a run stored since the last visit (here or from Training) joins
    # the chart at once instead of waiting to be picked
    known = st.session_state.get("ev_known_runs", set())
    if "ev_runs" not in st.session_state or st.session_state.get("ev_runs_dataset") != dataset:
        st.session_state["ev_runs"] = runs[-6:]
    else:
        st.session_state["ev_runs"] = ([r for r in st.session_state["ev_runs"] if r in runs]
                                       + [r for r in runs if r not in known and r not in st.session_state["ev_runs"]])
    st.session_state["ev_runs_dataset"] = dataset
    st.session_state["ev_known_runs"] = set(metrics["run_id"])
    chosen = c3.multiselect("Runs", runs, key="ev_runs")
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
BC_KEY = f"budget-curve:{ws.path}"
bc_run = background_run(BC_KEY)
bc_busy = bc_run is not None and bc_run.running


def budget_curve_figure(points, dataset: str, title: str):
    shown = points[points["dataset"] == dataset]
    fig = px.line(shown, x="budget", y="value", color="strategy", facet_col="metric", error_y="stderr",
                  markers=True, hover_data=["n_train", "n_turns", "selection_id"],
                  labels={"budget": "budget B (picks)", "value": ""}, title=title)
    fig.update_yaxes(matches=None, showticklabels=True)
    fig.update_layout(height=420, legend_title_text="", margin={"t": 60, "b": 10})
    return fig, shown


with st.form("ev_bc_form", border=True):
    st.markdown("#### Run a budget curve")
    st.caption("Per strategy: select once with the largest budget, synthesise queries for the picks, then for "
               "each budget B train the student on the queries of the first B picks and evaluate it. Each point is "
               "stored when it is done and appears on the chart; a stopped run resumes where it stopped.")
    f1, f2 = st.columns(2)
    bc_strategies = f1.multiselect("Strategies", list(strategies.names()), ["RANDOM_UNIFORM", "JS"],
                                   key="ev_bc_strategies", format_func=strategies.labels().get)
    bc_tests = f2.multiselect("Test sets", tests, [t for t in tests if t == "inspired_test"] or tests[:1],
                              key="ev_bc_tests")
    bc_students = budget_curve.students()
    bc_student = st.selectbox("Student", list(bc_students), key="ev_bc_student", format_func=bc_students.get,
                              help="What each point trains. NBCRS takes seconds per point; the fine-tuned "
                                   "retriever (and the hybrid over it) minutes.")
    f3, f4, f5, f6 = st.columns(4)
    bc_budgets = f3.text_input("Budgets B", "10, 25, 50", key="ev_bc_budgets", help="Picks per point, e.g. 10, 25, 50.")
    bc_seeds = f4.text_input("Seeds", "0", key="ev_bc_seeds", help="One experiment per seed, e.g. 0, 1, 2.")
    bc_sample = f5.number_input("Turns per test set (0 = all)", 0, 100_000, 200, key="ev_bc_sample")
    bc_gt = f6.selectbox("Ground truth", ["retrieve", "choose", "llm", "retrieve+llm"], key="ev_bc_gt",
                         help="retrieve: catalog retrieval (the teacher only writes the queries).")
    bc_start = st.form_submit_button("Resume budget curve" if bc_run is not None and not bc_busy
                                     and bc_run.result and not bc_run.result[-1].complete else "Run budget curve",
                                     type="primary", icon=":material/show_chart:", key="ev_bc_start",
                                     disabled=bc_busy or not tests)
teacher_cfg = TeacherConfig.from_env()
st.caption("Teacher for the queries: " + (f"{teacher_cfg.model} at {teacher_cfg.base_url} ($CRS_TEACHER_BASE_URL)"
                                            if teacher_cfg.base_url else "the local llama.cpp teacher (offline)")
           + ". Same as `python -m crs_core budget-curve`; teacher replies are cached in the workspace.")
if bc_start and not bc_busy:
    try:
        budgets_list = studio_actions.parse_int_list(bc_budgets, "Budgets")
        seeds_list = studio_actions.parse_int_list(bc_seeds, "Seeds")
        if not bc_strategies or not bc_tests:
            raise CRSError("Pick at least one strategy and one test set.")
    except CRSError as exc:
        show_error(exc)
    else:
        follow = {"experiments": []}  # filled by the run (a non-empty dict: BackgroundRun keeps it as extra)

        def bc_work(progress, stop, follow=follow, strategies=tuple(bc_strategies), budgets=tuple(budgets_list),
                    seeds=tuple(seeds_list), datasets=tuple(bc_tests), sample=int(bc_sample) or None, gt=bc_gt,
                    student=bc_student):
            return studio_actions.run_budget_curves(ws, strategies=strategies, budgets=budgets, seeds=seeds,
                                                    datasets=datasets, turn_sample=sample, gt_mode=gt,
                                                    student=student, progress=progress, stop=stop, follow=follow)

        start_background(BC_KEY, f"{bc_student} · {', '.join(bc_strategies)} · "
                         f"B = {', '.join(map(str, budgets_list))} · seeds "
                         f"{', '.join(map(str, seeds_list))} · {', '.join(bc_tests)}", bc_work, follow)
        st.rerun()


def budget_curve_run() -> None:
    """The running (or last) budget-curve run: progress, stop, and its points as they are stored."""
    current = background_run(BC_KEY)
    if current is None:
        return
    with st.container(border=True):
        st.markdown("#### Budget-curve run")
        st.text(current.label)
        exp_id = current.extra.get("experiment")
        points = budget_curve.budget_curve_frame(ws, exp_id, metrics=budget_curve.CHART_METRICS) if exp_id else None
        n_points = 0 if points is None else points[["strategy", "budget"]].drop_duplicates().shape[0]
        if current.running:
            stored = f"{n_points} point(s) stored in {exp_id or '…'}"
            show_progress(current.progress_now("Budget curve", detail=stored))
            if st.button("Stop", key="ev_bc_stop", icon=":material/stop:",
                         disabled=current.stop.is_set()) and authorized("background_work"):
                current.stop.set()
            if current.stop.is_set():
                st.caption("Stopping after the point in progress; stored points are kept.")
        elif current.error is not None:
            show_error(current.error)
        elif current.result is not None:
            done = all(r.complete for r in current.result)
            (st.success if done else st.warning)("Finished." if done else "Stopped or incomplete: run it again "
                                                 "with the same settings to resume.")
            st.code("\n\n".join("\n".join(r.lines()) for r in current.result), language=None)
        if points is not None and not points.empty:
            # figures are rebuilt only when a point arrives: building them (Plotly Express) costs
            # more than a poll on a loaded CPU and would take the run's time away from it
            signature = (exp_id, len(points), str(points["created_at"].max()))
            cached_figs = st.session_state.get("ev_bc_live_figs")
            if cached_figs is None or cached_figs[0] != signature:
                cached_figs = (signature, {ds: budget_curve_figure(points, ds, f"{exp_id} on {ds} (points as they "
                                                                               "are stored)")[0]
                                           for ds in sorted(points["dataset"].unique())})
                st.session_state["ev_bc_live_figs"] = cached_figs
            for ds, fig in cached_figs[1].items():
                st.plotly_chart(fig, key=f"ev_bc_live_{ds}")
    if st.session_state.get("ev_bc_was_running") and not current.running:
        st.session_state["ev_bc_was_running"] = False
        st.rerun(scope="app")  # the stored experiments below include it now
    st.session_state["ev_bc_was_running"] = current.running


st.fragment(budget_curve_run, run_every=2.0 if bc_busy else None)()

experiments = cached(budget_curve.list_experiments)
experiments = experiments[experiments["n_points"] > 0]
if experiments.empty:
    st.caption("No budget-curve experiment stored yet: run one above "
               "(or `python -m crs_core budget-curve --budgets 10 25 50 100 --turn-sample 500` from a terminal).")
else:
    c1, c2 = st.columns([0.5, 0.5])
    params = dict(zip(experiments["experiment_id"], experiments["params"]))
    experiment = c1.selectbox("Experiment", list(params), key="ev_bc_experiment",
                              format_func=lambda e: f"{e} — {budget_curve.describe_params(params[e])}")
    points = cached(budget_curve.budget_curve_frame, experiment, metrics=budget_curve.CHART_METRICS)
    bc_dataset = c2.selectbox("Test set", sorted(points["dataset"].unique()), key="ev_bc_dataset")
    fig, shown = budget_curve_figure(points, bc_dataset, f"Recall@5 and NDCG@5 vs budget on {bc_dataset} "
                                                         "(NBCRS trained on the first B picks)")
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
    # trained models that rank in process; the others (the LM) are evaluated by a job, from Training
    trained = {f"trained:{m['job_id']}": m for m in train.trained_models(ws)
               if m.get("model_dir") and not model_kinds.get(m["kind"]).evaluated_in_job}
    kinds = {**recommenders.recommender_labels(),
             **{k: f"Trained {model_kinds.get(m['kind']).short_label.lower()} {m['job_id']}"
                for k, m in trained.items()}}
    kind = c1.selectbox("Recommender", list(kinds), key="ev_kind", format_func=kinds.get,
                        help="Baselines, and retrievers trained on the Training page. Fine-tuned LMs are "
                             "evaluated through a generation job, from the Training page.")
    test = c2.selectbox("Test set", tests, key="ev_test")
    sample = c3.number_input("Turns (sample; 0 = all)", 0, 100_000, 200, key="ev_sample")
    store = st.checkbox("Store as a run (appears in the charts above)", key="ev_store")
    go = st.form_submit_button("Evaluate", type="primary", icon=":material/analytics:", key="ev_go")
if go and authorized("evaluate"):
    bar = StreamlitProgress(f"Evaluating {kind} on {test}")
    try:
        with st.spinner("Preparing the recommender…"):
            meta = {"model": kind, "training_data": None}
            if kind in trained:
                job = trained[kind]
                # the CLI's code path (`python -m crs_core eval --retriever`): the model loaded by
                # its kind's loader (query text, truncation and lengths as trained), items of the
                # test set embedded through the workspace cache
                rec, _ref = model_kinds.get(job["kind"]).resolve("evaluator")(ws, job["job_id"], [test])
                rec.fit(None, progress=bar)
                meta = {"model": rec.name, "config": {"job_id": job["job_id"]},
                        **{k: job["config"].get(k) for k in ("training_data", "selection_strategy", "budget")}}
            else:
                rec = recommenders.make_recommender(kind, ws)
                if recommenders.RECOMMENDERS[kind].fits_on_dialogues:
                    rec.fit(recommenders.training_set_from_synthetic(ws))
                    meta["training_data"] = "synthetic[approved]"
                meta["model"] = rec.name
        result = evaluate.evaluate(ws, rec, test, turn_sample=int(sample) or None, progress=bar)
        run_id = None
        if store:
            run_id = evaluate.store_run(ws, meta, {test: result})
        st.session_state["ev_result"] = result
        st.session_state["ev_result_run"] = run_id  # charted once, as "this evaluation"
        if run_id:
            st.session_state["ev_flash"] = f"Stored run {run_id}."
            st.rerun()  # the stored run joins the charts above
    except CRSError as exc:
        show_error(exc)
    finally:
        bar.done()

if "ev_flash" in st.session_state:
    st.success(st.session_state.pop("ev_flash"))
result = st.session_state.get("ev_result")
if result is None:
    st.caption("Run an evaluation to browse its turns.")
    st.stop()
st.dataframe(result.to_frame(), hide_index=True, width="stretch", key="ev_result_table")
# this evaluation beside the stored runs on the same test set (Recall@k, standard errors)
adhoc = views.results_frame({result.dataset: result}, f"{result.recommender} (this evaluation)")
stored_runs = metrics[(metrics["dataset"] == result.dataset) & metrics["metric"].str.startswith("recall@")].copy() \
    if not metrics.empty else metrics
if not stored_runs.empty:
    stored_runs = stored_runs[stored_runs["run_id"] != st.session_state.get("ev_result_run")]
    picked = [r for r in st.session_state.get("ev_runs") or [] if r in set(stored_runs["run_id"])]
    picked = picked or list(dict.fromkeys(stored_runs["run_id"]))[-3:]
    stored_runs = stored_runs[stored_runs["run_id"].isin(picked)].assign(run=lambda f: f["run_id"])
    stored_runs["k"] = stored_runs["metric"].str.split("@").str[1].astype(int)
compare = pd.concat([adhoc[adhoc["family"] == "recall"][["run", "k", "value", "stderr", "n_turns"]],
                     stored_runs[["run", "k", "value", "stderr", "n_turns"]] if not stored_runs.empty else None])
fig = px.bar(compare.sort_values("k"), x="k", y="value", color="run", barmode="group", error_y="stderr",
             hover_data=["n_turns"], labels={"value": "recall@k"},
             title=f"Recall@k on {result.dataset}: this evaluation and stored runs")
fig.update_xaxes(type="category")
fig.update_layout(height=400, legend_title_text="", margin={"t": 50, "b": 10})
st.plotly_chart(fig, key="ev_adhoc_bars")
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
