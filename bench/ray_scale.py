"""Benchmark: embedding under the Ray engine vs the in-process engine, on the same cores and the
same reviews, and what that projects to for 1 M and 17 M reviews on N workers.

    python bench/ray_scale.py                       # 1,024 real IMDb reviews, a local Ray on this machine
    python bench/ray_scale.py --n 4096 --ray-address HOST:PORT
    python bench/scale_bench.py --engine ray [...]  # the same (scale_bench dispatches here)

Both engines run ``embed.embed_texts`` (MiniLM int8, blocks of ``--block`` texts, each committed to
a fresh workspace's embedding cache as it finishes): in process with one torch thread per core,
and on Ray with one single-threaded actor per core holding the encoder. Timing is interleaved:
the sample is split into rounds and in each round both engines embed the same slice (alternating
which goes first), so load from other processes hits both alike. Model loading and Ray's start
(cluster, actors) are timed apart and left out of the rates.

Projection: per-worker throughput = Ray's rate / its workers; N workers are projected to scale
linearly, capped by what the one driver can commit (its measured commit rate of vectors into the
workspace). The last line is one JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from crs_core.embed import _write_cache, embed_texts, get_encoder, text_hash, usable_cores  # noqa: E402
from crs_core.engines import EngineError, RayEngine  # noqa: E402
from crs_core.store import Workspace  # noqa: E402

REVIEWS = ROOT / "data" / "bundled" / "imdb_reviews" / "imdb_reviews_catalog.jsonl.gz"
SIZES = {"1M": 1_000_000, "17M": 17_000_000}
WORKERS = (1, 4, 16, 64)


def load_reviews(n: int, seed: int) -> list[str]:
    with gzip.open(REVIEWS, "rt", encoding="utf-8") as fh:
        texts = [json.loads(line)["text"].replace("<br />", "\n") for line in fh if line.strip()]
    pick = np.random.default_rng(seed).choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[i] for i in pick]


def timed_embed(texts: list[str], block: int, engine) -> float:
    """Seconds to embed ``texts`` into a fresh workspace (every text a cache miss)."""
    with tempfile.TemporaryDirectory(prefix="ray-scale-") as tmp, Workspace(Path(tmp) / "ws.duckdb") as ws:
        t0 = time.perf_counter()
        vecs = embed_texts(ws, get_encoder("minilm"), texts, chunk_size=block, engine=engine)
        seconds = time.perf_counter() - t0
        assert vecs.shape == (len(texts), 384)
    return seconds


def driver_commit_rate(block: int, blocks: int = 20) -> float:
    """Vectors per second the driver commits into a workspace's embedding cache, in blocks."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="ray-scale-") as tmp, Workspace(Path(tmp) / "ws.duckdb") as ws:
        t0 = time.perf_counter()
        for b in range(blocks):
            hashes = [text_hash(f"commit-{b}-{i}") for i in range(block)]
            _write_cache(ws, "minilm", hashes, rng.standard_normal((block, 384)).astype(np.float32))
        return blocks * block / (time.perf_counter() - t0)


def projected_hours(rows: int, per_worker: float, workers: int, commit_rate: float) -> float:
    return rows / min(per_worker * workers, commit_rate) / 3600


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="reviews embedded by each engine (default 1024)")
    ap.add_argument("--block", type=int, default=32, help="texts per block (default 32)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds (default 4)")
    ap.add_argument("--workers", type=int, help="Ray workers (default: one per CPU of the cluster)")
    ap.add_argument("--ray-address", help="a running cluster (default: a local Ray on this machine's cores)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    texts = load_reviews(args.n, args.seed)
    warm = load_reviews(args.n + 64, args.seed + 1)[-64:]  # other texts: the warm-up caches nothing timed
    cores = usable_cores()
    print(f"machine: {platform.processor() or platform.machine()}, {cores} usable cores; "
          f"{len(texts)} IMDb reviews, blocks of {args.block}, {args.rounds} interleaved rounds")

    t0 = time.perf_counter()
    get_encoder("minilm")
    local_load = time.perf_counter() - t0
    engine = RayEngine(args.ray_address, workers=args.workers)
    try:
        t0 = time.perf_counter()
        engine.connect()
        ray_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        timed_embed(warm, args.block, engine)  # starts the actors, each loading the encoder
        ray_actors = time.perf_counter() - t0
        workers = engine.running_workers
        timed_embed(warm[:args.block], args.block, None)
        print(f"start: in-process encoder {local_load:.1f} s; Ray {ray_start:.1f} s + {workers} actors "
              f"{ray_actors:.1f} s (not in the rates)")

        rounds = np.array_split(np.arange(len(texts)), max(1, args.rounds))
        local_s = ray_s = 0.0
        for r, idx in enumerate(rounds):
            part = [texts[i] for i in idx]
            order = [("local", None), ("ray", engine)] if r % 2 == 0 else [("ray", engine), ("local", None)]
            for name, eng in order:
                seconds = timed_embed(part, args.block, eng)
                if name == "local":
                    local_s += seconds
                else:
                    ray_s += seconds
            print(f"  round {r + 1}: {len(part)} texts, local {local_s:.1f} s, ray {ray_s:.1f} s (cumulative)")
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.close()

    local_rate, ray_rate = len(texts) / local_s, len(texts) / ray_s
    per_worker = ray_rate / workers
    commit = driver_commit_rate(args.block)
    overhead = ray_s / local_s - 1
    print(f"\nin-process: {local_rate:,.1f} reviews/s   ray ({workers} workers): {ray_rate:,.1f} reviews/s   "
          f"ray / in-process time {ray_s / local_s:.3f} (overhead {overhead:+.1%}; target <= +15%)")
    print(f"per Ray worker (1 core): {per_worker:,.1f} reviews/s; the driver commits {commit:,.0f} vectors/s")
    print("\nprojected wall time (hours), linear in workers, capped by the driver's commit rate:")
    print(f"  {'reviews':>8} | " + " | ".join(f"N={n:>3}" for n in WORKERS))
    table = {}
    for label, rows in SIZES.items():
        hours = {n: projected_hours(rows, per_worker, n, commit) for n in WORKERS}
        table[label] = {str(n): round(h, 2) for n, h in hours.items()}
        print(f"  {label:>8} | " + " | ".join(f"{h:5.1f}" for h in hours.values()))
    print(json.dumps({
        "bench": "ray_scale", "reviews": len(texts), "cores": cores, "ray_workers": workers,
        "local_reviews_per_s": round(local_rate, 2), "ray_reviews_per_s": round(ray_rate, 2),
        "ray_over_local_time": round(ray_s / local_s, 4), "overhead_pct": round(100 * overhead, 1),
        "per_worker_reviews_per_s": round(per_worker, 2), "driver_commit_vectors_per_s": round(commit),
        "projected_hours": table,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
