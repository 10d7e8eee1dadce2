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
def evaluate_trained_retriever(ws: Any, job_id: str, datasets: Sequence[str], *, turn_sample: int | None = None,
                               progress: ProgressFn | None = None, stop: threading.Event | None = None
                               ) -> dict[str, Any]:
    """Evaluate the retriever of a succeeded training job on `datasets` and store the run, as
    `python -m crs_core eval --model dense --retriever <job>` does (same loader: model_eval.dense_retriever).
    Returns {"run_id", "results": {dataset: EvalResult}}."""
    from . import model_eval, train
    from .evaluate import evaluate, store_run

    job = next((m for m in train.trained_models(ws, train.KIND_RETRIEVER) if m["job_id"] == job_id), None)
    if job is None:
        raise model_eval.ModelNotReadyError(f"{job_id} is not a succeeded retriever job of this workspace")
    rec, _ref = model_eval.dense_retriever(ws, job_id, list(datasets))
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
