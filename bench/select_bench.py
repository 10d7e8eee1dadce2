"""Benchmark: fast active selection (crs_core.select) vs the literal reference.

    python bench/select_bench.py                       # full size: N=100,000, d=384, K=50, B=9,000
    python bench/select_bench.py --n 5000 --budget 500  # quick
    python bench/select_bench.py --data real            # the workspace's MiniLM review vectors, tiled

Data (--data): ``random`` (default), N random unit vectors (standard normal rows,
L2-normalised, float32) -- the isotropic worst case for lazy bounds (no cluster
structure to exploit); ``real``, the review embeddings of a workspace (set
review:minilm of data/workspaces/default.duckdb, opened read-only) tiled to N rows:
copy c of review r is row c * n_reviews + r, an exact copy (exact ties resolve to the
lowest index, see crs_core.select).
JS centres: scikit-learn K-means (n_init fixed) on a seeded subsample.
The reference (tests/select_reference.py) recomputes every score from scratch at
every pick; it is timed on a prefix of the budget and extrapolated linearly
(its cost per pick grows slightly with the number selected, so the
extrapolation flatters the reference).  The benchmark asserts nothing.

The machine may be shared: the GEMM rates are calibrated at the start (float64
and float32), and for FISHER the multiply-adds it did are converted to seconds
at those rates ("FISHER work"), a figure that does not depend on how much CPU
time other processes took during the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crs_core.select import kmeans_centers, select  # noqa: E402


def load_reference():
    spec = importlib.util.spec_from_file_location("select_reference", ROOT / "tests" / "select_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed(fn, *args, **kwargs):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="rows (default 100000)")
    ap.add_argument("--d", type=int, default=384, help="dimensions (default 384)")
    ap.add_argument("--budget", type=int, default=9_000, help="picks B (default 9000)")
    ap.add_argument("--k", type=int, default=50, help="K-means centres for JS (default 50)")
    ap.add_argument("--kmeans-sample", type=int, default=20_000, help="rows K-means is fitted on (default 20000)")
    ap.add_argument("--lam", type=float, default=1.0, help="JS lambda (default 1.0)")
    ap.add_argument("--prefix", type=int, default=30, help="picks the reference is timed on (default 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", default="js,fisher", help="comma list of js, fisher (default both)")
    ap.add_argument("--data", choices=["random", "real"], default="random",
                    help="random unit vectors (default) or a workspace's review embeddings tiled to N rows")
    ap.add_argument("--workspace", default=str(ROOT / "data" / "workspaces" / "default.duckdb"),
                    help="with --data real: the workspace (opened read-only)")
    ap.add_argument("--embedding-set", default="review:minilm", help="with --data real (default review:minilm)")
    args = ap.parse_args(argv)
    prefix = min(args.prefix, args.budget)

    ref = load_reference()
    print("Active selection benchmark (crs_core.select)")
    print(f"  machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"load average at start {os.getloadavg()[0]:.1f}  (timings are wall-clock; CPU seconds in brackets)")
    rng = np.random.default_rng(args.seed)
    if args.data == "real":
        from crs_core.embed import load_embedding_set
        from crs_core.store import Workspace

        with Workspace(args.workspace, read_only=True) as ws:
            _, E = load_embedding_set(ws, args.embedding_set)
        E = np.ascontiguousarray(E, dtype=np.float32)
        X = np.tile(E, (-(-args.n // len(E)), 1))[: args.n]
        args.d = X.shape[1]
        print(f"  data: N={args.n:,} rows = the {len(E):,} vectors of {args.embedding_set} in {args.workspace} "
              f"(d={args.d}, norms {np.linalg.norm(E, axis=1).min():.3f}-{np.linalg.norm(E, axis=1).max():.3f}) "
              f"tiled {args.n / len(E):.1f} times (exact copies)")
    else:
        X = rng.standard_normal((args.n, args.d)).astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        print(f"  data: N={args.n:,} random unit vectors in d={args.d} (standard normal rows, L2-normalised, float32), "
              f"seed {args.seed}")
    print(f"  budget B={args.budget:,}; reference timed on the first {prefix} picks and extrapolated linearly to B")

    # calibration: what the BLAS delivers right now (the machine may be shared)
    rates = {}
    for dt in (np.float64, np.float32):
        A = np.ascontiguousarray(X[: min(args.n, 20_000)], dtype=dt)
        W = rng.standard_normal((64, args.d)).astype(dt)
        A @ W.T
        t0 = time.perf_counter()
        for _ in range(5):
            A @ W.T
        rates[dt] = 5 * 2 * A.shape[0] * args.d * 64 / (time.perf_counter() - t0) / 1e9
    gflops, gflops32 = rates[np.float64], rates[np.float32]
    print(f"  calibration: GEMM ({A.shape[0]:,} x {args.d} x 64) runs at {gflops:.0f} GFLOPS in float64, "
          f"{gflops32:.0f} GFLOPS in float32 right now")

    rows = []
    strategies = [s.strip().lower() for s in args.strategies.split(",") if s.strip()]
    for name in strategies:
        if name == "js":
            C, kt, _ = timed(kmeans_centers, X, args.k, args.seed, max_samples=args.kmeans_sample)
            print(f"  JS: K={args.k} centres from K-means on a seeded subsample of "
                  f"{min(args.kmeans_sample, args.n):,} rows ({kt:.1f} s, not included below); lambda={args.lam}")
            fast, fw, fc = timed(select, "JS", X, args.budget, centers=C, lam=args.lam)
            # reference: one-off setup (probabilities, entropies) + per-pick cost
            _, sw, _ = timed(lambda: ref.ref_entropy(ref.ref_probabilities(X, C)))
            (ridx, rsc), rw, _ = timed(ref.ref_select_js, X, C, prefix, lam=args.lam)
            per_pick = max(rw - sw, 1e-9) / prefix
            extrap = sw + per_pick * args.budget
        elif name == "fisher":
            fast, fw, fc = timed(select, "FISHER", X, args.budget)
            (ridx, rsc), rw, _ = timed(ref.ref_select_fisher, X, prefix)
            extrap = rw / prefix * args.budget
        else:
            print(f"unknown strategy {name!r} (use js, fisher)")
            return 2
        same = bool(np.array_equal(fast.indices[:prefix], ridx)) and bool(
            np.allclose(fast.scores[:prefix], rsc, rtol=1e-9, atol=1e-12)
        )
        rows.append((name.upper(), fw, fc, rw, extrap, extrap / fw, same, fast.stats))

    print()
    head = ("strategy", "fast s", "(cpu s)", f"ref {prefix} picks s", f"ref B={args.budget} s (extrap.)", "speed-up", "prefix identical")
    print("{:<9} {:>8} {:>8} {:>16} {:>24} {:>9} {:>17}".format(*head))
    for name, fw, fc, rw, ex, ratio, same in (r[:7] for r in rows):
        print(f"{name:<9} {fw:>8.2f} {fc:>8.2f} {rw:>16.2f} {ex:>24.0f} {ratio:>8.0f}x {'yes' if same else 'NO':>17}")
    print()
    for name, *_, stats in rows:
        print(f"  {name} internals: " + ", ".join(f"{k}={v:,}" for k, v in stats.items()))
        if "bulk_macs" in stats:
            f32 = stats["bulk_macs"] + stats["mid_macs"]
            f64 = stats["exact_rows"] * args.d * args.d + stats["top_row_updates"] * args.d
            t32, t64 = 2 * f32 / gflops32 / 1e9, 2 * f64 / gflops / 1e9
            eager = args.n * args.d * args.budget
            print(f"  FISHER work: float32 GEMMs {f32 / 1e9:,.0f} G multiply-adds (bulk {stats['bulk_macs'] / 1e9:,.0f} G "
                  f"+ mid tier {stats['mid_macs'] / 1e9:,.0f} G) = {t32:.1f} s at the calibrated float32 rate; "
                  f"float64 {f64 / 1e9:,.0f} G (exact rows {stats['exact_rows']:,} x d^2, top tier) = {t64:.1f} s; "
                  f"every row at every pick (N*d*B) is {eager / 1e9:,.0f} G = {2 * eager / gflops32 / 1e9:.1f} s "
                  "in float32")
    print(f"  load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
