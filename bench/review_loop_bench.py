"""How fast an annotator can judge in the studio: the team review loop driven by keys only, in
headless Chromium, against the single-user Review page's Approve button as the baseline.

    python bench/review_loop_bench.py                      # a copy of the default workspace, 30 judgements
    python bench/review_loop_bench.py --judgements 60 --json test-artifacts/bench/review_loop.json

What it measures. A real `streamlit run app.py` (bench/app_bench.Studio) over a *copy* of the
workspace. If the copy has fewer pending synthetic dialogues than asked for, the bench adds them
with the test suite's SQL helper (tests/conftest.insert_synthetic_queries: queries about real
catalogue items, their real reviews as sources, a 5-title list) — the loop's speed does not
depend on what the query says.

- Team loop: the studio in team mode (CRS_STUDIO_MODE=team, a fresh accounts file), one
  annotator with all pending dialogues assigned (overlap 1). After signing in, the scripted
  annotator presses A (a trusted key event through the DevTools protocol) as soon as a dialogue is
  shown. Key to next dialogue: from just before the key event is sent to the first poll (every
  10 ms) that sees "Judged in this session: n+1" and no element marked stale by the rerun.
- Baseline: the single-user Review page (no sign-in), the Approve button clicked in the page
  each time the next dialogue is shown; shown = the "Saved … (approved)" message of that dialogue
  and nothing stale. The page reruns as a whole; the loop reruns only its fragment.

Judgements per minute = judgements / wall time from the first key press (click) to the last
dialogue shown, times 60: a scripted annotator with no thinking time, so the figure is the
studio's ceiling. Ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from app_bench import Studio, browser, copy_workspace  # noqa: E402

GOAL_S = 0.5  # the target: the next dialogue within 0.5 s of the key press
STATE = """
const body = document.body.innerText;
const m = body.match(/Judged in this session: (\\d+)/);
const saved = body.match(/Saved (\S+) as version \d+ \(approved\)/);
return {judged: m ? Number(m[1]) : null, saved: saved ? saved[1] : null, body: body.slice(0, 4000),
        stale: document.querySelector('[data-testid="stMain"] [data-stale="true"]') !== null,
        exception: document.querySelector('[data-testid="stException"]') !== null};
"""


def prepare(src: Path, dest: Path, n: int) -> int:
    from conftest import insert_synthetic_queries
    from crs_core.store import Workspace

    copy_workspace(src, dest)
    with Workspace(dest) as ws:
        pending = int(ws.scalar("SELECT count(*) FROM synthetic_queries WHERE status = 'pending'"))
        if pending < n:
            insert_synthetic_queries(ws, n - pending, prefix="bench-q")
            pending = n
    return pending


def _wait(driver, ok, timeout: float = 60.0) -> tuple[float, dict]:
    deadline = time.perf_counter() + timeout
    while True:
        state = driver.execute_script(STATE)
        if state["exception"]:
            raise RuntimeError("the page shows an exception:\n" + state["body"][:1500])
        if ok(state) and not state["stale"]:
            return time.perf_counter(), state
        if time.perf_counter() > deadline:
            raise TimeoutError("the next dialogue was not shown in time:\n" + state["body"][:1500])
        time.sleep(0.01)


def _press(driver, key: str) -> None:
    for kind in ("keyDown", "keyUp"):
        driver.execute_cdp_cmd("Input.dispatchKeyEvent", {"type": kind, "key": key, "text": key if kind == "keyDown"
                                                          else "", "code": f"Key{key.upper()}",
                                                          "windowsVirtualKeyCode": ord(key.upper())})


def team_loop(workspace: Path, n: int, tmp: Path) -> list[float]:
    from crs_core import judging
    from crs_core.accounts import Accounts, User
    from crs_core.store import Workspace

    book = Accounts(tmp / "accounts.json")
    owner = book.add("owner", "owner", "owner-password")
    book.add("ann", "annotator", "annotator-password", actor=owner)
    with Workspace(workspace) as ws:
        judging.assign(ws, User("owner", "owner"), None, ["ann"])
    os.environ.update({"CRS_STUDIO_MODE": "team", "CRS_ACCOUNTS": str(book.path)})
    try:
        with Studio(ROOT / "app.py", workspace, tmp) as studio:
            driver = browser(Path(tempfile.mkdtemp(prefix="profile-", dir=tmp)))
            try:
                from selenium.webdriver.common.by import By
                from selenium.webdriver.common.keys import Keys

                driver.get(f"{studio.url}/review")
                _wait(driver, lambda s: "Password" in s["body"])
                driver.find_element(By.XPATH, "//input[@aria-label='Name']").send_keys("ann")
                driver.find_element(By.XPATH, "//input[@aria-label='Password']").send_keys("annotator-password",
                                                                                         Keys.ENTER)
                _wait(driver, lambda s: s["judged"] == 0)
                time.sleep(1.0)  # let the first render settle before timing
                times = []
                for i in range(n):
                    t0 = time.perf_counter()
                    _press(driver, "a")
                    t1, _ = _wait(driver, lambda s, i=i: s["judged"] == i + 1)
                    times.append(t1 - t0)
                return times
            finally:
                driver.quit()
    finally:
        for key in ("CRS_STUDIO_MODE", "CRS_ACCOUNTS"):
            os.environ.pop(key, None)


CLICK_APPROVE = """
const b = [...document.querySelectorAll('button')].find(b => b.innerText.trim().endsWith('Approve'));
if (!b) return false; b.click(); return true;
"""


def single_page(workspace: Path, n: int, tmp: Path) -> list[float]:
    with Studio(ROOT / "app.py", workspace, tmp) as studio:
        driver = browser(Path(tempfile.mkdtemp(prefix="profile-", dir=tmp)))
        try:
            driver.get(f"{studio.url}/review")
            _wait(driver, lambda s: "Approve" in s["body"])
            time.sleep(1.0)
            times, last = [], None
            for _ in range(n):
                t0 = time.perf_counter()
                if not driver.execute_script(CLICK_APPROVE):
                    raise RuntimeError("no Approve button on the Review page")
                t1, state = _wait(driver, lambda s, last=last: s["saved"] not in (None, last))
                last = state["saved"]
                times.append(t1 - t0)
            return times
        finally:
            driver.quit()


def summary(times: list[float]) -> dict:
    total = sum(times)
    ordered = sorted(times)
    return {"judgements": len(times), "per_minute": round(60 * len(times) / total, 1),
            "median_s": round(statistics.median(times), 3), "p90_s": round(ordered[int(0.9 * (len(times) - 1))], 3),
            "max_s": round(max(times), 3)}


def main(argv: list[str] | None = None) -> int:
    from crs_core.store import DEFAULT_WORKSPACE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE,
                        help="workspace to copy (default: the default workspace; `python -m crs_core init`)")
    parser.add_argument("--judgements", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not args.workspace.exists():
        raise SystemExit(f"workspace {args.workspace} does not exist; build it with `python -m crs_core init`")
    tmp = Path(tempfile.mkdtemp(prefix="review-loop-"))
    figures = {}
    for name, run in (("team_loop_keys", team_loop), ("single_page_clicks", single_page)):
        ws = tmp / f"{name}.duckdb"
        prepare(args.workspace, ws, args.judgements + 1)  # the page shows its message while one is left
        times = run(ws, args.judgements, tmp)
        figures[name] = summary(times)
        print(f"{name}: {figures[name]}", flush=True)
    team, base = figures["team_loop_keys"], figures["single_page_clicks"]
    headline = {"bench": "review_loop", "judgements": args.judgements,
                "key_to_next_median_s": team["median_s"], "key_to_next_p90_s": team["p90_s"],
                "judgements_per_minute": team["per_minute"],
                "baseline_click_to_next_median_s": base["median_s"],
                "baseline_judgements_per_minute": base["per_minute"],
                "ratio_loop_to_baseline": round(team["median_s"] / base["median_s"], 2),
                "goal_s": GOAL_S, "within_goal": team["p90_s"] <= GOAL_S}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"figures": figures, "headline": headline}, indent=2))
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
