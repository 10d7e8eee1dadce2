"""Home: where the pipeline stands, the one-click default build, recent jobs."""

import streamlit as st

from crs_core import views
from crs_core.ingest import ingest_summary
from crs_core.pipeline import pipeline_status
from pages._shared import (PAGE_OF_STEP, background_run, cached, default_build_key, ensure_navigation,
                           show_progress, forget_background, show_error, start_default_build, workspace)

ensure_navigation()

st.title("CRS data studio")
st.write(
    "Turn seed data (items, reviews, ratings) into conversational training data and a trained "
    "recommender: select reviews, synthesize dialogues with a teacher LLM, review them, train, evaluate."
)
ws = workspace()
st.text(f"Workspace: {ws.path}")

if "home_flash" in st.session_state:
    st.success(st.session_state.pop("home_flash"))
steps = pipeline_status(ws)
n_done = sum(s.done for s in steps)
st.progress(n_done / len(steps), text=f"{n_done} of {len(steps)} steps done")

basics = {s.key: s.done for s in steps}
if not (basics["seeds"] and basics["embed"] and basics["cluster"]):
    with st.container(border=True):
        build_key = default_build_key(ws)
        build = background_run(build_key)
        busy = build is not None and build.running
        if busy:
            st.subheader("Building the default workspace")
            st.write("Ingesting the bundled data, then the review vectors (shipped with the data and "
                     "checked on this machine), clusters and the map: about a minute. Pages fill in as "
                     "steps finish.")
        elif not basics["seeds"]:
            st.subheader("This workspace is empty")
            st.write("Build the default workspace from the bundled real data (IMDb reviews, MovieLens "
                     "ratings, the ReDial / INSPIRED catalogs and test dialogues): ingest, embed the "
                     "reviews, cluster them and draw the map. About a minute with the shipped review "
                     "vectors; it reuses whatever is already built. Or add your own files on the Seeds page.")
        else:
            st.subheader("Finish the default workspace")
            st.write("Seed data is here; embeddings, clusters or the map are still missing.")
        if st.button("Build default workspace", type="primary", key="home_build", disabled=busy,
                     icon=":material/construction:"):
            start_default_build(ws)
            st.rerun()

        def follow() -> None:
            current = background_run(build_key)
            if current is None:
                return
            if current.running:
                show_progress(current.progress_now(current.extra["label"]))
                st.caption("You can leave this page; the build goes on and resumes where it stopped if interrupted.")
            elif current.error is not None:
                show_error(current.error)
            else:
                forget_background(build_key)
                st.session_state["home_flash"] = "  \n".join(
                    ["Built: " + (", ".join(current.result) or "nothing new"), *current.extra.get("notes", [])])
                st.rerun()

        st.fragment(follow, run_every=1.0 if busy else None)()

st.subheader("Pipeline")
for step in steps:
    with st.container(border=True):
        c1, c2, c3 = st.columns([0.42, 0.33, 0.25], vertical_alignment="center")
        icon = ":material/check_circle:" if step.done else ":material/pending:"
        c1.markdown(f"{icon} **{step.title}**")
        c1.text(step.detail)
        if step.done:
            c2.caption("done")
        elif step.hint.startswith("python "):  # the page is the way; the CLI is a hint for scripts
            c2.caption(f"to do on its page · headless: `{step.hint}`")
        else:
            c2.caption(f"to do: {step.hint}")
        page = PAGE_OF_STEP.get(step.key)
        if page:
            c3.page_link(page, label="Open", icon=":material/arrow_forward:")

jobs = cached(views.recent_jobs, 8)
if len(jobs):
    st.subheader("Recent jobs")
    st.dataframe(jobs, hide_index=True, width="stretch")
    st.page_link("pages/training.py", label="Training jobs", icon=":material/model_training:")

summary = ingest_summary(ws)
if summary:
    with st.expander("What the default data ingest found"):
        st.dataframe({"what": list(summary), "value": [str(v) for v in summary.values()]},
                     hide_index=True, width="stretch")
