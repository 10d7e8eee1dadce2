"""The registry of trained model kinds: one entry names everything the rest of the studio needs.

Jobs resolve a kind's runner here, the CLI's `train --kind` choices and the Training and
Augmentation pages' model options are read from here, and `train` looks up a kind's config
class and trainer here. Adding a kind is one module (its config, trainer and job runner) plus
one `register(ModelKind(...))` line below.

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
    trainer: str              # "module:function"(examples, augmented, items, cfg, hooks=...) -> result
    runner: str               # "module:function"(JobContext) -> result, run in the job process
    default_epochs: int       # the pages' default (a retriever learns in one epoch; an LM needs more)
    method: str | None = None  # "lora" where the kind fine-tunes adapters by default
    evaluated_as: str = ""    # the `eval --model` name that scores a finished job of this kind

    def resolve(self, field: str) -> Any:
        """The object a ``"module:attribute"`` field names, imported now."""
        module, _, attr = getattr(self, field).partition(":")
        return getattr(importlib.import_module(module), attr)


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
    trainer="crs_core.train_retriever:train_retriever",
    runner="crs_core.train:run_retriever_job", default_epochs=1, evaluated_as="dense"))
SFT = register(ModelKind(
    kind="train_lm", cli_name="sft", label="Fine-tuned LM (SmolLM2-135M, SFT / LoRA)",
    short_label="Fine-tuned LM (LoRA)", config="crs_core.train_data:SFTConfig",
    trainer="crs_core.train_lm:train_sft",
    runner="crs_core.train:run_sft_job", default_epochs=3, method="lora", evaluated_as="lm"))
