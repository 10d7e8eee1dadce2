"""Time to interactive of every studio page in a real browser, and of the map with 50k points.

    python bench/app_bench.py                         # the default workspace (a copy of it)
    python bench/app_bench.py --workspace my.duckdb --pages map evaluation
    python bench/app_bench.py --map-points 50000 --json test-artifacts/bench/app_bench.json
    python bench/app_bench.py --demo                  # the stakeholder demo's wall time (see run_demo)

How it measures. The studio runs as a real `streamlit run app.py` server on a free port over a
*copy* of the workspace (the studio opens its workspace for writing, and DuckDB allows one
writing process: the copy keeps the original free). Headless Chromium (Debian's chromium +
chromedriver, driven by Selenium, the flags of tests/test_browser.py) opens the page's URL.

Time to interactive (TTI), in seconds from the navigation start of the page's document
(``performance.now()`` in the page, whose origin is the navigation start) to the first moment
when all of these hold:

1. the page's main element is in the DOM: its ``h1`` title, and for the pages whose content is
   one big element also that element (Seeds: the items table, Map: the drawn Plotly chart);
2. the script run is over: Streamlit's running indicator (``stStatusWidget``) is not shown and
   the server has sent its last WebSocket message (a script run ends with a ``script_finished``
   message; afterwards the server is silent). "Last" is confirmed by ``QUIET_S`` of silence;
   the quiet wait itself is not counted: TTI = max(time the main element was first seen, time of
   the last WebSocket message).

The WebSocket messages are timed by a hook installed before any page script runs (Chrome
DevTools ``Page.addScriptToEvaluateOnNewDocument``); the DOM is polled every ``POLL_S``.

Cold: the first visit of the page after the server started, in a fresh browser profile (the
server imports the page's modules, opens the workspace and fills its caches; the browser loads
and compiles Streamlit's frontend). Warm: a second visit of the same URL in that browser (a new
document and session; server-side caches, st.cache_data keyed on the workspace's data version,
are warm). Every page gets its own server start, so a page's cold time does not profit from an
earlier page.

Baselines: the same measurement of a one-line Streamlit app (``st.title``), for a ratio that
removes the machine's speed and Streamlit's own cost; and of a one-line app with one Plotly
scatter of 300 points (``st.plotly_chart``), because a new document that draws any Plotly chart
pays for loading Streamlit's Plotly bundle (about 2 s of JavaScript on a slow 2-core machine,
measured with the DevTools profiler): that is the floor of the Map page, whatever it draws.

In-app navigation (``--in-app``, on by default): what a user does after the first page is to
click a page in the sidebar. The document stays (Streamlit is a single-page app), so scripts
already loaded, e.g. Plotly after the first chart, are not loaded again. Measured on one server
and one browser: open Home, then for each page click its sidebar link and time from the click
to interactive (same conditions as above: heading, main element, no script running, WebSocket
quiet); back to Home and click it again ("again").

The 50k-point map: a copy of the workspace whose mapped review set is tiled to at least
``--map-points`` points: each extra copy of a review is a new review row (same text and film,
id ``<id>~t<n>``) with its 2-D position jittered deterministically (by 1% of the map's extent,
from a hash of the id) and the same cluster. The real projections are thus repeated, not
re-embedded (embedding 50k reviews takes an hour on 2 CPUs and would not change what the page
draws: 50k points with hover texts in a WebGL scatter).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):  # the project, and the browser driving the tests share
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from browser_support import CHROMEDRIVER, CHROMIUM, free_port, new_browser  # noqa: E402

GOAL_S = 2.0
QUIET_S = 1.0
POLL_S = 0.05
TIMEOUT_S = 180.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# url path -> (navigation label, h1 title, CSS selector of the main element or None)
PAGES = {
    "home": ("", "CRS data studio", None),
    "seeds": ("seeds", "Seed data", '[data-testid="stDataFrame"]'),
    "map": ("map", "Embeddings & clusters", '[data-testid="stPlotlyChart"] .main-svg'),
    "selection": ("selection", "Selection", None),
    "synthesis": ("synthesis", "Synthesis", None),
    "review": ("review", "Review", None),
    "augmentation": ("augmentation", "Label augmentation", None),
    "training": ("training", "Training", None),
    "evaluation": ("evaluation", "Evaluation", None),
}

PLOTLY_BASELINE_APP = """import numpy as np
import plotly.graph_objects as go
import streamlit as st

st.title("Plotly baseline")
xy = np.random.default_rng(0).normal(size=(300, 2))
st.plotly_chart(go.Figure(go.Scattergl(x=xy[:, 0], y=xy[:, 1], mode="markers")), key="chart",
                on_select="rerun", selection_mode=("box", "lasso"))
"""

WS_HOOK = """
(() => {
  const Native = window.WebSocket;
  window.__crsWs = {last: 0, n: 0};
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', () => { window.__crsWs.last = performance.now(); window.__crsWs.n += 1; });
    }
  };
})();
"""

PROBE = """
const [title, main] = arguments;
const h1 = [...document.querySelectorAll('h1')].some(h => h.textContent.includes(title));
const el = main ? document.querySelector(main) !== null : true;
return {now: performance.now(), main: h1 && el,
        running: document.querySelector('[data-testid="stStatusWidget"]') !== null,
        exception: document.querySelector('[data-testid="stException"]') !== null,
        wsLast: window.__crsWs ? window.__crsWs.last : 0, wsN: window.__crsWs ? window.__crsWs.n : 0};
"""


@dataclass
class Visit:
    tti: float            # seconds from navigation start
    main_at: float
    last_message_at: float
    messages: int
    exception: bool


class Studio:
    """`streamlit run <script>` on a free port; stopped on exit."""

    def __init__(self, script: Path, workspace: Path | None, tmp: Path):
        self.script, self.workspace, self.tmp = script, workspace, tmp
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "Studio":
        port = free_port()
        env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false", "CRS_JOBS_ROOT": str(self.tmp / "jobs")}
        if self.workspace is not None:
            env["CRS_WORKSPACE"] = str(self.workspace)
        self.log = open(self.tmp / f"server-{port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(self.script), "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if _OPENER.open(self.url + "/_stcore/health", timeout=2).read().strip() == b"ok":
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the studio did not start; see {self.log.name}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def browser(profile: Path):
    driver = new_browser(profile)
    driver.set_page_load_timeout(TIMEOUT_S)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WS_HOOK})
    return driver


def visit(driver, url: str, title: str, main: str | None) -> Visit:
    """Open `url` and wait until the page is interactive (see the module docstring)."""
    driver.get("about:blank")
    driver.get(url)
    return _wait_interactive(driver, title, main, since=0.0, messages_before=0, what=url)


CLICK_NAV = """
const link = [...document.querySelectorAll('[data-testid="stSidebarNavLink"]')]
  .find(a => new URL(a.href).pathname.replace(/^\\/+|\\/+$/g, '') === arguments[0]);
if (!link) return null;
const t0 = performance.now(), n = window.__crsWs.n;
link.click();
return {t0: t0, n: n};
"""


def navigate(driver, path: str, title: str, main: str | None) -> Visit:
    """Click the sidebar link to `path` in the open document; TTI counted from the click."""
    started = driver.execute_script(CLICK_NAV, path)
    if started is None:
        raise RuntimeError(f"no sidebar link to /{path}")
    t0 = started["t0"] / 1000
    v = _wait_interactive(driver, title, main, since=t0, messages_before=int(started["n"]), what=f"/{path}")
    return Visit(v.tti - t0, v.main_at - t0, v.last_message_at - t0, v.messages, v.exception)


def _wait_interactive(driver, title: str, main: str | None, *, since: float, messages_before: int,
                      what: str) -> Visit:
    deadline = time.monotonic() + TIMEOUT_S
    main_at = None
    while time.monotonic() < deadline:
        p = driver.execute_script(PROBE, title, main)
        now = p["now"] / 1000
        if p["main"]:
            main_at = now if main_at is None else main_at
        else:
            main_at = None
        last = p["wsLast"] / 1000
        if (main_at is not None and not p["running"] and p["wsN"] > messages_before and last >= since
                and now - last >= QUIET_S):
            return Visit(max(main_at, last), main_at, last, int(p["wsN"]) - messages_before, bool(p["exception"]))
        time.sleep(POLL_S)
    raise TimeoutError(f"{what} did not become interactive within {TIMEOUT_S:.0f} s")


def measure(script: Path, workspace: Path | None, path: str, title: str, main: str | None, tmp: Path
            ) -> tuple[Visit, Visit]:
    """(cold, warm) visits of one page on a fresh server and browser."""
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=tmp))
    with Studio(script, workspace, tmp) as studio:
        driver = browser(profile)
        try:
            url = f"{studio.url}/{path}"
            cold = visit(driver, url, title, main)
            warm = visit(driver, url, title, main)
        finally:
            driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
    return cold, warm


def measure_in_app(workspace: Path, pages: list[str], tmp: Path) -> dict[str, tuple[Visit, Visit]]:
    """{page: (first click, click again)} on one server and one browser, starting from Home."""
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=tmp))
    out: dict[str, tuple[Visit, Visit]] = {}
    home_path, home_title, home_main = PAGES["home"]
    with Studio(ROOT / "app.py", workspace, tmp) as studio:
        driver = browser(profile)
        try:
            visit(driver, f"{studio.url}/{home_path}", home_title, home_main)
            for name in pages:
                if name == "home":
                    continue
                path, title, main = PAGES[name]
                first = navigate(driver, path, title, main)
                navigate(driver, home_path, home_title, home_main)
                again = navigate(driver, path, title, main)
                navigate(driver, home_path, home_title, home_main)
                out[name] = (first, again)
                print(f"in-app {name}: first {first.tti:.2f} s, again {again.tti:.2f} s", flush=True)
        finally:
            driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- workspaces
def copy_workspace(src: Path, dest: Path) -> Path:
    if not src.exists():
        raise SystemExit(f"workspace {src} does not exist; build it with `python -m crs_core init`")
    shutil.copyfile(src, dest)
    if Path(str(src) + ".wal").exists():
        shutil.copyfile(str(src) + ".wal", str(dest) + ".wal")
    return dest


def tile_map(path: Path, points: int) -> dict:
    """Tile the largest mapped review set of the workspace at `path` to >= `points` points."""
    from crs_core.store import Workspace

    with Workspace(path) as ws:
        row = ws.cursor().execute(
            "SELECT p.set_id, count(*) AS n, max(x) - min(x), max(y) - min(y) FROM projections p "
            "JOIN embedding_sets s USING (set_id) WHERE s.unit = 'review' GROUP BY p.set_id ORDER BY n DESC LIMIT 1"
        ).fetchone()
        if row is None:
            raise SystemExit("the workspace has no 2-D map of reviews; run `python -m crs_core init`")
        set_id, n, dx, dy = row
        copies = max(0, math.ceil(points / n) - 1)
        jitter_x, jitter_y = 0.01 * dx, 0.01 * dy
        with ws.transaction() as cur:
            cur.execute("CREATE TEMP TABLE _tiles AS SELECT range AS c FROM range(1, ?)", [copies + 1])
            cur.execute("CREATE TEMP TABLE _mapped AS SELECT unit_id, x, y FROM projections WHERE set_id = ?", [set_id])
            cur.execute("INSERT INTO reviews SELECT r.review_id || '~t' || t.c, r.item_id, r.user_id, r.text, r.rating, "
                        "r.ts, 'bench-tile' FROM reviews r JOIN _mapped m ON m.unit_id = r.review_id, _tiles t")
            cur.execute("INSERT INTO projections SELECT ?, m.unit_id || '~t' || t.c, "
                        "m.x + ((hash(m.unit_id || 'x' || t.c) % 2001) / 1000.0 - 1) * ?, "
                        "m.y + ((hash(m.unit_id || 'y' || t.c) % 2001) / 1000.0 - 1) * ? FROM _mapped m, _tiles t",
                        [set_id, jitter_x, jitter_y])
            cur.execute("INSERT INTO cluster_assignments SELECT a.clustering_id, a.unit_id || '~t' || t.c, a.cluster "
                        "FROM cluster_assignments a JOIN _mapped m ON m.unit_id = a.unit_id, _tiles t")
            cur.execute("DROP TABLE _tiles")
            cur.execute("DROP TABLE _mapped")
        total = ws.scalar("SELECT count(*) FROM projections WHERE set_id = ?", [set_id])
        ws.cursor().execute("CHECKPOINT")
    return {"set_id": set_id, "real_points": int(n), "copies": copies, "points": int(total)}


# ---------------------------------------------------------------------------------- main
# -- the stakeholder demo (issue 17) ----------------------------------------------------------------
def demo_in_process(ws_path: Path, stub, tmp: Path, catalog_title: str) -> dict[str, float]:
    """The demo's work without the studio: the same steps, settings and stub teacher through
    crs_core in this process (the CLI's path), for the ratio browser demo / work. Seconds per step."""
    from crs_core import evaluate, jobs, recommenders, review, studio_actions, train, views
    from crs_core.accounts import User
    from crs_core.selections import run_selection
    from crs_core.store import Workspace
    from crs_core.synth import run_synthesis
    from crs_core.teacher import Teacher, TeacherConfig
    import pandas as pd
    from studio_demo import CURVE_TURNS, EVAL_TURNS, QUERY_PHRASE, TRAINED_EPOCHS

    os.environ["CRS_JOBS_ROOT"] = str(tmp / "jobs-in-process")
    times: dict[str, float] = {}
    started = time.monotonic()

    def lap(step: str) -> None:
        nonlocal started
        times[step] = round(time.monotonic() - started, 1)
        started = time.monotonic()

    teacher_cfg = TeacherConfig(provider="openai", base_url=stub.base_url, model="gpt-4o-mini")  # loopback: no key
    with Workspace(ws_path) as ws:
        set_id = ws.scalar("SELECT set_id FROM embedding_sets WHERE unit = 'review' LIMIT 1")
        selection = run_selection(ws, "JS", 5, unit="item", set_id=set_id, name="demo JS (in process)")
        lap("selection")
        with Teacher(teacher_cfg, cache=ws) as teacher:
            run_synthesis(ws, selection, teacher, gt_mode="llm", dedup_embeddings=False)
        lap("synthesis")
        owner = User("bench", "owner")
        added = ws.df("SELECT item_id, title, year, genres FROM items WHERE title = ? ORDER BY item_id LIMIT 1",
                      [catalog_title])
        for n, (qid,) in enumerate(ws.cursor().execute(
                "SELECT query_id FROM synthetic_queries WHERE query LIKE ? ORDER BY 1 LIMIT 3",
                [f"%{QUERY_PHRASE}%"]).fetchall()):
            d = review.get_dialogue(ws, qid)
            rows = d.ground_truth
            if n == 0:  # as the demo's annotator: one catalog item added to the first list
                rows = pd.concat([rows, added.assign(rank=len(rows) + 1, title_raw=catalog_title, match_score=1.0,
                                                     flagged=False, note="added by bench")], ignore_index=True)
            review.save_edit(ws, qid, d.version, d.query, rows, "", owner, status="approved")
        lap("review")
        studio_actions.augment_then_train(ws, "synthetic", "similarity")
        lap("augmentation")
        examples, items, _ = views.training_inputs(ws, ("approved",))
        job_id = train.launch_training(ws, "train_retriever", examples, items, {"epochs": TRAINED_EPOCHS})
        state = jobs.wait_for_job(jobs.job_folder(ws, job_id), timeout=1800)
        if state.state != "succeeded":
            raise SystemExit(f"error: the training job {job_id} {state.state}: {state.error}")
        jobs.import_finished_jobs(ws)
        lap("training")
        studio_actions.evaluate_trained_model(ws, job_id, ["inspired_test"], turn_sample=EVAL_TURNS)
        lap("evaluate trained")
        rec = recommenders.make_recommender("dense", ws)
        result = evaluate.evaluate(ws, rec, "inspired_test", turn_sample=EVAL_TURNS)
        evaluate.store_run(ws, {"model": rec.name}, {"inspired_test": result})
        lap("evaluate zero-shot")
        stub.latency = 2.0  # as in the demo: seed 1, slower replies for the curve's queries
        studio_actions.run_budget_curves(ws, strategies=("RANDOM_UNIFORM", "JS"), budgets=(2, 4), seeds=(1,),
                                         datasets=("inspired_test",), turn_sample=CURVE_TURNS,
                                         teacher_config=teacher_cfg)
        lap("budget curve")
    return times


def run_demo(json_path: str | None) -> int:
    """Time the stakeholder demo in a real browser (tests/studio_demo.py) on a copy of the test
    suite's small workspace, with the loopback stub teacher (0.6 s per reply), against the same
    work done in process on another copy (the ratio is what the studio adds: page runs, polling,
    the browser, and the user's waiting between steps)."""
    from browser_support import running_studio
    from conftest import small_workspace_file
    from openai_stub_server import OpenAIStubServer
    from studio_demo import play_demo, stub_reply

    from crs_core.store import Workspace

    src = small_workspace_file()
    with Workspace(src, read_only=True) as ws:
        titles = ws.df("SELECT title, year FROM items WHERE year IS NOT NULL AND item_id IN "
                       "(SELECT item_id FROM reviews) ORDER BY item_id LIMIT 9")
    listing = "\n".join(f"{n}. {t} ({int(y)})" for n, (t, y) in enumerate(zip(titles["title"][:8], titles["year"]), 1))
    tmp = Path(tempfile.mkdtemp(prefix="crs-demo-bench-"))
    try:
        with OpenAIStubServer(reply=stub_reply(listing)) as stub:
            ws = copy_workspace(src, tmp / "demo.duckdb")
            with running_studio(ws, tmp, {"CRS_TEACHER_BASE_URL": stub.base_url}) as (url, _proc):
                driver = new_browser(tmp / "profile")
                try:
                    browser_times = play_demo(driver, url, stub, tmp / "shots", catalog_title=titles["title"].iloc[8])
                finally:
                    driver.quit()
        with OpenAIStubServer(reply=stub_reply(listing)) as stub:
            work = demo_in_process(copy_workspace(src, tmp / "work.duckdb"), stub, tmp, titles["title"].iloc[8])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steps = list(work)
    print(f"\nStakeholder demo (every step from a page), seconds; load average {os.getloadavg()[0]:.1f}")
    print(f"{'step':<20} {'browser':>8} {'in process':>11} {'ratio':>6}")
    for step in steps:
        b, w = browser_times[step], work[step]
        print(f"{step:<20} {b:>8.1f} {w:>11.1f} {b / w if w else float('nan'):>6.1f}")
    total_b, total_w = sum(browser_times[s] for s in steps), sum(work.values())
    print(f"{'total':<20} {total_b:>8.1f} {total_w:>11.1f} {total_b / total_w:>6.2f}")
    headline = {"demo_browser_s": round(total_b, 1), "demo_in_process_s": round(total_w, 1),
                "ratio": round(total_b / total_w, 2), "points_seen": browser_times.get("points seen")}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"browser": browser_times, "in_process": work, **headline}, indent=2))
    print(json.dumps(headline))
    return 0


def main(argv: list[str] | None = None) -> int:
    from crs_core.store import workspace_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", help="workspace to copy (default: $CRS_WORKSPACE or the default workspace)")
    ap.add_argument("--pages", nargs="+", choices=list(PAGES), default=list(PAGES))
    ap.add_argument("--map-points", type=int, default=50_000, help="points of the tiled map (0: skip)")
    ap.add_argument("--no-in-app", dest="in_app", action="store_false",
                    help="skip the in-app navigation measurement (sidebar clicks)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--demo", action="store_true",
                    help="instead: the wall time of the stakeholder demo (tests/studio_demo.py) vs its work in process")
    args = ap.parse_args(argv)
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).exists():
            raise SystemExit(f"{exe} is missing (Debian: apt-get install chromium chromium-driver)")
    if args.demo:
        return run_demo(args.json)

    src = workspace_path(args.workspace)
    tmp = Path(tempfile.mkdtemp(prefix="crs-app-bench-"))
    rows: list[dict] = []
    try:
        baseline_app = tmp / "baseline_app.py"
        baseline_app.write_text('import streamlit as st\n\nst.title("Baseline")\n')
        cold, warm = measure(baseline_app, None, "", "Baseline", None, tmp)
        base = {"cold": cold.tti, "warm": warm.tti}
        rows.append({"page": "baseline (st.title only)", "points": None, "cold": asdict(cold), "warm": asdict(warm)})
        print(f"baseline: cold {cold.tti:.2f} s, warm {warm.tti:.2f} s", flush=True)
        plotly_app = tmp / "plotly_baseline_app.py"
        plotly_app.write_text(PLOTLY_BASELINE_APP)
        cold, warm = measure(plotly_app, None, "", "Plotly baseline", PAGES["map"][2], tmp)
        rows.append({"page": "baseline + Plotly chart", "points": 300, "cold": asdict(cold), "warm": asdict(warm)})
        print(f"Plotly baseline: cold {cold.tti:.2f} s, warm {warm.tti:.2f} s", flush=True)

        ws = copy_workspace(src, tmp / "bench.duckdb")
        from crs_core.store import Workspace

        with Workspace(ws) as w:  # migrate once, outside the measurement
            mapped = int(w.scalar("SELECT count(*) FROM projections"))
        for name in args.pages:
            path, title, main_el = PAGES[name]
            cold, warm = measure(ROOT / "app.py", ws, path, title, main_el, tmp)
            rows.append({"page": name, "points": mapped if name == "map" else None,
                         "cold": asdict(cold), "warm": asdict(warm)})
            print(f"{name}: cold {cold.tti:.2f} s, warm {warm.tti:.2f} s"
                  + (" (EXCEPTION on the page)" if cold.exception or warm.exception else ""), flush=True)
        if args.map_points:
            big = copy_workspace(src, tmp / "bench-50k.duckdb")
            info = tile_map(big, args.map_points)
            path, title, main_el = PAGES["map"]
            cold, warm = measure(ROOT / "app.py", big, path, title, main_el, tmp)
            rows.append({"page": f"map ({info['points']:,} points)", "points": info["points"], "tiling": info,
                         "cold": asdict(cold), "warm": asdict(warm)})
            print(f"map {info['points']:,} points: cold {cold.tti:.2f} s, warm {warm.tti:.2f} s", flush=True)
        in_app = measure_in_app(ws, args.pages, tmp) if args.in_app else {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nTime to interactive, seconds (goal < {GOAL_S:g} s per page; workspace {src}):")
    print(f"{'page':<26} {'cold':>6} {'warm':>6} {'cold/base':>9} {'warm/base':>9}  goal")
    for r in rows:
        c, w = r["cold"]["tti"], r["warm"]["tti"]
        ok = "ok" if c < GOAL_S and w < GOAL_S else ("warm ok" if w < GOAL_S else "OVER")
        flag = " exception!" if r["cold"]["exception"] or r["warm"]["exception"] else ""
        print(f"{r['page']:<26} {c:>6.2f} {w:>6.2f} {c / base['cold']:>9.1f} {w / base['warm']:>9.1f}  {ok}{flag}")
    if in_app:
        print(f"\nIn-app navigation (sidebar click, same document), seconds (goal < {GOAL_S:g} s):")
        print(f"{'page':<26} {'first':>6} {'again':>6}  goal")
        for name, (first, again) in in_app.items():
            ok = "ok" if first.tti < GOAL_S and again.tti < GOAL_S else ("again ok" if again.tti < GOAL_S else "OVER")
            flag = " exception!" if first.exception or again.exception else ""
            print(f"{name:<26} {first.tti:>6.2f} {again.tti:>6.2f}  {ok}{flag}")
        for name, (first, again) in in_app.items():
            rows.append({"page": f"in-app {name}", "first": asdict(first), "again": asdict(again)})
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"workspace": str(src), "goal_s": GOAL_S, "quiet_s": QUIET_S, "rows": rows},
                                  indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
