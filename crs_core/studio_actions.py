"""Page entry points for steps the studio starts in a background thread (no Streamlit here).

Each function is the body of one studio action: it takes `progress(done, total)` and a
`threading.Event` to stop on, does the work through the same library calls as the CLI, and
returns a plain result the page shows. The pages run them with `pages._shared.start_background`.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

from .errors import CRSError
from .progress import ProgressFn, report, scaled


class ActionStopped(CRSError):
    """The person stopped the action; what was finished is kept (said in the message)."""


# -- evaluate a finished training job ------------------------------------------------------------
def evaluate_trained_model(ws: Any, job_id: str, datasets: Sequence[str], *, turn_sample: int | None = None,
                           progress: ProgressFn | None = None, stop: threading.Event | None = None
                           ) -> dict[str, Any]:
    """Evaluate the model of a succeeded training job on `datasets` in process, through its kind's
    evaluator, and store the run, as `python -m crs_core eval --model dense --retriever <job>` does
    for a retriever (same loader). Returns {"run_id", "results": {dataset: EvalResult}}."""
    from . import model_eval, model_kinds, train
    from .evaluate import evaluate, store_run

    job = next((m for m in train.trained_models(ws) if m["job_id"] == job_id), None)
    if job is None:
        raise model_eval.ModelNotReadyError(f"{job_id} is not a succeeded training job of this workspace")
    entry = model_kinds.get(job["kind"])
    if entry.evaluated_in_job:
        raise model_eval.EvalError(f"a {entry.short_label} is evaluated by a job: {entry.evaluator}")
    rec, _ref = entry.resolve("evaluator")(ws, job_id, list(datasets))
    report(progress, 0, 1000)
    rec.fit(None, progress=scaled(progress, 0.0, 0.4))  # embeds the test sets' items
    results = {}
    share = 0.6 / max(1, len(datasets))
    for n, ds in enumerate(datasets):
        if stop is not None and stop.is_set():
            raise ActionStopped("evaluation stopped; nothing was stored")
        results[ds] = evaluate(ws, rec, ds, turn_sample=turn_sample,
                               progress=scaled(progress, 0.4 + n * share, 0.4 + (n + 1) * share))
    config = job.get("config") or {}
    meta = {"model": rec.name, "config": {"job_id": job_id},
            **{k: config.get(k) for k in ("training_data", "selection_strategy", "budget")}}
    run_id = store_run(ws, meta, results)
    report(progress, 1000, 1000)
    return {"run_id": run_id, "results": results}


# -- label augmentation, then training with the chosen labels -------------------------------------
def augment_then_train(ws: Any, dataset: str, scorer: str, *, teacher_config: Any = None,
                       threshold: float | None = None, limit_turns: int | None = None,
                       teacher_pairs: int | None = None, train: Mapping[str, Any] | None = None,
                       progress: ProgressFn | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """FNSCRS label augmentation of `dataset` with `scorer` (as `python -m crs_core augment`),
    then, when `train` is given, the training job on the chosen labels (as `train --labels`).

    teacher_config: a `teacher.TeacherConfig` for the 'teacher' and 'distilled' scorers (None:
    the studio's default, $CRS_TEACHER_BASE_URL or the local teacher). Every teacher reply is
    cached in the workspace, so a stopped run started again pays no call twice (augmentation
    stores its labels only at the end: a stopped run stores none). `train`: {"kind", "labels"
    (two_stage / mixed / real), "data" (real training data: a dialogue set or "synthetic..."),
    "config" (epochs, max_steps, alpha, ...)}. Returns {"report": AugmentReport, "job_id",
    "info"} (job_id None without `train`)."""
    from . import augment

    kwargs: dict[str, Any] = {}
    if threshold is not None:
        kwargs["threshold"] = float(threshold)
    if teacher_pairs is not None:
        kwargs["teacher_pairs"] = int(teacher_pairs)
    teacher = None
    if scorer != "similarity":
        from .teacher import Teacher, TeacherConfig

        teacher = Teacher(teacher_config or TeacherConfig.from_env(), cache=ws)
    try:
        rep = augment.augment(ws, dataset, scorer=scorer, teacher=teacher, limit_turns=limit_turns,
                              progress=scaled(progress, 0.0, 0.95 if train else 1.0), stop=stop, **kwargs)
    finally:
        if teacher is not None:
            teacher.close()
    out: dict[str, Any] = {"report": rep, "job_id": None, "info": None}
    if train:
        if stop is not None and stop.is_set():
            raise ActionStopped(f"stopped after the augmentation ({rep.labels_kept:,} labels stored); "
                                "no training job was started")
        data = str(train.get("data") or dataset)
        real_data = "synthetic" if data.startswith("synthetic") else data
        job_id, info = augment.launch_training_job(
            ws, train["kind"], real_data, labels=train.get("labels", "two_stage"),
            config=dict(train.get("config") or {}), aug_dataset=dataset, aug_scorer=scorer,
            statuses=augment.SYNTHETIC_DATASETS.get(data, ("approved",)))
        out.update(job_id=job_id, info=info)
    report(progress, 1000, 1000)
    return out


# -- budget curves ---------------------------------------------------------------------------------
def parse_int_list(text: str, what: str) -> list[int]:
    """'10, 25 50' -> [10, 25, 50] (distinct, in order); a clear error for anything else."""
    import re

    values: list[int] = []
    for token in re.split(r"[\s,;]+", str(text or "").strip()):
        if not token:
            continue
        if not re.fullmatch(r"\d+", token):
            raise CRSError(f"{what}: {token!r} is not a whole number (give e.g. 10, 25, 50)")
        if int(token) not in values:
            values.append(int(token))
    if not values:
        raise CRSError(f"{what}: give at least one number")
    return values


def run_budget_curves(ws: Any, *, strategies: Sequence[str], budgets: Sequence[int], seeds: Sequence[int] = (0,),
                      datasets: Sequence[str], turn_sample: int | None = None, gt_mode: str = "retrieve",
                      student: str = "nbcrs", teacher_config: Any = None, progress: ProgressFn | None = None,
                      stop: threading.Event | None = None, follow: dict | None = None) -> list[Any]:
    """One budget-curve experiment per seed (`budget_curve.run_budget_curve`, as `python -m crs_core
    budget-curve`), one after the other; every point is stored when it is evaluated, so a chart
    that reads the experiment shows it at once. `follow` (a dict) gets "experiment" set to the
    experiment that is running (and "experiments", all of them so far). student: what each point
    trains (`budget_curve.students()`). teacher_config: the synthesis teacher (None:
    $CRS_TEACHER_BASE_URL or the local teacher). A stopped run keeps its
    points; started again with the same settings it resumes. Returns the reports."""
    from .budget_curve import run_budget_curve
    from .teacher import Teacher, TeacherConfig

    follow = follow if follow is not None else {}
    follow.setdefault("experiments", [])

    def started(exp_id: str) -> None:
        follow["experiment"] = exp_id
        if exp_id not in follow["experiments"]:
            follow["experiments"].append(exp_id)

    reports = []
    n = len(seeds)
    with Teacher(teacher_config or TeacherConfig.from_env(), cache=ws) as teacher:
        for i, seed in enumerate(seeds):
            if stop is not None and stop.is_set():
                break
            rep = run_budget_curve(ws, teacher, strategies=list(strategies), budgets=list(budgets),
                                   datasets=list(datasets), turn_sample=turn_sample, seed=int(seed), gt_mode=gt_mode,
                                   student=student, progress=scaled(progress, i / n, (i + 1) / n), stop=stop,
                                   on_experiment=started)
            reports.append(rep)
            if rep.stopped:
                break
    return reports
