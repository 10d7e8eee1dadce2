"""`python -m crs_core`: the studio's steps without the UI, for scripts and schedulers.

Every subcommand opens the workspace (--workspace, else $CRS_WORKSPACE, else
data/workspaces/default.duckdb), does one step with a progress bar, prints a short report,
and exits non-zero with a one-line reason on failure.
"""

from __future__ import annotations

import argparse
import json
import os
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
        done = init_default(ws, progress_for, k=args.k, seed=args.seed, note=lambda line: print(line, flush=True))
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


def _engine(args: argparse.Namespace):
    """The engine the step runs on, joined now: a cluster that does not answer stops the command
    before it starts anything."""
    from .engines import get_engine

    if args.ray_address and args.engine != "ray":
        raise CRSError("--ray-address is for --engine ray")
    engine = get_engine(args.engine, args.ray_address)
    if engine.name != "local":
        engine.connect()
    return engine


def engine_options(p: argparse.ArgumentParser) -> None:
    from .engines import DEFAULT_ENGINE, ENGINES, ENV_RAY_ADDRESS

    g = p.add_argument_group("engine (where the work runs; this process stores the results either way)")
    g.add_argument("--engine", choices=list(ENGINES), default=DEFAULT_ENGINE,
                   help="; ".join(f"{k}: {v}" for k, v in ENGINES.items()))
    g.add_argument("--ray-address", metavar="HOST:PORT",
                   help=f"a running Ray cluster (`ray start --head` prints it; default ${ENV_RAY_ADDRESS}, "
                        "else a local Ray starts)")


@command("embed")
def _embed(ws: Workspace, args: argparse.Namespace) -> int:
    from .embed import build_embedding_set, get_encoder
    from .catalog import item_text

    engine = _engine(args)

    if args.unit == "review":
        frame = ws.df("SELECT review_id AS id, text FROM reviews ORDER BY review_id")
        ids, texts = frame["id"].tolist(), frame["text"].tolist()
    else:
        frame = ws.df("SELECT * FROM items ORDER BY item_id")
        ids, texts = frame["item_id"].tolist(), [item_text(r) for r in frame.to_dict("records")]
    if not ids:
        raise CRSError(f"no {args.unit}s in the workspace; run `python -m crs_core init` first")
    with TqdmProgress(f"Embedding {args.unit}s", unit=args.unit) as bar:
        set_id = build_embedding_set(ws, args.unit, ids, texts, get_encoder(args.model), progress=bar,
                                     engine=engine)
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


def _teacher(ws: Workspace, args: argparse.Namespace):
    from .teacher import Budget, Teacher, TeacherConfig

    budget = Budget(max_calls=args.max_calls, max_tokens=args.max_tokens, max_cost=args.max_cost)
    if args.provider:
        config = TeacherConfig(provider=args.provider, base_url=args.base_url, model=args.model or "",
                               temperature=args.temperature)
    elif args.base_url:
        config = TeacherConfig.openai(args.base_url, args.model or "gpt-4o", temperature=args.temperature)
    else:
        config = TeacherConfig.from_env(temperature=args.temperature)
    return Teacher(config, cache=ws, budget=budget)


@command("synth")
def _synth(ws: Workspace, args: argparse.Namespace) -> int:
    from .synth import run_synthesis

    engine = _engine(args)
    with _teacher(ws, args) as teacher:
        if teacher.interrupted_calls():
            print(f"warning: {teacher.interrupted_calls()} teacher request(s) were in flight when an earlier run on "
                  "this workspace was killed; those this run needs are sent again, and an endpoint may bill them "
                  "twice", file=sys.stderr, flush=True)
        with TqdmProgress("Synthesizing", unit="query") as bar:
            report = run_synthesis(ws, args.selection, teacher, k_queries=args.k_queries, gt_mode=args.gt_mode,
                                   items_limit=args.items, seed=args.seed, progress=bar, engine=engine)
    print("\n".join(report.lines()), flush=True)
    if not report.complete:
        print(f"error: {report.reason()}", file=sys.stderr)
        return 1
    return 0


@command("export")
def _export(ws: Workspace, args: argparse.Namespace) -> int:
    from .synth import export_synthetic

    statuses = None if args.status == "all" else (args.status,)
    info = export_synthetic(ws, args.path, shape=args.shape, fmt=args.format, statuses=statuses)
    print_json(info)
    return 0


@command("augment")
def _augment(ws: Workspace, args: argparse.Namespace) -> int:
    from .augment import run_cli

    return run_cli(ws, args)


@command("eval")
def _eval(ws: Workspace, args: argparse.Namespace) -> int:
    from . import model_eval
    from .recommenders import RECOMMENDERS, make_recommender, training_set_from_synthetic, training_set_from_turns

    if args.engine != "local" and args.model != "lm":
        raise CRSError(f"--engine {args.engine} runs the generative evaluation (--model lm); "
                       f"{args.model} evaluates in this process")
    if args.model == "lm" and args.engine != "local":
        engine = _engine(args)
        with TqdmProgress(f"Generating with {args.lm} ({args.engine})", unit="turn") as bar:
            run_id = model_eval.evaluate_lm(ws, args.lm, args.dataset, engine=engine, seed=args.seed, progress=bar,
                                            turn_sample="auto" if args.turn_sample is None else args.turn_sample)
        _print_run(model_eval.run_results(ws, run_id), run_id)
        return 0
    if args.model == "lm":
        sample = "auto" if args.turn_sample is None else args.turn_sample
        job_id = model_eval.launch_lm_eval(ws, args.lm, args.dataset, turn_sample=sample, seed=args.seed)
        print(f"generation job {job_id} started ({args.lm})")
        if args.no_wait:
            print("not waiting; `python -m crs_core jobs` imports the run when the job has finished")
            return 0
        with TqdmProgress(f"Generating with {args.lm}", unit="turn") as bar:
            run_id = model_eval.wait_for_lm_eval(ws, job_id, progress=bar)
        _print_run(model_eval.run_results(ws, run_id), run_id)
        return 0
    if args.model == "dense" and args.retriever:
        recommender, ref = model_eval.dense_retriever(ws, args.retriever, args.dataset)
        meta = ref.run_meta(ref.label, recommender="dense", retriever=args.retriever,
                            encoder=recommender.encoder.name)
    else:
        extra = {}
        if args.model == "hybrid" and args.retriever:  # the hybrid's dense part: a fine-tuned retriever
            from .model_kinds import RETRIEVER

            extra["encoder"] = RETRIEVER.load(model_eval.resolve_model(ws, args.retriever, RETRIEVER.kind).model_dir)
        recommender = make_recommender(args.model, ws, **extra)
        if RECOMMENDERS[args.model].fits_on_dialogues:
            train = (training_set_from_synthetic(ws, statuses=tuple(args.statuses)) if args.train == "synthetic"
                     else training_set_from_turns(ws, args.train))
            recommender.fit(train)
        meta = {"model": recommender.name, "training_data": args.train, "config": {"recommender": args.model}}
    run_id, results = model_eval.evaluate_and_store(
        ws, recommender, args.dataset, meta, turn_sample=args.turn_sample, seed=args.seed,
        progress_for=lambda label: TqdmProgress(label, unit="turn"))
    _print_run(model_eval.run_results(ws, run_id), run_id)
    return 0


def _print_run(results: dict, run_id: str) -> None:
    for dataset, metrics in results.items():
        n = next(iter(metrics.values()))[2] if metrics else 0
        cells = "  ".join(f"{m}={v:.3f}" + (f"±{e:.3f}" if e is not None else "")
                          for m, (v, e, _n) in metrics.items())
        print(f"{dataset} ({n} turns): {cells}")
    print(f"stored as run {run_id}")


def _json_object(text: str) -> dict:
    """An argparse type: a JSON object (a bad one is argparse's one-line usage error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"epochs\": 1}}', got {text!r}")
    return value


@command("budget-curve")
def _budget_curve(ws: Workspace, args: argparse.Namespace) -> int:
    from .budget_curve import run_budget_curve

    with _teacher(ws, args) as teacher, TqdmProgress("Budget curve", unit="step") as bar:
        report = run_budget_curve(ws, teacher, strategies=args.strategies, budgets=args.budgets,
                                  queries_per_item=args.queries_per_item, gt_mode=args.gt_mode,
                                  datasets=args.datasets, turn_sample=args.turn_sample, seed=args.seed,
                                  set_id=args.embedding_set, unit=args.unit, k=args.k, lam=args.lam,
                                  store_runs=args.store_runs, student=args.student,
                                  student_config=args.student_config, progress=bar)
    print("\n".join(report.lines()))
    return 0 if report.complete else 1


@command("train")
def _train(ws: Workspace, args: argparse.Namespace) -> int:
    from . import model_kinds
    from .augment import launch_training_job

    entry = model_kinds.by_cli_name(args.kind)
    config = {}
    for key in ("max_steps", "epochs", "alpha", "stage1_model", "checkpoint_every", "checkpoint_seconds"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if entry.method is not None:
        config["method"] = args.method
    if args.nproc != 1:
        config["nproc"] = args.nproc
    job_id, info = launch_training_job(ws, entry.kind, args.data,
                                       labels=args.labels, config=config, aug_dataset=args.aug_dataset,
                                       aug_scorer=args.aug_scorer, statuses=args.statuses)
    if info["skipped_no_context"]:
        print(f"skipped {info['skipped_no_context']:,} turn(s) without any context")
    print(f"launched job {job_id} on {info['examples']:,} examples (labels: {args.labels}"
          + (f", {info['augmented_turns']:,} augmented turns from {info['augmentation']}" if args.labels != "real" else "")
          + "); follow it with `python -m crs_core jobs`")
    return 0


@command("jobs")
def _jobs(ws: Workspace, args: argparse.Namespace) -> int:
    from .jobs import cancel_job, import_finished_jobs, job_folder, list_jobs, resume_job

    if args.cancel:
        cancel_job(job_folder(ws, args.cancel))
        print(f"cancel requested for {args.cancel}")
    if args.resume:
        print(resume_job(ws, args.resume).describe())
    imported = import_finished_jobs(ws)
    if imported:
        print(f"imported: {', '.join(imported)}")
    states = list_jobs(ws)
    for state in states:
        print(f"{state.job_id}  {state.describe()}")
    if not states:
        print("no jobs yet; start one with `python -m crs_core train`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import model_kinds
    from .synth import DEFAULT_GT_MODE, GT_MODES
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
    engine_options(p)

    p = sub.add_parser("cluster", help="K-means clusters and the 2-D UMAP map of an embedding set")
    p.add_argument("--set", default="review:minilm", help="embedding set id (default review:minilm)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-map", action="store_true", help="skip the UMAP projection")

    from .strategies import names as strategy_names

    p = sub.add_parser("select", help="active selection of seeds under a budget (random, JS, Fisher, variants)")
    p.add_argument("--strategy", type=str.upper, choices=strategy_names(), default="JS")
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

    from .teacher.providers import PROVIDERS  # the registry: a provider added there is a choice here

    def teacher_options(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("teacher (default: $CRS_TEACHER_BASE_URL, else the local llama.cpp server)")
        g.add_argument("--provider", choices=list(PROVIDERS), help="the teacher provider (default: openai with "
                       "--base-url, else from the environment)")
        g.add_argument("--base-url", help="an OpenAI-compatible endpoint; the key comes from $OPENAI_API_KEY, "
                       "which is sent only to $CRS_TEACHER_BASE_URL (default https://api.openai.com/v1)")
        g.add_argument("--model", dest="model", help="the endpoint's model name")
        g.add_argument("--temperature", type=float, default=0.8, help="default 0.8 (the paper's)")
        g.add_argument("--max-calls", type=int, help="budget: stop cleanly after this many calls")
        g.add_argument("--max-tokens", type=int, help="budget: prompt + completion tokens")
        g.add_argument("--max-cost", type=float, help="budget: US dollars (price table in crs_core.teacher)")

    p = sub.add_parser("synth", help="Algorithm 2: queries and 20-item ground truth for a selection (resumable)")
    p.add_argument("--selection", required=True, help="selection id (see `select --list`)")
    p.add_argument("--k-queries", type=int, default=1, help="queries per item (default 1)")
    p.add_argument("--gt-mode", choices=GT_MODES, default=DEFAULT_GT_MODE,
                   help=f"ground truth (default {DEFAULT_GT_MODE}): choose = the teacher picks among the top "
                        "retrieved catalog items (grounded by construction); llm = the paper's free list of titles, "
                        "grounded afterwards; retrieve = dense retrieval, no LLM call; retrieve+llm = both")
    p.add_argument("--items", type=int, help="only the first N items of the selection")
    p.add_argument("--seed", type=int, default=0)
    teacher_options(p)
    engine_options(p)

    p = sub.add_parser("export", help="write synthetic dialogues as training data (JSONL or Parquet)")
    p.add_argument("path")
    p.add_argument("--shape", choices=["chat", "crs"], default="chat", help="chat SFT messages or CRS turns")
    p.add_argument("--format", choices=["jsonl", "parquet"], help="default: from the file name")
    p.add_argument("--status", choices=["approved", "pending", "rejected", "all"], default="approved")

    p = sub.add_parser("augment", help="FNSCRS label augmentation: retrieve top-N, score 0-4, keep >= threshold")
    from .augment import configure_cli_parser

    configure_cli_parser(p)

    p = sub.add_parser("eval", help="Recall@k / NDCG@k of a recommender on the ReDial / INSPIRED test sets")
    from .recommenders import RECOMMENDERS

    p.add_argument("--model", dest="model", choices=[*RECOMMENDERS, "lm"], default="dense",
                   help="a recommender (crs_core.recommenders.RECOMMENDERS) or lm, the student LM (generation job)")
    p.add_argument("--dataset", nargs="+", default=["redial_test", "inspired_test"])
    p.add_argument("--train", default="synthetic", help="training data of nbcrs / popularity-labels / hybrid: "
                   "'synthetic' (reviewed synthetic dialogues) or a dialogue dataset such as inspired_train")
    p.add_argument("--statuses", nargs="+", default=["approved"], help="synthetic statuses used for training")
    p.add_argument("--retriever", metavar="JOB_ID|FOLDER",
                   help="dense / hybrid: a fine-tuned retriever (finished train_retriever job, or its model folder)")
    p.add_argument("--lm", default="zero-shot", metavar="JOB_ID|FOLDER|zero-shot",
                   help="lm: a finished train_lm job (or its model folder), or zero-shot (default)")
    p.add_argument("--turn-sample", type=int,
                   help="evaluate a fixed, seeded subsample of turns per dataset (lm default: "
                        "30 on CPU, all on a GPU; others: all)")
    p.add_argument("--no-wait", action="store_true",
                   help="lm: return once the generation job has started; `jobs` imports the run later")
    p.add_argument("--seed", type=int, default=0)
    engine_options(p)

    from .budget_curve import DEFAULT_STUDENT, RETRIEVER_STUDENTS, students

    p = sub.add_parser("budget-curve", help="Recall@5 / NDCG@5 against the selection budget for each strategy "
                       "(select, synthesise, train a student, evaluate; reuses finished points)")
    p.add_argument("--strategies", nargs="+", type=str.upper, choices=strategy_names(),
                   default=list(strategy_names()), metavar="STRATEGY",
                   help=f"default: all ({' '.join(strategy_names())})")
    p.add_argument("--budgets", nargs="+", type=int, default=[10, 25, 50, 100], metavar="B",
                   help="selection budgets (default 10 25 50 100)")
    p.add_argument("--queries-per-item", type=int, default=1, help="K queries per selected item (default 1)")
    p.add_argument("--gt-mode", choices=GT_MODES, default="retrieve",
                   help="ground truth of the synthetic queries (default retrieve: no LLM call)")
    p.add_argument("--datasets", nargs="+", default=["redial_test", "inspired_test"])
    p.add_argument("--turn-sample", type=int, help="evaluate a fixed, seeded subsample of each test set's turns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embedding-set", default="review:minilm", help="review embedding set (default review:minilm)")
    p.add_argument("--unit", choices=["item", "review"], default="item",
                   help="what a pick is (default item: B = synthesis units; see crs_core.budget_curve)")
    p.add_argument("--k", type=int, default=20, help="K-means clusters for the JS strategies (default 20)")
    p.add_argument("--lam", type=float, default=1.0, help="JS weight lambda (default 1)")
    p.add_argument("--store-runs", action="store_true", help="also store every point as a run (runs table)")
    p.add_argument("--student", choices=list(students()), default=DEFAULT_STUDENT,
                   help=f"the recommender each point trains (default {DEFAULT_STUDENT}): "
                        + "; ".join(f"{k}: {v}" for k, v in students().items()))
    p.add_argument("--student-config", type=_json_object, metavar="JSON",
                   help=f"{' / '.join(RETRIEVER_STUDENTS)}: RetrieverConfig overrides, e.g. '{{\"epochs\": 1}}'")
    teacher_options(p)

    p = sub.add_parser("train", help="train the dense retriever or fine-tune the student LM as a background job")
    p.add_argument("--kind", choices=[k.cli_name for k in model_kinds.kinds()], default=model_kinds.RETRIEVER.cli_name,
                   help="the model to train (crs_core.model_kinds)")
    p.add_argument("--method", choices=["lora", "full"], default="lora", help="SFT: LoRA (default) or full")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a dialogue dataset such as inspired_train")
    p.add_argument("--statuses", nargs="+", default=["approved"], help="synthetic statuses used for training")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (per stage with two_stage)")
    p.add_argument("--epochs", type=int, help="training epochs (default: 1 retriever, 3 SFT)")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="save a checkpoint every STEPS steps (default 50)")
    p.add_argument("--checkpoint-seconds", type=float, metavar="S",
                   help="also save one when S seconds have passed since the last (default 60; 0: off)")
    p.add_argument("--labels", choices=["real", "mixed", "two_stage"], default="real",
                   help="real labels only; real + augmented in one run; or pre-train on real + augmented, "
                        "then fine-tune on real with the KL term (FNSCRS two-stage)")
    p.add_argument("--alpha", type=float, help="two_stage: weight of KL(P || stage-1 soft labels), >= 0 (default 0)")
    p.add_argument("--aug-dataset", help="dataset whose augmented labels are used (default: --data)")
    p.add_argument("--aug-scorer", help="scorer of those labels (default: the only one stored)")
    p.add_argument("--stage1-model", help="two_stage: reuse a finished stage-1 / mixed model folder, skip stage 1")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N processes of this machine (torchrun, DDP: gloo on CPU, nccl on GPUs); "
                        "the batch size is per process, so N processes take N times the examples a step")

    p = sub.add_parser("users", help="studio accounts for team mode (CRS_STUDIO_MODE=team): add, list, role, remove",
                       description="Accounts live in data/accounts.json (or $CRS_ACCOUNTS). The CLI acts as the "
                                   "local owner: whoever runs it can read the workspace and accounts files anyway.")
    p.add_argument("action", choices=["add", "list", "set-role", "password", "remove"])
    p.add_argument("name", nargs="?", help="account name (add, set-role, password, remove)")
    p.add_argument("--role", choices=["owner", "curator", "annotator", "viewer"],
                   help="add / set-role: owner (users, settings, keys), curator (selection, synthesis, training, "
                        "assigning review), annotator (judging assigned dialogues), viewer (read-only)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin instead of prompting")

    p = sub.add_parser("jobs", help="background jobs: state, cancel, resume; imports finished results")
    p.add_argument("--cancel", metavar="JOB_ID")
    p.add_argument("--resume", metavar="JOB_ID")

    return parser


def _users(args: argparse.Namespace) -> int:
    from .accounts import LOCAL_OWNER, AccountError, Accounts

    book = Accounts()
    if args.action == "list":
        for user in book.users():
            print(f"{user.name}\t{user.role}")
        return 0
    if not args.name:
        raise AccountError(f"users {args.action} needs a NAME")
    if args.action in ("add", "set-role") and not args.role:
        raise AccountError(f"users {args.action} needs --role")
    if args.action == "remove":
        book.remove(args.name, actor=LOCAL_OWNER)
    elif args.action == "set-role":
        book.set_role(args.name, args.role, actor=LOCAL_OWNER)
    else:
        password = _read_password(args.password_stdin)
        if args.action == "add":
            book.add(args.name, args.role, password, actor=LOCAL_OWNER)
        else:
            book.set_password(args.name, password, actor=LOCAL_OWNER)
    print(f"{args.action}: {args.name}" + (f" ({args.role})" if args.role else "") + f" in {book.path}")
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    import getpass

    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise CRSError("the two passwords differ; nothing was changed")
    return first


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "users":  # accounts are not in a workspace
            return _users(args)
        with Workspace(workspace_path(args.workspace)) as ws:
            code = _COMMANDS[args.command](ws, args)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # `status | head -1`: the reader has what it wanted; stop quietly (no traceback, and
        # nothing more to flush at exit), with the status of a process ended by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except CRSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file or folder the command reads or writes (permissions, full disk, ...)
        print(f"error: {_os_error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished work is kept (rerun to resume)", file=sys.stderr)
        return 130


def _os_error_line(exc: OSError) -> str:
    """'Permission denied: /path' for an OSError, in one line."""
    if exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))
