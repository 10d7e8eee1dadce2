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
