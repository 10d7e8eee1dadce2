"""crs_core.progress: the one progress record of background work (jobs and studio runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from crs_core.jobs import JobState
from crs_core.progress import Progress, report, scaled


def test_eta_from_the_rate_so_far_and_the_text_pages_show():
    p = Progress.from_counts("Synthesis", 30, 120, started=1000.0, now=1060.0, detail="3 refused")
    assert p.fraction == pytest.approx(0.25) and p.eta_seconds == pytest.approx(180.0)
    assert p.text() == "Synthesis — 30 / 120 (25%) · 3 refused · ETA 3.0 min"
    assert Progress.from_counts("x", 0, 10, started=1000.0, now=1010.0).eta_seconds is None  # no rate yet
    assert Progress.from_counts("x", 10, 10, started=1000.0, now=1010.0).eta_seconds is None  # done
    assert Progress("x", 1, 0).fraction == 0.0 and Progress("x", 1, 1).fraction == 1.0 and Progress("Waiting", 0, 0).text() == "Waiting"
    assert Progress("x", 5, 10, eta_seconds=42).text().endswith("ETA 42 s")


def test_a_job_reports_the_same_record():
    running = JobState(job_id="j1", kind="train_retriever", state="running", folder=Path("."), step=25,
                       total_steps=100, epoch=0.25, eta_seconds=90.0)
    assert running.progress == Progress("Training job j1: running: step 25/100", 25, 100, 90.0, "epoch 0.25")
    queued = JobState(job_id="j2", kind="lm_generate", state="queued", folder=Path("."))
    assert queued.progress.fraction == 0.0 and queued.progress.text() == "Generation job j2: queued"
    done = JobState(job_id="j3", kind="train_lm", state="succeeded", folder=Path("."))
    assert done.progress.fraction == 1.0 and done.progress.text().endswith("(100%)")


def test_report_and_scaled():
    seen = []
    report(lambda d, t: seen.append((d, t)), 1, 2)
    report(None, 1, 2)
    half = scaled(lambda d, t: seen.append((d, t)), 0.5, 1.0)
    half(1, 2)
    assert seen == [(1, 2), (750, 1000)] and scaled(None, 0, 1) is None
