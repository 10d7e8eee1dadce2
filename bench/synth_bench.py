"""Synthesis benchmarks.

Part 1, the teacher (runs anywhere, no model needed): calls/s of ``Teacher.chat_many`` against
the OpenAI-compatible stub server (tests/openai_stub_server.py, in its own process) answering
each call after a fixed latency, at several concurrency levels, next to the ideal
concurrency / latency; then the same inputs again, which must make 0 calls (all cached). Next to
the measured %, the CPU-bound ceilings in % of ideal: cores / (client + stub CPU per call), and
1 / (CPU per call of the client's event-loop thread, which runs every call's HTTP work), so that a
reader sees whether a level is bound by the machine.

Part 2, the synthesis pipeline with the default offline teacher (quality proxies, ending with one
JSON line): see the marked section ``SYNTHESIS BENCH`` below.

    python bench/synth_bench.py                      # teacher part, workspace (DuckDB) cache
    python bench/synth_bench.py --cache memory       # with the in-memory cache
    python bench/synth_bench.py --levels 1,4 --latency 0.05
    python bench/synth_bench.py --part synthesis --items 50            # Qwen2.5-Coder-1.5B, 'choose'
    python bench/synth_bench.py --part synthesis --teacher smollm2 --items 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from crs_core.teacher import Completion, MemoryCache, Teacher, TeacherConfig  # noqa: E402

STUB = ROOT / "tests" / "openai_stub_server.py"
GOAL = 0.90  # measured / ideal calls per second
CORES = os.cpu_count() or 1
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ==============================================================================================
# the stub server in its own process (its own GIL: the client side is what is measured)
# ==============================================================================================
class StubProcess:
    def __init__(self, latency: float):
        self.latency = latency
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def __enter__(self) -> "StubProcess":
        self.proc = subprocess.Popen(
            [sys.executable, str(STUB), "--latency", str(self.latency)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"the stub server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.stdin.close()  # the stub serves until its stdin closes
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _get(self, route: str) -> dict[str, Any]:
        with _OPENER.open(f"http://127.0.0.1:{self.port}{route}", timeout=5) as r:
            return json.loads(r.read())

    def stats(self) -> dict[str, Any]:
        return self._get("/_stub/stats")

    def reset(self) -> None:
        self._get("/_stub/reset")


# ==============================================================================================
# part 1: the teacher
# ==============================================================================================
def bench_teacher(levels: list[int], latency: float, rounds: int, min_calls: int, cache_kind: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, StubProcess(latency) as stub:
        workspace = None
        if cache_kind == "workspace":
            from crs_core.store import Workspace

            workspace = Workspace(Path(tmp) / "bench.duckdb")
        cache = workspace if workspace is not None else MemoryCache()
        try:
            config = TeacherConfig.openai(stub.base_url, "bench-model", api_key="sk-bench", timeout=30, max_tokens=64)
            for level in levels:
                n = max(rounds * level, min_calls)
                requests = [
                    [{"role": "system", "content": "You write movie-recommendation requests."},
                     {"role": "user", "content": f"level {level} call {i}: a cosy mystery for a rainy night"}]
                    for i in range(n)
                ]
                teacher = Teacher(config, cache=cache)
                # steady state, as in a long synthesis run: the client made and `level` connections
                # open before the clock starts (one warm-up wave of other requests)
                teacher.chat_many([[{"role": "user", "content": f"warm-up {level} {i}"}] for i in range(level)],
                                  concurrency=level)
                stub.reset()
                stub_cpu0, cpu0, loop0 = stub.stats()["cpu_seconds"], time.process_time(), _loop_cpu()
                t0 = time.perf_counter()
                results = teacher.chat_many(requests, concurrency=level)
                seconds = time.perf_counter() - t0
                cpu = time.process_time() - cpu0  # every thread of this process: the client side
                loop_cpu = _loop_cpu()
                loop_cpu = loop_cpu - loop0 if loop_cpu is not None and loop0 is not None else None
                commits = getattr(getattr(teacher, "_writer", None), "commits", None)
                first = stub.stats()
                ok = sum(isinstance(r, Completion) for r in results)
                # the same inputs again: everything comes from the cache
                stub.reset()
                t1 = time.perf_counter()
                again = teacher.chat_many(requests, concurrency=level)
                seconds_again = time.perf_counter() - t1
                second = stub.stats()
                teacher.close()
                ideal = level / latency
                stub_cpu = first["cpu_seconds"] - stub_cpu0
                # the CPU-bound ceilings: all cores busy with client + stub work, or the client's
                # event-loop thread busy all the time (it runs every call's HTTP work)
                ceiling = CORES * n / (cpu + stub_cpu) if cpu + stub_cpu > 0 else float("inf")
                loop_ceiling = n / loop_cpu if loop_cpu else float("inf")
                rows.append({
                    "concurrency": level, "calls": n, "ok": ok, "seconds": seconds,
                    "calls_per_s": n / seconds, "ideal_per_s": ideal, "ratio": (n / seconds) / ideal,
                    "ceiling_per_s": ceiling, "ceiling_ratio": ceiling / ideal,
                    "loop_ceiling_per_s": loop_ceiling, "loop_ceiling_ratio": loop_ceiling / ideal,
                    "client_cpu_ms": cpu / n * 1000, "stub_cpu_ms": stub_cpu / n * 1000,
                    "loop_cpu_ms": loop_cpu / n * 1000 if loop_cpu is not None else float("nan"),
                    "commits": commits,
                    "max_in_flight": first["max_in_flight"], "server_requests": first["chat_requests"],
                    "rerun_requests": second["chat_requests"],
                    "rerun_cached": sum(isinstance(r, Completion) and r.cached for r in again),
                    "rerun_seconds": seconds_again,
                })
        finally:
            if workspace is not None:
                workspace.close()
    return rows


def _loop_cpu() -> float | None:
    """CPU seconds of the teacher's event-loop thread so far (Linux /proc; None elsewhere)."""
    thread = next((t for t in threading.enumerate() if t.name == "teacher-loop"), None)
    if thread is None or thread.native_id is None:
        return None
    try:  # schedstat: nanoseconds on a CPU (stat's utime + stime count 10 ms ticks)
        with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def print_teacher_table(rows: list[dict[str, Any]], latency: float, cache_kind: str) -> bool:
    print(f"\nTeacher.chat_many against the stub server (own process): {latency * 1000:.0f} ms per call, "
          f"cache: {cache_kind}, goal: measured >= {GOAL:.0%} of ideal (concurrency / latency)")
    header = (f"{'conc.':>5} {'calls':>6} {'ok':>5} {'seconds':>8} {'calls/s':>8} {'ideal/s':>8} "
              f"{'measured':>8} {'ceiling':>8} {'loop ceil.':>10} | "
              f"{'CPU ms/call: client':>19} {'loop':>5} {'stub':>5} | {'commits':>7} {'max in-flight':>13} | "
              f"{'re-run: calls':>13} {'cached':>6} {'seconds':>7}")
    print(header)
    print("-" * len(header))
    all_ok = True
    for r in rows:
        good = r["ratio"] >= GOAL and r["rerun_requests"] == 0 and r["max_in_flight"] <= r["concurrency"]
        all_ok &= good
        commits = "" if r["commits"] is None else r["commits"]
        print(f"{r['concurrency']:>5} {r['calls']:>6} {r['ok']:>5} {r['seconds']:>8.2f} {r['calls_per_s']:>8.1f} "
              f"{r['ideal_per_s']:>8.1f} {r['ratio']:>8.0%} {r['ceiling_ratio']:>8.0%} {r['loop_ceiling_ratio']:>10.0%} | "
              f"{r['client_cpu_ms']:>19.2f} {r['loop_cpu_ms']:>5.2f} {r['stub_cpu_ms']:>5.2f} | "
              f"{commits:>7} {r['max_in_flight']:>13} | "
              f"{r['rerun_requests']:>13} {r['rerun_cached']:>6} {r['rerun_seconds']:>7.2f}"
              f"{'' if good else '   <-- below goal'}")
    print(f"measured / ceiling / loop ceil.: calls/s in % of ideal. ceiling = {CORES} cores / (client + stub "
          "CPU per call),\n  what the CPU allows if the two kept every core busy; loop ceil. = 1 / loop CPU per "
          "call: every call's HTTP work\n  runs on the client's one event-loop thread (loop, part of client), "
          "which allows no more whatever the cores.\n  A level whose measured % is close to the lower ceiling is "
          "CPU-bound. CPU ms/call: client = this process (all\n  threads), stub = the stub server's process. "
          "commits: cache writes (results that arrive together share one).")
    return all_ok


# ==============================================================================================
# SYNTHESIS BENCH ----- written by the synthesis author ----------------------------------------
# On the default (bundled) data with the default offline teacher (llama.cpp serving
# Qwen2.5-Coder-1.5B-Instruct; --teacher smollm2 for the small one), ground truth 'choose'
# (--gt-mode), K = 1, the quality proxies of issue 12 per run:
#   * stored rate: stored queries / (item, k) units that had reviews,
#   * plausible-query rate: query replies the parser accepts / all query replies (retries
#     included), with the rejection reasons counted,
#   * grounding rate: ground-truth rows that are catalog items,
#   * duplicate rate: stored queries marked as duplicates (normalised text or MiniLM cosine >= 0.95),
#   * seconds per stored query: the whole run (every call, flagged ones included) / stored,
#   * self-retrieval: the rank of the seed item among all catalog items when the query is embedded
#     with MiniLM (cosine to the item texts, no co-occurrence); recall@50 = share ranked <= 50,
# ending with ONE JSON line of them. A first row (skipped with --no-stub) runs the same plan
# against a zero-latency stub teacher answering well-formed replies: the pipeline's own cost.
# Workspace: --workspace, else $SYNTH_BENCH_WORKSPACE, else data/workspaces/default.duckdb, copied
# to a temporary folder (the original is never written); without one, a fresh one from the
# bundled data (ingest_default, ~2 min; the catalog's item texts are then embedded once, ~4 min).
# The copy's llm_cache is emptied so every call is really made; a rerun of the same plan must
# make 0 calls (all cached).
# ==============================================================================================
def _bench_workspace(tmp: Path, source: str | None) -> Path:
    import shutil

    from crs_core.store import DEFAULT_WORKSPACE, Workspace

    source = Path(source or os.environ.get("SYNTH_BENCH_WORKSPACE") or DEFAULT_WORKSPACE)
    target = tmp / "bench.duckdb"
    if source.exists():
        try:  # a workspace open in the studio is locked: then build a fresh one
            Workspace(source, read_only=True).close()
            shutil.copy(source, target)
            wal = source.with_name(source.name + ".wal")
            if wal.exists():
                shutil.copy(wal, target.with_name(target.name + ".wal"))
            print(f"synthesis bench: a copy of {source}")
            return target
        except Exception as exc:  # noqa: BLE001 - any reason to not use it
            print(f"synthesis bench: cannot use {source} ({exc}); building a fresh workspace")
    from crs_core.ingest import ingest_default

    print("synthesis bench: ingesting the bundled data into a fresh workspace (~2 min)")
    with Workspace(target) as ws:
        ingest_default(ws)
    return target


def _bench_selection(ws: Any, sel_id: str, n_items: int, seed: int = 0) -> None:
    """A selection of n items with at least 3 reviews (seeded random sample), replacing any old one."""
    import numpy as np

    with ws.transaction() as cur:
        cur.execute("DELETE FROM selection_picks WHERE selection_id = ?", [sel_id])
        cur.execute("DELETE FROM selections WHERE selection_id = ?", [sel_id])
        cur.execute("DELETE FROM ground_truth WHERE query_id IN (SELECT query_id FROM synthetic_queries WHERE selection_id = ?)", [sel_id])
        cur.execute("DELETE FROM synthetic_queries WHERE selection_id = ?", [sel_id])
        pool = [r[0] for r in cur.execute(
            "SELECT item_id FROM reviews GROUP BY item_id HAVING count(*) >= 3 ORDER BY item_id").fetchall()]
        picks = [pool[i] for i in np.random.default_rng(seed).choice(len(pool), size=min(n_items, len(pool)), replace=False)]
        cur.execute("INSERT INTO selections (selection_id, name, strategy, unit, set_id, budget, params) "
                    "VALUES (?, 'synthesis bench', 'random', 'item', 'item:bench', ?, '{}')", [sel_id, len(picks)])
        cur.executemany("INSERT INTO selection_picks VALUES (?, ?, ?, 0, 1)", [[sel_id, r, iid] for r, iid in enumerate(picks, 1)])


class _SeedRanker:
    """Rank of a seed item among all catalog items for a query (MiniLM, cosine to the item texts)."""

    def __init__(self, ws: Any):
        import pandas as pd

        from crs_core.embed import TextEncoder
        from crs_core.synth import CatalogRetriever

        catalog = ws.df("SELECT item_id, title, year, genres, plot, cast_names FROM items")
        catalog["year"] = [None if pd.isna(y) else int(y) for y in catalog["year"]]
        self.retriever = CatalogRetriever(ws, catalog, TextEncoder(ws), cooc_weight=0.0)

    def rank(self, query: str, item_id: str) -> int:
        import numpy as np

        r = self.retriever
        sims = r.matrix @ r.embed([query])[0]
        own = sims[r.pos[item_id]]
        return int(np.sum(sims > own)) + 1


def synthesis_metrics(ws: Any, sel_id: str, rep: Any, k: int, ranker: _SeedRanker | None) -> dict[str, Any]:
    """The issue-12 quality proxies of one run (see the section comment)."""
    import collections

    df = ws.df("SELECT q.query_id, q.item_id, q.query, q.provenance, i.title, i.year FROM synthetic_queries q "
               "JOIN items i USING (item_id) WHERE q.selection_id = ? ORDER BY q.created_at", [sel_id])
    attempts = []
    per_query = []
    for r in df.itertuples():
        prov = json.loads(r.provenance)
        attempts += prov.get("query_attempts") or []
        picks = [int(n.split("candidate ", 1)[1].split(" ", 1)[0]) for n in ws.df(
            "SELECT note FROM ground_truth WHERE query_id = ? ORDER BY rank", [r.query_id])["note"]
            if str(n).startswith("chosen: candidate ")]
        per_query.append({"item_id": r.item_id, "title": r.title, "query": r.query, "picks": picks,
                          "gt": prov.get("gt", {}), "rank": ranker.rank(r.query, r.item_id) if ranker else None})
    for f in rep.flagged:
        attempts += f.get("query_attempts") or []
    reasons = collections.Counter(a["flag"] for a in attempts if a.get("flag"))
    refused = [a for a in attempts if a.get("flag")]
    chose = [q["gt"].get("positional") for q in per_query if "positional" in q["gt"]]
    runnable = max(0, rep.planned - rep.items_without_reviews * k)
    ranks = [q["rank"] for q in per_query if q["rank"] is not None]
    nan = float("nan")
    return {
        "stored_rate": rep.stored / runnable if runnable else nan,
        "plausible_rate": sum(1 for a in attempts if not a.get("flag")) / len(attempts) if attempts else nan,
        "grounding_rate": rep.grounding_rate if rep.grounding_rate is not None else nan,
        "duplicate_rate": rep.duplicate_rate if rep.duplicate_rate is not None else (0.0 if rep.stored == 0 else nan),
        "s_per_stored_query": rep.seconds / rep.stored if rep.stored else nan,
        "seed_recall_at_50": sum(1 for x in ranks if x <= 50) / len(ranks) if ranks else nan,
        "seed_median_rank": float(sorted(ranks)[len(ranks) // 2]) if ranks else nan,
        "positional_rate": sum(chose) / len(chose) if chose else nan,
        "query_replies": len(attempts), "reasons": dict(reasons), "per_query": per_query, "refused": refused,
        "runnable": runnable,
    }


def _print_run(title: str, rep: Any, m: dict[str, Any], show: int) -> None:
    print(f"\n{title}")
    print("\n".join("  " + line for line in rep.lines()))
    print(f"  query replies: {m['query_replies']}, accepted {m['plausible_rate']:.1%}; refused: "
          + (", ".join(f"{n} x {why}" for why, n in sorted(m["reasons"].items(), key=lambda x: -x[1])) or "none"))
    for a in m["refused"][:show]:
        print(f"  refused ({a['flag']}): {str(a['reply'])[:120]!r}")
    for f in rep.flagged[:show]:
        print(f"  flagged {f['item_id']}: {f['reason']}: {f['reply'][:110]!r}")
    if m["positional_rate"] == m["positional_rate"]:
        print(f"  choose: picks were the first candidates in list order (no real choice) for "
              f"{m['positional_rate']:.0%} of the stored queries")
    for q in m["per_query"][:show]:
        gt = q["gt"]
        extra = (f"{gt.get('picked', gt.get('kept', '?'))} picked of {gt.get('candidates', '?')}"
                 + (", seed in GT" if gt.get("seed_in_gt") else "") + (f" {q['picks']}" if q.get("picks") else ""))
        rank = f"seed rank {q['rank']:>5}" if q["rank"] is not None else ""
        print(f"  {str(q['title'])[:26]:<26} {rank} | {extra} | {q['query'][:110]}")


def _stub_reply_factory(titles: list[str]) -> Any:
    """A well-behaved teacher for the pipeline-overhead row: a query made from the reviews' words
    (as JSON when a schema is sent), then picks among the candidates (choose) or 20 real catalog
    titles (llm), a seeded sample."""
    import hashlib
    import random as _random
    import re as _re

    from crs_core.prompts import QUERY_SYSTEM

    def reply(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
        user = messages[-1]["content"]
        h = int(hashlib.sha1(user.encode()).hexdigest()[:8], 16)
        rng = _random.Random(h)
        if messages[0]["content"] == QUERY_SYSTEM:
            words = _re.findall(r"[A-Za-z]{5,}", user.split("<review", 1)[-1])[:40]
            pick = rng.sample(words, min(6, len(words)))
            return json.dumps({"query": f"I want a movie that is {', '.join(w.lower() for w in pick)}. Any ideas? #{h % 9973}"})
        if "\nCandidates:\n" in user:
            n = len(user.split("\nCandidates:\n", 1)[1].splitlines())
            return json.dumps({"picks": rng.sample(range(1, n + 1), min(10, n))})
        return "Sure! Here are 20 recommendations:\n\n" + "\n".join(
            f"{n}. **{t}**" for n, t in enumerate(rng.sample(titles, 20), 1))

    return reply


def bench_synthesis(args: argparse.Namespace) -> list[dict[str, Any]]:
    from crs_core.catalog import display_title
    from crs_core.models import local_teacher
    from crs_core.store import Workspace
    from crs_core.synth import run_synthesis

    k, gt_mode = args.k, args.gt_mode
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = _bench_workspace(Path(tmp), args.workspace)
        ws = Workspace(path)
        try:
            ws.cursor().execute("DELETE FROM llm_cache")
            ranker = _SeedRanker(ws)  # embeds the catalog's item texts once (cached in the workspace)
            # 1. the pipeline's own cost: a zero-latency stub teacher answering well-formed replies
            if not args.no_stub:
                if str(ROOT / "tests") not in sys.path:
                    sys.path.insert(0, str(ROOT / "tests"))
                from openai_stub_server import OpenAIStubServer

                titles = [display_title(t, y) for t, y in ws.cursor().execute(
                    "SELECT title, year FROM items WHERE movielens_id IS NOT NULL AND year IS NOT NULL ORDER BY item_id").fetchall()]
                _bench_selection(ws, "bench-stub", args.stub_items, args.seed)
                with OpenAIStubServer(reply=_stub_reply_factory(titles), record=False) as stub:
                    teacher = Teacher(TeacherConfig.openai(stub.base_url, "stub-model", api_key="sk-bench", concurrency=1), cache=ws)
                    rep = run_synthesis(ws, "bench-stub", teacher, k_queries=k, gt_mode=gt_mode)
                    again = run_synthesis(ws, "bench-stub", teacher, k_queries=k, gt_mode=gt_mode)
                    teacher.close()
                m = synthesis_metrics(ws, "bench-stub", rep, k, ranker)
                _print_run("stub teacher (0 ms per call, well-formed replies): the pipeline's own cost", rep, m, 3)
                rows.append({"teacher": "stub (0 ms)", "items": rep.items, "rerun_calls": again.calls, **m})
            # 2. the local teacher
            choice = local_teacher(args.teacher)
            if choice.note:
                print(f"\nnote: {choice.note}")
            _bench_selection(ws, "bench-synth", args.items, args.seed)
            teacher = Teacher(TeacherConfig.local(choice.path, model=choice.alias, local_n_threads=args.threads), cache=ws)
            try:
                t0 = time.perf_counter()
                teacher.start()  # the llama.cpp server start is not part of a query's time
                start_s = time.perf_counter() - t0
                rep = run_synthesis(ws, "bench-synth", teacher, k_queries=k, gt_mode=gt_mode,
                                    progress=_progress_printer(time.perf_counter()))
                again = run_synthesis(ws, "bench-synth", teacher, k_queries=k, gt_mode=gt_mode)
                form = teacher.structured_format()
            finally:
                teacher.close()
            m = synthesis_metrics(ws, "bench-synth", rep, k, ranker)
            per_call = rep.teacher_seconds / rep.calls if rep.calls else float("nan")
            _print_run(f"local teacher {choice.alias} ({args.threads} threads; server start {start_s:.1f} s, not "
                       f"counted; response_format: {form}; {per_call:.1f} s per call, "
                       f"{rep.completion_tokens / rep.teacher_seconds if rep.teacher_seconds else float('nan'):.1f} "
                       "completion tokens/s)", rep, m, args.show)
            rows.append({"teacher": choice.alias, "items": rep.items, "rerun_calls": again.calls, **m})
        finally:
            ws.close()
    if hasattr(os, "getloadavg"):
        print(f"\n(machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end)")
    return rows


def _progress_printer(t0: float) -> Any:
    def show(done: int, total: int) -> None:
        if done:
            el = time.perf_counter() - t0
            print(f"  ... {done}/{total} units, {el:.0f} s", flush=True)
    return show


SYNTH_KEYS = ("stored_rate", "plausible_rate", "grounding_rate", "duplicate_rate", "s_per_stored_query",
              "seed_recall_at_50")


def print_synthesis_table(rows: list[dict[str, Any]], gt_mode: str) -> None:
    if not rows:
        print("\nSynthesis bench: no rows.")
        return
    print(f"\nSynthesis (Algorithm 2), ground truth '{gt_mode}', targets: stored >= 0.9, plausible >= 0.8, "
          "grounding >= 0.95, duplicates < 0.02")
    keys = ["teacher", "items", *SYNTH_KEYS, "seed_median_rank", "positional_rate", "rerun_calls"]
    width = {k: max(len(k), 8) for k in keys}
    width["teacher"] = max(len("teacher"), *(len(str(r["teacher"])) for r in rows))
    print("  ".join(f"{k:>{width[k]}}" for k in keys))
    for r in rows:
        print("  ".join(f"{r[k]:>{width[k]}.3f}" if isinstance(r[k], float) else f"{r[k]!s:>{width[k]}}" for k in keys))
    last = rows[-1]

    def num(x: Any) -> Any:
        return None if isinstance(x, float) and x != x else (round(x, 4) if isinstance(x, float) else x)

    print(json.dumps({"teacher": last["teacher"], "items": last["items"], **{k: num(last[k]) for k in SYNTH_KEYS}}))
# ==============================================================================================


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["teacher", "synthesis", "all"], default="all")
    ap.add_argument("--levels", default="1,4,16,64", help="concurrency levels, comma-separated")
    ap.add_argument("--latency", type=float, default=0.1, help="stub seconds per call")
    ap.add_argument("--rounds", type=int, default=8, help="calls per level = max(rounds * level, min-calls)")
    ap.add_argument("--min-calls", type=int, default=40)
    ap.add_argument("--cache", choices=["workspace", "memory"], default="workspace")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a level misses the goal")
    syn = ap.add_argument_group("synthesis part")
    syn.add_argument("--items", type=int, default=50, help="items synthesised by the local teacher")
    syn.add_argument("--teacher", default="qwen", help="local teacher: qwen (the default offline teacher), "
                     "smollm2, or a .gguf path")
    syn.add_argument("--gt-mode", default="choose", help="ground-truth mode (crs_core.synth.GT_MODES)")
    syn.add_argument("--k", type=int, default=1, help="queries per item")
    syn.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    syn.add_argument("--workspace", default=None, help="workspace to copy (default: $SYNTH_BENCH_WORKSPACE, "
                     "else data/workspaces/default.duckdb, else a fresh one)")
    syn.add_argument("--seed", type=int, default=0, help="item sample seed")
    syn.add_argument("--stub-items", type=int, default=50, help="items of the stub (pipeline-cost) row")
    syn.add_argument("--no-stub", action="store_true", help="skip the stub row")
    syn.add_argument("--show", type=int, default=12, help="queries and flagged replies printed")
    args = ap.parse_args(argv)
    ok = True
    if args.part in ("teacher", "all"):
        levels = [int(x) for x in args.levels.split(",") if x.strip()]
        load_before = _load()
        rows = bench_teacher(levels, args.latency, args.rounds, args.min_calls, args.cache)
        ok = print_teacher_table(rows, args.latency, args.cache)
        print(f"(machine: {os.cpu_count()} cores, load average {load_before:.1f} before, {_load():.1f} after; "
              "other work on the machine takes its share of the cores)")
    if args.part in ("synthesis", "all"):
        print_synthesis_table(bench_synthesis(args), args.gt_mode)
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
