"""The studio in a real browser: start `streamlit run app.py` on a free port with a copy of the
small workspace, drive headless Chromium with Selenium, visit every page (no Streamlit exception
anywhere, a screenshot of each), approve one dialogue through the UI and find it approved in the
workspace after the server stopped; a review containing <script> shows as text and never runs;
the stakeholder demo (tests/studio_demo.py) with every step from a page; team sign-in and
keyboard judging.

Skipped when Chromium / chromedriver are not installed (`scripts/setup.sh --browser`).
"""

from __future__ import annotations

import shutil
import time

import pytest

from browser_support import (browser_installed, click_button, exceptions, goto, new_browser, running_studio,
                             wait_idle)
from conftest import ARTIFACTS, copy_workspace

SCREENSHOTS = ARTIFACTS / "screenshots"
# (url path, navigation label, page heading)
PAGES = [("", "Home", "CRS data studio"), ("seeds", "Seeds", "Seed data"),
         ("map", "Map", "Embeddings & clusters"), ("selection", "Selection", "Selection"),
         ("synthesis", "Synthesis", "Synthesis"),
         ("review", "Review", "Review"), ("augmentation", "Augmentation", "Label augmentation"),
         ("training", "Training", "Training"), ("evaluation", "Evaluation", "Evaluation")]

pytestmark = pytest.mark.skipif(
    not browser_installed(),
    reason="headless Chromium not installed (run scripts/setup.sh --browser)",
)


@pytest.fixture(scope="module")
def studio(studio_workspace_file, tmp_path_factory):
    """(base url, workspace path, server process) of a running studio."""
    tmp = tmp_path_factory.mktemp("browser")
    ws_path = copy_workspace(studio_workspace_file, tmp / "browser.duckdb")
    with running_studio(ws_path, tmp) as (url, proc):
        yield url, ws_path, proc


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = new_browser(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def test_every_page_renders_and_an_approval_reaches_the_workspace(studio, browser):
    from selenium.webdriver.common.by import By

    url, ws_path, proc = studio
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    SCREENSHOTS.mkdir(parents=True)
    print(f"\nscreenshots: {SCREENSHOTS}")
    # a deep link as the first request after the start still gets app.py's navigation
    browser.get(f"{url}/review")
    wait_idle(browser, "Review")
    nav = [a.text.splitlines()[-1] for a in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a')]
    assert "Home" in nav and "Evaluation" in nav and "app" not in nav, nav
    assert browser.find_elements(By.XPATH, "//label[.//p[normalize-space(.)='Workspace']]")
    for n, (path, label, title) in enumerate(PAGES):  # through the sidebar, as a user does
        started = time.monotonic()
        goto(browser, label, title)
        assert browser.current_url.rstrip("/") == f"{url}/{path}".rstrip("/")
        print(f"  /{path}: {time.monotonic() - started:.1f} s")
        assert exceptions(browser) == [], f"exception on page {path or 'home'}"
        browser.save_screenshot(str(SCREENSHOTS / f"{n:02d}-{path or 'home'}.png"))

    # the map: lasso a region, its reviews are listed
    from selenium.webdriver.common.action_chains import ActionChains

    goto(browser, "Map", "Embeddings & clusters")
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
    wait_idle(browser, "Embeddings & clusters")
    assert exceptions(browser) == []
    browser.save_screenshot(str(SCREENSHOTS / "09-map-lasso.png"))

    # the review page: the first pending dialogue was written from a review containing <script>
    goto(browser, "Review", "Review")
    browser.find_element(By.XPATH, "//summary[contains(., 'Source reviews')]").click()
    time.sleep(1)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "<script>window.__crs_xss = 1</script><b>bold?</b>" in body  # shown as text ...
    assert browser.execute_script("return window.__crs_xss === undefined")  # ... and never run
    assert not browser.find_elements(By.XPATH, "//b[contains(., 'bold?')]")
    browser.save_screenshot(str(SCREENSHOTS / "10-review-sources.png"))
    click_button(browser, "Approve")
    deadline = time.monotonic() + 60
    while "as version 2 (approved)" not in browser.find_element(By.TAG_NAME, "body").text:
        assert time.monotonic() < deadline, "no confirmation after Approve"
        assert exceptions(browser) == []
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


# -- issue 17: the stakeholder demo, every step from a page ----------------------------------------
def test_stakeholder_demo_every_step_from_a_page(studio_workspace_file, tmp_path, browser):
    """tests/studio_demo.py plays it (selection, synthesis with counters checked at every poll,
    review with an edited list, augmentation, training, evaluation against zero-shot, a budget
    curve whose points appear); here: what the workspace holds afterwards."""
    from crs_core.store import Workspace
    from openai_stub_server import OpenAIStubServer
    from studio_demo import QUERY_PHRASE, SELECTION_NAME, play_demo, stub_reply

    ws_path = copy_workspace(studio_workspace_file, tmp_path / "demo.duckdb")
    with Workspace(ws_path, read_only=True) as ws:
        titles = ws.df("SELECT title, year FROM items WHERE year IS NOT NULL AND item_id IN "
                       "(SELECT item_id FROM reviews) ORDER BY item_id LIMIT 9")
        runs_before = ws.count("runs")
    listing = "\n".join(f"{n}. {t} ({int(y)})" for n, (t, y) in enumerate(zip(titles["title"][:8], titles["year"]), 1))
    shots = SCREENSHOTS / "demo"
    shutil.rmtree(shots, ignore_errors=True)
    with OpenAIStubServer(reply=stub_reply(listing)) as stub:
        with running_studio(ws_path, tmp_path, {"CRS_TEACHER_BASE_URL": stub.base_url}) as (url, proc):
            times = play_demo(browser, url, stub, shots, catalog_title=titles["title"].iloc[8])
            print(f"\ndemo steps (s): {times}")
    with Workspace(ws_path, read_only=True) as ws:
        q = ws.cursor()
        assert q.execute("SELECT strategy, unit, budget FROM selections WHERE name = ?",
                         [SELECTION_NAME]).fetchall() == [("JS", "item", 5)]
        demo_queries = q.execute("SELECT q.query, q.status FROM synthetic_queries q JOIN selections s "
                                 "USING (selection_id) WHERE s.name = ?", [SELECTION_NAME]).fetchall()
        assert len(demo_queries) == 5 and all(QUERY_PHRASE in text for text, _ in demo_queries)
        assert [s for _, s in demo_queries].count("approved") == 3
        actions = [a for (a,) in q.execute("SELECT action FROM query_history WHERE action <> 'created'").fetchall()]
        assert sorted(actions) == ["approve", "approve", "edit+approve"], actions
        assert q.execute("SELECT count(*) FROM augmented_labels").fetchone()[0] > 0
        assert q.execute("SELECT count(*) FROM jobs WHERE kind = 'train_retriever' AND status = 'succeeded'"
                         ).fetchone()[0] == 1
        assert ws.count("runs") == runs_before + 2  # the trained retriever and zero-shot
        points = q.execute("SELECT DISTINCT strategy, budget FROM budget_curve_points").fetchall()
        assert sorted(points) == [("JS", 2), ("JS", 4), ("RANDOM_UNIFORM", 2), ("RANDOM_UNIFORM", 4)]


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
    with running_studio(ws_path, tmp_path, {"CRS_STUDIO_MODE": "team", "CRS_ACCOUNTS": str(book.path)}) as (url, proc):
        yield url, ws_path, proc


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
    wait_idle(browser, "Sign in")
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a[href$="/evaluation"]') or \
        "Workspace" not in browser.find_element(By.TAG_NAME, "body").text

    def sign_in(password: str) -> None:
        name = browser.find_element(By.XPATH, "//input[@aria-label='Name']")
        name.send_keys(Keys.CONTROL, "a")
        name.send_keys("ann")
        field = browser.find_element(By.XPATH, "//input[@aria-label='Password']")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(password)
        click_button(browser, "Sign in")

    sign_in("wrong-password")
    deadline = time.monotonic() + 30
    while "wrong name or password" not in browser.find_element(By.TAG_NAME, "body").text:
        assert time.monotonic() < deadline, "no message for a wrong password"
        time.sleep(0.2)
    browser.save_screenshot(str(SCREENSHOTS / "team-01-wrong-password.png"))
    sign_in("annotator-password-1")
    wait_idle(browser, "Review")
    assert _judged_in_session(browser) == 0 and exceptions(browser) == []
    browser.save_screenshot(str(SCREENSHOTS / "team-02-loop.png"))
    for key, done in (("a", 1), ("x", 2), ("s", 2), ("u", 1)):
        ActionChains(browser).send_keys(key).perform()
        deadline = time.monotonic() + 30
        while _judged_in_session(browser) != done:
            assert time.monotonic() < deadline, f"key {key!r}: the loop did not move on"
            time.sleep(0.1)
        wait_idle(browser, "Review")
        assert exceptions(browser) == []
    browser.save_screenshot(str(SCREENSHOTS / "team-03-after-keys.png"))
    proc.terminate()
    proc.wait(20)
    with Workspace(ws_path, read_only=True) as ws:
        rows = ws.cursor().execute("SELECT annotator, verdict FROM judgements").fetchall()
        statuses = dict(ws.cursor().execute("SELECT status, count(*) FROM synthetic_queries GROUP BY 1").fetchall())
    assert rows == [("ann", "approved")]  # the reject was taken back with U
    assert statuses.get("approved") == 1 and ws_path.exists()
