"""The studio in a real browser: start `streamlit run app.py` on a free port with a copy of the
small workspace, drive headless Chromium with Selenium, visit every page (no Streamlit exception
anywhere, a screenshot of each), approve one dialogue through the UI and find it approved in the
workspace after the server stopped; a review containing <script> shows as text and never runs.

Skipped when Chromium / chromedriver are not installed (`scripts/setup.sh --browser`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ARTIFACTS, ROOT, copy_workspace

CHROMIUM = os.environ.get("CRS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CRS_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = ARTIFACTS / "screenshots"
# (url path, navigation label, page heading)
PAGES = [("", "Home", "CRS data studio"), ("seeds", "Seeds", "Seed data"),
         ("map", "Map", "Embeddings & clusters"), ("selection", "Selection", "Selection"),
         ("synthesis", "Synthesis", "Synthesis"),
         ("review", "Review", "Review"), ("augmentation", "Augmentation", "Label augmentation"),
         ("training", "Training", "Training"), ("evaluation", "Evaluation", "Evaluation")]

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="headless Chromium not installed (run scripts/setup.sh --browser)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio(studio_workspace_file, tmp_path_factory):
    """(base url, workspace path, server process) of a running studio."""
    tmp = tmp_path_factory.mktemp("browser")
    yield from _run_studio(copy_workspace(studio_workspace_file, tmp / "browser.duckdb"), tmp)


def _run_studio(ws_path: Path, tmp: Path, extra_env: dict | None = None):
    """Start `streamlit run app.py` on `ws_path`; yields (base url, workspace path, process)."""
    port = _free_port()
    env = {**os.environ, "CRS_WORKSPACE": str(ws_path), "CRS_JOBS_ROOT": str(tmp / "jobs"),
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false", **(extra_env or {})}
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read().strip() == b"ok":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the studio did not start:\n" + (tmp / "server.log").read_text(errors="replace")[-3000:])
        time.sleep(0.3)
    yield url, ws_path, proc
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager go online
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1440,1800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait_idle(driver, title: str, timeout: float = 90) -> None:
    """Until the page's title is shown and the script has stopped running for a moment."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        # read in one script: elements found by one call can be replaced before the next reads them
        heads, running = driver.execute_script(
            "return [[...document.querySelectorAll('h1')].map(h => h.textContent),"
            " document.querySelector('[data-testid=\"stStatusWidget\"]') !== null];")
        quiet = quiet + 1 if any(title in h for h in heads) and not running else 0
        if quiet >= 4:
            return
        time.sleep(0.25)
    raise AssertionError(f"page {title!r} did not finish rendering; headings: {heads}")


def _goto(driver, label: str, title: str) -> None:
    """Open a page through the sidebar navigation (no page reload, as a user does)."""
    from selenium.webdriver.common.by import By

    link = next(a for a in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a')
                if a.text.splitlines()[-1] == label)
    link.click()
    _wait_idle(driver, title)


def _exceptions(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')]


def _click_button(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    button = driver.find_element(
        By.XPATH, f"//button[normalize-space(.)='{label}' or .//p[normalize-space(.)='{label}']]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()


def test_every_page_renders_and_an_approval_reaches_the_workspace(studio, browser):
    from selenium.webdriver.common.by import By

    url, ws_path, proc = studio
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    SCREENSHOTS.mkdir(parents=True)
    print(f"\nscreenshots: {SCREENSHOTS}")
    # a deep link as the first request after the start still gets app.py's navigation
    browser.get(f"{url}/review")
    _wait_idle(browser, "Review")
    nav = [a.text.splitlines()[-1] for a in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a')]
    assert "Home" in nav and "Evaluation" in nav and "app" not in nav, nav
    assert browser.find_elements(By.XPATH, "//label[.//p[normalize-space(.)='Workspace']]")
    for n, (path, label, title) in enumerate(PAGES):  # through the sidebar, as a user does
        started = time.monotonic()
        _goto(browser, label, title)
        assert browser.current_url.rstrip("/") == f"{url}/{path}".rstrip("/")
        print(f"  /{path}: {time.monotonic() - started:.1f} s")
        assert _exceptions(browser) == [], f"exception on page {path or 'home'}"
        browser.save_screenshot(str(SCREENSHOTS / f"{n:02d}-{path or 'home'}.png"))

    # the map: lasso a region, its reviews are listed
    from selenium.webdriver.common.action_chains import ActionChains

    _goto(browser, "Map", "Embeddings & clusters")
    drag = browser.find_element(By.CSS_SELECTOR, '[data-testid="stPlotlyChart"] .nsewdrag')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", drag)
    w, h = drag.size["width"], drag.size["height"]
    chain = ActionChains(browser).move_to_element_with_offset(drag, -w // 3, -h // 3).click_and_hold()
    for dx, dy in ((2 * w // 3, 0), (0, 2 * h // 3), (-2 * w // 3, 0), (0, -2 * h // 3 + 5)):
        for _ in range(4):
            chain = chain.move_by_offset(dx // 4, dy // 4)
    chain.release().perform()
    deadline = time.monotonic() + 60
    while not any("Selected region" in e.text for e in browser.find_elements(By.CSS_SELECTOR, "h3")):
        assert time.monotonic() < deadline, "lasso selection did not list the region's reviews"
        time.sleep(0.3)
    _wait_idle(browser, "Embeddings & clusters")
    assert _exceptions(browser) == []
    browser.save_screenshot(str(SCREENSHOTS / "09-map-lasso.png"))

    # the review page: the first pending dialogue was written from a review containing <script>
    _goto(browser, "Review", "Review")
    browser.find_element(By.XPATH, "//summary[contains(., 'Source reviews')]").click()
    time.sleep(1)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "<script>window.__crs_xss = 1</script><b>bold?</b>" in body  # shown as text ...
    assert browser.execute_script("return window.__crs_xss === undefined")  # ... and never run
    assert not browser.find_elements(By.XPATH, "//b[contains(., 'bold?')]")
    browser.save_screenshot(str(SCREENSHOTS / "10-review-sources.png"))
    _click_button(browser, "Approve")
    deadline = time.monotonic() + 60
    while "as version 2 (approved)" not in browser.find_element(By.TAG_NAME, "body").text:
        assert time.monotonic() < deadline, "no confirmation after Approve"
        assert _exceptions(browser) == []
        time.sleep(0.3)
    browser.save_screenshot(str(SCREENSHOTS / "11-review-approved.png"))

    proc.terminate()
    proc.wait(20)
    from crs_core.store import Workspace

    with Workspace(ws_path, read_only=True) as ws:
        row = ws.cursor().execute("SELECT status, version FROM synthetic_queries WHERE query_id = 'q000'").fetchone()
        actions = ws.cursor().execute(
            "SELECT action FROM query_history WHERE query_id = 'q000' ORDER BY version").fetchall()
    assert row == ("approved", 2)
    assert [a for (a,) in actions] == ["created", "approve"]


# -- issue 17: the Synthesis page's counters agree while a run stores queries -----------------------
@pytest.fixture()
def own_studio(studio_workspace_file, tmp_path):
    """A studio of its own (the test writes queries that the module's other test does not expect)."""
    yield from _run_studio(copy_workspace(studio_workspace_file, tmp_path / "own.duckdb"), tmp_path)


def _counters(driver) -> dict:
    """The numbers the Synthesis page shows now, read in one script."""
    import re

    bars, metrics, body, stale = driver.execute_script(
        "return [[...document.querySelectorAll('[data-testid=\"stProgress\"]')].map(e => e.innerText),"
        " [...document.querySelectorAll('[data-testid=\"stMetric\"]')].map(e => e.innerText),"
        " document.body.innerText,"
        " document.querySelector('[data-testid=\"stMain\"] [data-stale=\"true\"]') !== null];")
    num = lambda v: int(v.replace(",", ""))  # noqa: E731
    # stale: a rerun of the page (or of its polling fragment) is being drawn, element by element;
    # a reader then sees some elements of the new run beside some of the previous one
    out = {"finished": "Finished." in body, "stale": stale}
    for bar in bars:
        if m := re.search(r"([\d,]+) of ([\d,]+) queries of this plan stored", bar):
            out["plan"] = (num(m[1]), num(m[2]))
        if m := re.search(r"([\d,]+) / ([\d,]+) queries stored · ([\d,]+) processed", bar):
            out["run"] = (num(m[1]), num(m[2]), num(m[3]))
    for metric in metrics:
        label, _, value = metric.partition("\n")
        if label.strip() == "Synthetic queries":
            out["total"] = num(value.strip())
    return out


def test_synthesis_counters_agree_at_every_poll_while_a_run_stores(own_studio, browser):
    """Synthesise the 5 items of a selection with the loopback stub teacher from the page and
    read the page every 0.3 s while the run goes (its fragment refreshes once a second): whenever
    the page is drawn (no element marked stale by a rerun in progress), the plan's stored, the
    run's stored and "Synthetic queries" say the same, never go back, and end at what the
    workspace holds after the server stopped."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from crs_core.store import Workspace
    from openai_stub_server import OpenAIStubServer

    url, ws_path, proc = own_studio
    with Workspace(ws_path, read_only=True) as ws:
        titles = ws.df("SELECT title, year FROM items WHERE year IS NOT NULL AND item_id IN "
                       "(SELECT item_id FROM reviews) ORDER BY item_id LIMIT 8")
    listing = "\n".join(f"{n}. {t} ({int(y)})" for n, (t, y) in enumerate(zip(titles["title"], titles["year"]), 1))
    counter = iter(range(10_000))

    def reply(messages):  # runs on the stub's event loop: the sleep serialises requests, so
        time.sleep(0.6)   # the queries are stored one by one, about a second apart
        if messages[-1]["content"].startswith("Pretend you are a movie recommender system"):
            return listing
        return f"Can you recommend a quiet old comedy with physical gags and a sweet ending, take {next(counter)}?"

    shots = SCREENSHOTS / "synthesis-counters"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    with OpenAIStubServer(reply=reply) as stub:
        browser.get(f"{url}/synthesis")
        _wait_idle(browser, "Synthesis")
        browser.find_element(By.XPATH, "//label[.//p[normalize-space(.)='OpenAI-compatible endpoint']]").click()
        _wait_idle(browser, "Synthesis")
        base = browser.find_element(By.XPATH, "//input[@aria-label='Base URL']")
        base.send_keys(Keys.CONTROL, "a")
        base.send_keys(stub.base_url, Keys.ENTER)
        _wait_idle(browser, "Synthesis")
        browser.find_element(By.CSS_SELECTOR, "input[type='password']").send_keys("sk-test-browser", Keys.ENTER)
        _wait_idle(browser, "Synthesis")
        gt = browser.find_element(By.XPATH, "//div[@data-testid='stSelectbox'][.//p[normalize-space(.)='Ground truth']]"
                                            "//input")
        gt.click()
        gt.send_keys("llm", Keys.ENTER)  # the paper's listing: no catalog embedding
        _wait_idle(browser, "Synthesis")
        browser.find_element(By.XPATH, "//label[.//p[starts-with(normalize-space(.), 'Flag near-duplicate')]]").click()
        _wait_idle(browser, "Synthesis")
        before = _counters(browser)
        assert before["plan"] == (0, 5) and "run" not in before, before
        others = before["total"]
        _click_button(browser, "Start synthesis")
        polls, deadline = [], time.monotonic() + 180
        while True:
            now = _counters(browser)
            assert _exceptions(browser) == []
            if "run" in now and "plan" in now and "total" in now and not now["stale"]:
                polls.append(now)
                stored = now["plan"][0]
                assert now["run"][0] == stored and now["total"] == others + stored, now
                assert now["run"][2] >= stored and now["plan"][1] == now["run"][1] == 5, now
                if len(polls) == 1 or stored != polls[-2]["plan"][0]:
                    browser.save_screenshot(str(shots / f"{len(polls):03d}-stored-{stored}.png"))
                if now["finished"]:
                    break
            assert time.monotonic() < deadline, f"the run did not finish: {polls[-3:]}"
            time.sleep(0.3)
        assert stub.chat_requests >= 10
    seen = [p["plan"][0] for p in polls]
    assert seen == sorted(seen), f"a counter went back: {seen}"
    assert len(set(seen)) >= 3, f"the counters did not move while the run went: {seen}"
    proc.terminate()
    proc.wait(20)
    with Workspace(ws_path, read_only=True) as ws:
        assert ws.count("synthetic_queries") == others + seen[-1] == others + 5


# -- issue 15: team mode: sign in, then judge assigned dialogues with single keys -------------------
@pytest.fixture()
def team_studio(studio_workspace_file, tmp_path):
    from crs_core import judging
    from crs_core.accounts import Accounts, User
    from crs_core.store import Workspace

    ws_path = copy_workspace(studio_workspace_file, tmp_path / "team.duckdb")
    book = Accounts(tmp_path / "accounts.json")
    owner = book.add("olga", "owner", "owner-password-1")
    book.add("ann", "annotator", "annotator-password-1", actor=owner)
    with Workspace(ws_path) as ws:
        judging.assign(ws, User("olga", "owner"), None, ["ann"])
    yield from _run_studio(ws_path, tmp_path, {"CRS_STUDIO_MODE": "team", "CRS_ACCOUNTS": str(book.path)})


def _judged_in_session(driver) -> int | None:
    import re

    body = driver.execute_script("return document.body.innerText;")
    m = re.search(r"Judged in this session: (\d+)", body)
    return int(m[1]) if m else None


def test_team_sign_in_and_keyboard_judging(team_studio, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from crs_core.store import Workspace

    url, ws_path, proc = team_studio
    browser.delete_all_cookies()
    browser.get(f"{url}/review")
    _wait_idle(browser, "Sign in")
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a[href$="/evaluation"]') or \
        "Workspace" not in browser.find_element(By.TAG_NAME, "body").text

    def sign_in(password: str) -> None:
        name = browser.find_element(By.XPATH, "//input[@aria-label='Name']")
        name.send_keys(Keys.CONTROL, "a")
        name.send_keys("ann")
        field = browser.find_element(By.XPATH, "//input[@aria-label='Password']")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(password)
        _click_button(browser, "Sign in")

    sign_in("wrong-password")
    deadline = time.monotonic() + 30
    while "wrong name or password" not in browser.find_element(By.TAG_NAME, "body").text:
        assert time.monotonic() < deadline, "no message for a wrong password"
        time.sleep(0.2)
    browser.save_screenshot(str(SCREENSHOTS / "team-01-wrong-password.png"))
    sign_in("annotator-password-1")
    _wait_idle(browser, "Review")
    assert _judged_in_session(browser) == 0 and _exceptions(browser) == []
    browser.save_screenshot(str(SCREENSHOTS / "team-02-loop.png"))
    for key, done in (("a", 1), ("x", 2), ("s", 2), ("u", 1)):
        ActionChains(browser).send_keys(key).perform()
        deadline = time.monotonic() + 30
        while _judged_in_session(browser) != done:
            assert time.monotonic() < deadline, f"key {key!r}: the loop did not move on"
            time.sleep(0.1)
        _wait_idle(browser, "Review")
        assert _exceptions(browser) == []
    browser.save_screenshot(str(SCREENSHOTS / "team-03-after-keys.png"))
    proc.terminate()
    proc.wait(20)
    with Workspace(ws_path, read_only=True) as ws:
        rows = ws.cursor().execute("SELECT annotator, verdict FROM judgements").fetchall()
        statuses = dict(ws.cursor().execute("SELECT status, count(*) FROM synthetic_queries GROUP BY 1").fetchall())
    assert rows == [("ann", "approved")]  # the reject was taken back with U
    assert statuses.get("approved") == 1 and ws_path.exists()
