"""Training across processes (crs_core.train_dist): a job with ``nproc`` 2 runs its worker under
torchrun (2 gloo processes on 127.0.0.1) with batch b each, and must train exactly as one process
with batch 2b: the same loss at every step.

Tolerance: relative 1e-4. The two runs add the same numbers in a different order (per-process
sums, then an all-reduce; micro-batches padded to different widths), so float32 rounding differs
(~1e-6 relative per step) and grows a little through the optimizer steps; a wrong split of the
data, of the gradient average or of the in-batch negatives changes the loss by far more (the
checks below show the gap for a run that differs in its batch).

Dropout is off in both runs: each process draws its own dropout masks, so with dropout two
processes cannot reproduce one process's random numbers (the objective is the same, the noise not).
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest

from crs_core import jobs, models, train, train_dist
from crs_core.errors import CRSError
from crs_core.store import Workspace
from crs_core.train_loop import _NoJob

from test_train import EXAMPLES, ITEMS

REL = 1e-4
MORE_EXAMPLES = EXAMPLES + [
    {"context": ["User: Something with a heist, please."], "labels": ["tt0113277"]},
    {"context": ["User: An animated classic about a lion?"], "labels": ["tt0110357", "tt0114709"]},
]


def _job_losses(tmp_path: Path, kind: str, config: dict, *, cancel_and_resume: bool = False
                ) -> tuple[list[float], dict, Path]:
    """The per-step losses a job records. `cancel_and_resume`: the job is cancelled as soon as it
    is launched (rank 0 stops every rank, before training or at a step, saving a checkpoint),
    then resumed, on 2 processes again, to the end."""
    ws = Workspace(tmp_path / "ws.duckdb")
    try:
        job_id = train.launch_training(ws, kind, MORE_EXAMPLES, ITEMS, config, jobs_root=tmp_path / "jobs")
        folder = jobs.job_folder(ws, job_id)
        if cancel_and_resume:
            jobs.cancel_job(folder)
            st = jobs.wait_for_job(folder, timeout=600, poll=0.5)
            assert st.state == "cancelled", f"{st}\n{jobs.read_log(folder)}"
            _assert_no_worker_left(folder)
            jobs.resume_job(ws, job_id)
        st = jobs.wait_for_job(folder, timeout=600, poll=0.5)
    finally:
        ws.close()
    log = jobs.read_log(folder)
    assert st.state == "succeeded", f"{st}\n{log}"
    return [p["loss"] for p in jobs.read_progress(folder)], st.result, folder


def _assert_no_worker_left(folder: Path, wait_s: float = 60.0) -> None:
    """torchrun's agent and both ranks exit once rank 0 has recorded the result."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [pid for pid in _processes_naming(str(folder))]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert alive == [], f"processes of {folder.name} still running: {alive}"


def _processes_naming(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `text`."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "status").read_text().split("State:", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            out.append(int(proc.name))
    return out


def test_two_process_lm_sft_matches_one_process_with_the_doubled_batch(tmp_path):
    """The LM's SFT loss is a per-token mean over the step: 2 x (1 x 2 micro-batches) with DDP
    averaging (and the global token count) equals 1 x (2 x 2 micro-batches)."""
    common = {"method": "lora", "lora_dropout": 0.0, "epochs": 1, "max_length": 96, "n_titles": 2, "seed": 5,
              "max_steps": 2, "grad_accum": 2}
    losses2, res2, folder = _job_losses(tmp_path, train.KIND_SFT, {**common, "batch_size": 1, "nproc": 2})
    log = jobs.read_log(folder)
    assert "on 2 processes (4 units a step in all)" in log  # rank 0's log line; the others write nothing
    assert log.count("training: 2 steps") == 1
    _assert_no_worker_left(folder)

    examples, items = train.load_examples(MORE_EXAMPLES), train.load_items(ITEMS)
    one = []
    res1 = train.train_sft(examples, items, {**common, "batch_size": 2}, out_dir=tmp_path / "one",
                           hooks=_Recorder(one, tmp_path / "one"))
    print(f"\nSFT loss per step, 2 processes x batch 1 x accum 2: {losses2}; 1 process x batch 2 x accum 2: {one}")
    assert len(losses2) == len(one) == 2 == res2["steps"] == res1["steps"]
    assert losses2 == pytest.approx(one, rel=REL), (losses2, one)
    assert res2["final_loss"] == pytest.approx(res1["final_loss"], rel=REL)
    assert (Path(res2["model_dir"]) / "adapter_model.safetensors").is_file()

    # the check can fail: the same run without the second process's half of each step differs
    half = []
    train.train_sft(examples, items, {**common, "batch_size": 1, "max_steps": 1}, out_dir=tmp_path / "half",
                    hooks=_Recorder(half, tmp_path / "half"))
    assert abs(half[0] - one[0]) > 100 * REL * one[0]


def test_two_process_retriever_gathers_in_batch_negatives(tmp_path):
    """InfoNCE with in-batch negatives: the vectors are gathered across processes, so 2 x 2 pairs
    see the same 4 x 4 similarity matrix (and the same hard negatives) as 1 x 4 pairs; a
    cancelled job resumes on its processes and still trains exactly as one process."""
    base = _minilm_without_dropout(tmp_path / "minilm-no-dropout")
    common = {"base_model": str(base), "max_steps": 3, "query_max_len": 48, "item_max_len": 48, "seed": 7,
              "hard_negatives": 1, "hard_negative_ranks": [2, 8], "val_fraction": 0.0}
    losses2, res2, folder = _job_losses(tmp_path, train.KIND_RETRIEVER,
                                        {**common, "batch_size": 2, "nproc": 2, "checkpoint_every": 1},
                                        cancel_and_resume=True)
    _assert_no_worker_left(folder)
    examples, items = train.load_examples(MORE_EXAMPLES), train.load_items(ITEMS)
    one = []
    res1 = train.train_retriever(examples, items, {**common, "batch_size": 4}, out_dir=tmp_path / "one",
                                 hooks=_Recorder(one, tmp_path / "one"))
    print(f"\nretriever loss per step, 2 processes x 2 pairs: {losses2}; 1 process x 4 pairs: {one}")
    assert len(losses2) == len(one) == 3
    assert losses2 == pytest.approx(one, rel=REL), (losses2, one)
    assert res2["pairs"] == res1["pairs"]
    # local negatives only (each process its own 2 x 2 matrix) would be another objective
    local = []
    train.train_retriever(examples, items, {**common, "batch_size": 2, "max_steps": 1}, out_dir=tmp_path / "local",
                          hooks=_Recorder(local, tmp_path / "local"))
    assert abs(local[0] - one[0]) > 100 * REL * one[0]


def test_bad_process_counts_are_one_clear_error(tmp_path):
    ws = Workspace(tmp_path / "ws.duckdb")
    try:
        for bad in (0, "two", 1.5):
            with pytest.raises(CRSError, match="nproc must be a whole number >= 1"):
                train.launch_training(ws, train.KIND_SFT, EXAMPLES, ITEMS, {"nproc": bad}, jobs_root=tmp_path / "jobs")
        assert jobs.list_jobs(ws) == []  # nothing launched
    finally:
        ws.close()
    assert train_dist.shard_sizes(5, 2) == [3, 2] and train_dist.shard([4, 1, 3], train_dist.World(2, 1, 1)) == [3]


class _Recorder(_NoJob):
    """In-process hooks that keep each step's loss (what a job writes to progress.jsonl)."""

    def __init__(self, losses: list[float], out: Path):
        self.losses, self.out = losses, out

    def log(self, message: str) -> None:
        pass

    warn = log

    def report(self, step, total_steps, **kw) -> None:
        self.losses.append(kw["loss"])


def _minilm_without_dropout(dest: Path) -> Path:
    """all-MiniLM-L6-v2 with dropout 0: its files linked, its config.json rewritten."""
    src = models.minilm_path()
    dest.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name != "config.json":
            os.symlink(entry.resolve(), dest / entry.name)
    config = json.loads((src / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (dest / "config.json").write_text(json.dumps(config))
    return dest
