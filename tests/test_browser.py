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
    ws_path = copy_workspace(studio_workspace_file, tmp / "browser.duckdb")
    port = _free_port()
    env = {**os.environ, "CRS_WORKSPACE": str(ws_path), "CRS_JOBS_ROOT": str(tmp / "jobs"),
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
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
