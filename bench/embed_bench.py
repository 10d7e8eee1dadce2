"""Benchmark: the studio's MiniLM embedding path vs plain sentence-transformers, same reviews.

    python bench/embed_bench.py                 # N=2,000 real IMDb reviews
    python bench/embed_bench.py --n 500 --fp32  # quicker; also time our exact fp32 path

Reviews: a seeded sample of N from data/bundled/imdb_reviews/*.jsonl.gz (else the shared
/work/shared/data/reviews/imdb_reviews.jsonl.gz), `<br />` replaced by newlines.
Baseline: `SentenceTransformer(minilm_path()).encode(texts, batch_size=32)` (it already sorts
by length). Ours: `crs_core.embed.get_encoder("minilm").encode(texts, batch_size=32)`.

Timing is interleaved: the sample is split into rounds, and in each round both paths encode
the same slice (alternating which goes first), so load from other processes on a shared
machine hits both alike. Model loading is timed separately and excluded from the rates.
Agreement: cosine of our vectors with the baseline's (mean / min). Asserts nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from crs_core.embed import get_encoder  # noqa: E402
from crs_core.models import minilm_path  # noqa: E402

SHARED = Path("/work/shared/data/reviews/imdb_reviews.jsonl.gz")


def review_file(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    bundled = sorted((ROOT / "data" / "bundled" / "imdb_reviews").glob("*.jsonl.gz"))
    if bundled:
        return bundled[0]
    if SHARED.exists():
        return SHARED
    sys.exit("no review file: pass --reviews PATH (JSON lines with a `text` field)")


def load_reviews(path: Path, n: int, seed: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        texts = [json.loads(line)["text"].replace("<br />", "\n") for line in fh if line.strip()]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[i] for i in pick]


def cos_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    c = np.sum(a * b, axis=1)
    return float(c.mean()), float(c.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="number of reviews (default 2000)")
    ap.add_argument("--reviews", help="JSON-lines review file (.jsonl or .jsonl.gz)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32", action="store_true", help="also time our exact fp32 path (minilm-fp32)")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    path = review_file(args.reviews)
    texts = load_reviews(path, args.n, args.seed)
    words = np.array([len(t.split()) for t in texts])
    print(f"reviews: {len(texts):,} from {path} (words: median {np.median(words):.0f}, mean {words.mean():.0f})")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    t0 = time.perf_counter()
    st = SentenceTransformer(str(minilm_path()), device="cpu")
    t_st_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = get_encoder("minilm")
    t_our_load = time.perf_counter() - t0
    contenders = {"sentence-transformers": lambda x: st.encode(x, batch_size=args.batch_size),
                  ours.name: lambda x: ours.encode(x, batch_size=args.batch_size)}
    if args.fp32:
        fp32 = get_encoder("minilm-fp32")
        contenders[fp32.name] = lambda x: fp32.encode(x, batch_size=args.batch_size)
    print(f"load: sentence-transformers {t_st_load:.1f} s, ours {t_our_load:.1f} s "
          f"(int8={getattr(ours, 'quantized', False)}, incl. calibration), workers={getattr(ours, 'workers', '?')}")

    warm = texts[:16]
    for fn in contenders.values():
        fn(warm)

    names = list(contenders)
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    vecs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    bounds = np.linspace(0, len(texts), args.rounds + 1).astype(int)
    for r in range(args.rounds):
        part = texts[bounds[r]:bounds[r + 1]]
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            out = np.asarray(contenders[name](part), dtype=np.float32)
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
            vecs[name].append(out)
        done = bounds[r + 1]
        print(f"  round {r + 1}/{args.rounds}: {done:,} reviews; " + ", ".join(
            f"{name} {done / wall[name]:.1f}/s" for name in names), flush=True)

    base = np.vstack(vecs[names[0]])
    print()
    print(f"{'path':24s} {'reviews/s':>10s} {'CPU s/100':>10s} {'cos mean':>9s} {'cos min':>9s}")
    for name in names:
        m = np.vstack(vecs[name])
        mean, low = cos_stats(m, base)
        print(f"{name:24s} {len(texts) / wall[name]:10.1f} {100 * cpu[name] / len(texts):10.2f} "
              f"{mean:9.4f} {low:9.4f}")
    ratio = wall[names[0]] / wall[ours.name]
    print(f"\nspeed-up of `{ours.name}` over sentence-transformers: {ratio:.2f}x (goal >= 1.5x); "
          f"cosine agreement mean {cos_stats(np.vstack(vecs[ours.name]), base)[0]:.4f}, "
          f"min {cos_stats(np.vstack(vecs[ours.name]), base)[1]:.4f}")
    if args.fp32:
        print(f"speed-up of minilm-fp32 (exact): {wall[names[0]] / wall['minilm-fp32']:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
