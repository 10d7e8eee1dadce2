"""The ray engine against the in-process one (crs_core.engines), on a local Ray cluster started
here (``ray.init`` on this machine's cores) and shut down at the end, with nothing left running.

Real data: IMDb reviews and MovieLens titles from data/bundled. The teacher is the loopback
OpenAI-compatible stub server (tests/openai_stub_server.py); Ray's workers reach it over HTTP.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from crs_core.embed import embed_texts, get_encoder, text_hash  # noqa: E402
from crs_core.engines import EngineError, RayEngine, get_engine, spool_folder  # noqa: E402
from crs_core.prompts import QUERY_SYSTEM  # noqa: E402
from crs_core.store import Workspace  # noqa: E402
from crs_core.synth import run_synthesis  # noqa: E402
from crs_core.teacher import Budget, Teacher, TeacherConfig  # noqa: E402
from openai_stub_server import OpenAIStubServer  # noqa: E402

BUNDLED = ROOT / "data" / "bundled"
N_ITEMS = 6
K_QUERIES = 2

# what the stub's "model" writes for a query prompt: chosen by a hash of the reviews it was given
QUERY_STYLES = [
    "I'm looking for a heartfelt drama with strong performances and a story that stays with me.",
    "Can you suggest a clever thriller with a twist I won't see coming?",
    "I want a funny, warm movie to watch with friends on a Friday night.",
    "Looking for an atmospheric film with a haunting score and beautiful photography.",
    "Can you recommend a gripping movie about people fighting against the odds?",
]


# ------------------------------------------------------------------------------ real small data
def _titles_by_imdb() -> dict[str, tuple[str, int | None]]:
    with open(BUNDLED / "movielens_small" / "movies.csv", newline="", encoding="utf-8") as fh:
        movies = {r["movieId"]: r["title"] for r in csv.DictReader(fh)}
    out = {}
    with open(BUNDLED / "movielens_small" / "links.csv", newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            raw = movies.get(r["movieId"], "")
            title, year = raw, None
            if raw.endswith(")") and raw[-6:-5] == "(" and raw[-5:-1].isdigit():
                title, year = raw[:-7].strip(), int(raw[-5:-1])
            out[f"tt{r['imdbId']}"] = (title, year)
    return out


def _reviews(limit: int = 3000) -> list[dict]:
    out = []
    with gzip.open(BUNDLED / "imdb_reviews" / "imdb_reviews_catalog.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line))
            if len(out) >= limit:
                break
    return out


@pytest.fixture(scope="module")
def data() -> dict:
    titles = _titles_by_imdb()
    reviews = _reviews()
    by_item = defaultdict(list)
    for r in reviews:
        if r["imdb_id"] in titles:
            by_item[r["imdb_id"]].append(r)
    items = [i for i, rs in by_item.items() if len(rs) >= 3][:N_ITEMS]
    assert len(items) == N_ITEMS, "the bundled data has fewer reviewed MovieLens films than the test needs"
    return {"titles": titles, "items": items, "reviews": {i: by_item[i][:4] for i in items},
            # the shortest reviews: real text at little encoder time on 2 cores
            "texts": sorted((r["text"] for r in reviews), key=len)[:96]}


def build_workspace(path: Path, data: dict) -> Workspace:
    ws = Workspace(path)
    with ws.transaction() as cur:
        catalog = list(data["items"]) + [i for i in list(data["titles"])[:40] if i not in data["items"]]
        cur.executemany("INSERT INTO items (item_id, title, year, imdb_id, sources) VALUES (?, ?, ?, ?, 'movielens')",
                        [[i, data["titles"][i][0], data["titles"][i][1], i] for i in catalog])
        cur.executemany("INSERT INTO reviews (review_id, item_id, user_id, text, rating, source) "
                        "VALUES (?, ?, NULL, ?, ?, 'imdb')",
                        [[r["review_id"], i, r["text"], r["rating"]] for i in data["items"] for r in data["reviews"][i]])
        cur.execute("INSERT INTO selections (selection_id, name, strategy, unit, set_id, budget, params) "
                    "VALUES ('sel-ray', 'sel-ray', 'RANDOM_UNIFORM', 'item', 'review:minilm', ?, '{}')", [N_ITEMS])
        cur.executemany("INSERT INTO selection_picks (selection_id, rank, unit_id, score) VALUES ('sel-ray', ?, ?, 0)",
                        [[n + 1, i] for n, i in enumerate(data["items"])])
    return ws


def stub_reply(titles: list[str]):
    """Query prompts get a query picked by the reviews' hash; recommendation prompts the catalog's
    first titles."""

    def reply(messages: list[dict]) -> str:
        if messages[0]["content"] == QUERY_SYSTEM:
            digest = int(hashlib.sha1(messages[1]["content"].encode()).hexdigest(), 16)
            return QUERY_STYLES[digest % len(QUERY_STYLES)]
        return "\n".join(f"{n}. {t}" for n, t in enumerate(titles[:8], 1))

    return reply


def make_teacher(stub: OpenAIStubServer, ws: Workspace) -> Teacher:
    cfg = TeacherConfig.openai(stub.base_url, "gpt-4o-mini", timeout=10.0, max_attempts=2, backoff_base=0.01,
                               backoff_max=0.05, concurrency=2)
    return Teacher(cfg, cache=ws)


def stored(ws: Workspace) -> list[tuple]:
    """Each stored query with its ground truth, in id order."""
    rows = ws.cursor().execute("SELECT query_id, item_id, query FROM synthetic_queries ORDER BY query_id").fetchall()
    out = []
    for qid, item, query in rows:
        gt = ws.cursor().execute("SELECT rank, title_raw, item_id FROM ground_truth WHERE query_id = ? ORDER BY rank",
                                 [qid]).fetchall()
        out.append((qid, item, query, tuple(map(tuple, gt))))
    return out


def ray_processes() -> list[psutil.Process]:
    """Ray's processes under this one (its GCS, raylet, workers)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any(s in " ".join(p.cmdline()) for s in ("raylet", "gcs_server", "ray::", "ray/_private")):
                found.append(p)
        except psutil.Error:
            continue
    return found


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------ no cluster: errors
def test_unreachable_address_is_one_clear_error_and_starts_nothing(tmp_path, data):
    import ray

    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(EngineError, match=f"Ray is not reachable at {address}"):
        RayEngine(address).connect()
    assert not ray.is_initialized() and not ray_processes()
    with pytest.raises(EngineError, match="unknown engine 'spark'"):
        get_engine("spark")

    path = tmp_path / "cli.duckdb"
    build_workspace(path, data).close()
    for args in (["embed", "--unit", "review"], ["synth", "--selection", "sel-ray", "--base-url", "http://127.0.0.1:9/v1"]):
        proc = subprocess.run([sys.executable, "-m", "crs_core", "--workspace", str(path), *args, "--engine", "ray",
                               "--ray-address", address], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"error: Ray is not reachable at {address} (Connection refused); "
                                                    "start a cluster there with `ray start --head`, or leave out "
                                                    "the address to start a local Ray"]
    with Workspace(path) as ws:
        assert ws.count("embedding_cache") == 0 and ws.count("synthetic_queries") == 0


# ------------------------------------------------------------------------ a local Ray cluster
@pytest.fixture(scope="module")
def engine():
    eng = RayEngine(workers=2)  # a local Ray on this machine's cores
    ray = eng.connect()
    assert eng.cluster_cpus() >= 1
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    listening = [c.laddr.ip for p in ray_processes() for c in p.net_connections(kind="inet") if c.status == "LISTEN"]
    assert listening and set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1"}  # a local Ray: loopback only
    yield eng
    eng.close()
    import ray

    assert not ray.is_initialized()
    deadline = time.monotonic() + 20
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(), "Ray processes were left running"


@pytest.fixture(scope="module")
def local_vectors(tmp_path_factory, data) -> np.ndarray:
    with Workspace(tmp_path_factory.mktemp("local") / "ws.duckdb") as ws:
        return embed_texts(ws, get_encoder("minilm"), data["texts"], chunk_size=16)


def test_ray_embedding_equals_the_in_process_vectors(tmp_path, data, engine, local_vectors):
    seen = []
    with Workspace(tmp_path / "ws.duckdb") as ws:
        vecs = embed_texts(ws, get_encoder("minilm"), data["texts"], lambda d, t: seen.append((d, t)),
                           chunk_size=16, engine=engine)
        assert ws.count("embedding_cache") == len(set(data["texts"]))
    # the int8 encoder batches only equal-length texts, so a text's vector does not depend on
    # its block or worker; left is only float summation order (1 torch thread here, 2 there)
    np.testing.assert_allclose(vecs, local_vectors, atol=1e-5)
    assert seen[-1] == (len(set(data["texts"])),) * 2 and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_killed_embedding_worker_loses_and_duplicates_nothing(tmp_path, data, engine, local_vectors):
    texts = data["texts"]
    with Workspace(tmp_path / "ws.duckdb") as ws:
        first_block = threading.Event()
        result: dict = {}

        def run():
            try:
                result["vecs"] = embed_texts(ws, get_encoder("minilm"), texts,
                                             lambda d, t: d >= 4 and first_block.set(), chunk_size=4, engine=engine)
            except BaseException as exc:  # pragma: no cover - shown by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        assert first_block.wait(120)
        victim = engine.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        thread.join(300)
        assert "error" not in result and not thread.is_alive()
        np.testing.assert_allclose(result["vecs"], local_vectors, atol=1e-5)
        hashes = {text_hash(t) for t in texts}
        rows = ws.cursor().execute("SELECT text_hash, count(*) FROM embedding_cache GROUP BY text_hash").fetchall()
        assert {h for h, _ in rows} == hashes and all(n == 1 for _, n in rows)
        assert victim not in engine.worker_pids()  # Ray restarted the actor in a new process


def test_ray_synthesis_stores_what_the_local_engine_stores(tmp_path, data, engine):
    titles = [data["titles"][i][0] for i in data["items"]]
    with OpenAIStubServer(reply=stub_reply(titles)) as stub:
        local = build_workspace(tmp_path / "local.duckdb", data)
        rep = run_synthesis(local, "sel-ray", make_teacher(stub, local), k_queries=K_QUERIES, gt_mode="llm",
                            dedup_embeddings=False)
        assert rep.complete and rep.stored == N_ITEMS * K_QUERIES
        expected = stored(local)

        remote = build_workspace(tmp_path / "remote.duckdb", data)
        progress = []
        rep = run_synthesis(remote, "sel-ray", make_teacher(stub, remote), k_queries=K_QUERIES, gt_mode="llm",
                            dedup_embeddings=False, engine=engine, progress=lambda d, t: progress.append((d, t)))
        assert rep.complete and rep.stored == N_ITEMS * K_QUERIES and rep.calls == 2 * N_ITEMS * K_QUERIES
        assert stored(remote) == expected
        assert progress[-1] == (N_ITEMS * K_QUERIES,) * 2
        assert remote.count("llm_cache") == local.count("llm_cache")  # every reply committed by the driver
        assert not spool_folder(remote.path, "synth|sel-ray").exists()

        # the same cached replies give the same queries: no call reaches the endpoint
        with local.transaction() as cur:
            cur.execute("DELETE FROM ground_truth")
            cur.execute("DELETE FROM synthetic_queries")
        before = stub.chat_requests
        rep = run_synthesis(local, "sel-ray", make_teacher(stub, local), k_queries=K_QUERIES, gt_mode="llm",
                            dedup_embeddings=False, engine=engine)
        assert rep.calls == 0 and rep.cached_hits == 2 * N_ITEMS * K_QUERIES and stub.chat_requests == before
        assert stored(local) == expected
        local.close()
        remote.close()


def test_a_killed_synthesis_worker_loses_and_repeats_nothing(tmp_path, data, engine):
    titles = [data["titles"][i][0] for i in data["items"]]
    with OpenAIStubServer(reply=stub_reply(titles)) as stub:
        reference = build_workspace(tmp_path / "reference.duckdb", data)
        run_synthesis(reference, "sel-ray", make_teacher(stub, reference), k_queries=K_QUERIES, gt_mode="llm",
                      dedup_embeddings=False)
        expected = stored(reference)
        reference.close()

        stub.reset()
        first = 0
        stub.latency = 0.3  # calls in flight long enough to kill a worker in the middle of its block
        ws = build_workspace(tmp_path / "ws.duckdb", data)
        result: dict = {}

        def run():
            try:
                result["rep"] = run_synthesis(ws, "sel-ray", make_teacher(stub, ws), k_queries=K_QUERIES,
                                              gt_mode="llm", dedup_embeddings=False, engine=engine)
            except BaseException as exc:  # pragma: no cover - shown by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        while stub.chat_requests - first < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        victim = engine.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        thread.join(300)
        assert "error" not in result and not thread.is_alive()
        rep = result["rep"]
        assert rep.complete and rep.stored == N_ITEMS * K_QUERIES
        assert stored(ws) == expected  # nothing lost, nothing stored twice
        # a reply the dead worker had got was read back from its spool file: only calls that were
        # in flight when it died (at most its concurrency, 2) were sent again
        bodies = [json.dumps(r.body, sort_keys=True) for r in stub.requests[first:]]
        assert len(bodies) - len(set(bodies)) <= 2
        assert len(set(bodies)) == 2 * N_ITEMS * K_QUERIES
        ws.close()


def test_a_budget_is_shared_by_the_blocks_in_flight_and_a_resume_pays_nothing_twice(tmp_path, data, engine):
    titles = [data["titles"][i][0] for i in data["items"]]
    with OpenAIStubServer(reply=stub_reply(titles)) as stub:
        ws = build_workspace(tmp_path / "ws.duckdb", data)
        rep = run_synthesis(ws, "sel-ray", make_teacher(stub, ws), k_queries=K_QUERIES, gt_mode="llm",
                            dedup_embeddings=False, engine=engine, budget=Budget(max_calls=5))
        assert rep.stopped.startswith("budget") and stub.chat_requests <= 5
        assert rep.stored == ws.count("synthetic_queries") < N_ITEMS * K_QUERIES
        assert spool_folder(ws.path, "synth|sel-ray").exists()  # kept for the resume

        rep = run_synthesis(ws, "sel-ray", make_teacher(stub, ws), k_queries=K_QUERIES, gt_mode="llm",
                            dedup_embeddings=False, engine=engine)
        assert rep.complete and ws.count("synthetic_queries") == N_ITEMS * K_QUERIES
        bodies = [json.dumps(r.body, sort_keys=True) for r in stub.requests]
        assert len(bodies) == len(set(bodies)) == 2 * N_ITEMS * K_QUERIES  # the stopped run's replies were kept
        assert not spool_folder(ws.path, "synth|sel-ray").exists()
        ws.close()


def test_a_typed_key_stays_here_and_a_worker_side_error_is_its_own_line(tmp_path, data, engine):
    from crs_core.teacher import TeacherSetupError

    ws = build_workspace(tmp_path / "ws.duckdb", data)
    typed = Teacher(TeacherConfig.openai("http://127.0.0.1:9/v1", "m", api_key="sk-typed-in-the-studio"), cache=ws)
    with pytest.raises(EngineError, match="never receive a typed API key"):
        run_synthesis(ws, "sel-ray", typed, gt_mode="llm", dedup_embeddings=False, engine=engine)
    # no key for this endpoint where the worker runs: the worker's setup error, not Ray's traceback
    keyless = Teacher(TeacherConfig.openai("http://192.0.2.1:9/v1", "m", max_attempts=1), cache=ws)
    with pytest.raises(TeacherSetupError, match="no API key for http://192.0.2.1:9/v1"):
        run_synthesis(ws, "sel-ray", keyless, gt_mode="llm", dedup_embeddings=False, engine=engine)
    assert ws.count("synthetic_queries") == 0
    ws.close()


def test_ray_generative_evaluation_has_the_in_process_metrics(tmp_path, studio_workspace_file, engine):
    from conftest import copy_workspace

    from crs_core.engines import LocalEngine
    from crs_core.model_eval import evaluate_lm, run_results

    opts = dict(datasets=["inspired_test"], turn_sample=4, n=3, batch_size=2, max_new_tokens=24)
    with Workspace(copy_workspace(studio_workspace_file, tmp_path / "local.duckdb")) as ws:
        run_id = evaluate_lm(ws, "zero-shot", engine=LocalEngine(), **opts)
        expected = run_results(ws, run_id)
    with Workspace(copy_workspace(studio_workspace_file, tmp_path / "ray.duckdb")) as ws:
        seen = []
        assert evaluate_lm(ws, "zero-shot", engine=engine, progress=lambda d, t: seen.append((d, t)), **opts) == run_id
        assert run_results(ws, run_id) == expected and seen[-1] == (4, 4)
        config = json.loads(ws.scalar("SELECT config FROM runs WHERE run_id = ?", [run_id]))
        assert config["engine"] == "ray" and config["grounding"]["inspired_test"]["contexts"] == 4
        assert not spool_folder(ws.path, f"lm-eval|{run_id}").exists()
        # evaluating again returns the stored run and generates nothing
        runs, reports = ws.count("runs"), len(seen)
        assert evaluate_lm(ws, "zero-shot", engine=engine, progress=lambda d, t: seen.append((d, t)), **opts) == run_id
        assert ws.count("runs") == runs and len(seen) == reports
