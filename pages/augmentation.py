"""Augmentation: FNSCRS label augmentation (retrieve the top-50 items per training dialogue,
score each 0–4 with an LLM, keep those >= 3.5 as extra labels)."""

import streamlit as st

from crs_core import views
from pages._shared import cached, ensure_navigation, needs, workspace

ensure_navigation()

st.title("Label augmentation")
st.write(
    "Beyond single labels (FNSCRS): for every training dialogue, retrieve the 50 catalog items most "
    "similar to its context, let a teacher LLM score each one's relevance from 0 to 4, and keep the "
    "items scoring at least 3.5 as extra labels. Training then pre-trains on the augmented labels and "
    "fine-tunes on the real ones with a KL label-smoothing term weighted by α."
)
workspace()
labels = cached(views.augmented_counts)
if labels.empty:
    needs("No augmented labels yet. They appear here once the augmentation step has run "
          "(`python -m crs_core augment`; its controls on this page land with that step). It works on "
          "training dialogues and approved synthetic ones, so review some dialogues first.",
          "pages/review.py", "Review")
    turns = cached(views.dialogue_datasets)
    if len(turns):
        st.caption("Dialogue datasets in this workspace (candidates for augmentation):")
        st.dataframe(turns, hide_index=True, width="stretch")
else:
    m = st.columns(3)
    m[0].metric("Augmented labels", f"{int(labels['labels'].sum()):,}")
    m[1].metric("Dialogue turns", f"{int(labels['turns'].sum()):,}")
    m[2].metric("Labels per turn", f"{labels['labels'].sum() / max(labels['turns'].sum(), 1):.1f}")
    st.dataframe(labels, hide_index=True, width="stretch",
                 column_config={"mean_score": st.column_config.NumberColumn(format="%.2f")})
