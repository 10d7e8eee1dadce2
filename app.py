"""The CRS curation studio: `streamlit run app.py [-- --workspace PATH]`.

Navigation over pages/, a workspace picker and a shared sidebar. Every page is a thin view
over crs_core; nothing here computes anything.
"""

import streamlit as st

from pages._shared import sidebar_workspace_picker

st.set_page_config(page_title="CRS data studio", page_icon=":material/movie:", layout="wide")

PAGES = {
    "Studio": [
        st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    ],
}

navigation = st.navigation(PAGES)
sidebar_workspace_picker()
navigation.run()
