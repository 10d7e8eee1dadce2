"""Scale benchmark: one machine, a 1 M-review catalogue, step by step, against the bundled size.

    python bench/scale_bench.py                          # 1,000,000 rows vs the bundled 16,740
    python bench/scale_bench.py --rows 200000            # quicker
    python bench/scale_bench.py --rows 1000000 --json bench/out/scale.json
    python bench/scale_bench.py --engine ray [...]       # embedding throughput under Ray (bench/ray_scale.py)

Every step runs twice, at ``--base-rows`` (default: all 16,740 bundled reviews) and at ``--rows``,
each size in its own temporary workspace (never data/workspaces/default.duckdb), through the
crs_core function the studio itself calls:

ingest      ``ingest.ingest_file`` of a reviews file (IMDb review JSONL) into a workspace that holds
            the bundled catalogue. The file is the bundled IMDb reviews TILED: copy c of review r
            is review ``<id>~c<c>`` with `` (copy c)`` appended to its text for c >= 1, so ids AND
            texts are distinct (identical texts would share one cached vector, which would hide
            the cost of storing a million of them). Real text, repeated: not a new corpus.
vectors     ``embed.build_embedding_set`` over every review (``pipeline.review_texts``) with a
            RANDOM encoder: a seeded standard-normal vector per text, L2-normalised, d=384. No
            model runs (its throughput is bench/embed_bench.py's subject); the hashing, the
            cache writes and the set's rows are the real path.
cluster     ``cluster.run_kmeans`` (k=20), which the Map colours by. The 2-D map itself is not
            UMAP here (its transform of a million points is a separate cost); the bench stores,
            outside the timings, the first two coordinates of each random vector as its position.
select      ``selections.run_selection("JS", B)`` from the stored vectors (K-means centres,
            the exact greedy JS, the summary, the stored picks).
map         what pages/map.py asks crs_core for: embedding sets, clusterings, selections,
            ``views.map_points`` with the page's cap (a fixed sample past ``views.MAP_MAX_POINTS``),
            the clusters' top terms, the selection overlay (``views.selection_picks``) and the
            cluster sizes.
map_all     the same with every point, as the page drew it before it sampled: the fix's baseline.
seeds       what pages/seeds.py asks for: counts, genres, the items table's first page, the rating
            range, clusterings, and the reviews table's first and 10th pages with their match
            count (``views.reviews_page``), unfiltered and with a text search.
export      ``synth.export_synthetic`` of the selection's synthetic queries (chat JSONL). No
            teacher is run: before the timer, one query per distinct item of the first
            ``--export-queries`` picks is stored by SQL (its text the first 200 characters of the
            picked review, its ground truth that item), the same number at both sizes.

Time is wall-clock, with the CPU seconds of the step's process (all its threads, DuckDB's
included) beside it: on a shared machine CPU time moves less with the load. Peak memory is the peak resident set size (VmHWM of /proc/self/status) of a
fresh child process that runs only that step: a process's high-water mark never goes down, so
steps measured in one process would hide each other's peaks, and tracemalloc does not see
DuckDB's own allocations (its buffer manager is C++). "over imports" subtracts the child's peak after its
imports, before the step. A step is flagged superlinear when its wall time, CPU time or memory
over imports grew more than 1.5x faster than the rows did. The benchmark asserts nothing; it ends
with one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUNDLED_REVIEWS = ROOT / "data" / "bundled" / "imdb_reviews" / "imdb_reviews_catalog.jsonl.gz"
SET_ID = "review:random384"
DIM = 384
K = 20
STEPS = ("ingest", "vectors", "cluster", "select", "map", "map_all", "seeds", "export")
SUPERLINEAR = 1.5  # a step whose big/base ratio exceeds this many times the row ratio is flagged


# ============================================================================ the random encoder
class RandomUnitEncoder:
    """Texts -> seeded random unit vectors (standard normal rows, L2-normalised), d=384. Stands in
    for the sentence encoder only where the model's cost is not the subject (see the docstring)."""

    name = "random384"
    dim = DIM

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)

    def encode(self, texts, batch_size: int = 32, progress=None) -> np.ndarray:
        X = self._rng.standard_normal((len(texts), self.dim)).astype(np.float32)
        return X / np.linalg.norm(X, axis=1, keepdims=True)


# ============================================================================ the data
def bundled_reviews() -> list[dict]:
    with gzip.open(BUNDLED_REVIEWS, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_tiled_reviews(path: Path, rows: int, reviews: list[dict]) -> None:
    """``rows`` reviews: the bundled ones in order, again and again, with distinct ids and texts."""
    with open(path, "w", encoding="utf-8") as fh:
        for n in range(rows):
            copy, r = divmod(n, len(reviews))
            rec = reviews[r]
            if copy:
                rec = {**rec, "review_id": f"{rec['review_id']}~c{copy}", "text": f"{rec['text']} (copy {copy})"}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def catalogue_template(path: Path) -> None:
    """A workspace with the bundled catalogue (items, interactions, tags, turns) and no reviews."""
    from crs_core.ingest import ingest_default
    from crs_core.store import Workspace

    with Workspace(path) as ws:
        ingest_default(ws)
        with ws.transaction() as cur:
            cur.execute("DELETE FROM reviews")
    with Workspace(path) as ws:  # a checkpoint, so copies of the file carry no WAL
        ws.cursor().execute("CHECKPOINT")


# ============================================================================ the steps (child side)
def _peak_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent through fork and exec, so every child would start at the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_ingest(ws, ctx: dict) -> dict:
    from crs_core.ingest import ingest_file

    rep = ingest_file(ws, ctx["reviews_file"], "reviews")
    return {"reviews": rep.counts.get("reviews_added")}


def step_vectors(ws, ctx: dict) -> dict:
    from crs_core.embed import build_embedding_set
    from crs_core.pipeline import review_texts

    ids, texts = review_texts(ws)
    build_embedding_set(ws, "review", ids, texts, RandomUnitEncoder(ctx["seed"]))
    return {"vectors": len(ids)}


def step_cluster(ws, ctx: dict) -> dict:
    from crs_core.cluster import run_kmeans

    return {"clustering": run_kmeans(ws, SET_ID, K, ctx["seed"])}


def step_select(ws, ctx: dict) -> dict:
    from crs_core.selections import run_selection

    sel = run_selection(ws, "JS", ctx["budget"], unit="review", set_id=SET_ID, k=K, seed=ctx["seed"],
                        name="scale bench")
    return {"selection": sel, "picks": int(ws.scalar("SELECT count(*) FROM selection_picks WHERE selection_id = ?",
                                                    [sel]))}


def step_map(ws, ctx: dict, max_points="page") -> dict:
    from crs_core import views

    sets = views.embedding_sets(ws)
    n_mapped = int(sets.set_index("set_id").loc[SET_ID, "n_projected"])
    clustering = views.clusterings(ws, SET_ID)["clustering_id"].iloc[0]
    selection = views.selections(ws)["selection_id"].iloc[0]
    cap = views.MAP_MAX_POINTS if max_points == "page" else max_points
    points = views.map_points(ws, SET_ID, clustering, 160 if n_mapped <= 20_000 else 80, cap)
    terms = views.cluster_top_terms(ws, clustering, 8, 3000)
    views.cluster_hover_lines(terms)
    picks = views.selection_picks(ws, selection, clustering)
    sizes = views.cluster_sizes(ws, clustering)
    views.cluster_table(sizes, terms)
    return {"mapped": n_mapped, "points_drawn": len(points), "picks_drawn": int(picks["x"].notna().sum())}


def step_map_every_point(ws, ctx: dict) -> dict:
    """The map as the page drew it before it sampled: every point (the baseline of the fix)."""
    return step_map(ws, ctx, max_points=None)


def step_seeds(ws, ctx: dict) -> dict:
    from crs_core import views

    views.counts(ws)
    views.genres(ws)
    views.items_page(ws, "", (), False, 0, 500)
    views.rating_range(ws)
    views.clusterings(ws)
    matches = {}
    for search in ("", "soundtrack"):
        for page in (0, 9):  # the first page and a deep one: OFFSET must not read every row into Python
            shown = views.reviews_page(ws, search, (), None, None, (), page, 500, 300)
        matches[f"{search or 'all'}_matches"] = shown.total
    return matches


def step_export(ws, ctx: dict) -> dict:
    from crs_core.synth import export_synthetic

    info = export_synthetic(ws, ctx["export_path"], shape="chat", statuses="all", selection_id=ctx["selection"])
    return {"exported": info["rows"]}


def store_export_queries(ws, selection: str, n_picks: int) -> int:
    """One synthetic query per distinct item of the selection's first picks (SQL; no teacher)."""
    with ws.transaction() as cur:
        cur.execute("DELETE FROM ground_truth WHERE query_id LIKE 'scale-%'")
        cur.execute("DELETE FROM synthetic_queries WHERE query_id LIKE 'scale-%'")
        cur.execute(
            "INSERT INTO synthetic_queries (query_id, selection_id, item_id, query, gt_mode, status) "
            "SELECT 'scale-' || min(p.rank), ?, r.item_id, left(arg_min(r.text, p.rank), 200), 'bench', 'approved' "
            "FROM selection_picks p JOIN reviews r ON r.review_id = p.unit_id "
            "WHERE p.selection_id = ? AND p.rank <= ? GROUP BY r.item_id", [selection, selection, int(n_picks)])
        cur.execute(
            "INSERT INTO ground_truth (query_id, rank, title_raw, item_id, match_score, flagged) "
            "SELECT q.query_id, 1, i.title, q.item_id, 1.0, FALSE FROM synthetic_queries q "
            "JOIN items i ON i.item_id = q.item_id WHERE q.query_id LIKE 'scale-%'")
    return int(ws.scalar("SELECT count(*) FROM synthetic_queries WHERE query_id LIKE 'scale-%'"))


STEP_FUNCTIONS = {"ingest": step_ingest, "vectors": step_vectors, "cluster": step_cluster, "select": step_select,
                  "map": step_map, "map_all": step_map_every_point, "seeds": step_seeds, "export": step_export}


def run_child(step: str, workspace: str, ctx: dict) -> None:
    """The child process: imports, then one step timed; prints one JSON line."""
    import crs_core.embed  # noqa: F401  (the imports every step pays, before the baseline)
    import crs_core.ingest  # noqa: F401
    import crs_core.selections  # noqa: F401
    import crs_core.synth  # noqa: F401
    import crs_core.views  # noqa: F401
    from crs_core.store import Workspace

    with Workspace(workspace) as ws:
        if step == "export":
            ctx["selection"] = ws.scalar("SELECT selection_id FROM selections ORDER BY created_at DESC LIMIT 1")
            ctx["queries"] = store_export_queries(ws, ctx["selection"], ctx["export_queries"])
        base_mb = _peak_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        out = STEP_FUNCTIONS[step](ws, ctx)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if step == "cluster":  # the map's positions, outside the timing (see the docstring)
            from crs_core.cluster import store_projection
            from crs_core.embed import load_embedding_set

            ids, X = load_embedding_set(ws, SET_ID)
            store_projection(ws, SET_ID, ids, X[:, :2] * 10)
    print("RESULT " + json.dumps({"step": step, "seconds": seconds, "cpu_s": cpu, "peak_mb": _peak_mb(),
                                  "imports_mb": base_mb, "info": out}, default=str), flush=True)


# ============================================================================ the parent
def measure(step: str, workspace: Path, ctx: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-step", step, "--child-workspace", str(workspace),
           "--child-context", json.dumps(ctx)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"error: step {step} failed at {workspace.name}: {tail[0]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_size(rows: int, reviews: list[dict], template: Path, tmp: Path, args) -> dict[str, dict]:
    folder = tmp / f"rows-{rows}"
    folder.mkdir()
    workspace = folder / "scale.duckdb"
    shutil.copyfile(template, workspace)
    reviews_file = folder / "reviews.jsonl"
    write_tiled_reviews(reviews_file, rows, reviews)
    ctx = {"reviews_file": str(reviews_file), "seed": args.seed, "budget": args.budget,
           "export_path": str(folder / "export.jsonl"), "export_queries": args.export_queries}
    out = {}
    for step in STEPS:
        out[step] = measure(step, workspace, ctx)
        r = out[step]
        print(f"  {rows:>9,} rows  {step:<8} {r['seconds']:>8.2f} s ({r['cpu_s']:.2f} s CPU)  peak {r['peak_mb']:>7,.0f} MB "
              f"({r['peak_mb'] - r['imports_mb']:>6,.0f} over imports)  {json.dumps(r['info'])}", flush=True)
        if step == "ingest":
            reviews_file.unlink()  # hundreds of MB at 1 M rows; the workspace holds them now
    out["workspace_mb"] = workspace.stat().st_size / 2**20
    shutil.rmtree(folder, ignore_errors=True)
    return out


def dispatch_ray(argv: list[str]) -> int:
    path = Path(__file__).resolve().parent / "ray_scale.py"
    if not path.exists():
        print(f"error: --engine ray needs {path.relative_to(ROOT)}, which is not there yet", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("ray_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--engine", choices=["local", "ray"], default="local")
    known, rest = engine.parse_known_args(argv)
    if known.engine == "ray":
        return dispatch_ray(rest)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local (this benchmark) or ray (bench/ray_scale.py: embedding throughput under Ray)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="review rows of the big run (default 1000000)")
    ap.add_argument("--base-rows", type=int, default=None, help="rows of the base run (default: the bundled count)")
    ap.add_argument("--budget", type=int, default=10_000, help="JS selection budget B (default 10000)")
    ap.add_argument("--export-queries", type=int, default=2_000,
                    help="picks whose items get a synthetic query for the export step (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--child-step", help=argparse.SUPPRESS)
    ap.add_argument("--child-workspace", help=argparse.SUPPRESS)
    ap.add_argument("--child-context", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_step:
        run_child(args.child_step, args.child_workspace, json.loads(args.child_context))
        return 0

    reviews = bundled_reviews()
    base_rows = args.base_rows or len(reviews)
    if not 0 < base_rows < args.rows:
        print(f"error: --base-rows ({base_rows:,}) must be between 1 and --rows ({args.rows:,})", file=sys.stderr)
        return 2
    if args.budget >= base_rows:
        print(f"error: --budget ({args.budget:,}) must be below the base rows ({base_rows:,})", file=sys.stderr)
        return 2
    row_ratio = args.rows / base_rows
    print("Scale benchmark (bench/scale_bench.py)")
    print(f"  machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print(f"  rows: base {base_rows:,}, big {args.rows:,} (x{row_ratio:.1f}): the {len(reviews):,} bundled IMDb "
          f"reviews tiled with distinct ids and texts; vectors random unit d={DIM}; JS B={args.budget:,}, k={K}")
    tmp = Path(tempfile.mkdtemp(prefix="crs-scale-bench-"))
    try:
        template = tmp / "catalogue.duckdb"
        t0 = time.perf_counter()
        catalogue_template(template)
        print(f"  catalogue workspace (ingest_default, reviews removed): {time.perf_counter() - t0:.1f} s, "
              "not counted", flush=True)
        base = run_size(base_rows, reviews, template, tmp, args)
        big = run_size(args.rows, reviews, template, tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'step':<8} {'base s':>8} {'big s':>8} {'time x':>7} {'CPU x':>6} {'base MB':>8} {'big MB':>8} {'mem x':>6}  "
          f"(rows x{row_ratio:.1f}; memory = peak RSS over imports)")
    steps, flagged = {}, []
    for step in STEPS:
        b, g = base[step], big[step]
        tx = g["seconds"] / max(b["seconds"], 1e-9)
        cx = g["cpu_s"] / max(b["cpu_s"], 1e-2)
        bm, gm = max(b["peak_mb"] - b["imports_mb"], 1.0), max(g["peak_mb"] - g["imports_mb"], 1.0)
        mx = gm / bm
        notes = [what for what, ratio in (("time", tx), ("CPU", cx), ("memory", mx)) if ratio > SUPERLINEAR * row_ratio]
        flagged += [f"{step} {n}" for n in notes]
        print(f"{step:<8} {b['seconds']:>8.2f} {g['seconds']:>8.2f} {tx:>7.1f} {cx:>6.1f} {bm:>8,.0f} {gm:>8,.0f} {mx:>6.1f}  "
              + (f"SUPERLINEAR ({', '.join(notes)})" if notes else ""))
        steps[step] = {"base_s": round(b["seconds"], 3), "big_s": round(g["seconds"], 3), "time_ratio": round(tx, 2),
                       "base_cpu_s": round(b["cpu_s"], 3), "big_cpu_s": round(g["cpu_s"], 3), "cpu_ratio": round(cx, 2),
                       "base_peak_mb": round(b["peak_mb"]), "big_peak_mb": round(g["peak_mb"]),
                       "base_over_imports_mb": round(bm), "big_over_imports_mb": round(gm),
                       "memory_ratio": round(mx, 2), "base_info": b["info"], "big_info": g["info"]}
    print(f"  workspace file: {base['workspace_mb']:,.0f} MB at base, {big['workspace_mb']:,.0f} MB big")
    print(f"  load average at end {os.getloadavg()[0]:.1f}")
    headline = {"bench": "scale", "rows": args.rows, "base_rows": base_rows, "row_ratio": round(row_ratio, 2),
                "budget": args.budget, "superlinear": flagged,
                **{f"{s}_s": steps[s]["big_s"] for s in STEPS},
                **{f"{s}_time_ratio": steps[s]["time_ratio"] for s in STEPS},
                **{f"{s}_cpu_ratio": steps[s]["cpu_ratio"] for s in STEPS},
                "peak_mb": max(steps[s]["big_peak_mb"] for s in STEPS)}
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"headline": headline, "steps": steps,
                                   "workspace_mb": {"base": base["workspace_mb"], "big": big["workspace_mb"]}},
                                  indent=2, default=str))
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
