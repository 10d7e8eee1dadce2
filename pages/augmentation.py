"""Augmentation: FNSCRS label augmentation (retrieve the top-50 items per training dialogue,
score each 0–4, keep those >= 3.5 as extra labels): coverage, score histograms, examples, and
the two-stage training job that uses them."""

import pandas as pd
import streamlit as st

from crs_core import augment, train, views
from crs_core.errors import CRSError
from pages._shared import cached, ensure_navigation, needs, show_error, workspace

ensure_navigation()

st.title("Label augmentation")
st.write(
    "Beyond single labels (FNSCRS): for every training dialogue, retrieve the 50 catalog items most "
    "similar to its context, score each one's relevance from 0 to 4 (teacher LLM, a head distilled from "
    "it, or rescaled similarity), and keep the items scoring at least 3.5 as extra labels. Training then "
    "pre-trains on real + augmented labels and fine-tunes on the real ones with a KL term weighted by α."
)
ws = workspace()
labels = cached(views.augmented_counts)
if labels.empty:
    needs("No augmented labels yet. Run the augmentation step from a terminal, e.g. "
          "`python -m crs_core augment inspired_train --scorer similarity` (no LLM) or `--scorer distilled` "
          "(the teacher scores a sample, a small head the rest). It works on training dialogue sets and "
          "on reviewed synthetic dialogues (`synthetic`).", "pages/review.py", "Review")
    turns = cached(views.dialogue_datasets)
    turns = turns[~turns["dataset"].str.endswith("_test")]  # test sets are never augmented
    if len(turns):
        st.caption("Training dialogue datasets in this workspace (candidates for augmentation):")
        st.dataframe(turns, hide_index=True, width="stretch")
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
train_sets = [d for d in cached(views.dialogue_datasets)["dataset"].tolist() if not d.endswith("_test")]
with st.form("aug_train_form", border=True):
    f1, f2, f3 = st.columns(3)
    kind = f1.selectbox("Model", [train.KIND_RETRIEVER, train.KIND_SFT], key="aug_kind",
                        format_func={train.KIND_RETRIEVER: "Dense retriever", train.KIND_SFT: "Fine-tuned LM (LoRA)"}.get)
    mode = f2.selectbox("Labels", ["two_stage", "mixed"], key="aug_mode")
    alpha = f3.number_input("α (two-stage)", min_value=0.0, max_value=10.0, value=0.5, step=0.1, key="aug_alpha",
                            help="Weight of the KL term in stage 2; the paper sweeps 0–1. 0 = plain fine-tuning.")
    g1, g2, g3 = st.columns(3)
    default_data = dataset if dataset in train_sets or dataset.startswith("synthetic") else (train_sets or [dataset])[0]
    options = sorted(set(train_sets) | {default_data})
    data = g1.selectbox("Real training data", options, index=options.index(default_data), key="aug_data")
    epochs = g2.number_input("Epochs per stage", 1, 50, 1 if kind == train.KIND_RETRIEVER else 3, key="aug_epochs")
    max_steps = g3.number_input("Max steps per stage (0 = all)", 0, 1_000_000, 0, key="aug_max_steps")
    launch = st.form_submit_button("Launch training job", type="primary", icon=":material/rocket_launch:",
                                   key="aug_launch")
if launch:
    config = {"epochs": int(epochs)}
    if max_steps:
        config["max_steps"] = int(max_steps)
    if mode == "two_stage":
        config["alpha"] = float(alpha)
    if kind == train.KIND_SFT:
        config["method"] = "lora"
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
