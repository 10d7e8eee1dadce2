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

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import model_kinds, train_dist
from .prompts import (DEFAULT_SYSTEM_PROMPT, DEFAULT_USER_INSTRUCTION)
from .train_data import (AUGMENTED_INPUT, Example, ITEMS_INPUT, Item, KIND_GENERATE, KIND_RETRIEVER, KIND_SFT,
    LABEL_MODES, RetrieverConfig, SFTConfig, STAGE1_DIR, TRAIN_INPUT, TrainingError, build_messages,
    format_target, load_examples, load_items, merge_labels, parse_numbered_list, render_context, title_from_text,
    _config_from)
from .train_lm import (generate_titles, launch_generation, load_lm, read_generations, run_generate_job, train_sft)
from .train_loop import (pick_device, soft_label_loss, _StageHooks, _hooks_or_default)
from .train_retriever import train_retriever

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
    "run_training_job",
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
    train_dist.check_nproc((config or {}).get(train_dist.NPROC_KEY, 1))
    return _config_from(entry.resolve("config"), config)




def _job_data(ctx) -> tuple[list[Example], dict[str, Item]]:
    where = str(ctx.folder / "inputs")
    return load_examples(ctx.read_input(TRAIN_INPUT), where), load_items(ctx.read_input(ITEMS_INPUT), where)


def run_training_job(ctx) -> dict[str, Any]:
    """The job runner of every trained model kind: the job's kind names its config and trainer."""
    kind = ctx.kind
    cfg = _config_from(model_kinds.get(kind).resolve("config"), ctx.config)
    examples, items = _job_data(ctx)
    augmented = None
    if cfg.labels != "real":
        if not ctx.has_input(AUGMENTED_INPUT):
            raise TrainingError(f"labels={cfg.labels!r} but the job folder has no augmented examples")
        augmented = load_examples(ctx.read_input(AUGMENTED_INPUT), str(ctx.folder / "inputs"))
    return train_with_labels(kind, examples, augmented, items, cfg, hooks=ctx)


# job folders written before every kind shared one runner record these runner names
run_retriever_job = run_sft_job = run_training_job


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
    entry = model_kinds.get(kind)
    trainer, planned_steps = entry.resolve("trainer"), entry.resolve("planned_steps")
    plain = dict(labels="real", alpha=0.0, stage1_epochs=None, finetune_lr=None, stage1_model=None)
    s1_cfg = replace(cfg, **plain, epochs=int(cfg.stage1_epochs or cfg.epochs))
    s2_cfg = replace(cfg, **plain, lr=cfg.lr if cfg.finetune_lr is None else float(cfg.finetune_lr))
    stage1_data = merge_labels(real, augmented)
    folder = getattr(job, "folder", None)
    if cfg.stage1_model:
        stage1_dir, s1_steps = Path(cfg.stage1_model), 0
    elif out_dir is not None:
        stage1_dir = Path(out_dir).with_name(f"{Path(out_dir).name}-stage1")
        s1_steps = planned_steps(stage1_data, items, s1_cfg)
    else:
        stage1_dir = Path(folder) / STAGE1_DIR
        s1_steps = planned_steps(stage1_data, items, s1_cfg)
    s2_steps = planned_steps(real, items, s2_cfg)
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
        if train_dist.world().is_main:
            tmp = summary_file.with_name(f".{summary_file.name}.tmp")
            tmp.write_text(json.dumps({k: v for k, v in res1.items() if k != "config"}, default=str))
            os.replace(tmp, summary_file)
            if folder is not None:
                _drop_checkpoints_of_stage(Path(folder), 1)
    else:
        if folder is not None and train_dist.world().is_main:  # died between saving stage1/ and dropping its checkpoints
            _drop_checkpoints_of_stage(Path(folder), 1)
        job.log(f"stage 1 already done ({stage1_dir})")
    if res1 is None and summary_file.is_file():
        res1 = json.loads(summary_file.read_text())
    job.log(f"stage 2: {len(real)} examples with real labels, {s2_steps} steps, alpha {cfg.alpha:g}")
    hooks2 = _StageHooks(job, 2, s1_steps, grand)
    res2 = trainer(real, items, s2_cfg, hooks=hooks2, out_dir=out_dir, init_from=stage1_dir, kl_alpha=cfg.alpha)
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

    trained_kinds = {k.kind for k in model_kinds.kinds()}
    out = []
    for st in jobs.list_jobs(ws):
        if st.kind not in trained_kinds or (kind and st.kind != kind) or st.state != "succeeded":
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
