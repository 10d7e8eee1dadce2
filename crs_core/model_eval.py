"""Evaluation of trained and generative recommenders: the glue between the training and
generation jobs (`crs_core.train`, `crs_core.jobs`) and the protocol (`crs_core.evaluate`).

- A model is named by the id of a finished training job of the workspace, or by a model
  folder (`resolve_model`). The stored run names the model (the job id, else the folder) and
  its training data, selection strategy and budget as the training job's config recorded them.
- Dense retriever (`dense_retriever`): `DenseRetrieval` over the fine-tuned bi-encoder
  (loaded by its model kind's loader, `model_kinds.RETRIEVER.load`, the one every consumer uses);
  item vectors go to the workspace embedding cache under the model's weights digest, so a second evaluation of the same model embeds nothing.
- Generative LM (`launch_lm_eval`): the contexts of a fixed, seeded subsample of each test
  set's evaluable turns (`turn_sample`; default `DEFAULT_LM_TURN_SAMPLE` per dataset on CPU,
  every turn when CUDA is available) go to an ``lm_generate`` background job. When it has
  succeeded, `import_lm_eval` (the job's importer, run by `crs_core.jobs.import_finished_jobs`)
  grounds each turn's generated titles in the dataset's own item set (`titles_to_item_ids`
  with the catalog matcher of `crs_core.ingest`), scores them with `evaluate_rankings` and
  stores ONE run, whose id is derived from the job id: importing again stores nothing twice.

Sample size: 30 turns per test set on CPU. SmolLM2-135M greedily writing up to 20 titles (at
most 288 new tokens, batches of 8) took 26 s per context on the 2 shared cores of the
development machine while four other jobs ran (load average 9-10); a decode step of a batch of
8 costs ~50 ms on an idle core pair, i.e. 2-5 s per context, so 2 x 30 contexts take a few
minutes there. The price is a standard error of ~0.05 on Recall@20 at 30 turns: compare LMs
on the same seeded turns (the sample depends only on the seed and the dataset), or pass a
larger `turn_sample` (or None: every turn, the default when CUDA is available).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .evaluate import (
    EvalError,
    EvalResult,
    candidate_items,
    evaluate,
    evaluate_rankings,
    load_eval_turns,
    sample_turns,
    store_run,
    titles_to_item_ids,
)
from . import model_kinds
from .progress import ProgressFn, report

if TYPE_CHECKING:  # pragma: no cover
    from .recommenders import DenseRetrieval
    from .store import Workspace

__all__ = [
    "ZERO_SHOT",
    "DEFAULT_DATASETS",
    "DEFAULT_LM_TURN_SAMPLE",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelRef",
    "evaluate_lm",
    "score_generations",
    "resolve_model",
    "dense_retriever",
    "supervised_training_data",
    "evaluate_and_store",
    "default_lm_turn_sample",
    "plan_lm_eval",
    "launch_lm_eval",
    "import_lm_eval",
    "store_lm_eval",
    "lm_eval_results",
    "lm_run_id",
    "wait_for_lm_eval",
    "run_results",
]

ZERO_SHOT = "zero-shot"
DEFAULT_DATASETS = ("redial_test", "inspired_test")
DEFAULT_LM_TURN_SAMPLE = 30
IMPORTER = "crs_core.model_eval:import_lm_eval"
KIND_RETRIEVER = model_kinds.RETRIEVER.kind
KIND_SFT = model_kinds.SFT.kind
KIND_GENERATE = "lm_generate"


class ModelNotFoundError(EvalError):
    """No finished training job of that id in the workspace, and no model folder at that path."""


class ModelNotReadyError(EvalError):
    """The training / generation job exists but has not succeeded (running, failed, cancelled)."""


# ----------------------------------------------------------------------------- model references


@dataclass
class ModelRef:
    """A model to evaluate and what the run should say about it."""

    model_dir: Path
    label: str                      # the job id, or the folder
    kind: str                       # train_retriever | train_lm | zero-shot
    job_id: str | None = None
    training_data: str | None = None
    selection_strategy: str | None = None
    budget: int | None = None
    train_config: dict[str, Any] = field(default_factory=dict)

    def run_meta(self, model: str, **config: Any) -> dict[str, Any]:
        return {
            "model": model, "training_data": self.training_data,
            "selection_strategy": self.selection_strategy, "budget": self.budget,
            "config": {"model_dir": str(self.model_dir), "train_job": self.job_id,
                       "train_config": self.train_config, **config},
        }


def _job_row(ws: "Workspace", job_id: str) -> tuple[str, str] | None:
    row = ws.cursor().execute("SELECT kind, folder FROM jobs WHERE job_id = ?", [job_id]).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def _not_ready(job_id: str, st: Any, what: str) -> ModelNotReadyError:
    if st.state in ("queued", "running"):
        where = f" (step {st.step}/{st.total_steps})" if st.total_steps else ""
        return ModelNotReadyError(
            f"{what} job {job_id} is still {st.state}{where}; wait until it has succeeded "
            "(`python -m crs_core jobs` shows it)")
    reason = (st.error or st.message or "").strip().splitlines()
    tail = f": {reason[-1][:200]}" if reason else ""
    return ModelNotReadyError(f"{what} job {job_id} {st.state}{tail}; nothing to evaluate")


def resolve_model(ws: "Workspace", ref: str, kind: str) -> ModelRef:
    """A succeeded training job of `kind` (by job id) or a model folder (path), checked.

    Raises ModelNotFoundError (no such job or folder, or its model folder is gone) and
    ModelNotReadyError (the job is queued, running, failed or cancelled)."""
    from . import jobs

    ref = str(ref).strip()
    if not ref:
        raise ModelNotFoundError("no model given: pass a training job id or a model folder")
    row = _job_row(ws, ref)
    if row is not None:
        job_kind, folder = row
        what = "training" if job_kind in {k.kind for k in model_kinds.kinds()} else job_kind
        if job_kind != kind:
            raise EvalError(f"job {ref} is a {job_kind} job; this evaluation needs a {kind} job")
        try:
            st = jobs.job_state(folder)
        except jobs.JobNotFoundError as exc:
            raise ModelNotFoundError(f"the folder of job {ref} is gone ({folder}): {exc}") from exc
        if st.state != "succeeded":
            raise _not_ready(ref, st, what)
        model_dir = Path((st.result or {}).get("model_dir") or Path(folder) / jobs.MODEL_DIR)
        if not model_dir.is_dir():
            raise ModelNotFoundError(f"job {ref} succeeded but its model folder {model_dir} is missing")
        cfg = dict(st.config or {})
        budget = cfg.get("budget")
        return ModelRef(model_dir, ref, kind, ref, cfg.get("training_data"), cfg.get("selection_strategy"),
                        None if budget is None else int(budget), cfg)
    path = Path(ref).expanduser()
    if not path.is_dir():
        looks_like_path = "/" in ref or path.suffix or ref.startswith(".")
        raise ModelNotFoundError(
            f"model folder {path} does not exist" if looks_like_path else
            f"no job {ref!r} in workspace {getattr(ws, 'path', '')} and no folder of that name; "
            "`python -m crs_core jobs` lists the jobs")
    info_file = path / "crs_model.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return ModelRef(path.resolve(), str(path), kind, None, info.get("training_data"), None, None, info)


def dense_retriever(ws: "Workspace", ref: str, datasets: Iterable[str] = DEFAULT_DATASETS,
                    catalog: Any = None) -> tuple["DenseRetrieval", ModelRef]:
    """`DenseRetrieval` with the fine-tuned encoder of `ref` (job id or folder), over the items
    the evaluated datasets can rank (the union of their candidate sets: embedding the other
    catalog items would change nothing but the time). `catalog`: a `Catalog` whose item texts
    to use (default: the workspace catalog with `catalog.item_text`, the texts the retriever was trained on)."""
    from .recommenders import Catalog, DenseRetrieval, RecommenderError

    model = resolve_model(ws, ref, KIND_RETRIEVER)
    try:
        encoder = model_kinds.RETRIEVER.load(model.model_dir)
    except RecommenderError as exc:
        raise ModelNotFoundError(str(exc)) from exc
    catalog = catalog if catalog is not None else Catalog.from_workspace(ws)
    wanted: set[str] = set()
    for ds in datasets:
        wanted |= candidate_items(ws, ds)
    catalog = catalog.subset(wanted) if wanted else catalog
    rec = DenseRetrieval(ws, encoder=encoder, catalog=catalog)
    rec.name = f"dense-retriever:{model.label}"
    return rec, model


def supervised_training_data(ws: "Workspace", dataset: str = "inspired_train"
                             ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(examples, items) to fit a model on the turns of a TRAINING split, as `python -m crs_core
    train --data <dataset>` builds them: examples {"context", "labels"} (turns without context
    skipped, labels without the items mentioned earlier), items = id -> `catalog.item_text` of
    every label. A ``*_test`` split is refused, and the examples go through
    `check_no_test_leakage` (no test dialogue, whole or in part) before anything is fitted."""
    from .catalog import item_text
    from .evaluate import check_no_test_leakage
    from .recommenders import training_set_from_turns

    if dataset.endswith("_test"):
        raise EvalError(f"{dataset} is a test split: models are never fitted on test turns")
    train_set = training_set_from_turns(ws, dataset)
    examples = [{"context": list(e.context), "labels": list(e.labels)} for e in train_set.examples
                if any(str(u or "").strip() for u in e.context)]
    check_no_test_leakage(ws, [e["context"] for e in examples])
    wanted = {i for e in examples for i in e["labels"]}
    rows = ws.df("SELECT * FROM items").to_dict("records")
    items = {str(r["item_id"]): item_text(r) for r in rows if str(r["item_id"]) in wanted}
    return examples, items


def evaluate_and_store(ws: "Workspace", recommender: Any, datasets: Sequence[str],
                       run_meta: Mapping[str, Any], *, turn_sample: int | None = None, seed: int = 0,
                       progress_for: Callable[[str], ProgressFn] | None = None
                       ) -> tuple[str, dict[str, EvalResult]]:
    """Evaluate an in-process recommender on each dataset and store one run; (run_id, results).
    `progress_for(label)` gives a progress callback per dataset (e.g. a tqdm bar)."""
    results: dict[str, EvalResult] = {}
    for ds in datasets:
        bar = progress_for(f"Evaluating {recommender.name} on {ds}") if progress_for else None
        try:
            results[ds] = evaluate(ws, recommender, ds, turn_sample=turn_sample, seed=seed, progress=bar)
        finally:
            if bar is not None and hasattr(bar, "close"):
                bar.close()
    meta = dict(run_meta)
    meta.setdefault("seed", seed)
    return store_run(ws, meta, results), results


# ----------------------------------------------------------------------------- generative LM


def default_lm_turn_sample() -> int | None:
    """Every turn on a GPU; `DEFAULT_LM_TURN_SAMPLE` turns per test set on CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:  # pragma: no cover - torch is a requirement
        pass
    return DEFAULT_LM_TURN_SAMPLE


def _resolve_lm(ws: "Workspace", lm: str | None) -> tuple[ModelRef, str]:
    from . import models

    if lm in (None, "", ZERO_SHOT):
        folder = models.student_model_dir()
        ref = ModelRef(folder, ZERO_SHOT, ZERO_SHOT, training_data="none (zero-shot)")
        return ref, f"{models.STUDENT_FOLDER_NAME} (zero-shot)"
    ref = resolve_model(ws, str(lm), KIND_SFT)
    d = ref.model_dir
    if not ((d / "adapter_config.json").is_file() or (d / "config.json").is_file()):
        raise ModelNotFoundError(f"{d} is neither a LoRA adapter nor a model folder")
    method = (ref.train_config.get("method") or ref.train_config.get("type") or "sft")
    return ref, f"lm-{method}:{ref.label}"


def plan_lm_eval(ws: "Workspace", datasets: Sequence[str], turn_sample: int | None | str = "auto",
                 seed: int = 0) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """(plan per dataset: sampled turn ids, recorded sample size, totals; contexts by
    "dataset/turn_id") for an LM evaluation; see `launch_lm_eval`."""
    if not datasets:
        raise EvalError("no dataset to evaluate on")
    if turn_sample == "auto":
        turn_sample = default_lm_turn_sample()
    plan: dict[str, dict[str, Any]] = {}
    contexts: dict[str, list[str]] = {}
    for ds in dict.fromkeys(datasets):
        turns, skipped, total = load_eval_turns(ws, ds)
        if not turns:
            raise EvalError(f"dataset {ds!r}: no turn has a label left to evaluate")
        sampled, recorded = sample_turns(turns, turn_sample, seed)
        plan[ds] = {"turn_ids": [t.turn_id for t in sampled], "turn_sample": recorded,
                    "n_total": total, "skipped": skipped}
        for t in sampled:
            # a turn at the very start of a dialogue has no context: the prompt is then empty
            contexts[f"{ds}/{t.turn_id}"] = [u for u in t.context if u.strip()] or [""]
    return plan, contexts


def launch_lm_eval(
    ws: "Workspace",
    lm: str | None = ZERO_SHOT,
    datasets: Sequence[str] = DEFAULT_DATASETS,
    *,
    turn_sample: int | None | str = "auto",
    seed: int = 0,
    n: int = 20,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    num_threads: int | None = None,
    jobs_root: str | None = None,
) -> str:
    """Start the generation job of an LM evaluation; returns its job id.

    `lm`: "zero-shot" (the base student, SmolLM2-135M-Instruct, with the recommendation prompt
    of `crs_core.train`) or a succeeded ``train_lm`` job id / model folder. `turn_sample`:
    turns per dataset ("auto": `default_lm_turn_sample()`; None: every turn; a number larger
    than a set means the whole set). The sampled turn ids are fixed in the job's config, so
    the import scores exactly the turns that were generated."""
    from .train import launch_generation

    ref, model_name = _resolve_lm(ws, lm)
    plan, contexts = plan_lm_eval(ws, datasets, turn_sample, seed)
    config: dict[str, Any] = {
        "n": int(n), "batch_size": int(batch_size), "model_name": model_name, "lm": ref.label,
        "train_job": ref.job_id, "training_data": ref.training_data,
        "selection_strategy": ref.selection_strategy, "budget": ref.budget, "seed": int(seed),
        "evaluation": plan,
    }
    if max_new_tokens:
        config["max_new_tokens"] = int(max_new_tokens)
    if num_threads:
        config["num_threads"] = int(num_threads)
    return launch_generation(ws, ref.model_dir, contexts, config, jobs_root, importer=IMPORTER)


def lm_run_id(job_id: str) -> str:
    """The run an LM evaluation job is stored as (one per job)."""
    return f"lm-eval-{job_id}"


class _CursorWorkspace:
    """The read/write surface of `Workspace` that `crs_core.evaluate` uses, over the cursor of
    a transaction that is already open (a job importer runs inside one)."""

    read_only = False

    def __init__(self, cur: Any):
        self._cur = cur
        self.path = "(import transaction)"

    def df(self, sql: str, params: list | tuple | None = None):
        return self._cur.execute(sql, params or []).df()

    def cursor(self):
        return self._cur

    def transaction(self):
        import contextlib

        return contextlib.nullcontext(self._cur)


def lm_eval_results(ws: "Workspace", state: Any) -> tuple[dict[str, EvalResult], dict[str, Any]]:
    """Score a finished generation job of `launch_lm_eval`: (results per dataset, grounding
    statistics per dataset: contexts, titles generated, titles matched to the dataset's items)."""
    from .train import read_generations

    cfg = dict(state.config or {})
    plan = cfg.get("evaluation")
    if not isinstance(plan, dict) or not plan:
        raise EvalError(f"job {state.job_id} is not an LM evaluation (its config has no 'evaluation' plan)")
    return score_generations(ws, plan, read_generations(state.folder), recommender=str(cfg.get("model_name") or "lm"),
                             seed=int(cfg.get("seed") or 0), source=f"job {state.job_id}")


def score_generations(ws: "Workspace", plan: Mapping[str, Any], gens: Mapping[str, list[str]], *, recommender: str,
                      seed: int, source: str) -> tuple[dict[str, EvalResult], dict[str, Any]]:
    """Ground the generated titles of each planned turn ("dataset/turn_id" -> titles) in the
    dataset's items and score them: (results per dataset, grounding statistics per dataset)."""
    from .ingest import catalog_matcher

    items = ws.df("SELECT item_id, title, year FROM items")
    results: dict[str, EvalResult] = {}
    grounding: dict[str, Any] = {}
    for ds, spec in plan.items():
        turns, skipped, total = load_eval_turns(ws, ds)
        by_id = {t.turn_id: t for t in turns}
        ids = [str(t) for t in spec["turn_ids"]]
        missing = [t for t in ids if t not in by_id]
        if missing:
            raise EvalError(f"{len(missing)} turns of {ds} that {source} generated for are no longer "
                            f"in the workspace (e.g. {missing[0]}); re-import the dataset or evaluate again")
        chosen = [by_id[t] for t in ids]
        candidates = candidate_items(ws, ds)
        matcher = catalog_matcher(items[items["item_id"].astype(str).isin(candidates)])
        rankings, n_titles, n_matched, n_missing = [], 0, 0, 0
        for t in chosen:
            titles = gens.get(f"{ds}/{t.turn_id}")
            if titles is None:
                n_missing += 1
                titles = []
            ranked = titles_to_item_ids(titles, matcher)
            n_titles += len(titles)
            n_matched += len(ranked)
            rankings.append(ranked)
        results[ds] = evaluate_rankings(
            chosen, rankings, dataset=ds, recommender=recommender,
            k_max=50, n_skipped=sum(skipped.values()), skipped_reasons=skipped, n_total=total,
            catalog=candidates, turn_sample=spec.get("turn_sample"), seed=seed,
            candidates=f"dataset ({len(candidates)} items)",
        )
        grounding[ds] = {"contexts": len(chosen), "titles": n_titles, "matched": n_matched,
                         "without_generation": n_missing}
    return results, grounding


def evaluate_lm(
    ws: "Workspace",
    lm: str | None = ZERO_SHOT,
    datasets: Sequence[str] = DEFAULT_DATASETS,
    *,
    engine: Any,
    turn_sample: int | None | str = "auto",
    seed: int = 0,
    n: int = 20,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: ProgressFn | None = None,
) -> str:
    """An LM evaluation generated by an engine (``crs_core.engines``, e.g. Ray actors each holding
    the LM) instead of a background job: the same plan, generation (`generate_titles`, blocks
    of `batch_size` contexts) and scoring as `launch_lm_eval`. Each finished block's generations
    are appended to a file beside the workspace (fsynced), so a killed run resumes with the
    blocks still missing; the run is then scored and stored once. Returns the run id, derived
    from the model and the plan (evaluating again returns the stored run)."""
    import hashlib

    from .engines import remove_spool, spool_folder

    ref, model_name = _resolve_lm(ws, lm)
    plan, contexts = plan_lm_eval(ws, datasets, turn_sample, seed)
    key = json.dumps({"model_dir": str(ref.model_dir), "plan": plan, "n": int(n), "max_new_tokens": max_new_tokens,
                      "batch_size": int(batch_size)}, sort_keys=True, default=str)
    run_id = f"lm-eval-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:12]}"
    if ws.cursor().execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]:
        return run_id
    spool = spool_folder(ws.path, f"lm-eval|{run_id}")
    spool.mkdir(parents=True, exist_ok=True)
    done_file = spool / "generations.jsonl"
    gens = _read_generated(done_file)
    todo = [cid for cid in contexts if cid not in gens]
    blocks = [todo[s:s + max(1, int(batch_size))] for s in range(0, len(todo), max(1, int(batch_size)))]
    report(progress, len(gens), len(contexts))
    options = {"n": int(n), "max_new_tokens": max_new_tokens, "batch_size": int(batch_size)}
    with open(done_file, "a", encoding="utf-8") as fh:
        for index, titles in engine.generate_blocks(ref.model_dir, [[contexts[c] for c in b] for b in blocks], options):
            fh.write("".join(json.dumps({"id": cid, "titles": t}, ensure_ascii=False) + "\n"
                             for cid, t in zip(blocks[index], titles)))
            fh.flush()
            os.fsync(fh.fileno())
            gens.update(zip(blocks[index], titles))
            report(progress, len(gens), len(contexts))
    results, grounding = score_generations(ws, plan, gens, recommender=model_name, seed=int(seed),
                                           source=f"run {run_id}")
    meta = {
        "run_id": run_id, "model": model_name, "training_data": ref.training_data,
        "selection_strategy": ref.selection_strategy, "budget": ref.budget, "seed": int(seed),
        "config": {"recommender": "lm", "lm": ref.label, "train_job": ref.job_id, "engine": engine.name,
                   "model_dir": str(ref.model_dir), "n": int(n), "grounding": grounding},
    }
    store_run(ws, meta, results)
    remove_spool(spool)
    return run_id


def _read_generated(path: Path) -> dict[str, list[str]]:
    """id -> titles of the blocks a killed run had finished (a torn last line is redone)."""
    out: dict[str, list[str]] = {}
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    out[str(row["id"])] = list(row["titles"])
                except (ValueError, KeyError, TypeError):
                    break
    return out


def store_lm_eval(ws: "Workspace", state: Any) -> str:
    """Store the run of a finished LM evaluation job once; returns its run id (idempotent)."""
    run_id = lm_run_id(state.job_id)
    if ws.cursor().execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]:
        return run_id
    cfg = dict(state.config or {})
    results, grounding = lm_eval_results(ws, state)
    res = state.result or {}
    meta = {
        "run_id": run_id, "model": cfg.get("model_name") or "lm", "training_data": cfg.get("training_data"),
        "selection_strategy": cfg.get("selection_strategy"), "budget": cfg.get("budget"),
        "seed": cfg.get("seed"),
        "config": {"recommender": "lm", "lm": cfg.get("lm"), "train_job": cfg.get("train_job"),
                   "generation_job": state.job_id, "model_dir": res.get("model_dir") or cfg.get("model_dir"),
                   "n": cfg.get("n"), "seconds_per_context": res.get("seconds_per_context"),
                   "grounding": grounding},
    }
    return store_run(ws, meta, results)


def import_lm_eval(cur: Any, state: Any) -> None:
    """Job importer (``importer`` of the generation job): runs in the import transaction."""
    store_lm_eval(_CursorWorkspace(cur), state)


def wait_for_lm_eval(ws: "Workspace", job_id: str, *, progress: ProgressFn | None = None,
                     poll: float = 1.0, timeout: float | None = None) -> str:
    """Wait for the generation job, import it (through `import_finished_jobs`, as `jobs` does)
    and return the stored run id. A job that fails or is cancelled raises ModelNotReadyError."""
    from . import jobs

    row = _job_row(ws, job_id)
    if row is None:
        raise ModelNotFoundError(f"no job {job_id!r} in workspace {getattr(ws, 'path', '')}")
    if row[0] != KIND_GENERATE:
        raise EvalError(f"job {job_id} is a {row[0]} job, not an LM evaluation")
    folder = Path(row[1])
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = None
    while True:
        st = jobs.job_state(folder)
        if st.total_steps and (st.step, st.total_steps) != shown:
            shown = (st.step, st.total_steps)
            report(progress, st.step, st.total_steps)
        if st.finished:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise EvalError(f"job {job_id} still {st.state} after {timeout:.0f} s; import it later with "
                            "`python -m crs_core jobs`")
        time.sleep(poll)
    if st.state != "succeeded":
        raise _not_ready(job_id, st, "generation")
    try:
        jobs.import_finished_jobs(ws)
    except jobs.JobImportError as exc:
        if job_id in exc.failures:
            raise EvalError(f"job {job_id} finished but its results could not be scored: "
                            f"{exc.failures[job_id]}") from exc
    run_id = lm_run_id(job_id)
    if not ws.cursor().execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]:
        raise EvalError(f"job {job_id} succeeded but no run {run_id} was stored")
    return run_id


def run_results(ws: "Workspace", run_id: str) -> dict[str, dict[str, tuple[float, float | None, int]]]:
    """dataset -> metric -> (value, stderr, n_turns) of a stored run (for printing)."""
    from .evaluate import _metric_names

    df = ws.df("SELECT dataset, metric, value, stderr, n_turns FROM metrics WHERE run_id = ?", [run_id])
    rank = {m: i for i, m in enumerate(_metric_names(10**9))}
    df = df.assign(_o=df["metric"].map(lambda m: rank.get(m, len(rank)))).sort_values(["dataset", "_o"])
    out: dict[str, dict[str, tuple[float, float | None, int]]] = {}
    for r in df.itertuples(index=False):
        se = None if r.stderr is None or r.stderr != r.stderr else float(r.stderr)
        out.setdefault(str(r.dataset), {})[str(r.metric)] = (float(r.value), se, int(r.n_turns))
    return out
