"""Progress reporting shared by the CLI (tqdm) and the app (st.progress wraps the same callable).

Library functions take `progress: Callable[[int, int], None] | None` — (done, total) — and call
it sparsely; they never import a UI.
"""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[int, int], None]


def report(progress: ProgressFn | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def scaled(progress: ProgressFn | None, start: float, end: float) -> ProgressFn | None:
    """Map a sub-step's (done, total) onto the [start, end] share of a 1000-step parent."""
    if progress is None:
        return None

    def inner(done: int, total: int) -> None:
        share = start + (end - start) * (done / total if total else 1.0)
        progress(int(round(share * 1000)), 1000)

    return inner


class TqdmProgress:
    """A `progress` callable backed by a tqdm bar (CLI use)."""

    def __init__(self, desc: str, unit: str = "it"):
        from tqdm import tqdm

        self._bar = tqdm(desc=desc, unit=unit, total=0, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        if self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
