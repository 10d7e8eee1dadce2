"""Streamlit glue shared by the pages: the workspace resource, the picker, progress bars.

Only UI plumbing lives here; the work itself is done by crs_core.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import streamlit as st

from crs_core.store import DEFAULT_WORKSPACE, Workspace, workspace_path


def _cli_workspace() -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workspace")
    known, _ = parser.parse_known_args(sys.argv[1:])
    return known.workspace


@st.cache_resource(show_spinner="Opening workspace…")
def _open(path: str) -> Workspace:
    return Workspace(path)


def known_workspaces() -> list[str]:
    found = {str(workspace_path(_cli_workspace()))}
    folder = DEFAULT_WORKSPACE.parent
    if folder.exists():
        found |= {str(p) for p in folder.glob("*.duckdb")}
    return sorted(found)


def sidebar_workspace_picker() -> None:
    options = known_workspaces()
    default = str(workspace_path(_cli_workspace()))
    current = st.session_state.get("workspace_path", default)
    if current not in options:
        options.append(current)
    with st.sidebar:
        choice = st.selectbox(
            "Workspace", options, index=options.index(current), key="workspace_picker",
            format_func=lambda p: Path(p).name, help="One DuckDB file per workspace.",
        )
        st.session_state["workspace_path"] = choice
        st.caption(choice)


def workspace() -> Workspace:
    path = st.session_state.get("workspace_path") or str(workspace_path(_cli_workspace()))
    return _open(path)


def show_progress(progress) -> None:
    """One bar for any background work: a job (`JobState.progress`) or a studio run
    (`BackgroundRun.progress_now()`), with the same text and ETA."""
    st.progress(progress.fraction, text=progress.text())


class StreamlitProgress:
    """A crs_core `progress(done, total)` callable drawing an st.progress bar."""

    def __init__(self, label: str):
        self._label = label
        self._bar = st.progress(0.0, text=label)

    def __call__(self, done: int, total: int) -> None:
        share = done / total if total else 1.0
        self._bar.progress(min(1.0, share), text=f"{self._label} — {done:,} / {total:,}")

    def done(self) -> None:
        self._bar.empty()


# -- small UI helpers for the pages (keep pages thin) ----------------------------------------
def ensure_navigation() -> None:
    """Make every page run inside app.py's st.navigation (call first in each page).

    Streamlit treats a `pages/` folder next to the main script as the old multipage layout until
    st.navigation has been called once in the process (AppTest even starts every run that way):
    a deep link opened first after a start (e.g. /review) would run the page alone, without
    app.py's page config, navigation and sidebar. Then run app.py here instead (it renders this
    page through st.navigation) and stop; no rerun, so a click that triggered the run is kept."""
    from streamlit.runtime.pages_manager import PagesManager

    if not PagesManager.uses_pages_directory:
        return
    PagesManager.uses_pages_directory = False
    import runpy

    runpy.run_path(str(Path(__file__).resolve().parent.parent / "app.py"), run_name="__main__")
    st.stop()


def data_version() -> str:
    """Fingerprint of the current workspace's contents: part of every st.cache_data key."""
    from crs_core.views import data_version as _version

    return _version(workspace())


@st.cache_data(show_spinner=False, max_entries=256, ttl=3600)
def _cached_call(module: str, name: str, path: str, version: str, args: tuple, kwargs: tuple):
    import importlib

    fn = getattr(importlib.import_module(module), name)
    return fn(_open(path), *args, **dict(kwargs))


def cached(fn, *args, **kwargs):
    """`fn(workspace(), *args, **kwargs)` through st.cache_data, keyed by the workspace path and
    its data version, so a change to the workspace (by any session) invalidates the result."""
    ws = workspace()
    return _cached_call(fn.__module__, fn.__name__, str(ws.path), data_version(), tuple(args),
                        tuple(sorted(kwargs.items())))


PAGE_OF_STEP = {
    "seeds": "pages/seeds.py", "embed": "pages/map.py", "cluster": "pages/map.py",
    "select": "pages/selection.py", "synth": "pages/synthesis.py", "review": "pages/review.py",
    "augment": "pages/augmentation.py", "train": "pages/training.py", "evaluate": "pages/evaluation.py",
}


def needs(message: str, page: str | None = None, label: str | None = None) -> None:
    """A helpful empty state: what is missing and which step to run first."""
    st.info(message, icon=":material/info:")
    if page:
        st.page_link(page, label=label or "Go to that step", icon=":material/arrow_forward:")


def show_error(exc: BaseException) -> None:
    """A crs_core error as one clear line (never as HTML)."""
    st.error(f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc), icon=":material/error:")


def current_user():
    """The person acting in this session (a crs_core.accounts.User): the local owner in
    single-user mode, else the signed-in account (app.py's `sign_in_gate` runs first)."""
    from crs_core import accounts

    if accounts.studio_mode() == "single":
        return accounts.LOCAL_OWNER
    user = st.session_state.get("signed_in")
    if user is None:
        st.stop()  # not signed in: the gate in app.py is showing the sign-in form
    return user


def sign_in_gate() -> None:
    """Team mode: a sign-in form instead of any page until the visitor signs in; the sidebar
    names who is signed in. Single-user mode: the sidebar says there is no sign-in."""
    from crs_core import accounts
    from crs_core.errors import CRSError

    ss = st.session_state
    try:
        mode = accounts.studio_mode()
    except CRSError as exc:
        show_error(exc)
        st.stop()
    if mode == "single":
        accounts.set_acting(accounts.LOCAL_OWNER)
        st.sidebar.caption("Single-user mode: no sign-in, you act as the local owner. "
                           f"For a team, start with {accounts.MODE_ENV}=team (see README).")
        return
    user = ss.get("signed_in")
    accounts.set_acting(user)  # every write of this page run records this account
    if user is not None:
        st.sidebar.caption(f"Signed in as **{user.name}** ({user.role})")
        if st.sidebar.button("Sign out", key="sign_out", icon=":material/logout:"):
            for key in list(ss):
                del ss[key]
            st.rerun()
        return
    book = accounts.Accounts()
    st.title("Sign in")
    try:
        empty = not book.users()
    except CRSError as exc:
        show_error(exc)
        st.stop()
    if empty:
        st.info("This studio runs in team mode but has no accounts yet. Create the first owner on the "
                "studio's machine: `python -m crs_core users add NAME --role owner`.")
        st.stop()
    with st.form("sign_in_form"):
        name = st.text_input("Name", key="sign_in_name")
        password = st.text_input("Password", type="password", key="sign_in_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        try:
            ss["signed_in"] = book.sign_in(name, password)
        except CRSError as exc:
            show_error(exc)
        else:
            ss.pop("sign_in_password", None)
            st.rerun()
    st.stop()


def authorized(action: str) -> bool:
    """Whether the current user may do `action`; if not, say why on the page (crs_core decides)."""
    from crs_core.accounts import PermissionDenied, require

    try:
        require(current_user(), action)
    except PermissionDenied as exc:
        show_error(exc)
        return False
    return True


class BackgroundRun:
    """A crs_core call running in a thread of the studio process (not of one session), so a
    page can show live progress, stop it (threading.Event) and survive reruns. The thread never
    calls Streamlit; pages poll `done`, `total`, `result`, `error` from an st.fragment."""

    def __init__(self, label: str, extra: dict | None = None):
        import threading
        import time

        self.label = label
        self.extra = extra or {}
        self.stop = threading.Event()
        self.done = 0
        self.total = 0
        self.result = None
        self.error: BaseException | None = None
        self.started = time.time()
        self.finished: float | None = None
        self.thread: threading.Thread | None = None

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = int(done), int(total)

    def progress_now(self, label: str | None = None, detail: str = ""):
        """This run's crs_core.progress.Progress (ETA from its rate so far)."""
        from crs_core.progress import Progress

        return Progress.from_counts(label or self.label, self.done, self.total, self.started, detail=detail)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


@st.cache_resource
def _background_runs() -> dict:
    return {}


def background_run(key: str) -> BackgroundRun | None:
    return _background_runs().get(key)


def forget_background(key: str) -> None:
    """Drop a finished run from the registry (its result has been shown)."""
    run = _background_runs().get(key)
    if run is not None and not run.running:
        _background_runs().pop(key, None)


def start_background(key: str, label: str, target, extra: dict | None = None, *,
                     action: str = "background_work") -> BackgroundRun:
    """Run `target(progress, stop_event)` in a daemon thread, one at a time per key, if the
    current user's role allows `action` (crs_core.accounts decides); else say why and stop."""
    import threading
    import time

    if not authorized(action):
        st.stop()
    from crs_core.accounts import set_acting

    user = current_user()
    runs = _background_runs()
    current = runs.get(key)
    if current is not None and current.running:
        return current
    run = BackgroundRun(label, extra)

    def body() -> None:
        set_acting(user)  # the thread writes as the person who started it
        try:
            run.result = target(run.progress, run.stop)
        except BaseException as exc:  # noqa: BLE001 - shown by the page
            run.error = exc
        finally:
            run.finished = time.time()

    run.thread = threading.Thread(target=body, name=f"studio-{key}", daemon=True)
    runs[key] = run
    run.thread.start()
    return run


# -- the default build (ingest, embeddings, clusters, map) in the studio process -------------
ENV_BUILD_DEFAULT = "CRS_BUILD_DEFAULT"  # set by studio.sh: build the start-up workspace unasked


def default_build_key(ws: Workspace) -> str:
    return f"build:{ws.path}"


def start_default_build(ws: Workspace) -> BackgroundRun:
    """`init` of the default workspace in a background thread; Home follows its progress."""
    from crs_core.pipeline import init_default

    step = {"label": "Starting", "notes": []}

    def work(progress, stop, step=step):
        def progress_for(label):
            step["label"] = label
            return progress

        return init_default(ws, progress_for, note=step["notes"].append)

    return start_background(default_build_key(ws), "Building the default workspace", work, step)


def auto_build_default() -> None:
    """When studio.sh started the studio, build what its workspace still lacks right away, so
    the first page answers in seconds and the workspace fills in behind it (once per process,
    only for the workspace the studio was started on; a failed build waits for the button)."""
    import os

    if os.environ.get(ENV_BUILD_DEFAULT) != "1" or not current_user().may("background_work"):
        return
    ws = workspace()
    if str(ws.path) != str(workspace_path(_cli_workspace())) or background_run(default_build_key(ws)):
        return
    from crs_core.pipeline import default_build_pending

    if default_build_pending(ws):
        start_default_build(ws)
