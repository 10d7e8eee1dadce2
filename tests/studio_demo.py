"""The stakeholder demo, played in a real browser, every step from a page (issue 17):

JS selection of 5 items → synthesis of those 5 items with the loopback stub teacher (the page's
counters checked against each other at every poll) → 3 dialogues approved, one of them with an
edited ground-truth list → label augmentation → a tiny dense retriever trained → evaluated → its
Recall@k beside zero-shot dense retrieval on one chart → a 2-budget curve whose points appear as
they are stored.

`play_demo` drives it and returns the wall time of each step; tests/test_browser.py asserts on
the outcome in the workspace, bench/app_bench.py --demo reports the times.
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

from browser_support import (body_text, choose, click_button, exceptions, fill, goto, metric, plotly_traces,
                             synthesis_counters, tick, wait_for_text, wait_idle)

SELECTION_NAME = "demo JS"
QUERY_PHRASE = "quiet old comedy"
TRAINED_EPOCHS = 4  # 3 approved dialogues make one batch: one step per epoch
EVAL_TURNS = 50
CURVE_BUDGETS = "2, 4"
CURVE_TURNS = 50


def stub_reply(listing: str, delay: float = 0.6):
    """The loopback teacher's replies: a numbered title listing when asked for ground truth,
    otherwise a new user query. `delay` serialises the requests (the stub answers on one event
    loop), so queries are stored about a second apart and the counters can be watched moving."""
    counter = itertools.count()

    def reply(messages):
        time.sleep(delay)
        if messages[-1]["content"].startswith("Pretend you are a movie recommender system"):
            return listing
        return f"Can you recommend a {QUERY_PHRASE} with physical gags and a sweet ending, take {next(counter)}?"

    return reply


def _shot(driver, shots: Path, name: str) -> None:
    driver.save_screenshot(str(shots / f"{name}.png"))


def play_demo(driver, url: str, stub, shots: Path, catalog_title: str) -> dict[str, float]:
    """Play the demo on the studio at `url` (started with $CRS_TEACHER_BASE_URL = the stub's, for
    budget curves); screenshots into `shots`; `catalog_title` is added to one ground-truth list.
    Returns {step: seconds}. Asserts as it goes (counters, charts, no Streamlit exception)."""
    shots.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    started = time.monotonic()
    steps: list[str] = []

    def lap(step: str) -> None:
        nonlocal started
        assert exceptions(driver) == [], f"{step}: {exceptions(driver)}"
        steps.append(step)
        _shot(driver, shots, f"{len(steps):02d}-{step}")
        times[step] = round(time.monotonic() - started, 1)
        started = time.monotonic()

    try:
        _play(driver, url, stub, shots, catalog_title, lap, times)
    except BaseException:
        _shot(driver, shots, "failed-here")  # what the page showed when the demo stopped
        raise
    return times


def _play(driver, url: str, stub, shots: Path, catalog_title: str, lap, times: dict) -> None:
    driver.get(f"{url}/selection")
    wait_idle(driver, "Selection")
    choose(driver, "Pick", "items")
    choose(driver, "Strategy", "Jensen")
    fill(driver, "Budget B (picks)", "5")
    fill(driver, "Name (optional)", SELECTION_NAME)
    click_button(driver, "Run selection")
    wait_for_text(driver, "Stored selection", 120, "the JS selection")
    wait_idle(driver, "Selection")
    lap("selection")

    goto(driver, "Synthesis", "Synthesis")
    tick(driver, "OpenAI-compatible endpoint")
    wait_idle(driver, "Synthesis")
    fill(driver, "Base URL", stub.base_url, enter=True)
    wait_idle(driver, "Synthesis")
    fill(driver, "", "sk-demo", key="syn_api_key", enter=True)
    wait_idle(driver, "Synthesis")
    choose(driver, "Selection", SELECTION_NAME)
    wait_idle(driver, "Synthesis")
    choose(driver, "Ground truth", "llm")  # the paper's listing: the stub names catalog titles
    wait_idle(driver, "Synthesis")
    tick(driver, "Flag near-duplicate")
    wait_idle(driver, "Synthesis")
    polls = watch_synthesis(driver, shots / "synthesis-counters", planned=5)
    lap("synthesis")
    times["synthesis polls"] = len(polls)

    goto(driver, "Review", "Review")
    fill(driver, "Search query or item title", QUERY_PHRASE, enter=True)
    wait_idle(driver, "Review")
    approved = int(metric(driver, "Approved").replace(",", ""))
    fill(driver, "Add from the catalog: search a title", catalog_title, enter=True)
    wait_idle(driver, "Review")
    grounded = re.search(r"(\d+) of (\d+) rows grounded", body_text(driver))
    click_button(driver, "Add")
    wait_for_text(driver, f"{int(grounded[1]) + 1} of {int(grounded[2]) + 1} rows grounded", 30,
                  "the added catalog item")
    wait_idle(driver, "Review")
    _shot(driver, shots, "review-edited-list")
    for n in range(1, 4):
        click_button(driver, "Approve")
        deadline = time.monotonic() + 60
        while metric(driver, "Approved") != f"{approved + n:,}":
            assert exceptions(driver) == [] and time.monotonic() < deadline, f"approval {n} not counted"
            time.sleep(0.3)
        wait_idle(driver, "Review")
    lap("review")

    goto(driver, "Augmentation", "Label augmentation")
    choose(driver, "Dialogues to augment", "synthetic")
    tick(driver, "Then train on the new labels")  # off: the retriever is trained on the Training page
    click_button(driver, "Start augmentation")
    wait_for_text(driver, "augmented labels (synthetic, similarity)", 600, "the augmentation run")
    wait_idle(driver, "Label augmentation")
    lap("augmentation")

    goto(driver, "Training", "Training")
    fill(driver, "Epochs", str(TRAINED_EPOCHS))
    click_button(driver, "Launch training job")
    wait_for_text(driver, "Started job", 120, "the training job")
    wait_for_text(driver, "Evaluate this model", 300, "the finished training job")
    wait_idle(driver, "Training")
    assert "Training loss" in body_text(driver), "no loss chart for the finished job"
    lap("training")

    choose(driver, "", "inspired_test", key="tr_ev_test")
    fill(driver, "", str(EVAL_TURNS), key="tr_ev_sample")
    wait_idle(driver, "Training")
    click_button(driver, "Evaluate")
    wait_for_text(driver, "Stored as run", 900, "the evaluation of the trained retriever")
    trained_run = re.search(r"Stored as run (\S+)\.", body_text(driver))[1]
    wait_idle(driver, "Training")
    lap("evaluate trained")

    goto(driver, "Evaluation", "Evaluation")
    choose(driver, "", "Zero-shot dense", key="ev_kind")
    choose(driver, "", "inspired_test", key="ev_test")
    fill(driver, "", str(EVAL_TURNS), key="ev_sample")
    tick(driver, "Store as a run")
    click_button(driver, "Evaluate")
    wait_for_text(driver, "Stored run", 900, "the zero-shot evaluation")
    wait_idle(driver, "Evaluation")
    zero_shot_run = re.search(r"Stored run (\S+)\.", body_text(driver))[1]
    charts = plotly_traces(driver)
    assert any(trained_run in names and any(n.startswith(zero_shot_run) for n in names) for names in charts), \
        f"no chart with {trained_run} beside {zero_shot_run}: {charts}"
    lap("evaluate zero-shot")

    fill(driver, "", CURVE_BUDGETS, key="ev_bc_budgets")
    fill(driver, "", str(CURVE_TURNS), key="ev_bc_sample")
    # seed 1: other reviews and templates per item than the demo's synthesis (seed 0), so no prompt
    # is answered from the teacher cache; with slower replies the second strategy's queries take
    # seconds after the first strategy's points are stored, and the page shows them meanwhile
    fill(driver, "", "1", key="ev_bc_seeds")
    stub.latency = 2.0
    click_button(driver, "Run budget curve")
    seen, deadline = [], time.monotonic() + 900
    while "Finished." not in body_text(driver):
        assert exceptions(driver) == [], exceptions(driver)
        assert time.monotonic() < deadline, f"the budget curve did not finish: {seen}"
        if m := re.search(r"(\d+) point\(s\) stored", body_text(driver)):
            if not seen or seen[-1] != int(m[1]):
                seen.append(int(m[1]))
                _shot(driver, shots, f"budget-curve-{m[1]}-points")
        time.sleep(0.5)
    assert seen == sorted(seen) and any(0 < n < 4 for n in seen), f"points did not appear one by one: {seen}"
    # "Finished." is drawn before the chart below it is redrawn with the last points
    deadline = time.monotonic() + 60
    while not any({"RANDOM_UNIFORM", "JS"} <= set(names) for names in plotly_traces(driver)):
        assert time.monotonic() < deadline, f"no budget-curve chart with both strategies: {plotly_traces(driver)}"
        time.sleep(0.5)
    wait_idle(driver, "Evaluation")
    lap("budget curve")
    times["points seen"] = seen


def watch_synthesis(driver, shots: Path, planned: int) -> list[dict]:
    """Start synthesis on the open Synthesis page and read it every 0.3 s until it finishes:
    whenever the page is drawn (no element marked stale by a rerun in progress), the plan's
    stored, the run's stored and "Synthetic queries" say the same and never go back."""
    shots.mkdir(parents=True, exist_ok=True)
    before = synthesis_counters(driver)
    assert before["plan"] == (0, planned) and "run" not in before, before
    others = before["total"]
    click_button(driver, "Start synthesis")
    polls, deadline = [], time.monotonic() + 180
    while True:
        now = synthesis_counters(driver)
        assert exceptions(driver) == []
        if "run" in now and "plan" in now and "total" in now and not now["stale"]:
            polls.append(now)
            stored = now["plan"][0]
            assert now["run"][0] == stored and now["total"] == others + stored, now
            assert now["run"][2] >= stored and now["plan"][1] == now["run"][1] == planned, now
            if len(polls) == 1 or stored != polls[-2]["plan"][0]:
                driver.save_screenshot(str(shots / f"{len(polls):03d}-stored-{stored}.png"))
            if now["finished"]:
                break
        assert time.monotonic() < deadline, f"the run did not finish: {polls[-3:]}"
        time.sleep(0.3)
    seen = [p["plan"][0] for p in polls]
    assert seen == sorted(seen), f"a counter went back: {seen}"
    assert len(set(seen)) >= 3, f"the counters did not move while the run went: {seen}"
    assert seen[-1] == planned, seen
    return polls
