"""The student LM: supervised fine-tuning of SmolLM2 (full or LoRA) on dialogue -> numbered title
list, then loading and generation for evaluation. Used through `crs_core.train`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from . import train_dist
from .errors import CRSError, InputError
from .train_data import (CONTEXTS_INPUT, Example, GENERATIONS_FILE, Item, KIND_GENERATE, KIND_SFT, SFTConfig,
    TrainingError, build_messages, format_target, parse_numbered_list, render_context, _config_from)
from .train_loop import (pick_device, soft_label_loss, _LoopSpec, _autocast, _hooks_or_default,
    _linear_warmup_decay, _run_loop, _seed_everything, _trainable)
from .train_retriever import (_save_final)
from .prompts import DEFAULT_SYSTEM_PROMPT, DEFAULT_USER_INSTRUCTION

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


def planned_steps(examples: Sequence[Example], items: Mapping[str, Item], cfg: SFTConfig) -> int:
    """The optimizer steps `train_sft` makes: one unit per example with a known label."""
    n = sum(1 for ex in examples if any(lab in items for lab in ex.labels))
    return _LoopSpec.of(n, cfg.batch_size * cfg.grad_accum, 1, cfg).total_steps


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
    hooks = train_dist.rank_hooks(_hooks_or_default(hooks, out_dir))
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
    world = train_dist.init(device)
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
    forward = train_dist.wrap(model, device)  # training passes; `model` is what is saved
    n_train = sum(p.numel() for _, p in _trainable(model))
    n_all = sum(p.numel() for p in model.parameters())
    params = [p for _, p in _trainable(model)]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accum
    spec = _LoopSpec.of(len(data), per_step, 1, cfg)
    total = spec.total_steps
    warmup = max(1, round(cfg.warmup_ratio * total)) if cfg.warmup_ratio > 0 else 0
    scheduler = _linear_warmup_decay(optimizer, warmup, total)
    lens = [len(x) for x, _ in data]
    hooks.log(
        f"SFT ({cfg.method}) of {base.name}: {len(data)} examples, {n_train:,} of {n_all:,} parameters trained, "
        f"lr {cfg.learning_rate:g}, {cfg.batch_size} x {cfg.grad_accum} per step, "
        f"{min(lens)}-{max(lens)} tokens, device {device}"
        + (f", {world.size} processes of {cfg.batch_size} x {cfg.grad_accum} each" if world.distributed else "")
    )
    pad_id = tok.pad_token_id

    def step_fn(idx: list[int]) -> tuple[float, int]:
        chunk = [data[i] for i in idx]
        # the mean over the target tokens of the WHOLE step (every process counts them all), so
        # that with DDP's gradient average (times grad_scale) the step's gradient is the one a
        # single process computes on the same examples: per-token, independent of the split
        n_tok = sum(sum(1 for t in lab[1:] if t != -100) for _, lab in chunk)
        mine = [data[i] for i in train_dist.shard(idx)]
        starts = list(range(0, len(mine), cfg.batch_size))
        total_loss = 0.0
        for s in starts:
            mb = mine[s : s + cfg.batch_size]
            width = max(len(x) for x, _ in mb)
            ids = torch.full((len(mb), width), pad_id, dtype=torch.long)
            labels = torch.full((len(mb), width), -100, dtype=torch.long)
            att = torch.zeros((len(mb), width), dtype=torch.long)
            for r, (x, lab) in enumerate(mb):
                ids[r, : len(x)] = torch.tensor(x)
                labels[r, : len(lab)] = torch.tensor(lab)
                att[r, : len(x)] = 1
            ids, labels, att = ids.to(device), labels.to(device), att.to(device)
            with train_dist.sync_gradients(forward, s == starts[-1]):
                with _autocast(device):
                    logits = forward(input_ids=ids, attention_mask=att).logits
                sel = labels[:, 1:] != -100  # position t predicts token t+1: target tokens only
                rows, target = logits[:, :-1][sel], labels[:, 1:][sel]
                soft = None
                if teacher is not None:
                    with torch.no_grad(), _autocast(device):
                        soft = teacher(input_ids=ids, attention_mask=att).logits[:, :-1][sel]
                ce, kl = soft_label_loss(rows, target, soft, kl_alpha)
                loss_sum = ce.sum() + kl_alpha * kl.sum()
                (loss_sum * train_dist.grad_scale() / n_tok).backward()
            total_loss += float(loss_sum.detach())
        return train_dist.all_sum(total_loss) / max(1, n_tok), len(chunk)

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
