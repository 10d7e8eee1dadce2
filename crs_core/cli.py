"""`python -m crs_core`: the studio's steps without the UI, for scripts and schedulers.

Every subcommand opens the workspace (--workspace, else $CRS_WORKSPACE, else
data/workspaces/default.duckdb), does one step with a progress bar, prints a short report,
and exits non-zero with a one-line reason on failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .errors import CRSError
from .progress import TqdmProgress
from .store import ENV_WORKSPACE, Workspace, workspace_path

EPILOG = """examples:
  python -m crs_core init                      build the default workspace from data/bundled
  python -m crs_core status                    what is done, with counts
  python -m crs_core ingest my_reviews.jsonl   add your own reviews (format detected)
  python -m crs_core ingest meta_Movies.jsonl --kind items
  python -m crs_core embed --unit item         embed catalog items too
  python -m crs_core cluster --k 30            re-cluster the review embeddings
"""

_COMMANDS: dict[str, Callable[[Workspace, argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        _COMMANDS[name] = fn
        return fn
    return register


def _bars() -> Callable[[str], TqdmProgress]:
    return lambda label: TqdmProgress(label)


@command("init")
def _init(ws: Workspace, args: argparse.Namespace) -> int:
    from .ingest import ingest_summary
    from .pipeline import init_default

    bars: list[TqdmProgress] = []

    def progress_for(label: str) -> TqdmProgress:
        bars.append(TqdmProgress(label))
        return bars[-1]

    try:
        done = init_default(ws, progress_for, k=args.k, seed=args.seed)
    finally:
        for bar in bars:
            bar.close()
    print("built: " + (", ".join(done) if done else "nothing (everything was already there)"))
    for key, value in ingest_summary(ws).items():
        print(f"  {key}: {value}")
    return 0


@command("status")
def _status(ws: Workspace, args: argparse.Namespace) -> int:
    from .pipeline import pipeline_status

    print(f"workspace: {ws.path}")
    for step in pipeline_status(ws):
        mark = "done" if step.done else "todo"
        hint = "" if step.done else f"   -> {step.hint}"
        print(f"  [{mark}] {step.title:<22} {step.detail}{hint}")
    return 0


@command("ingest")
def _ingest(ws: Workspace, args: argparse.Namespace) -> int:
    from .ingest import ingest_default, ingest_file

    if args.default:
        with TqdmProgress("Ingesting bundled data") as bar:
            rep = ingest_default(ws, progress=bar)
    elif args.path:
        rep = ingest_file(ws, args.path, args.kind, fmt=args.format, skip_bad=args.skip_bad,
                          dataset=args.dataset)
    else:
        raise CRSError("give a file to ingest, or --default for the bundled data")
    print("\n".join(rep.lines()))
    return 0


@command("embed")
def _embed(ws: Workspace, args: argparse.Namespace) -> int:
    from .embed import build_embedding_set, get_encoder
    from .catalog import item_text

    if args.unit == "review":
        frame = ws.df("SELECT review_id AS id, text FROM reviews ORDER BY review_id")
        ids, texts = frame["id"].tolist(), frame["text"].tolist()
    else:
        frame = ws.df("SELECT * FROM items ORDER BY item_id")
        ids, texts = frame["item_id"].tolist(), [item_text(r) for r in frame.to_dict("records")]
    if not ids:
        raise CRSError(f"no {args.unit}s in the workspace; run `python -m crs_core init` first")
    with TqdmProgress(f"Embedding {args.unit}s", unit=args.unit) as bar:
        set_id = build_embedding_set(ws, args.unit, ids, texts, get_encoder(args.model), progress=bar)
    print(f"embedding set {set_id}: {len(ids):,} vectors")
    return 0


@command("cluster")
def _cluster(ws: Workspace, args: argparse.Namespace) -> int:
    from .cluster import run_kmeans, run_projection

    clustering_id = run_kmeans(ws, args.set, k=args.k, seed=args.seed)
    print(f"clustering {clustering_id} stored")
    if not args.no_map:
        with TqdmProgress("Projecting to 2-D (UMAP)") as bar:
            run_projection(ws, args.set, seed=args.seed, progress=bar)
        print(f"2-D map of {args.set} stored")
    return 0


@command("select")
def _select(ws: Workspace, args: argparse.Namespace) -> int:
    from .selections import list_selections, run_selection, selection_info

    if args.list:
        frame = list_selections(ws)
        print(frame[["selection_id", "name", "strategy", "unit", "budget", "created_at"]].to_string(index=False)
              if len(frame) else "no selections yet")
        return 0
    weights = tuple(args.weights) if args.weights else None
    with TqdmProgress(f"Selecting ({args.strategy})", unit="pick") as bar:
        selection_id = run_selection(ws, args.strategy, args.budget, unit=args.unit, set_id=args.set, k=args.k,
                                     lam=args.lam, seed=args.seed, weights=weights, name=args.name,
                                     parent_id=args.continue_from, progress=bar)
    info = selection_info(ws, selection_id)
    print(f"selection {selection_id}: {info['budget']:,} {info['unit']}s by {info['strategy']}")
    for key, value in info["summary"].items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crs_core", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )
    parser.add_argument("--workspace", metavar="PATH",
                        help=f"workspace DuckDB file (default: ${ENV_WORKSPACE} or {workspace_path()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init", help="build the default workspace (ingest, embed, cluster, map); reuses what exists")
    p.add_argument("--k", type=int, default=20, help="number of K-means clusters (default 20)")
    p.add_argument("--seed", type=int, default=0)

    sub.add_parser("status", help="pipeline steps done / pending, with counts")

    p = sub.add_parser("ingest", help="add a file in a supported format (reviews, items, interactions, tags, dialogues)")
    p.add_argument("path", nargs="?", help="the file (JSONL, JSON, CSV, TSV; .gz allowed)")
    p.add_argument("--default", action="store_true", help="re-ingest the bundled default data")
    p.add_argument("--kind", choices=["reviews", "items", "interactions", "tags", "dialogues"],
                   help="what the file holds (default: detected)")
    p.add_argument("--format", help="force a format instead of detecting it")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed rows and rows of unknown items, and report them, instead of failing")
    p.add_argument("--dataset", help="name for a dialogue file's turns (default: the file name)")

    p = sub.add_parser("embed", help="embed reviews or items (cached per model and text; resumable)")
    p.add_argument("--unit", choices=["review", "item"], default="review")
    p.add_argument("--model", choices=["minilm", "smollm2-mean"], default="minilm",
                   help="minilm: sentence model (default); smollm2-mean: the student LM's mean last hidden state")

    p = sub.add_parser("cluster", help="K-means clusters and the 2-D UMAP map of an embedding set")
    p.add_argument("--set", default="review:minilm", help="embedding set id (default review:minilm)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-map", action="store_true", help="skip the UMAP projection")

    from .select import STRATEGIES

    p = sub.add_parser("select", help="active selection of seeds under a budget (random, JS, Fisher, variants)")
    p.add_argument("--strategy", type=str.upper, choices=STRATEGIES, default="JS")
    p.add_argument("--budget", "-B", type=int, default=500, help="number of picks (default 500)")
    p.add_argument("--unit", choices=["review", "item"], default="review",
                   help="pick reviews, or items (mean of their review embeddings)")
    p.add_argument("--set", default="review:minilm", help="review embedding set (default review:minilm)")
    p.add_argument("--k", type=int, default=20, help="K-means clusters for JS (default 20)")
    p.add_argument("--lam", type=float, default=1.0, help="JS weight lambda >= 0 (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", type=float, nargs=3, metavar=("W_REVIEW", "W_META", "W_USER"),
                   help="block weights of the METADATA_/USER_ variants (default 1 1 1)")
    p.add_argument("--name", help="a label for the selection")
    p.add_argument("--continue-from", metavar="SELECTION_ID",
                   help="continue an earlier selection by another round (Algorithm 1)")
    p.add_argument("--list", action="store_true", help="list stored selections and exit")

    for register in _EXTENSIONS:
        register(sub)
    return parser


# Later steps (selection, synthesis, training, evaluation, augmentation) add their subcommands here.
_EXTENSIONS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with Workspace(workspace_path(args.workspace)) as ws:
            return _COMMANDS[args.command](ws, args)
    except CRSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished work is kept (rerun to resume)", file=sys.stderr)
        return 130


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))
