"""The dense retriever: a MiniLM bi-encoder fine-tuned with in-batch InfoNCE on (dialogue
context, labelled item text) pairs, a validation split carved from train for early stopping,
and its final save. Used through `crs_core.train`."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from . import train_dist

from .train_data import (Example, Item, KIND_RETRIEVER, RetrieverConfig, TrainingError, _config_from)
from .train_loop import (pick_device, soft_label_loss, _LoopSpec, _autocast, _epoch_order, _hooks_or_default,
    _linear_warmup_decay, _run_loop, _seed_everything)

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


def planned_steps(examples: Sequence[Example], items: Mapping[str, Item], cfg: RetrieverConfig) -> int:
    """The optimizer steps `train_retriever` makes: one unit per (training context, known label) pair."""
    train_idx, _ = _validation_split(examples, _val_fraction(cfg, len(examples)), cfg.seed)
    pairs = sum(min(sum(1 for lab in dict.fromkeys(examples[i].labels) if lab in items), cfg.max_labels_per_context)
                for i in train_idx)
    return _LoopSpec.of(pairs, cfg.batch_size, 2, cfg).total_steps


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
    init_from: str | os.PathLike | None = None,
    kl_alpha: float = 0.0,
    monitor: Callable[[int, RetrieverProbe], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune the bi-encoder; saves through `hooks.save_output` (a job) or into `out_dir`.

    `init_from` (stage 2 of two-stage training): start from that saved model instead of
    ``base_model``. `kl_alpha` > 0: the model it starts from is also the frozen stage-1 model; the loss is ``CE + kl_alpha * KL(P || y_hat)`` over the in-batch
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
    if init_from is not None:
        cfg = replace(cfg, base_model=str(init_from))
    hooks = train_dist.rank_hooks(_hooks_or_default(hooks, out_dir))
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
    world = train_dist.init(device)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModel.from_pretrained(str(base), dtype=torch.float32).to(device)
    if getattr(model, "pooler", None) is not None:
        # BERT's [CLS] pooler is not in the mean-pooled vector and never gets a gradient; frozen,
        # because DDP needs a gradient for every trainable parameter
        model.pooler.requires_grad_(False)
    forward = train_dist.wrap(model, device)  # training passes; `model` is what is saved and validated
    spec = _LoopSpec.of(len(pairs), cfg.batch_size, 2, cfg)
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

    def encode(texts: list[str], max_len: int, side: str, net=model):
        tok.truncation_side = side
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
        with _autocast(device):
            out = net(**enc).last_hidden_state
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
        # Across processes each encodes its block of the step and the vectors are gathered (with
        # gradient), so every item of the whole step is a negative for every query, as on one
        # process: 2 x batch b optimise the same InfoNCE as 1 x batch 2b. Every rank computes that
        # same global loss; the gather's backward sums its world copies of each gradient and DDP
        # averages them, which gives exactly the single-process gradient.
        batch = [pairs[i] for i in idx]
        b = len(batch)
        docs = [it for _, it in batch]
        hard_counts = []
        for e, _ in batch:  # drawn for the whole step on every rank: the same draws as one process
            pool = hard_pool.get(e)
            hard_counts.append(cfg.hard_negatives if pool else 0)
            if pool:
                docs.extend(random.choice(pool) for _ in range(cfg.hard_negatives))
        sizes = train_dist.shard_sizes(b)
        lo = sum(sizes[: world.rank])
        hi = lo + sizes[world.rank]
        q_mine = encode([queries[e] for e, _ in batch[lo:hi]], cfg.query_max_len, "left", forward)
        d_mine = encode([items[it].text for it in docs[lo:hi]], cfg.item_max_len, "right", forward)
        q, d = train_dist.gather_rows(q_mine, sizes), train_dist.gather_rows(d_mine, sizes)
        if len(docs) > b:
            hard_sizes = [sum(hard_counts[a : a + n]) for a, n in zip([sum(sizes[:r]) for r in range(len(sizes))], sizes)]
            h_lo = b + sum(hard_sizes[: world.rank])
            h_texts = [items[it].text for it in docs[h_lo : h_lo + hard_sizes[world.rank]]]
            # a rank without hard negatives in this step still takes part in the gather, with 0 rows
            h_mine = encode(h_texts, cfg.item_max_len, "right", forward) if h_texts else d_mine[:0]
            d = torch.cat([d, train_dist.gather_rows(h_mine, hard_sizes)])
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
    """The final model, written by rank 0 only; every rank returns once it is complete."""
    if not train_dist.world().is_main:
        train_dist.barrier()
        return Path(out_dir) if out_dir is not None else Path(getattr(hooks, "folder", ".")) / "model"
    try:
        return _write_final(hooks, out_dir, write)
    finally:
        train_dist.barrier()


def _write_final(hooks: Any, out_dir: str | os.PathLike | None, write: Callable[[Path], None]) -> Path:
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
