"""The CLI as a user runs it: real subprocesses, a real workspace file, a real HTTP teacher."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crs_core.store import Workspace
from openai_stub_server import OpenAIStubServer

ROOT = Path(__file__).resolve().parent.parent
MOVIES = [
    ("tt0133093", "The Matrix", 1999, "action|sci-fi", "A hacker learns that reality is a simulation."),
    ("tt0076759", "Star Wars", 1977, "adventure|sci-fi", "A farm boy joins a rebellion against an empire."),
    ("tt0114709", "Toy Story", 1995, "animation|comedy", "Toys come to life when their owner is away."),
    ("tt0109830", "Forrest Gump", 1994, "drama|romance", "A kind man witnesses decades of history."),
    ("tt0120338", "Titanic", 1997, "drama|romance", "A romance aboard the doomed ocean liner."),
]


def run_cli(*args: str, workspace: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CRS_WORKSPACE": str(workspace), **(env or {})}
    return subprocess.run([sys.executable, "-m", "crs_core", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture()
def small_workspace(tmp_path) -> Path:
    path = tmp_path / "w.duckdb"
    with Workspace(path) as ws, ws.transaction() as cur:
        for item_id, title, year, genres, plot in MOVIES:
            cur.execute("INSERT INTO items (item_id, title, year, genres, plot, imdb_id) VALUES (?, ?, ?, ?, ?, ?)",
                        [item_id, title, year, genres, plot, item_id])
            for j in range(3):
                cur.execute("INSERT INTO reviews VALUES (?, ?, NULL, ?, 8, NULL, 'test')",
                            [f"{item_id}-{j}", item_id, f"{title}: {plot} Loved it, watch number {j + 1}."])
    return path


def test_help_explains_every_command(tmp_path):
    out = run_cli("--help", workspace=tmp_path / "w.duckdb")
    assert out.returncode == 0
    for command in ("init", "status", "ingest", "embed", "cluster", "select", "synth", "export", "eval", "train",
                    "jobs", "augment"):
        assert command in out.stdout


def test_status_of_an_empty_workspace_says_what_to_run(tmp_path):
    out = run_cli("status", workspace=tmp_path / "w.duckdb")
    assert out.returncode == 0
    assert "[todo] Seed data" in out.stdout and "python -m crs_core init" in out.stdout


def test_failures_exit_non_zero_with_one_line(tmp_path, small_workspace):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    out = run_cli("ingest", str(bad), workspace=small_workspace)
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    out = run_cli("select", "--strategy", "FISHER", "-B", "2", workspace=small_workspace)
    assert out.returncode == 1 and "run `python -m crs_core embed`" in out.stderr


def test_embed_select_synth_export_end_to_end(tmp_path, small_workspace):
    assert run_cli("embed", workspace=small_workspace).returncode == 0
    out = run_cli("select", "--strategy", "FISHER", "-B", "4", "--k", "2", workspace=small_workspace)
    assert out.returncode == 0, out.stderr
    selection_id = out.stdout.split()[1].rstrip(":")

    def reply(messages):
        prompt = messages[-1]["content"]
        if "20" in prompt and "movie" in prompt.lower() and "query" not in prompt.lower()[:40]:
            return "1. The Matrix (1999)\n2. Star Wars (1977)\n3. Toy Story (1995)"
        return "I want a clever science-fiction film with great action."

    with OpenAIStubServer(reply=reply) as stub:
        out = run_cli("synth", "--selection", selection_id, "--gt-mode", "retrieve", "--base-url", stub.base_url,
                      "--model", "stub-model", workspace=small_workspace, env={"OPENAI_API_KEY": "sk-test"})
        assert out.returncode == 0, out.stderr
        calls = stub.chat_requests
        assert calls > 0
        again = run_cli("synth", "--selection", selection_id, "--gt-mode", "retrieve", "--base-url", stub.base_url,
                        "--model", "stub-model", workspace=small_workspace, env={"OPENAI_API_KEY": "sk-test"})
        assert again.returncode == 0 and stub.chat_requests == calls  # resumed: nothing paid twice
    with Workspace(small_workspace) as ws:
        assert ws.count("synthetic_queries") > 0
    target = tmp_path / "train.jsonl"
    out = run_cli("export", str(target), "--shape", "crs", "--status", "all", workspace=small_workspace)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert rows and all(r["context"] and r["rec"] for r in rows)
    assert "sk-test" not in target.read_text() and b"sk-test" not in small_workspace.read_bytes()


# ----------------------------------------------------------------------------- eval of trained models
def _wait_job(workspace: Path, job_id: str, timeout: float = 900):
    from crs_core import jobs

    with Workspace(workspace) as ws:
        folder = jobs.job_folder(ws, job_id)
    return jobs.wait_for_job(folder, timeout=timeout)


@pytest.fixture()
def eval_workspace(studio_workspace_file, tmp_path) -> Path:
    from conftest import copy_workspace

    return copy_workspace(studio_workspace_file, tmp_path / "eval.duckdb")


def test_eval_of_a_retriever_trained_for_a_few_steps(tmp_path, eval_workspace):
    env = {"CRS_JOBS_ROOT": str(tmp_path / "jobs"), "OMP_WAIT_POLICY": "PASSIVE"}
    out = run_cli("train", "--kind", "retriever", "--statuses", "pending", "--max-steps", "2",
                  workspace=eval_workspace, env=env)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[2]
    assert _wait_job(eval_workspace, job_id).state == "succeeded"

    out = run_cli("eval", "--model", "dense", "--retriever", job_id, "--dataset", "inspired_test",
                  workspace=eval_workspace, env=env)
    assert out.returncode == 0, out.stderr
    assert "inspired_test (189 turns): recall@1=" in out.stdout
    run_id = out.stdout.strip().splitlines()[-1].split()[-1]
    with Workspace(eval_workspace) as ws:
        model, training_data, config = ws.cursor().execute(
            "SELECT model, training_data, config FROM runs WHERE run_id = ?", [run_id]).fetchone()
        cached = ws.scalar("SELECT count(*) FROM embedding_cache WHERE model LIKE 'retriever-%'")
    assert model == job_id and training_data == "synthetic"
    assert json.loads(config)["train_job"] == job_id
    assert cached > 1000  # the dataset's items, cached under the fine-tuned model's digest

    # the model folder works as well; a missing folder and an unknown job are one-line errors
    model_dir = tmp_path / "jobs" / job_id / "model"
    out = run_cli("eval", "--model", "dense", "--retriever", str(tmp_path / "nowhere" / "model"),
                  workspace=eval_workspace)
    assert out.returncode == 1 and "does not exist" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run_cli("eval", "--model", "dense", "--retriever", "train_retriever-unknown", workspace=eval_workspace)
    assert out.returncode == 1 and "no job 'train_retriever-unknown'" in out.stderr
    assert model_dir.is_dir()


def test_zero_shot_lm_eval_end_to_end_through_a_real_job(tmp_path, eval_workspace):
    env = {"CRS_JOBS_ROOT": str(tmp_path / "jobs"), "OMP_WAIT_POLICY": "PASSIVE"}
    out = run_cli("eval", "--model", "lm", "--turn-sample", "2", "--dataset", "inspired_test",
                  workspace=eval_workspace, env=env)
    assert out.returncode == 0, out.stderr
    assert "inspired_test (2 turns): recall@1=" in out.stdout
    job_id = out.stdout.split()[2]
    run_id = out.stdout.strip().splitlines()[-1].split()[-1]
    assert run_id == f"lm-eval-{job_id}"
    with Workspace(eval_workspace) as ws:
        config = json.loads(ws.scalar("SELECT config FROM runs WHERE run_id = ?", [run_id]))
        n_turns = ws.scalar("SELECT max(n_turns) FROM metrics WHERE run_id = ?", [run_id])
    assert n_turns == 2 and config["lm"] == "zero-shot" and config["generation_job"] == job_id
    assert config["grounding"]["inspired_test"]["contexts"] == 2
    # `jobs` imports nothing twice
    out = run_cli("jobs", workspace=eval_workspace, env=env)
    assert out.returncode == 0 and "imported:" not in out.stdout
    with Workspace(eval_workspace) as ws:
        assert ws.scalar("SELECT count(*) FROM runs WHERE run_id LIKE 'lm-eval-%'") == 1
    # a fine-tuned LM that does not exist is a clear error, and no job is started
    out = run_cli("eval", "--model", "lm", "--lm", "train_lm-unknown", workspace=eval_workspace, env=env)
    assert out.returncode == 1 and "no job 'train_lm-unknown'" in out.stderr


# ----------------------------------------------------------------------------- issue 13: failures that looked like success
def _add_selection(path: Path, selection_id: str = "sel-cli") -> str:
    with Workspace(path) as ws, ws.transaction() as cur:
        cur.execute("INSERT INTO selections (selection_id, strategy, unit, set_id, budget) "
                    "VALUES (?, 'RANDOM_UNIFORM', 'review', 'review:minilm', 3)", [selection_id])
        for rank, (item_id, *_rest) in enumerate(MOVIES[:3], 1):
            cur.execute("INSERT INTO selection_picks (selection_id, rank, unit_id) VALUES (?, ?, ?)",
                        [selection_id, rank, f"{item_id}-0"])
    return selection_id


def _synth(path: Path, stub, *extra: str, key: str = "sk-test-cli-KEY-0123456789") -> subprocess.CompletedProcess:
    return run_cli("synth", "--selection", "sel-cli", "--gt-mode", "llm", "--base-url", stub.base_url,
                   "--model", "stub-model", *extra, workspace=path,
                   env={"OPENAI_API_KEY": key, "CRS_TEACHER_BASE_URL": stub.base_url, "HF_HUB_OFFLINE": "1"})


def test_synth_that_stops_on_its_budget_exits_non_zero_and_says_the_paid_replies_are_cached(small_workspace):
    _add_selection(small_workspace)
    with OpenAIStubServer(reply=lambda m: "I want a clever science-fiction film with great action.") as stub:
        out = _synth(small_workspace, stub, "--max-calls", "1")
        assert out.returncode == 1, out.stdout + out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("error: synthesis stopped early (0 of 3 queries stored)")
        assert "budget" in out.stderr.strip().splitlines()[-1]
        assert "the 1 replies paid for in this run are cached in the workspace (none became a stored query yet)" \
            in out.stdout
        assert stub.chat_requests == 1
        again = _synth(small_workspace, stub, "--max-calls", "1")  # the cached reply is reused, one more call paid
        assert again.returncode == 1 and stub.chat_requests == 2


def test_synth_with_a_refused_key_stops_at_once_with_the_reason_and_no_key(small_workspace):
    from openai_stub_server import Fault

    _add_selection(small_workspace)
    key = "sk-test-cli-KEY-0123456789"
    with OpenAIStubServer() as stub:
        stub.behaviour = lambda i, body: Fault("error", 401, message=f"Incorrect API key provided: {key}")
        out = _synth(small_workspace, stub, key=key)
    assert out.returncode == 1 and stub.chat_requests <= 3  # the queries already in flight, no retry, no more
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "HTTP 401" in line and "Incorrect API key provided: [redacted]" in line
    assert key not in out.stdout + out.stderr


def test_status_into_a_closed_pipe_ends_quietly(tmp_path):
    """`python -m crs_core status | head -1` ended with a BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    proc = subprocess.run([sys.executable, "-m", "crs_core", "status"], cwd=ROOT, stdout=write_end,
                          stderr=subprocess.PIPE, text=True, timeout=300,
                          env={**os.environ, "CRS_WORKSPACE": str(tmp_path / "w.duckdb")})
    os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 141


def test_an_unwritable_folder_is_one_line_not_a_traceback(tmp_path, small_workspace):
    out = run_cli("export", "/sys/crs-studio-test/train.jsonl", "--status", "all", workspace=small_workspace)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() in ("error: Operation not permitted: /sys/crs-studio-test",
                                  "error: Permission denied: /sys/crs-studio-test")
    out = run_cli("status", workspace=Path("/sys/crs-studio-test/w.duckdb"))
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("error: cannot create the folder of workspace /sys/crs-studio-test/w.duckdb")


def test_a_csv_given_as_workspace_is_refused_untouched(tmp_path):
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("userId,movieId,rating\n1,2,3.5\n")
    out = run_cli("status", workspace=reviews)
    assert out.returncode == 1 and "is not a DuckDB workspace" in out.stderr and str(reviews) in out.stderr
    assert reviews.read_text() == "userId,movieId,rating\n1,2,3.5\n"


def test_users_are_managed_from_the_cli_and_passwords_never_stored_in_clear(tmp_path):
    env = {"CRS_ACCOUNTS": str(tmp_path / "accounts.json")}
    ws = tmp_path / "w.duckdb"

    def users(*args, password=None):
        full_env = {**os.environ, "CRS_WORKSPACE": str(ws), **env}
        return subprocess.run([sys.executable, "-m", "crs_core", "users", *args], cwd=ROOT, env=full_env,
                              input=password, capture_output=True, text=True, timeout=120)

    out = users("add", "ann", "--role", "annotator", "--password-stdin", password="annotator-secret\n")
    assert out.returncode == 1 and "first account must be an owner" in out.stderr
    assert users("add", "olga", "--role", "owner", "--password-stdin", password="owner-secret-1\n").returncode == 0
    assert users("add", "ann", "--role", "annotator", "--password-stdin", password="annotator-secret\n").returncode == 0
    out = users("add", "bob", "--role", "annotator", "--password-stdin", password="short\n")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "at least 8" in out.stderr
    assert users("set-role", "ann", "--role", "curator").returncode == 0
    out = users("list")
    assert out.stdout.split("\n")[:2] == ["ann\tcurator", "olga\towner"]
    out = users("remove", "olga")
    assert out.returncode == 1 and "last owner" in out.stderr
    text = (tmp_path / "accounts.json").read_text()
    assert "owner-secret-1" not in text and "annotator-secret" not in text and "scrypt$" in text
