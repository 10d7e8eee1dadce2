"""Synthesis: a teacher LLM turns the selected items' reviews into user queries and
ground-truth lists (Algorithm 2), with live progress, tokens and cost; stop and resume."""

import streamlit as st

from crs_core import engines, synth, views
from crs_core.errors import CRSError
from crs_core.teacher import ENV_API_KEY, Budget, Teacher, TeacherConfig, endpoint_of, env_key_endpoint
from crs_core.teacher import provider_labels
from pages._shared import (authorized, background_run, cached, ensure_navigation, needs, show_error, start_background,
                           workspace)

ensure_navigation()

st.title("Synthesis")
st.write("For each selected item: 3 of its reviews + 5 style templates → the teacher writes K user "
         "queries; each gets up to 20 ground-truth items, grounded in the catalog (unmatched titles "
         "are flagged, never kept silently). Finished queries are stored one by one; a stopped run "
         "resumes where it left off.")
ws = workspace()
selections = cached(views.selections)
if selections.empty:
    needs("No selection yet: run a selection first; synthesis works on its picks.",
          "pages/selection.py", "Selection")
    st.stop()

@st.cache_resource(show_spinner=False)
def local_teacher_info():
    """Which local teacher runs (nothing is read: the model is checked when a run starts)."""
    from crs_core.models import local_teacher

    return local_teacher(verify=False)


def show_time_estimate(config, gt_mode: str, todo: int) -> None:
    """Before a run: how long the queries still to make will take with this teacher (seconds per
    call measured in this workspace, else the local teacher's stated figure)."""
    if config is None or todo <= 0:
        return
    local = config.provider == "local"
    model = (config.model or local_teacher_info().alias) if local else config.model
    est = synth.synthesis_estimate(ws, model, gt_mode, todo,
                                   stated_seconds_per_call=local_teacher_info().seconds_per_call if local else None)
    if est is None:
        st.caption(f"Time: unknown for {model} until a first call is measured.")
        return
    total = est["total_seconds"]
    text = (f"About {total / 60:.0f} min for {todo:,} queries ({est['seconds_per_query']:.0f} s per query: "
            f"{est['calls_per_query']} calls of ~{est['seconds_per_call']:.0f} s, {est['basis']}; a refused "
            "reply costs one call more).")
    if total > 600:
        st.warning(f"Synthesis with {model} is slow on this machine. {text} It runs in the background and can "
                   "be stopped and resumed; fewer items or another teacher make it shorter.", icon=":material/schedule:")
    else:
        st.caption(text)


RUN_KEY = f"synthesis:{ws.path}"
run = background_run(RUN_KEY)
labels = {r.selection_id: f"{r.name or r.selection_id} — {r.strategy}, B={r.budget}" for r in selections.itertuples()}

with st.container(border=True):
    st.markdown("#### Teacher")
    local_choice = local_teacher_info()
    names = {"local": f"Local llama.cpp server ({local_choice.alias}, offline)",  # the default: no key, no cost
             **{name: label for name, label in provider_labels().items() if name != "local"}}
    provider = st.radio("Provider", list(names), horizontal=True, key="syn_provider", format_func=names.get)
    key_value = None
    if provider != "local":  # an endpoint: base URL, model and key
        t1, t2 = st.columns(2)
        base_url = t1.text_input("Base URL", "https://api.openai.com/v1", key="syn_base_url")
        model = t2.text_input("Model", "gpt-4o-mini", key="syn_model")
        # A typed key is fixed to the endpoint it was typed for (the rule is TeacherConfig's): a new
        # base URL drops it, and it has to be entered again for the new endpoint.
        endpoint = endpoint_of(base_url.strip() or None)
        typed_for = st.session_state.get("syn_key_endpoint")
        if st.session_state.get("syn_api_key") and typed_for not in (None, endpoint):
            st.session_state["syn_api_key"] = ""
            st.session_state["syn_key_endpoint"] = typed_for = None
            st.warning(f"The API key was entered for another endpoint; enter it again to send it to {endpoint}.")
        key_value = st.text_input(f"API key for {endpoint} (kept only in this browser session, sent only there)",
                                  type="password", key="syn_api_key")
        if key_value and typed_for is None:
            st.session_state["syn_key_endpoint"] = typed_for = endpoint
        config = None
        try:
            config = TeacherConfig(provider=provider, base_url=base_url.strip() or None, model=model.strip(),
                                   api_key=key_value or None, api_key_endpoint=typed_for if key_value else None)
            if not key_value and config.has_api_key:
                st.caption(f"Using ${ENV_API_KEY} from the studio's environment (fixed to {env_key_endpoint()}).")
            if not config.has_api_key and not base_url.startswith(("http://127.0.0.1", "http://localhost")):
                st.warning(f"No API key for {endpoint}: {config.missing_key_reason()}")
        except CRSError as exc:
            show_error(exc)
    else:
        config = TeacherConfig.local()
        st.caption(f"Starts a llama.cpp server on 127.0.0.1 with {local_choice.alias} (offline; about "
                   f"{local_choice.seconds_per_call:.0f} s per call on 2 threads). For a strong teacher, use an endpoint.")
        if local_choice.note:
            st.info(local_choice.note)

with st.container(border=True):
    st.markdown("#### What to synthesize")
    c1, c2, c3 = st.columns(3)
    selection_id = c1.selectbox("Selection", list(labels), format_func=labels.get, key="syn_selection")
    gt_mode = c2.selectbox("Ground truth", list(synth.GT_MODES), key="syn_gt_mode",
                           help="choose: the teacher picks up to 20 of 35 retrieved catalog items (every row "
                                "grounded); llm: the teacher lists 20 titles freely (the paper; unmatched titles are "
                                "flagged); retrieve: catalog retrieval (no LLM); retrieve+llm: retrieval scored 0–4 "
                                "by the teacher.")
    k_queries = c3.number_input("Queries per item (K)", 1, 10, 1, key="syn_k")
    c4, c5, c6 = st.columns(3)
    items_limit = c4.number_input("Items (0 = all of the selection)", 0, 100_000, 20, key="syn_items")
    max_calls = c5.number_input("Budget: max teacher calls (0 = no limit)", 0, 10_000_000, 0, key="syn_max_calls")
    max_cost = c6.number_input("Budget: max cost in $ (0 = no limit)", 0.0, 10_000.0, 0.0, step=0.5, key="syn_max_cost")
    dedup = st.checkbox("Flag near-duplicate queries with embeddings (loads the MiniLM encoder)", True,
                        key="syn_dedup", help="Off: only exact duplicates are detected.")
    e1, e2 = st.columns(2)
    engine_name = e1.selectbox("Engine", list(engines.ENGINES), key="syn_engine",
                               help="; ".join(f"{k}: {v}" for k, v in engines.ENGINES.items())
                               + ". The studio stores the queries either way, block by block.")
    ray_address = e2.text_input("Ray address (empty: a local Ray on this machine)", key="syn_ray_address",
                                disabled=engine_name != "ray", placeholder="head-node:6379")

plan = (selection_id, int(k_queries), int(items_limit) or None)


def start_run() -> None:
    """Start (or resume) the run of this plan in a background thread of the studio."""
    if not authorized("synthesize"):
        return
    budget = Budget(max_calls=int(max_calls) or None, max_cost=float(max_cost) or None)
    try:
        engine = engines.get_engine(engine_name, ray_address.strip() or None if engine_name == "ray" else None)
        teacher = Teacher(config, cache=ws)
    except CRSError as exc:
        show_error(exc)
    else:
        def work(progress, stop_event, teacher=teacher, engine=engine):
            try:
                return synth.run_synthesis(ws, selection_id, teacher, k_queries=int(k_queries), gt_mode=gt_mode,
                                           items_limit=int(items_limit) or None, dedup_embeddings=dedup,
                                           budget=None if budget.unlimited else budget,
                                           progress=progress, stop_event=stop_event, engine=engine)
            finally:
                teacher.close()

        start_background(RUN_KEY, f"{selection_id} ({gt_mode}, K={k_queries})", work,
                         {"teacher": teacher, "plan": plan})
        st.rerun(scope="app")


def status() -> None:
    """Every counter of the page, from one read of the workspace per refresh (views.synthesis_counters)
    and the run's own progress: the plan's "stored", the run's "stored" and the workspace's
    "Synthetic queries" are the same committed rows, so they agree at every refresh (a fragment
    polling once a second while a run goes)."""
    current = background_run(RUN_KEY)
    running = current is not None and current.running
    run_plan = current.extra.get("plan", plan) if current is not None else plan
    processed = current.done if current is not None else 0  # read before the rows: stored <= processed
    try:
        counters = views.synthesis_counters(ws, *plan)
        run_counters = counters if run_plan == plan else views.synthesis_counters(ws, *run_plan)
    except CRSError as exc:
        show_error(exc)
        return
    st.progress(counters["stored"] / counters["planned"] if counters["planned"] else 0.0,
                text=f"{counters['stored']:,} of {counters['planned']:,} queries of this plan stored "
                     f"({counters['items']:,} items)")
    if not running:
        show_time_estimate(config, gt_mode, counters["planned"] - counters["stored"])
    complete = 0 < counters["planned"] <= counters["stored"]  # nothing left: no button that promises more
    label = ("Every query of this plan is stored" if complete else
             "Resume synthesis" if not running and current is not None else "Start synthesis")
    if st.button(label, type="primary", key="syn_start", disabled=running or config is None or complete,
                 icon=":material/play_arrow:", help="Raise K or the items to plan more queries." if complete else None
                 ) and config is not None:
        start_run()
    if current is not None:
        live(current, run_counters, max(processed, run_counters["stored"]))
    if st.session_state.get("syn_was_running") and not running:
        st.session_state["syn_was_running"] = False
        st.rerun(scope="app")  # the whole page: polling can stop
    st.session_state["syn_was_running"] = running
    st.subheader("In this workspace")
    m = st.columns(4)
    m[0].metric("Synthetic queries", f"{counters['queries']:,}")
    m[1].metric("Teacher calls (cached)", f"{counters['llm_calls']:,}")
    m[2].metric("Tokens", f"{counters['prompt_tokens'] + counters['completion_tokens']:,}")
    m[3].metric("Spent", f"${counters['cost']:.4f}")


def live(current, counters: dict, processed: int) -> None:
    with st.container(border=True):
        st.markdown("#### Run")
        st.text(current.label)
        planned = counters["planned"]
        st.progress(min(1.0, counters["stored"] / planned) if planned else 0.0,
                    text=f"{counters['stored']:,} / {planned:,} queries stored · {processed:,} processed "
                         "(a refused reply or a failure is processed, not stored)")
        teacher = current.extra.get("teacher")
        if teacher is not None:
            tally = teacher.tally()
            m = st.columns(4)
            m[0].metric("Teacher calls", f"{tally.calls:,}", help=f"{tally.cached_hits:,} answered from the cache")
            m[1].metric("Tokens", f"{tally.total_tokens:,}")
            m[2].metric("Cost", f"${tally.cost:.4f}")
            m[3].metric("Failures", f"{tally.failures:,}")
        if current.running:
            if st.button("Stop", key="syn_stop", icon=":material/stop:") and authorized("background_work"):
                current.stop.set()
            if current.stop.is_set():
                st.caption("Stopping after the queries in flight…")
        elif current.error is not None:
            show_error(current.error)
        elif current.result is not None:
            rep = current.result
            if rep.complete:
                st.success("Finished.")
            else:
                st.warning(f"Stopped: {rep.stopped or 'with failures'}")
            st.code("\n".join(rep.lines()), language=None)
            if rep.flagged:
                with st.expander(f"{len(rep.flagged)} replies refused by the parser"):
                    st.dataframe(rep.flagged, hide_index=True, width="stretch")
            st.page_link("pages/review.py", label="Review the new dialogues", icon=":material/rate_review:")


st.fragment(status, run_every=1.0 if run is not None and run.running else None)()
