"""Driving the studio in headless Chromium (Debian's chromium + chromedriver, through Selenium):
start a studio server, open a browser, wait for a page to settle, and fill Streamlit widgets.
Shared by tests/test_browser.py, tests/studio_demo.py and bench/app_bench.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CRS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CRS_CHROMEDRIVER", "/usr/bin/chromedriver")


def browser_installed() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_studio(ws_path: Path, tmp: Path, extra_env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`streamlit run app.py` on `ws_path` (jobs under `tmp`), on a free loopback port; yields
    (base url, process) and stops the server on exit."""
    port = free_port()
    env = {**os.environ, "CRS_WORKSPACE": str(ws_path), "CRS_JOBS_ROOT": str(tmp / "jobs"),
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false", **(extra_env or {})}
    log_path = tmp / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read().strip() == b"ok":
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the studio did not start:\n" + log_path.read_text(errors="replace")[-3000:])
                time.sleep(0.3)
            yield url, proc
        finally:
            stop_server(proc)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def new_browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager go online
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1440,1800", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    return driver


def wait_idle(driver, title: str, timeout: float = 90) -> None:
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


def goto(driver, label: str, title: str) -> None:
    """Open a page through the sidebar navigation (no page reload, as a user does)."""
    from selenium.webdriver.common.by import By

    link = next(a for a in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a')
                if a.text.splitlines()[-1] == label)
    link.click()
    wait_idle(driver, title)


def exceptions(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')]


def body_text(driver) -> str:
    return driver.execute_script("return document.body.innerText;")


def wait_for_text(driver, text: str, timeout: float = 120, what: str | None = None) -> None:
    """Until `text` is on the page; fails at once on a Streamlit exception."""
    deadline = time.monotonic() + timeout
    while text not in body_text(driver):
        assert exceptions(driver) == [], exceptions(driver)
        assert time.monotonic() < deadline, f"{what or repr(text)}: not shown after {timeout:.0f} s"
        time.sleep(0.3)


def click_button(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    button = driver.find_element(
        By.XPATH, f"//button[normalize-space(.)='{label}' or .//p[normalize-space(.)='{label}']]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()


def widget_input(driver, key: str):
    """The input element of the widget created with `key=` (Streamlit marks its container
    `st-key-<key>`): unambiguous where two widgets share a label."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f".st-key-{key} input, .st-key-{key} textarea")


def choose(driver, label: str, option: str, *, key: str | None = None) -> None:
    """Pick `option` (typed: the first option its text matches) in the selectbox labelled `label`
    (or created with `key`)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = widget_input(driver, key) if key else driver.find_element(
        By.XPATH, f"//div[@data-testid='stSelectbox'][.//p[normalize-space(.)='{label}']]//input")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys(option, Keys.ENTER)


def fill(driver, aria_label: str, text: str, *, key: str | None = None, enter: bool = False) -> None:
    """Replace the text of the input labelled `aria_label` (or created with `key`); Tab commits
    it inside a form, where Enter would submit the form."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = widget_input(driver, key) if key else driver.find_element(By.XPATH, f"//input[@aria-label='{aria_label}']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", field)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(text, Keys.ENTER if enter else Keys.TAB)


def tick(driver, label_start: str) -> None:
    """Click the checkbox (or radio option) whose label starts with `label_start`."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.XPATH, f"//label[.//p[starts-with(normalize-space(.), '{label_start}')]]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()


def metric(driver, label: str) -> str | None:
    """The value an st.metric labelled `label` shows now."""
    for text in driver.execute_script(
            "return [...document.querySelectorAll('[data-testid=\"stMetric\"]')].map(e => e.innerText);"):
        name, _, value = text.partition("\n")
        if name.strip() == label:
            return value.strip().splitlines()[0] if value.strip() else ""
    return None


def plotly_traces(driver) -> list[list[str]]:
    """The trace names of every Plotly chart on the page, chart by chart."""
    return driver.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot')].map(p => (p.data || []).map(t => t.name || ''));")


def synthesis_counters(driver) -> dict:
    """The numbers the Synthesis page shows now, read in one script."""
    import re

    bars, metrics, body, stale, running = driver.execute_script(
        "return [[...document.querySelectorAll('[data-testid=\"stProgress\"]')].map(e => e.innerText),"
        " [...document.querySelectorAll('[data-testid=\"stMetric\"]')].map(e => e.innerText),"
        " document.body.innerText,"
        " document.querySelector('[data-testid=\"stMain\"] [data-stale=\"true\"]') !== null,"
        " document.querySelector('[data-testid=\"stStatusWidget\"]') !== null];")
    num = lambda v: int(v.replace(",", ""))  # noqa: E731
    # stale: a rerun of the page (or of its polling fragment) is being drawn, element by element;
    # a reader then sees some elements of the new run beside some of the previous one. A whole-page
    # rerun (the one that ends the polling) shows the running indicator while it draws, and marks
    # the elements it has not reached yet only after a moment, so it counts as stale too.
    out = {"finished": "Finished." in body, "stale": stale or running}
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
