"""The registry of trained model kinds: one entry names everything the rest of the studio needs.

Jobs resolve a kind's runner here, the CLI's `train --kind` choices and the Training,
Augmentation and Evaluation pages' model options are read from here, `train` looks up a kind's
config class, trainer and step plan here (real, mixed and two-stage labels alike), and the
pages, the CLI, model_eval and the benches load and evaluate a trained model through its entry.
Adding a kind is one module (its config, trainer, step plan, loader and evaluator) plus one
`register(ModelKind(...))` line below.

Heavy objects are named as ``"module:attribute"`` strings and imported on first use
(`ModelKind.resolve`), so this module imports only the standard library: the job worker and
`crs_core.jobs` read it at start without importing torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelKind", "register", "get", "kinds", "by_cli_name", "RETRIEVER", "SFT"]


@dataclass(frozen=True)
class ModelKind:
    kind: str                 # the job kind stored with every job of this model, e.g. "train_retriever"
    cli_name: str             # `python -m crs_core train --kind <cli_name>`
    label: str                # what pages call it
    short_label: str          # the same, short (select boxes beside other options)
    config: str               # "module:Class", the config dataclass (validated before a job starts)
    # "module:function"(examples, items, cfg, hooks=, out_dir=, *, init_from=None, kl_alpha=0.0) -> result;
    # init_from and kl_alpha are stage 2 of two-stage training (start from stage 1, KL against it)
    trainer: str
    planned_steps: str        # "module:function"(examples, items, cfg) -> the optimizer steps the trainer makes
    loader: str               # "module:function"(model_dir) -> the trained model, the one loader of every consumer
    # "module:function" that scores a succeeded job (ws, job_id, datasets, ...): in process it
    # returns (recommender, ModelRef) to evaluate like any other; with evaluated_in_job it launches
    # a job (turn_sample=) whose import stores the run, and returns that job's id
    evaluator: str
    default_epochs: int       # the pages' default (a retriever learns in one epoch; an LM needs more)
    runner: str = "crs_core.train:run_training_job"  # "module:function"(JobContext) -> result, in the job process
    method: str | None = None  # "lora" where the kind fine-tunes adapters by default
    evaluated_in_job: bool = False

    def resolve(self, field: str) -> Any:
        """The object a ``"module:attribute"`` field names, imported now."""
        module, _, attr = getattr(self, field).partition(":")
        return getattr(importlib.import_module(module), attr)

    def load(self, model_dir: Any) -> Any:
        """The trained model in `model_dir`, through this kind's loader."""
        return self.resolve("loader")(model_dir)


_KINDS: dict[str, ModelKind] = {}


def register(entry: ModelKind) -> ModelKind:
    if any(k.cli_name == entry.cli_name and k.kind != entry.kind for k in _KINDS.values()):
        raise ValueError(f"another model kind is already called {entry.cli_name!r} on the command line")
    _KINDS[entry.kind] = entry
    return entry


def kinds() -> list[ModelKind]:
    return list(_KINDS.values())


def get(kind: str) -> ModelKind:
    try:
        return _KINDS[kind]
    except KeyError:
        known = ", ".join(repr(k) for k in _KINDS)
        raise KeyError(f"unknown model kind {kind!r}; known: {known}") from None


def by_cli_name(name: str) -> ModelKind:
    for entry in _KINDS.values():
        if entry.cli_name == name:
            return entry
    raise KeyError(f"unknown model kind {name!r}; known: {', '.join(k.cli_name for k in _KINDS.values())}")


RETRIEVER = register(ModelKind(
    kind="train_retriever", cli_name="retriever", label="Dense retriever (MiniLM bi-encoder, InfoNCE)",
    short_label="Dense retriever", config="crs_core.train_data:RetrieverConfig",
    trainer="crs_core.train_retriever:train_retriever", planned_steps="crs_core.train_retriever:planned_steps",
    loader="crs_core.recommenders_base:load_retriever", evaluator="crs_core.model_eval:dense_retriever",
    default_epochs=1))
SFT = register(ModelKind(
    kind="train_lm", cli_name="sft", label="Fine-tuned LM (SmolLM2-135M, SFT / LoRA)",
    short_label="Fine-tuned LM (LoRA)", config="crs_core.train_data:SFTConfig",
    trainer="crs_core.train_lm:train_sft", planned_steps="crs_core.train_lm:planned_steps",
    loader="crs_core.train_lm:load_lm", evaluator="crs_core.model_eval:launch_lm_eval", evaluated_in_job=True,
    default_epochs=3, method="lora"))
