"""Progress reporting shared by the CLI (tqdm) and the app (st.progress wraps the same callable).

Library functions take `progress: Callable[[int, int], None] | None` — (done, total) — and call
it sparsely; they never import a UI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Progress:
    """Where a piece of background work stands, the same for a job process (`JobState.progress`)
    and a studio background run (`pages._shared.BackgroundRun.progress_now`): pages draw both with
    one helper. `eta_seconds`: the worker's own estimate, else the rate so far (None until there
    is one)."""

    label: str
    done: float
    total: float
    eta_seconds: float | None = None
    detail: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, max(0.0, self.done / self.total)) if self.total else 0.0

    @classmethod
    def from_counts(cls, label: str, done: float, total: float, started: float, *, now: float | None = None,
                    detail: str = "") -> "Progress":
        """ETA from the average rate since `started` (a `time.time()`)."""
        elapsed = (time.time() if now is None else now) - started
        eta = elapsed * (total - done) / done if done > 0 and total > done and elapsed > 0 else None
        return cls(label, done, total, eta, detail)

    def text(self) -> str:
        """"label — 40 / 120 (33%) · detail · ETA 2.5 min"."""
        parts = [self.label]
        if self.total:
            parts[0] += f" — {self.done:,.0f} / {self.total:,.0f} ({self.fraction:.0%})"
        if self.detail:
            parts.append(self.detail)
        if self.eta_seconds is not None:
            parts.append(f"ETA {self.eta_seconds / 60:.1f} min" if self.eta_seconds >= 60
                         else f"ETA {self.eta_seconds:.0f} s")
        return " · ".join(parts)


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
