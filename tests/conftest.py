"""Shared fixtures: small real workspaces for the app, review and browser tests.

`studio_workspace_file` builds, once per session, a workspace from the bundled data
(`ingest_default`), embeds a subset of the reviews (crs_core.embed: MiniLM), clusters and
projects them (crs_core.cluster: K-means, UMAP), stores one selection, a few synthetic queries
(inserted with SQL, one of them shown a review that contains HTML) and one evaluated baseline. The built file is cached under test-artifacts/cache/ keyed by the code and
data it depends on, so a second run skips the build (1-2 minutes on an idle 2-core machine, most
of it ingest, MiniLM and UMAP's first compile); set CRS_TEST_REBUILD=1 to force a rebuild. Tests
get copies, never the cached file itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARTIFACTS = ROOT / "test-artifacts"
N_EMBED = 400  # reviews embedded for the small workspace
K = 8
XSS_TEXT = "<script>window.__crs_xss = 1</script><b>bold?</b> An honest review & nothing else."


# ---------------------------------------------------------------------------------- helpers
def insert_synthetic_queries(ws, n: int = 4, *, selection_id: str | None = None, teacher: str = "offline-test",
                             prefix: str = "q", extra_reviews: dict[int, list[str]] | None = None) -> list[str]:
    """Insert `n` synthetic queries about the first items that have reviews (SQL only).

    Query i is about the i-th reviewed item (by item id); the teacher was shown 3 reviews (of
    that item, then of the following ones); its ground truth is that item and the next three
    (matched, score 0.95) plus one title not found in the catalog (flagged).
    """
    items = ws.df(
        "SELECT i.item_id, i.title, i.genres FROM items i WHERE i.item_id IN (SELECT item_id FROM reviews) "
        "ORDER BY i.item_id LIMIT ?", [n + 4])
    reviews = ws.df("SELECT review_id, item_id FROM reviews WHERE item_id IN (SELECT unnest(?::VARCHAR[])) "
                    "ORDER BY item_id, review_id", [items["item_id"].tolist()])
    by_item = reviews.groupby("item_id", sort=False)["review_id"].apply(list).to_dict()
    ids = []
    with ws.transaction() as cur:
        for i in range(n):
            item = items.iloc[i]
            genre = (item["genres"] or "good").split("|")[0]
            shown: list[str] = list((extra_reviews or {}).get(i, []))
            for j in range(i, len(items)):
                for rid in by_item.get(items.iloc[j]["item_id"], []):
                    if len(shown) < 3 and rid not in shown:
                        shown.append(rid)
            qid = f"{prefix}{i:03d}"
            ids.append(qid)
            provenance = {"teacher": {"provider": "openai", "model": teacher}, "reviews": shown,
                          "templates": ["style-1"], "prompt_tokens": 100, "completion_tokens": 50}
            cur.execute(
                "INSERT INTO synthetic_queries (query_id, selection_id, item_id, query, provenance, gt_mode) "
                "VALUES (?, ?, ?, ?, ?, 'teacher')",
                [qid, selection_id, item["item_id"], f"I want something like {item['title']}, a {genre} film",
                 json.dumps(provenance)],
            )
            rows = [(qid, r + 1, f"{items.iloc[i + r]['title']}", items.iloc[i + r]["item_id"], 0.95, False)
                    for r in range(4)]
            rows.append((qid, 5, "Unknown Film (1900)", None, None, True))
            cur.executemany("INSERT INTO ground_truth (query_id, rank, title_raw, item_id, match_score, flagged) "
                            "VALUES (?, ?, ?, ?, ?, ?)", rows)
    return ids


def fake_training_runner(ctx) -> dict:
    """A job runner for app tests (`runner="conftest:fake_training_runner"`, with tests/ on the
    worker's PYTHONPATH): `steps` quick steps with a falling loss and learning rate, honouring
    cancel; no model (config "result": fields added to the result, e.g. an existing model_dir)."""
    total = int(ctx.config.get("steps", 5))
    delay = float(ctx.config.get("delay", 0.0))
    ctx.set_total(total)
    for step in range(1, total + 1):
        ctx.check_cancel()
        time.sleep(delay)
        ctx.report(step, total, epoch=step / total, loss=1.0 / step, lr=1e-3 * (1 - (step - 1) / total), examples=4)
        ctx.log(f"step {step}: loss {1.0 / step:.3f}")
    return {"model_name": "fake-retriever", "steps": total, "final_loss": 1.0 / total, **ctx.config.get("result", {})}


def _fingerprint() -> str:
    h = hashlib.sha256()
    used = {"store", "ingest", "datasets", "catalog", "titles", "embed", "cluster", "models", "evaluate",
            "recommenders", "recommenders_base", "progress", "errors"}  # the modules that build the workspace
    for f in [Path(__file__)] + sorted((ROOT / "crs_core").glob("*.py")):
        if f.stem in used or f == Path(__file__):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    for f in sorted((ROOT / "data" / "bundled").rglob("*")):
        if f.is_file():
            h.update(f"{f.relative_to(ROOT)}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _embed_cluster_project(ws) -> str:
    """Embed N_EMBED reviews with MiniLM, K-means them and project them to 2-D; returns the set id."""
    from crs_core.cluster import run_kmeans, run_projection
    from crs_core.embed import build_embedding_set, get_encoder

    # the shortest reviews: real text, and the encoder (CPU) is the slowest part of the build
    frame = ws.df("SELECT review_id, text FROM reviews ORDER BY length(text), review_id LIMIT ?", [N_EMBED])
    ids, texts = frame["review_id"].tolist(), frame["text"].tolist()
    set_id = build_embedding_set(ws, "review", ids, texts, get_encoder("minilm"))
    run_kmeans(ws, set_id, k=K, seed=0)
    run_projection(ws, set_id, seed=0)
    return set_id


def _encode_catalog(ws) -> None:
    """Every catalog item's text through the project's MiniLM, cached in the workspace as a user's
    first augmentation, retrieval ground truth or dense evaluation leaves it: each test's copy
    reads the vectors instead of encoding 12.8k texts again (about a minute on 2 cores)."""
    from crs_core.embed import TextEncoder
    from crs_core.recommenders_base import Catalog

    TextEncoder(ws)(Catalog.from_workspace(ws).texts)


def _evaluate_baseline(ws) -> None:
    """One real evaluated run (popularity on INSPIRED test) for the Evaluation page."""
    from crs_core.evaluate import evaluate, store_run
    from crs_core.recommenders import make_recommender

    result = evaluate(ws, make_recommender("popularity", ws), "inspired_test")
    store_run(ws, {"model": "popularity-interactions", "run_id": "test-popularity"}, {"inspired_test": result})


def build_small_workspace(path: Path) -> None:
    from crs_core.ingest import ingest_default
    from crs_core.store import Workspace

    ws = Workspace(path)
    try:
        ingest_default(ws)
        set_id = _embed_cluster_project(ws)
        _encode_catalog(ws)
        first_item = ws.scalar("SELECT min(item_id) FROM items WHERE item_id IN (SELECT item_id FROM reviews)")
        with ws.transaction() as cur:
            cur.execute("INSERT INTO reviews (review_id, item_id, user_id, text, rating, source) "
                        "VALUES ('xss-review', ?, 'tester', ?, 9, 'test')", [first_item, XSS_TEXT])
            picks = cur.execute("SELECT unit_id FROM embedding_rows WHERE set_id = ? ORDER BY pos LIMIT 5",
                                [set_id]).fetchall()
            cur.execute("INSERT INTO selections (selection_id, name, strategy, unit, set_id, budget, params) "
                        "VALUES ('test-random', 'test random', 'RANDOM_UNIFORM', 'review', ?, 5, '{}')", [set_id])
            cur.executemany("INSERT INTO selection_picks (selection_id, rank, unit_id, score) VALUES (?, ?, ?, 0)",
                            [("test-random", r + 1, u) for r, (u,) in enumerate(picks)])
        insert_synthetic_queries(ws, n=6, selection_id="test-random", teacher="offline-test",
                                 extra_reviews={0: ["xss-review"]})
        _evaluate_baseline(ws)
        ws.cursor().execute("CHECKPOINT")
    finally:
        ws.close()


def add_item_selection(path: Path) -> tuple[str, list[str]]:
    """An item-unit selection over the small workspace's review map (as budget curves make)."""
    from crs_core.store import Workspace

    with Workspace(path) as w:
        set_id = w.scalar("SELECT set_id FROM embedding_sets WHERE unit = 'review' LIMIT 1")
        items = [r[0] for r in w.cursor().execute(
            "SELECT DISTINCT r.item_id FROM projections q JOIN reviews r ON r.review_id = q.unit_id "
            "WHERE q.set_id = ? ORDER BY 1 LIMIT 3", [set_id]).fetchall()]
        with w.transaction() as cur:
            cur.execute("INSERT INTO selections (selection_id, name, strategy, unit, set_id, budget, params) "
                        "VALUES ('test-items', 'items', 'JS', 'item', ?, 3, '{}')", [set_id])
            cur.executemany("INSERT INTO selection_picks (selection_id, rank, unit_id, score) VALUES (?, ?, ?, 0)",
                            [("test-items", n + 1, item) for n, item in enumerate(items)])
    return set_id, items


def studio_page(monkeypatch, workspace_path: Path, page: str, jobs_root: Path | None = None):
    """Open `page` of the studio (through app.py's navigation) with AppTest on `workspace_path`;
    fails on any exception the page raised."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CRS_WORKSPACE", str(workspace_path))
    monkeypatch.setenv("CRS_JOBS_ROOT", str(jobs_root or workspace_path.parent / "jobs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page(page)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def cli_choices(command: str, option: str) -> list[str]:
    """The choices `python -m crs_core <command> <option>` offers now."""
    from crs_core import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return list(next(a for a in sub._actions if option in a.option_strings).choices)


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def studio_workspace_file() -> Path:
    """The small real workspace (closed; do not open it: copy it). Cached across runs."""
    return small_workspace_file()


def small_workspace_file() -> Path:
    """The small workspace's file, built by `build_small_workspace` when this code has none yet
    (also used by bench/app_bench.py --demo)."""
    cache = ARTIFACTS / "cache" / f"studio-{_fingerprint()}.duckdb"
    if os.environ.get("CRS_TEST_REBUILD") or not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        for old in cache.parent.glob("studio-*.duckdb*"):  # builds of older code
            if old.name != cache.name:
                old.unlink(missing_ok=True)
        # a name of this process's own: test runs building at the same time never share a file
        tmp = cache.with_name(f"{cache.stem}.building-{os.getpid()}")
        for leftover in (tmp, Path(str(tmp) + ".wal")):
            leftover.unlink(missing_ok=True)
        build_small_workspace(tmp)
        os.replace(tmp, cache)
    return cache


def copy_workspace(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


@pytest.fixture(scope="session")
def studio_workspace(studio_workspace_file, tmp_path_factory) -> Path:
    """A session-wide copy of the small workspace (tests may add to it)."""
    return copy_workspace(studio_workspace_file, tmp_path_factory.mktemp("studio") / "small.duckdb")


@pytest.fixture(scope="session")
def empty_workspace(tmp_path_factory) -> Path:
    from crs_core.store import Workspace

    path = tmp_path_factory.mktemp("empty") / "empty.duckdb"
    Workspace(path).close()
    return path
