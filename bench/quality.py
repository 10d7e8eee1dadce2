"""Quality benchmark: every recommender trained on synthetic data from the bundled seed reviews.

No ReDial or INSPIRED dialogue is used for training (the leakage guard checks the synthetic
queries against both test sets before anything is trained). One command:

    nice -n 10 python bench/quality.py                     # defaults below, ~30 min on 2 idle cores
    nice -n 10 python bench/quality.py --seeds 400 --retriever-epochs 2 --sft-epochs 2 --lm-turns 100

Steps (all in a COPY of the source workspace, default data/workspaces/default.duckdb, which is
never written; `--out` keeps the copy, otherwise it lives in a temporary folder):

1. seeds: `--strategy` (JS) picks `--seeds` reviews from the review embeddings (review:minilm);
2. synthesis (Algorithm 2) with the teacher of `crs_core.teacher.TeacherConfig.from_env()` (the
   offline default: SmolLM2-135M-Instruct served by llama.cpp), `--k-queries` per item, ground
   truth by `--gt-mode` (default `retrieve`: the top 20 catalog items by MiniLM similarity to the
   query, blended with co-occurrence; the cheap mode; `llm` is the paper's);
3. the training set: every synthesized query with its grounded labels (status pending or
   approved; no human review in a benchmark), checked by `check_no_test_leakage`;
4. models: popularity (interactions), NBCRS (neighbours among the synthetic queries), zero-shot
   dense retrieval (MiniLM), the dense retriever fine-tuned on (query, item text) pairs (a
   `train_retriever` job), the hybrid over it (weights fitted on held-out synthetic queries),
   zero-shot LM and a LoRA SFT of SmolLM2-135M (a `train_lm` job),
   both LMs evaluated through `crs_core.model_eval.launch_lm_eval` on `--lm-turns` sampled
   turns per test set (seeded; the same turns for both);
5. one table: model x dataset -> Recall@10, Recall@20, NDCG@10 (mean ± standard error) and the
   number of turns, with the goals (2 CPU cores, offline default teacher): ReDial R@10 >= 0.15
   and R@20 >= 0.20; INSPIRED R@10 >= 0.20 and R@20 >= 0.25.

`--only supervised` runs just the supervised INSPIRED rows (no synthesis, no teacher, no review
embeddings: the bundled data is ingested into a temporary workspace in seconds): zero-shot MiniLM,
popularity of the INSPIRED train labels, and the dense retriever fine-tuned on real INSPIRED train
with the default recipe of `crs_core.train.RetrieverConfig` (validation and early stopping on
dialogues held out of TRAIN), with its learning curve (test R@10 at every validation point:
observed only, never used to pick anything), R@1/10/50 and NDCG@10 with standard errors on the
189 evaluable INSPIRED test turns, then the hybrid (dense + MovieLens item-item + popularity) over
the zero-shot and over the fine-tuned retriever, and one JSON line per row. Measured: 31.5 min on
2 cores at load average 5-6 on 2026-12-04 (29 of them fine-tuning; not yet timed on idle cores):

    nice -n 10 python bench/quality.py --only supervised

Item texts: one text per item everywhere (`crs_core.catalog.item_text`, the text synthesis
retrieves with and `python -m crs_core train` trains the retriever on), so the MiniLM item
vectors are computed once and shared by ground-truth retrieval and zero-shot dense retrieval.
Every run is also stored in the copy's runs / metrics tables.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting threads on shared cores

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from crs_core.progress import TqdmProgress  # noqa: E402

DATASETS = ("redial_test", "inspired_test")
GOALS = {"redial_test": {"recall@10": 0.15, "recall@20": 0.20},
         "inspired_test": {"recall@10": 0.20, "recall@20": 0.25}}
COLUMNS = ("recall@10", "recall@20", "ndcg@10")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(ROOT / "data" / "workspaces" / "default.duckdb"),
                   help="workspace to copy (built by `python -m crs_core init`); never written")
    p.add_argument("--out", help="keep the bench workspace here (default: a temporary folder)")
    p.add_argument("--reuse", metavar="PATH",
                   help="continue in the kept bench workspace PATH (its 'quality bench' selection and "
                        "queries; synthesis resumes without repeating a call) instead of a new copy")
    p.add_argument("--retriever-datasets", nargs="+", default=list(DATASETS),
                   help="test sets for the fine-tuned retriever (its item vectors are the slow part)")
    p.add_argument("--strategy", default="JS", help="seed selection strategy (default JS)")
    p.add_argument("--seeds", type=int, default=200, help="reviews selected as seeds (default 200)")
    p.add_argument("--k-queries", type=int, default=1, help="queries per seed item (default 1)")
    p.add_argument("--gt-mode", default="retrieve", choices=["retrieve", "llm", "retrieve+llm"])
    p.add_argument("--retriever-epochs", type=int, default=1)
    p.add_argument("--retriever-steps", type=int, help="cap on retriever optimizer steps")
    p.add_argument("--sft-epochs", type=int, default=1)
    p.add_argument("--sft-steps", type=int, help="cap on SFT optimizer steps")
    p.add_argument("--sft-method", default="lora", choices=["lora", "full"])
    p.add_argument("--lm-turns", type=int, default=20,
                   help="sampled turns per test set for the two LMs (default 20; 0 skips the LMs)")
    p.add_argument("--eval-turns", type=int,
                   help="seeded sample of turns per test set for the non-LM models (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["supervised"],
                   help="supervised: just the INSPIRED rows trained on real INSPIRED train (see above)")
    p.add_argument("--train-config", default="{}", metavar="JSON",
                   help="--only supervised: RetrieverConfig overrides on top of the default recipe")
    p.add_argument("--num-threads", type=int, default=2, help="torch threads for --only supervised (default 2)")
    return p.parse_args(argv)


def prepare_workspace(source: Path, out: str | None) -> Path:
    from crs_core.store import Workspace

    if not source.exists():
        sys.exit(f"error: {source} does not exist; build it with `python -m crs_core init`")
    try:
        with Workspace(source, read_only=True) as ws:
            n = ws.scalar("SELECT count(*) FROM embedding_sets WHERE set_id = 'review:minilm'")
    except Exception as exc:  # noqa: BLE001 - locked by a running init / studio
        sys.exit(f"error: cannot read {source} ({exc}); wait for `python -m crs_core init` to finish")
    if not n:
        sys.exit(f"error: {source} has no review embeddings yet; run `python -m crs_core init` first")
    target = Path(out) if out else Path(tempfile.mkdtemp(prefix="crs-quality-")) / "bench.duckdb"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        sys.exit(f"error: {target} exists; give another --out")
    shutil.copyfile(source, target)
    wal = source.with_name(source.name + ".wal")
    if wal.exists():
        shutil.copyfile(wal, target.with_name(target.name + ".wal"))
    return target


def wait_job(ws, job_id: str, label: str) -> dict[str, Any]:
    from crs_core import jobs

    folder = jobs.job_folder(ws, job_id)
    shown = None
    with TqdmProgress(label, unit="step") as bar:
        while True:
            st = jobs.job_state(folder)
            if st.total_steps and (st.step, st.total_steps) != shown:
                shown = (st.step, st.total_steps)
                bar(st.step, st.total_steps)
            if st.finished:
                break
            time.sleep(2)
    if st.state != "succeeded":
        sys.exit(f"error: job {job_id} {st.state}: {st.error}\n{jobs.read_log(folder)[-2000:]}")
    return st.result or {}


def fmt(value: float, se: float | None) -> str:
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return f"{value:.3f}"
    return f"{value:.3f}±{se:.3f}"


SUPERVISED_METRICS = ("recall@1", "recall@10", "recall@50", "ndcg@10")


def json_row(model: str, labels: str, result) -> dict[str, Any]:
    """The one-line JSON summary of a row (INSPIRED test)."""
    row: dict[str, Any] = {"model": model, "labels": labels, "dataset": "inspired"}
    for m in SUPERVISED_METRICS:
        row[m] = round(result.value(m), 4)
        row[f"stderr@{m.split('@')[1]}" if m == "recall@10" else f"stderr_{m}"] = round(result.stderr(m), 4)
    row["turns"] = len(result.turns)
    return row


def supervised(args: argparse.Namespace) -> int:
    """Zero-shot, train-label popularity and the retriever fine-tuned on real INSPIRED train,
    on INSPIRED test; learning curve; one JSON line per row."""
    import json

    from crs_core import model_eval, model_kinds, train
    from crs_core.evaluate import candidate_items, evaluate
    from crs_core.ingest import ingest_default
    from crs_core.recommenders import (Catalog, DenseRetrieval, Hybrid, Popularity, TrainingSet,
                                       training_set_from_turns)
    from crs_core.store import Workspace

    t_all = time.monotonic()
    timings: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="crs-quality-supervised-"))
    t = time.monotonic()
    ws = Workspace(tmp / "bench.duckdb")
    ingest_default(ws)
    timings["ingest"] = time.monotonic() - t
    test = "inspired_test"
    examples, item_texts = model_eval.supervised_training_data(ws, "inspired_train")  # refuses test turns
    catalog = Catalog.from_workspace(ws)
    test_items = catalog.subset(candidate_items(ws, test))
    print(f"training data: {len(examples):,} INSPIRED train turns with context, {len(item_texts):,} label items; "
          f"leakage guard passed; test: {test} over its {len(test_items):,} candidate items", flush=True)
    rows: list[tuple[str, str, Any]] = []

    def run_eval(rec) -> Any:
        return evaluate(ws, rec, test)

    t = time.monotonic()
    rows.append(("MiniLM zero-shot", "-", run_eval(DenseRetrieval(None, catalog=test_items))))
    timings["zero-shot"] = time.monotonic() - t
    t = time.monotonic()
    pop = Popularity(None, source="labels", catalog=catalog)
    pop.fit(TrainingSet.from_pairs([(e["context"], e["labels"]) for e in examples]))
    rows.append(("popularity (train-label counts)", "real", run_eval(pop)))
    timings["popularity"] = time.monotonic() - t

    # the fine-tuned retriever: the default recipe; the learning curve observes test R@10
    class _Probe:  # the model at a validation point, as a recommenders encoder
        def __init__(self, probe, step: int):
            self.probe, self.name = probe, f"probe-step-{step}-{time.monotonic()}"

        def encode(self, texts):
            return self.probe.encode_items(list(texts))

        def encode_queries(self, texts):
            return self.probe.encode_queries(list(texts))

        def query_text(self, context):
            return self.probe.query_text(context)

    curve: list[tuple[int, float, float]] = []

    def monitor(step: int, probe) -> None:
        res = run_eval(DenseRetrieval(None, encoder=_Probe(probe, step), catalog=test_items))
        curve.append((step, res.value("recall@10"), res.stderr("recall@10")))
        print(f"  learning curve: step {step}: INSPIRED test R@10 {res.value('recall@10'):.3f}", flush=True)

    cfg = {"num_threads": args.num_threads, "seed": 13, **json.loads(args.train_config)}
    recipe = train.RetrieverConfig(**{k: v for k, v in cfg.items() if k in train.RetrieverConfig.__dataclass_fields__})
    t = time.monotonic()
    res = train.train_retriever(train.load_examples(examples), train.load_items(item_texts), cfg,
                                out_dir=tmp / "retriever", monitor=monitor)
    timings["fine-tuning (with validation and curve)"] = time.monotonic() - t
    t = time.monotonic()
    encoder = model_kinds.RETRIEVER.load(res["model_dir"])  # the loader of the CLI, the pages and the jobs
    fine = run_eval(DenseRetrieval(None, encoder=encoder, catalog=test_items))
    timings["fine-tuned eval"] = time.monotonic() - t
    label = f"dense retriever fine-tuned ({res['steps']} steps, kept step {res.get('best_step')})"
    rows.append((label, "real", fine))

    # the hybrid (dense + MovieLens item-item + train-label popularity): its weights are picked on
    # the SAME dialogues the retriever held out for validation (same examples, fraction and seed),
    # so the fine-tuned dense part is scored on turns it never trained on
    turns = [e for e in training_set_from_turns(ws, "inspired_train").examples
             if any(str(u or "").strip() for u in e.context)]
    assert [e.labels for e in turns] == [e["labels"] for e in examples]
    hybrid_train = TrainingSet(turns, name="inspired_train")
    for name, enc in (("hybrid (zero-shot dense)", None), ("hybrid (fine-tuned dense)", encoder)):
        t = time.monotonic()
        hybrid = Hybrid(ws, encoder=enc, catalog=test_items, val_fraction=recipe.val_fraction or 0.1,
                        seed=recipe.seed)
        hybrid.fit(hybrid_train)
        w_cf, w_pop = hybrid.weights
        rows.append((f"{name}, w_cf={w_cf:g} w_pop={w_pop:g}", "real", run_eval(hybrid)))
        timings[name] = time.monotonic() - t
    ws.close()

    print()
    print(f"INSPIRED test, {len(fine.turns)} evaluable turns (He et al. protocol, candidates = INSPIRED item set); "
          f"mean ± standard error")
    print("recipe: " + ", ".join(f"{k}={getattr(recipe, k)}" for k in (
        "lr", "epochs", "batch_size", "temperature", "symmetric", "hard_negatives", "query_turns",
        "query_speaker", "query_max_len", "item_max_len", "val_fraction", "patience")))
    head = f"{'model':<58} {'labels':<7} " + " ".join(f"{m:>13}" for m in SUPERVISED_METRICS)
    print(head)
    print("-" * len(head))
    for name, labels, r in rows:
        print(f"{name:<58} {labels:<7} " + " ".join(f"{fmt(r.value(m), r.stderr(m)):>13}" for m in SUPERVISED_METRICS))
    print()
    print("learning curve (test R@10 vs optimizer steps; validation on held-out TRAIN dialogues picks the step):")
    val = {h["step"]: h for h in res.get("validation") or []}
    for step, r10, se in curve:
        v = val.get(step)
        vtxt = f"   validation R@10 {v['recall@10']:.3f} R@50 {v['recall@50']:.3f}" if v else ""
        mark = "  <- kept" if step == res.get("best_step") else ""
        print(f"  step {step:>4}: test R@10 {fmt(r10, se)}{vtxt}{mark}")
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
          + f"; total {(time.monotonic() - t_all) / 60:.1f} min")
    for name, labels, r in rows:
        print(json.dumps(json_row(name, labels, r)))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.only == "supervised":
        return supervised(args)
    from crs_core import model_eval
    from crs_core.evaluate import candidate_items, check_no_test_leakage
    from crs_core.recommenders import (NBCRS, Catalog, DenseRetrieval, Hybrid, Popularity,
                                       training_set_from_synthetic)
    from crs_core.selections import run_selection
    from crs_core.store import Workspace
    from crs_core.synth import run_synthesis
    from crs_core.teacher import Teacher, TeacherConfig
    from crs_core.train import KIND_RETRIEVER, KIND_SFT, launch_training

    t_all = time.monotonic()
    timings: dict[str, float] = {}
    path = Path(args.reuse) if args.reuse else prepare_workspace(Path(args.source), args.out)
    jobs_root = path.parent / "jobs"
    print(f"bench workspace: {path} ({'reused' if args.reuse else f'copy of {args.source}'}); jobs in {jobs_root}")
    ws = Workspace(path)
    rows: list[tuple[str, str, dict]] = []  # (model, how it was trained, run results)

    # 1-2: seeds and synthesis ----------------------------------------------------------
    t = time.monotonic()
    previous = ws.df("SELECT selection_id FROM selections WHERE name = 'quality bench' AND strategy = ? "
                     "AND budget = ? ORDER BY created_at DESC LIMIT 1", [args.strategy.upper(), args.seeds])
    if args.reuse and len(previous):
        selection = str(previous["selection_id"].iloc[0])
    else:
        with TqdmProgress(f"Selecting {args.seeds} seeds ({args.strategy})", unit="pick") as bar:
            selection = run_selection(ws, args.strategy, args.seeds, seed=args.seed, name="quality bench",
                                      progress=bar)
    config = TeacherConfig.from_env()
    teacher_name = f"{config.provider}:{config.model or 'smollm2-135m-instruct (llama.cpp, offline default)'}"
    with Teacher(config, cache=ws) as teacher, TqdmProgress("Synthesizing", unit="query") as bar:
        report = run_synthesis(ws, selection, teacher, k_queries=args.k_queries, gt_mode=args.gt_mode,
                               seed=args.seed, progress=bar)
    timings["seeds + synthesis"] = time.monotonic() - t
    print("\n".join(report.lines()))

    # 3: training data ------------------------------------------------------------------------
    train = training_set_from_synthetic(ws, statuses=("pending", "approved"), selection_id=selection)
    if len(train) < 2:
        sys.exit(f"error: only {len(train)} usable synthetic queries; raise --seeds")
    check_no_test_leakage(ws, [e.context for e in train])
    described = (f"{len(train)} synthetic queries ({args.strategy} seeds={args.seeds}, teacher {teacher_name}, "
                 f"gt {args.gt_mode})")
    print(f"training data: {described}; leakage guard passed")
    catalog = Catalog.from_workspace(ws)
    wanted = {i for e in train for i in e.labels}
    items = [{"item_id": i, "text": catalog.texts[catalog.index[i]]} for i in wanted if i in catalog.index]
    examples = [{"context": e.context, "labels": e.labels} for e in train]
    meta = {"training_data": described, "selection_strategy": args.strategy, "budget": args.seeds,
            "seed": args.seed}

    def evaluate_in_process(rec, name: str, trained: str, datasets=DATASETS) -> None:
        t0 = time.monotonic()
        run_id, _ = model_eval.evaluate_and_store(
            ws, rec, datasets, {**meta, "model": name, "config": {"bench": "quality"}},
            turn_sample=args.eval_turns, seed=args.seed,
            progress_for=lambda label: TqdmProgress(label, unit="turn"))
        timings[name] = time.monotonic() - t0
        rows.append((name, trained, model_eval.run_results(ws, run_id)))

    # 4: in-process models -------------------------------------------------------------------
    evaluate_in_process(Popularity(ws, catalog=catalog), "popularity", "interactions (MovieLens)")
    nbcrs = NBCRS(ws, catalog=catalog)
    nbcrs.fit(train)
    evaluate_in_process(nbcrs, "NBCRS", "synthetic")
    # only the items a test set can rank need vectors (~8k of the 12.8k): same rankings, less time
    rankable = catalog.subset(set().union(*(candidate_items(ws, ds) for ds in DATASETS)))
    evaluate_in_process(DenseRetrieval(ws, catalog=rankable), "zero-shot dense (MiniLM)", "none")

    # 5: fine-tuned dense retriever ------------------------------------------------------------
    t = time.monotonic()
    rcfg: dict[str, Any] = {"epochs": args.retriever_epochs, "training_data": described,
                            "selection_strategy": args.strategy, "budget": args.seeds}
    if args.retriever_steps:
        rcfg["max_steps"] = args.retriever_steps
    job = launch_training(ws, KIND_RETRIEVER, examples, items, rcfg, jobs_root)
    res = wait_job(ws, job, "Training the dense retriever")
    timings["retriever training"] = time.monotonic() - t
    rec, ref = model_eval.dense_retriever(ws, job, args.retriever_datasets, catalog=catalog)
    evaluate_in_process(rec, "dense retriever (fine-tuned)", f"synthetic, {res.get('steps')} steps",
                        args.retriever_datasets)
    # the hybrid over it: its weights (MovieLens co-rating, label popularity) fitted on held-out
    # synthetic queries, so no test dialogue reaches it either
    hybrid = Hybrid(ws, encoder=rec.encoder, catalog=rec.catalog)
    hybrid.fit(train)
    w_cf, w_pop = hybrid.weights
    evaluate_in_process(hybrid, "hybrid (fine-tuned dense)", f"synthetic, cf={w_cf:g} pop={w_pop:g}",
                        args.retriever_datasets)

    # 6: LMs ---------------------------------------------------------------------------------------
    if args.lm_turns > 0:
        t = time.monotonic()
        zs = model_eval.launch_lm_eval(ws, model_eval.ZERO_SHOT, DATASETS, turn_sample=args.lm_turns,
                                       seed=args.seed, jobs_root=str(jobs_root))
        with TqdmProgress("Zero-shot LM generating", unit="turn") as bar:
            run_id = model_eval.wait_for_lm_eval(ws, zs, progress=bar, poll=2)
        timings["zero-shot LM"] = time.monotonic() - t
        rows.append(("zero-shot LM (SmolLM2-135M)", "none", model_eval.run_results(ws, run_id)))

        t = time.monotonic()
        scfg: dict[str, Any] = {"method": args.sft_method, "epochs": args.sft_epochs, "training_data": described,
                                "selection_strategy": args.strategy, "budget": args.seeds}
        if args.sft_steps:
            scfg["max_steps"] = args.sft_steps
        job = launch_training(ws, KIND_SFT, examples, items, scfg, jobs_root)
        res = wait_job(ws, job, f"{args.sft_method} SFT of the student")
        timings["SFT training"] = time.monotonic() - t
        t = time.monotonic()
        ft = model_eval.launch_lm_eval(ws, job, DATASETS, turn_sample=args.lm_turns, seed=args.seed,
                                       jobs_root=str(jobs_root))
        with TqdmProgress("Fine-tuned LM generating", unit="turn") as bar:
            run_id = model_eval.wait_for_lm_eval(ws, ft, progress=bar, poll=2)
        timings["fine-tuned LM"] = time.monotonic() - t
        rows.append((f"fine-tuned LM ({args.sft_method})", f"synthetic, {res.get('steps')} steps",
                     model_eval.run_results(ws, run_id)))
    ws.close()

    # 7: the table ------------------------------------------------------------------------------
    print()
    print(f"teacher: {teacher_name}; ground truth: {args.gt_mode}; training data: {described}")
    print("seed reviews only (no ReDial / INSPIRED dialogue in training; leakage guard passed); "
          + (f"LMs on {args.lm_turns} seeded turns per test set, " if args.lm_turns else "LMs skipped, ")
          + f"the others on {args.eval_turns or 'all'} turns (at most) per test set")
    head = f"{'model':<30} {'trained on':<26} {'dataset':<14} " + " ".join(f"{c:>13}" for c in COLUMNS) + "  turns"
    print(head)
    print("-" * len(head))
    for name, trained, results in rows:
        for ds in DATASETS:
            m = results.get(ds, {})
            cells = " ".join(f"{fmt(m[c][0], m[c][1]) if c in m else '-':>13}" for c in COLUMNS)
            n = next(iter(m.values()))[2] if m else 0
            print(f"{name:<30} {trained[:26]:<26} {ds:<14} {cells}  {n}")
    print()
    for ds, goal in GOALS.items():
        best = {c: max((r[2].get(ds, {}).get(c, (0.0,))[0] for r in rows), default=0.0) for c in goal}
        status = ", ".join(f"{c} best {best[c]:.3f} (goal {g:.2f}: {'met' if best[c] >= g else 'not met'})"
                           for c, g in goal.items())
        print(f"goal {ds}: {status}")
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
          + f"; total {(time.monotonic() - t_all) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
