"""Augmentation: FNSCRS label augmentation (retrieve the top-50 items per training dialogue,
score each 0–4, keep those >= 3.5 as extra labels), started from here as a background run with
progress, stop and resume, optionally followed by the training job on the new labels; coverage,
score histograms, examples, and the two-stage training job that uses stored labels."""

import pandas as pd
import streamlit as st

from crs_core import augment, jobs, model_kinds, studio_actions, views
from crs_core.errors import CRSError
from crs_core.teacher import TeacherConfig
from pages._shared import (authorized, background_run, cached, ensure_navigation, needs, show_error,
                           show_progress, start_background, workspace)

ensure_navigation()

st.title("Label augmentation")
st.write(
    "Beyond single labels (FNSCRS): for every training dialogue, retrieve the 50 catalog items most "
    "similar to its context, score each one's relevance from 0 to 4 (teacher LLM, a head distilled from "
    "it, or rescaled similarity), and keep the items scoring at least 3.5 as extra labels. Training then "
    "pre-trains on real + augmented labels and fine-tunes on the real ones with a KL term weighted by α."
)
ws = workspace()
RUN_KEY = f"augment:{ws.path}"
SCORERS = {"similarity": "Rescaled similarity (no LLM)",
           "distilled": "Distilled: the teacher scores a sample, a small head the rest",
           "teacher": "Teacher LLM scores every candidate (slow on the local teacher)"}
LABEL_MODES = {"two_stage": "Two-stage (real + augmented, then real with α·KL)", "mixed": "Mixed (one run)"}
KIND_NAMES = {k.kind: k.short_label for k in model_kinds.kinds()}
train_sets = [d for d in cached(views.dialogue_datasets)["dataset"].tolist() if not d.endswith("_test")]
run = background_run(RUN_KEY)
busy = run is not None and run.running
synthetic = views.review_counts(ws)
if not train_sets and not (synthetic["approved"] + synthetic["pending"]):
    needs("No dialogues to augment yet: build the default workspace on Home (it ingests INSPIRED's training "
          "dialogues), or synthesise and review dialogues first.", "pages/home.py", "Home")
    st.stop()

with st.form("aug_run_form", border=True):
    st.markdown("#### Run label augmentation")
    a1, a2, a3 = st.columns(3)
    sources = train_sets + ["synthetic", "synthetic:all"]
    new_dataset = a1.selectbox("Dialogues to augment", sources, key="aug_new_dataset",
                               help="A training dialogue set, or the reviewed synthetic dialogues (synthetic: "
                                    "approved only; synthetic:all: approved and pending). Test sets never.")
    new_scorer = a2.selectbox("Scorer", list(SCORERS), format_func=SCORERS.get, key="aug_new_scorer")
    threshold = a3.number_input("Keep scores ≥", 0.0, 4.0, augment.DEFAULT_THRESHOLD, 0.1, key="aug_new_threshold")
    a4, a5 = st.columns(2)
    limit_turns = a4.number_input("Turns (0 = all)", 0, 1_000_000, 0, key="aug_new_limit",
                                  help="Only the first N usable turns: a quick trial run.")
    teacher_pairs = a5.number_input("Teacher-scored pairs (distilled)", 10, 100_000, augment.DEFAULT_TEACHER_PAIRS,
                                    key="aug_new_pairs")
    then_train = st.checkbox("Then train on the new labels", True, key="aug_new_train")
    b1, b2, b3, b4 = st.columns(4)
    new_kind = b1.selectbox("Model", list(KIND_NAMES), format_func=KIND_NAMES.get, key="aug_new_kind")
    new_mode = b2.selectbox("Labels", list(LABEL_MODES), format_func=LABEL_MODES.get, key="aug_new_mode")
    new_alpha = b3.number_input("α (two-stage)", 0.0, 10.0, 0.5, 0.1, key="aug_new_alpha")
    new_max_steps = b4.number_input("Max steps per stage (0 = all)", 0, 1_000_000, 0, key="aug_new_max_steps")
    started = st.form_submit_button("Resume augmentation" if run is not None and not busy and run.error else
                                    "Start augmentation", type="primary", icon=":material/play_arrow:",
                                    key="aug_start", disabled=busy)
teacher_cfg = TeacherConfig.from_env()
st.caption("Teacher for the distilled and teacher scorers: "
           + (f"{teacher_cfg.model} at {teacher_cfg.base_url} ($CRS_TEACHER_BASE_URL)" if teacher_cfg.base_url
              else "the local llama.cpp teacher (offline)")
           + ". Every teacher reply is cached in the workspace: a stopped run started again pays no call twice. "
           "The first run encodes the catalog's item texts with MiniLM once (minutes on a CPU for the default "
           "catalog); later runs read them from the workspace.")
if started and not busy:
    train_spec = None
    if then_train:
        config = {"epochs": model_kinds.get(new_kind).default_epochs}
        if new_max_steps:
            config["max_steps"] = int(new_max_steps)
        if new_mode == "two_stage":
            config["alpha"] = float(new_alpha)
        if model_kinds.get(new_kind).method is not None:
            config["method"] = model_kinds.get(new_kind).method
        train_spec = {"kind": new_kind, "labels": new_mode, "data": new_dataset, "config": config}

    def work(progress, stop, dataset=new_dataset, scorer=new_scorer, spec=train_spec,
             threshold=float(threshold), limit=int(limit_turns) or None, pairs=int(teacher_pairs)):
        return studio_actions.augment_then_train(ws, dataset, scorer, threshold=threshold, limit_turns=limit,
                                                 teacher_pairs=pairs, train=spec, progress=progress, stop=stop)

    start_background(RUN_KEY, f"{new_dataset} scored by {new_scorer}"
                     + (f", then {KIND_NAMES[new_kind]} ({new_mode})" if train_spec else ""), work)
    st.rerun()


def live() -> None:
    current = background_run(RUN_KEY)
    if current is None:
        return
    job = None
    if current.result is not None and current.result.get("job_id"):
        try:
            job = jobs.job_state(jobs.job_folder(ws, current.result["job_id"]))
        except CRSError:
            job = None
    polling = current.running or (job is not None and not job.finished)
    with st.container(border=True):
        st.markdown("#### Augmentation run")
        st.text(current.label)
        share = current.done / current.total if current.total else 0.0
        phase = "retrieving candidates" if share < 0.3 else "scoring" if share < 0.95 else "storing labels"
        if current.running:
            show_progress(current.progress_now("Augmentation", detail=phase))
            if st.button("Stop", key="aug_stop", icon=":material/stop:",
                         disabled=current.stop.is_set()) and authorized("background_work"):
                current.stop.set()
            if current.stop.is_set():
                st.caption("Stopping… nothing is stored by a stopped augmentation; teacher replies stay cached.")
        elif current.error is not None:
            show_error(current.error)
            st.caption("Start it again to resume: cached teacher replies are reused.")
        elif current.result is not None:
            rep = current.result["report"]
            st.success(f"Stored {rep.labels_kept:,} augmented labels ({rep.dataset}, {rep.scorer}).")
            st.code("\n".join(rep.lines()), language=None)
        if job is not None:
            show_progress(job.progress)
            st.page_link("pages/training.py", label="Loss curve, log and evaluation on the Training page",
                         icon=":material/arrow_forward:")
    if st.session_state.get("aug_was_polling") and not polling:
        st.session_state["aug_was_polling"] = False
        st.rerun(scope="app")  # the labels below changed; polling can stop
    st.session_state["aug_was_polling"] = polling


st.fragment(live, run_every=1.0 if busy or st.session_state.get("aug_was_polling") else None)()
if run is not None and run.result is not None and run.result.get("job_id"):
    st.session_state.setdefault("tr_job", run.result["job_id"])  # the Training page opens on it

labels = cached(views.augmented_counts)
if labels.empty:
    st.caption("No augmented labels in this workspace yet: run the augmentation above "
               "(or `python -m crs_core augment` from a terminal).")
    st.stop()

m = st.columns(3)
m[0].metric("Augmented labels", f"{int(labels['labels'].sum()):,}")
m[1].metric("Dialogue turns", f"{int(labels['turns'].sum()):,}")
m[2].metric("Labels per turn", f"{labels['labels'].sum() / max(labels['turns'].sum(), 1):.1f}")
st.dataframe(labels, hide_index=True, width="stretch",
             column_config={"mean_score": st.column_config.NumberColumn(format="%.2f")})

runs = [(r.dataset, r.scorer) for r in labels.itertuples()]
dataset, scorer = st.selectbox("Augmentation run", runs, format_func=lambda r: f"{r[0]} — {r[1]}", key="aug_run")

try:
    cov = cached(augment.coverage, dataset, scorer)
except CRSError as exc:
    show_error(exc)
    st.stop()

st.subheader("Coverage")
c = st.columns(4)
c[0].metric("Labels added", f"{cov.get('labels_added', 0):,}")
c[1].metric("Per turn", f"{cov.get('labels_per_turn') or 0:.2f}")
c[2].metric("Items covered before", f"{cov.get('distinct_items_before', 0):,}")
c[3].metric("Items covered after", f"{cov.get('distinct_items_after', 0):,}", f"+{cov.get('new_items', 0):,} new")
with st.expander("All coverage statistics"):
    st.code("\n".join(augment.format_coverage(cov)), language=None)

st.subheader("Score histograms")
hist = []
for name in ("histogram_all", "histogram_kept"):
    for b in cov.get(name) or []:
        hist.append({"score": f"{b['lo']:.1f}–{b['hi']:.1f}", "pairs": b["count"],
                     "set": "all scored pairs" if name == "histogram_all" else "kept (stored)"})
if hist:
    frame = pd.DataFrame(hist).pivot_table(index="score", columns="set", values="pairs", aggfunc="sum").fillna(0)
    st.bar_chart(frame, x_label="relevance score", y_label="pairs", stack=False, height=260)
st.caption(f"Threshold {cov.get('threshold')}; run {cov.get('run_id')}.")

st.subheader("Examples")
try:
    examples = cached(augment.augmentation_examples, dataset, scorer, limit=5)
except CRSError as exc:
    show_error(exc)
    examples = []
for ex in examples:
    with st.container(border=True):
        st.caption(f"turn {ex['turn_id']}")
        st.text("\n".join(ex["context"][-4:]))
        st.markdown("**Real label(s):** " + (", ".join(ex["real"]) or "—"))
        st.dataframe(pd.DataFrame(ex["augmented"], columns=["augmented label", "score"]), hide_index=True,
                     width="stretch", column_config={"score": st.column_config.NumberColumn(format="%.2f")})

st.subheader("Train with these labels")
st.write("Two-stage (FNSCRS): stage 1 pre-trains on real + augmented labels, stage 2 fine-tunes on the real "
         "labels with cross-entropy + α · KL(model ‖ stage-1 soft labels). Mixed: one run on real + augmented. "
         "The job runs in the background; follow it on the Training page.")
with st.form("aug_train_form", border=True):
    f1, f2, f3 = st.columns(3)
    kind = f1.selectbox("Model", list(KIND_NAMES), key="aug_kind", format_func=KIND_NAMES.get)
    mode = f2.selectbox("Labels", ["two_stage", "mixed"], key="aug_mode")
    alpha = f3.number_input("α (two-stage)", min_value=0.0, max_value=10.0, value=0.5, step=0.1, key="aug_alpha",
                            help="Weight of the KL term in stage 2; the paper sweeps 0–1. 0 = plain fine-tuning.")
    g1, g2, g3 = st.columns(3)
    default_data = dataset if dataset in train_sets or dataset.startswith("synthetic") else (train_sets or [dataset])[0]
    options = sorted(set(train_sets) | {default_data})
    data = g1.selectbox("Real training data", options, index=options.index(default_data), key="aug_data")
    epochs = g2.number_input("Epochs per stage", 1, 50, model_kinds.get(kind).default_epochs, key="aug_epochs")
    max_steps = g3.number_input("Max steps per stage (0 = all)", 0, 1_000_000, 0, key="aug_max_steps")
    launch = st.form_submit_button("Launch training job", type="primary", icon=":material/rocket_launch:",
                                   key="aug_launch")
if launch and authorized("train"):
    config = {"epochs": int(epochs)}
    if max_steps:
        config["max_steps"] = int(max_steps)
    if mode == "two_stage":
        config["alpha"] = float(alpha)
    if model_kinds.get(kind).method is not None:
        config["method"] = model_kinds.get(kind).method
    real_data = "synthetic" if data.startswith("synthetic") else data
    try:
        with st.spinner("Exporting the training data…"):
            job_id, info = augment.launch_training_job(ws, kind, real_data, labels=mode, config=config,
                                                       aug_dataset=dataset, aug_scorer=scorer,
                                                       statuses=augment.SYNTHETIC_DATASETS.get(data, ("approved",)))
    except CRSError as exc:
        show_error(exc)
    else:
        st.session_state["tr_job"] = job_id
        st.success(f"Started job {job_id}: {info['examples']:,} real examples, {info.get('augmented_turns', 0):,} "
                   f"augmented turns ({info.get('augmentation')})"
                   + (f"; {info['skipped_no_context']:,} turns without context skipped" if info["skipped_no_context"] else ""))
        st.page_link("pages/training.py", label="Follow it on the Training page", icon=":material/arrow_forward:")
