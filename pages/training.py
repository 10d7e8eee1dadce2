"""Training: launch a retriever or SFT job on approved dialogues (a background process), follow
its progress, loss / learning-rate charts and log; cancel and resume; evaluate a finished job."""

import altair as alt
import streamlit as st

from crs_core import jobs, model_kinds, studio_actions, train, views
from crs_core.errors import CRSError
from crs_core.evaluate import check_no_test_leakage
from pages._shared import (authorized, background_run, cached, ensure_navigation, needs, show_error,
                           show_progress, start_background, workspace)

ensure_navigation()

KINDS = {k.kind: k.label for k in model_kinds.kinds()}

st.title("Training")
st.write("Train a recommender on the reviewed dialogues: a dense retriever or the paper's student LM "
         "(SFT, LoRA or full). A job runs as its own process with progress, log, checkpoints, cancel and "
         "resume; a finished job is evaluated from here with one click.")
ws = workspace()
try:
    jobs.import_finished_jobs(ws)  # syncs the jobs table with the job folders
except CRSError as exc:
    show_error(exc)

counts = views.review_counts(ws)
datasets = cached(views.dialogue_datasets)
train_sets = [d for d in datasets["dataset"].tolist() if not d.endswith("_test")]
if counts["approved"] == 0 and not train_sets:
    needs("No approved dialogues yet: training uses the dialogues annotators approved. Review some first.",
          "pages/review.py", "Review")
else:
    st.caption(f"Approved synthetic dialogues: {counts['approved']:,} (pending {counts['pending']:,}). "
               f"Real training dialogue sets: {', '.join(train_sets) or 'none'}.")
    with st.form("train_form", border=True):
        st.markdown("#### New training job")
        c1, c2 = st.columns(2)
        kind = c1.selectbox("Model", list(KINDS), format_func=KINDS.get, key="tr_kind")
        statuses = c2.multiselect("Synthetic dialogues with status", ["approved", "pending"], ["approved"],
                                  key="tr_statuses", help="Approved only is the safe default.")
        selections = cached(views.selections)
        sel_labels = {r.selection_id: f"{r.name or r.selection_id} — {r.strategy}, B={r.budget}"
                      for r in selections.itertuples()}
        from_selection = st.selectbox("Only dialogues synthesized from selection", [None] + list(sel_labels),
                                      key="tr_selection", format_func=lambda s: "(all)" if s is None else sel_labels[s],
                                      help="Recorded with the run (strategy and budget), for budget curves.")
        c3, c4, c5, c6 = st.columns(4)
        extra = c3.selectbox("Add real training dialogues", [None] + train_sets, key="tr_extra",
                             format_func=lambda d: "(none)" if d is None else d)
        epochs = c4.number_input("Epochs", 1, 50, model_kinds.get(kind).default_epochs, key="tr_epochs")
        max_steps = c5.number_input("Max steps (0 = all)", 0, 1_000_000, 0, key="tr_max_steps")
        method = c6.selectbox("SFT method", ["lora", "full"], key="tr_method", help="Fine-tuned LM only.")
        name = st.text_input("Run name (optional)", key="tr_name")
        launch = st.form_submit_button("Launch training job", type="primary", icon=":material/rocket_launch:",
                                       key="tr_launch")
    if launch and authorized("train"):
        try:
            with st.spinner("Exporting the training data…"):
                examples, items, info = views.training_inputs(ws, tuple(statuses), from_selection, extra)
                check_no_test_leakage(ws, [e["context"] for e in examples])
            config = {"epochs": int(epochs), "max_steps": int(max_steps) or None,
                      "training_data": f"synthetic[{','.join(statuses)}]" + (f"+{extra}" if extra else "")}
            if name.strip():
                config["name"] = name.strip()
            if from_selection:
                row = selections.set_index("selection_id").loc[from_selection]
                config.update(selection_strategy=str(row["strategy"]), budget=int(row["budget"]))
            if model_kinds.get(kind).method is not None:
                config["method"] = method
            job_id = train.launch_training(ws, kind, examples, items, config)
        except CRSError as exc:
            show_error(exc)
        else:
            st.session_state["tr_job"] = job_id
            st.success(f"Started job {job_id} on {info['examples']:,} examples "
                       f"({info['synthetic']:,} synthetic, {info['real']:,} real; {info['dropped']:,} dropped "
                       "for lack of grounded labels).")

states = [s for s in jobs.list_jobs(ws) if s.kind in KINDS]
if not states:
    st.caption("No training jobs yet.")
    st.stop()
st.subheader("Jobs")
ids = [s.job_id for s in states]
if st.session_state.get("tr_job") not in ids:
    st.session_state["tr_job"] = ids[0]
job_id = st.selectbox("Job to follow", ids, key="tr_job")
folder = next(s.folder for s in states if s.job_id == job_id)
active = any(not s.finished for s in states)


@st.fragment(run_every=2.0 if active else None)
def follow() -> None:
    # the table and the followed job's panel come from one read of the job folders, so their
    # step, loss and state agree at every refresh (the table used to wait for a page rerun)
    try:
        fresh = [s for s in jobs.list_jobs(ws) if s.kind in KINDS]
    except CRSError as exc:
        show_error(exc)
        return
    st.dataframe(views.job_frame(fresh), hide_index=True, width="stretch", key="tr_jobs_table")
    state = next((s for s in fresh if s.job_id == job_id), None)
    if state is None:
        st.caption(f"Job {job_id} is no longer in this workspace.")
        return
    show_progress(state.progress)
    m = st.columns(4)
    m[0].metric("Step", f"{state.step:,} / {state.total_steps or '?'}")
    m[1].metric("Loss", "—" if state.loss is None else f"{state.loss:.4f}")
    m[2].metric("Examples / s", "—" if state.throughput is None else f"{state.throughput:.1f}")
    m[3].metric("Attempt", state.attempt)
    if state.error:
        st.error(state.error)
    for warning in state.warnings:
        st.warning(warning)
    curve = views.progress_frame(jobs.read_progress(folder))
    charts = [c for c in ("loss", "learning_rate") if c in curve]
    for column, name in zip(st.columns(len(charts)) if charts else [], charts):
        with column:
            st.markdown(f"**{'Training loss' if name == 'loss' else 'Learning rate'}** per step")
            # a line with a dot per step: a short job (a demo, one epoch) still shows its points
            st.altair_chart(alt.Chart(curve).mark_line(point=True, color="#1f77b4" if name == "loss" else "#ff7f0e")
                            .encode(x=alt.X("step:Q", axis=alt.Axis(format="d", tickMinStep=1)),
                                    y=alt.Y(f"{name}:Q", title=name.replace("_", " ")),
                                    tooltip=["step", name]).properties(height=240))
    b1, b2 = st.columns(2)
    if not state.finished and b1.button("Cancel", key="tr_cancel", icon=":material/stop:",
                                        disabled=state.cancel_requested) and authorized("train"):
        jobs.cancel_job(folder)
        st.rerun()
    if state.state in ("failed", "cancelled") and b2.button("Resume from the last checkpoint", key="tr_resume",
                                                           icon=":material/replay:") and authorized("train"):
        try:
            jobs.resume_job(ws, job_id)
        except CRSError as exc:
            show_error(exc)
        st.rerun(scope="app")
    labels = (state.config or {}).get("labels", "real")
    if labels != "real":
        st.caption(f"Labels: {labels}" + (f" (α = {state.config.get('alpha', 0)}; stage 1 on real + augmented "
                                          "labels, then stage 2 on the real labels)" if labels == "two_stage" else
                                          " (real + augmented labels in one run)")
                   + (f" · augmentation {state.config['augmentation']}" if state.config.get("augmentation") else "")
                   + " — launched from the Augmentation page or `train --labels`.")
    if state.state == "succeeded" and state.result:
        st.caption("Result")
        st.json(state.result, expanded=False)
    with st.expander("Log"):
        st.code(jobs.read_log(folder, 8_000) or "(empty)", language=None)
    any_active = any(not s.finished for s in fresh)
    if st.session_state.get("tr_was_active") and not any_active:
        st.session_state["tr_was_active"] = False
        st.rerun(scope="app")  # polling can stop; the evaluation below appears for a finished job
    if st.session_state.get("tr_followed_active") and state.finished:
        st.session_state["tr_followed_active"] = False
        st.rerun(scope="app")
    st.session_state["tr_was_active"] = any_active
    st.session_state["tr_followed_active"] = not state.finished


follow()


# -- the evaluation of a finished job, one click away ------------------------------------------------
selected = next(s for s in states if s.job_id == job_id)
tests = [d for d in datasets["dataset"].tolist() if d.endswith("_test")]
EVAL_KEY = f"train-eval:{ws.path}:{job_id}"
EVAL_JOB_KEY = f"tr_lm_eval:{job_id}"


def _eval_job_state():
    eval_job = st.session_state.get(EVAL_JOB_KEY)
    return None if eval_job is None else jobs.job_state(jobs.job_folder(ws, eval_job))


def evaluate_this_job() -> None:
    run = background_run(EVAL_KEY)
    busy = run is not None and run.running
    st.subheader("Evaluate this model")
    if not tests:
        needs("No test dialogues in this workspace: build the default workspace on Home first.",
              "pages/home.py", "Home")
        return
    c1, c2, c3 = st.columns([0.4, 0.3, 0.3], vertical_alignment="bottom")
    test = c1.selectbox("Test set", tests, key="tr_ev_test")
    sample = c2.number_input("Turns (sample; 0 = all)", 0, 100_000, 0, key="tr_ev_sample",
                             help="Recall@k / NDCG@k over the recommendation turns of the test set.")
    if c3.button("Evaluate", key="tr_evaluate", type="primary", icon=":material/analytics:", disabled=busy):
        try:
            entry = model_kinds.get(selected.kind)
            if entry.evaluated_in_job:  # e.g. the LM: a generation job, imported when it finishes
                st.session_state[EVAL_JOB_KEY] = entry.resolve("evaluator")(
                    ws, job_id, [test], turn_sample=int(sample) or "auto")
            else:
                def work(progress, stop, job_id=job_id, test=test, sample=int(sample) or None):
                    return studio_actions.evaluate_trained_model(ws, job_id, [test], turn_sample=sample,
                                                                 progress=progress, stop=stop)

                start_background(EVAL_KEY, f"Evaluating {job_id} on {test}", work)
        except CRSError as exc:
            show_error(exc)
        else:
            st.rerun(scope="app")  # the page polls while the evaluation runs
    job_eval = _eval_job_state()
    if run is not None:
        if run.running:
            show_progress(run.progress_now())
            if st.button("Stop", key="tr_eval_stop", icon=":material/stop:",
                         disabled=run.stop.is_set()) and authorized("background_work"):
                run.stop.set()
        elif run.error is not None:
            show_error(run.error)
        elif run.result is not None:
            frame = views.results_frame(run.result["results"], run.result["run_id"])
            st.success(f"Stored as run {run.result['run_id']}.")
            st.dataframe(frame[["dataset", "metric", "value", "stderr", "n_turns"]], hide_index=True,
                         key="tr_eval_table", column_config={"value": st.column_config.NumberColumn(format="%.4f"),
                                                             "stderr": st.column_config.NumberColumn(format="%.4f")})
            st.page_link("pages/evaluation.py", label="Compare it with other runs on the Evaluation page",
                         icon=":material/arrow_forward:")
    if job_eval is not None:
        show_progress(job_eval.progress)
        if job_eval.state == "succeeded":
            st.page_link("pages/evaluation.py", label="See the run on the Evaluation page",
                         icon=":material/arrow_forward:")
    running = (run is not None and run.running) or (job_eval is not None and not job_eval.finished)
    if st.session_state.get("tr_eval_was_running") and not running:
        st.session_state["tr_eval_was_running"] = False
        st.rerun(scope="app")  # stop polling; the jobs table imports the finished evaluation
    st.session_state["tr_eval_was_running"] = running


if selected.state == "succeeded":
    _run = background_run(EVAL_KEY)
    _eval_job = _eval_job_state()
    polling = (_run is not None and _run.running) or (_eval_job is not None and not _eval_job.finished)
    st.fragment(evaluate_this_job, run_every=1.0 if polling else None)()
