"""First start, as a new user meets it: setup, time to the Home page, time to a complete workspace.

    python bench/first_start.py                  # this checkout, a new empty workspace
    python bench/first_start.py --fresh-clone    # git clone of this checkout's HEAD, setup included

What it does. With ``--fresh-clone`` it clones HEAD into a temporary folder and times the setup
step of ``studio.sh`` there (``bash scripts/setup.sh`` with studio.sh's flags: a new .venv and
every pinned requirement; pip's wheel cache on this machine makes it faster than on a new one).
Then it runs ``bash studio.sh`` (its setup step is now a no-op) on a free port with a new, empty
workspace, and times, from the moment studio.sh starts:

- ``home_s``: headless Chromium shows the Home page (its title rendered, the script run over);
- ``complete_s``: the default workspace is complete (seeds, vectors, clusters, map), read on
  Home, which follows the background build and says "Built: …" when it ends.

Baseline in the same run: the old first start encoded every bundled review here. This bench
encodes a seeded sample of 256 bundled review texts with the same encoder and projects the time
for all of them (``projected_encode_s``); ``speedup`` = projected / complete. The last line is
one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from app_bench import _free_port, browser  # noqa: E402  (one browser setup for the benches)

TIMEOUT_S = 1800


def setup_flags(checkout: Path) -> list[str]:
    """The flags studio.sh passes to scripts/setup.sh."""
    found = re.search(r"bash scripts/setup\.sh([^\n]*)", (checkout / "studio.sh").read_text())
    return found.group(1).split() if found else []


def page_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''") or ""


def wait_for(driver, predicate, what: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if predicate(page_text(driver)):
                return
        except Exception:  # noqa: BLE001 - the page is reloading; poll again
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not happen within {TIMEOUT_S} s")


def projected_encode_seconds(sample: int = 256) -> tuple[float, int]:
    """Seconds to encode every bundled review here, from a seeded sample (the old first start)."""
    import gzip

    import numpy as np

    from crs_core.embed import get_encoder

    path = ROOT / "data/bundled/imdb_reviews/imdb_reviews_catalog.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    rng = np.random.default_rng(0)
    picked = [texts[i] for i in rng.choice(len(texts), sample, replace=False)]
    encoder = get_encoder("minilm")
    encoder.encode(picked[:8])  # warm-up
    start = time.perf_counter()
    encoder.encode(picked)
    return (time.perf_counter() - start) * len(texts) / sample, len(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh-clone", action="store_true", help="clone HEAD and time setup too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="first-start-"))
    checkout, setup_s = ROOT, None
    try:
        if args.fresh_clone:
            checkout = tmp / "clone"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(checkout)], check=True)
            flags = setup_flags(checkout)
            print(f"setup: bash scripts/setup.sh {' '.join(flags)} in a fresh clone …", flush=True)
            start = time.monotonic()
            subprocess.run(["bash", "scripts/setup.sh", *flags], cwd=checkout, check=True,
                           stdout=open(tmp / "setup.log", "wb"), stderr=subprocess.STDOUT)
            setup_s = time.monotonic() - start
            print(f"setup: {setup_s:.0f} s", flush=True)

        port = _free_port()
        workspace = tmp / "workspaces" / "default.duckdb"
        env = {**os.environ, "CRS_WORKSPACE": str(workspace), "CRS_JOBS_ROOT": str(tmp / "jobs")}
        load_before = os.getloadavg()[0]
        start = time.monotonic()
        log = open(tmp / "studio.log", "wb")
        proc = subprocess.Popen(["bash", "studio.sh", "--server.port", str(port), "--server.address", "127.0.0.1",
                                 "--server.fileWatcherType", "none"], cwd=checkout, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        profile = tmp / "profile"
        driver = browser(profile)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                try:
                    driver.get(f"http://127.0.0.1:{port}/")
                    break
                except Exception:  # noqa: BLE001 - not listening yet
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"studio.sh stopped; see {tmp / 'studio.log'}")
                    time.sleep(0.5)
            wait_for(driver, lambda t: "CRS data studio" in t and "Pipeline" in t, "Home", deadline)
            home_s = time.monotonic() - start
            print(f"Home shown after {home_s:.1f} s", flush=True)
            wait_for(driver, lambda t: "Built:" in t or "error" in t.lower() and "Build default" in t,
                     "the default build", deadline)
            complete_s = time.monotonic() - start
            text = page_text(driver)
            built = next((line for line in text.splitlines() if line.startswith("Built:")), "")
            if not built:
                raise RuntimeError("the default build failed:\n" + text[:2000])
            notes = [line for line in text.splitlines() if "shipped vectors" in line]
            print(f"workspace complete after {complete_s:.1f} s — {built}", flush=True)
            for line in notes:
                print("  " + line)
        finally:
            driver.quit()
            os.killpg(proc.pid, 15)
            proc.wait(30)
            log.close()
        load_after = os.getloadavg()[0]

        print("baseline: encoding a sample of the bundled reviews with the same encoder …", flush=True)
        projected, n = projected_encode_seconds()
        print(f"baseline: encoding all {n:,} reviews here would take {projected:.0f} s")
        figures = {
            "setup_s": None if setup_s is None else round(setup_s, 1),
            "home_s": round(home_s, 1),
            "complete_s": round(complete_s, 1),
            "projected_encode_s": round(projected),
            "speedup": round(projected / complete_s, 1),
            "shipped_vectors_used": "embed (shipped vectors)" in built,
            "load_before": round(load_before, 2), "load_after": round(load_after, 2),
        }
        print(f"setup {figures['setup_s']} s · Home {figures['home_s']} s · complete {figures['complete_s']} s "
              f"· without shipped vectors ≈ {figures['projected_encode_s']} s of encoding alone "
              f"({figures['speedup']}×) · load {figures['load_before']} → {figures['load_after']}")
        print(json.dumps(figures))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    sys.exit(main())
