"""Training: launch a retriever or SFT job on approved dialogues (a background process), follow
its progress, loss and log; cancel and resume."""

import pandas as pd
import streamlit as st

from crs_core import jobs, train, views
from crs_core.errors import CRSError
from crs_core.evaluate import check_no_test_leakage
from pages._shared import cached, ensure_navigation, needs, show_error, workspace

ensure_navigation()

KINDS = {train.KIND_RETRIEVER: "Dense retriever (MiniLM bi-encoder, InfoNCE)",
         train.KIND_SFT: "Fine-tuned LM (SmolLM2-135M, SFT / LoRA)"}

st.title("Training")
st.write("Train a recommender on the reviewed dialogues: a dense retriever or the paper's student LM "
         "(SFT, LoRA or full). A job runs as its own process with progress, log, checkpoints, cancel and "
         "resume; a finished retriever can be evaluated on the Evaluation page.")
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
        epochs = c4.number_input("Epochs", 1, 50, 1 if kind == train.KIND_RETRIEVER else 3, key="tr_epochs")
        max_steps = c5.number_input("Max steps (0 = all)", 0, 1_000_000, 0, key="tr_max_steps")
        method = c6.selectbox("SFT method", ["lora", "full"], key="tr_method", help="Fine-tuned LM only.")
        name = st.text_input("Run name (optional)", key="tr_name")
        launch = st.form_submit_button("Launch training job", type="primary", icon=":material/rocket_launch:",
                                       key="tr_launch")
    if launch:
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
            if kind == train.KIND_SFT:
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
st.dataframe(views.job_frame(states), hide_index=True, width="stretch", key="tr_jobs_table")
ids = [s.job_id for s in states]
if st.session_state.get("tr_job") not in ids:
    st.session_state["tr_job"] = ids[0]
job_id = st.selectbox("Job", ids, key="tr_job")
folder = next(s.folder for s in states if s.job_id == job_id)
active = not next(s for s in states if s.job_id == job_id).finished


@st.fragment(run_every=2.0 if active else None)
def follow() -> None:
    try:
        state = jobs.job_state(folder)
    except CRSError as exc:
        show_error(exc)
        return
    st.progress(state.fraction, text=f"{state.describe()}" + (f" · epoch {state.epoch:.2f}" if state.epoch else "")
                + (f" · ETA {state.eta_seconds / 60:.1f} min" if state.eta_seconds else ""))
    m = st.columns(4)
    m[0].metric("Step", f"{state.step:,} / {state.total_steps or '?'}")
    m[1].metric("Loss", "—" if state.loss is None else f"{state.loss:.4f}")
    m[2].metric("Examples / s", "—" if state.throughput is None else f"{state.throughput:.1f}")
    m[3].metric("Attempt", state.attempt)
    if state.error:
        st.error(state.error)
    for warning in state.warnings:
        st.warning(warning)
    points = jobs.read_progress(folder)
    if points:
        frame = pd.DataFrame(points)
        if "loss" in frame:
            st.line_chart(frame, x="step", y="loss", x_label="step", y_label="training loss", height=260)
    b1, b2 = st.columns(2)
    if not state.finished and b1.button("Cancel", key="tr_cancel", icon=":material/stop:",
                                        disabled=state.cancel_requested):
        jobs.cancel_job(folder)
        st.rerun()
    if state.state in ("failed", "cancelled") and b2.button("Resume from the last checkpoint", key="tr_resume",
                                                           icon=":material/replay:"):
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
    if st.session_state.get("tr_was_active") and state.finished:
        st.session_state["tr_was_active"] = False
        st.rerun(scope="app")
    st.session_state["tr_was_active"] = not state.finished


follow()
