"""The CRS curation studio: `streamlit run app.py [-- --workspace PATH]`.

Navigation over pages/, a workspace picker and a shared sidebar. Every page is a thin view
over crs_core; nothing here computes anything.
"""

import streamlit as st

from pages._shared import auto_build_default, sidebar_workspace_picker, sign_in_gate

st.set_page_config(page_title="CRS data studio", page_icon=":material/movie:", layout="wide")

PAGES = {
    "Studio": [
        st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    ],
    "Data": [
        st.Page("pages/seeds.py", title="Seeds", icon=":material/dataset:"),
        st.Page("pages/map.py", title="Map", icon=":material/scatter_plot:"),
        st.Page("pages/selection.py", title="Selection", icon=":material/checklist:"),
    ],
    "Dialogues": [
        st.Page("pages/synthesis.py", title="Synthesis", icon=":material/auto_awesome:"),
        st.Page("pages/review.py", title="Review", icon=":material/rate_review:"),
        st.Page("pages/augmentation.py", title="Augmentation", icon=":material/library_add:"),
    ],
    "Models": [
        st.Page("pages/training.py", title="Training", icon=":material/model_training:"),
        st.Page("pages/evaluation.py", title="Evaluation", icon=":material/analytics:"),
    ],
}

navigation = st.navigation(PAGES)
sign_in_gate()
sidebar_workspace_picker()
auto_build_default()
navigation.run()
