"""Background jobs: real worker processes training the real MiniLM retriever on real movies.

Each job is a separate OS process started by `launch_job`; the tests poll its folder like the
app does. One uninterrupted 10-step run (40 pairs, batch 4, checkpoint every 2 steps) is shared
as the reference for the kill -9 / resume test.
"""

from __future__ import annotations

import os

# before torch loads: busy-waiting OpenMP threads make torch 5-10x slower on a shared 2-core box
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crs_core import jobs, train
from crs_core.errors import CRSError
from crs_core.store import Workspace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# 20 real films (IMDb ids), item text as the studio renders it
ITEMS = {
    "tt0133093": "The Matrix (1999). Action, Sci-Fi. A computer hacker learns that reality is a simulation run by machines and joins the human rebellion.",
    "tt0114709": "Toy Story (1995). Animation, Comedy, Family. A cowboy doll feels threatened when a new space ranger action figure becomes his owner's favourite toy.",
    "tt0113277": "Heat (1995). Crime, Drama, Thriller. A veteran Los Angeles detective hunts a disciplined professional thief planning one last heist.",
    "tt0081505": "The Shining (1980). Horror. A writer becomes the winter caretaker of an isolated mountain hotel and slowly descends into madness.",
    "tt0120338": "Titanic (1997). Drama, Romance. A poor artist and a wealthy young woman fall in love aboard the doomed ocean liner.",
    "tt0266543": "Finding Nemo (2003). Animation, Adventure, Family. A timid clownfish crosses the ocean to rescue his son, who was captured by a diver.",
    "tt0068646": "The Godfather (1972). Crime, Drama. The ageing patriarch of a mafia dynasty hands control of his empire to his reluctant youngest son.",
    "tt0107290": "Jurassic Park (1993). Adventure, Sci-Fi. Cloned dinosaurs break loose in an island theme park during a preview tour.",
    "tt0098635": "When Harry Met Sally... (1989). Comedy, Romance. Two friends spend years arguing over whether men and women can ever be just friends.",
    "tt0078748": "Alien (1979). Horror, Sci-Fi. The crew of a commercial space tug is stalked by a deadly alien creature aboard their ship.",
    "tt0107048": "Groundhog Day (1993). Comedy, Fantasy, Romance. A cynical TV weatherman is forced to relive the same day over and over in a small town.",
    "tt0120815": "Saving Private Ryan (1998). Drama, War. After the D-Day landings, a squad of soldiers goes behind enemy lines to find a paratrooper.",
    "tt0332280": "The Notebook (2004). Drama, Romance. An elderly man reads a decades-old love story from a notebook to a woman with dementia.",
    "tt0245429": "Spirited Away (2001). Animation, Fantasy, Family. A girl trapped in a bathhouse for spirits must work to free her parents, who were turned into pigs.",
    "tt1392190": "Mad Max: Fury Road (2015). Action, Adventure, Sci-Fi. In a desert wasteland a drifter and a rebel warrior flee a tyrant in a war rig.",
    "tt0102926": "The Silence of the Lambs (1991). Crime, Thriller, Horror. An FBI trainee seeks the help of an imprisoned cannibal psychiatrist to catch a serial killer.",
    "tt0829482": "Superbad (2007). Comedy. Two inseparable high school seniors try to score alcohol for a party before they go separate ways.",
    "tt1375666": "Inception (2010). Action, Sci-Fi, Thriller. A thief who steals secrets through shared dreams is hired to plant an idea in a target's mind.",
    "tt0110357": "The Lion King (1994). Animation, Drama, Family. A young lion flees after his father's death and must return to reclaim his kingdom.",
    "tt5052448": "Get Out (2017). Horror, Mystery, Thriller. A young Black man uncovers a disturbing secret when he visits his white girlfriend's family.",
}

# (context, labels): two requests per film; the second label is a related film
EXAMPLES = [
    (["User: Hi! I want a mind-bending sci-fi action movie.", "System: Do you like stories about simulated worlds?", "User: Yes, where reality is not what it seems."], ["tt0133093", "tt1375666"]),
    (["User: Something with hackers, kung fu and bullet time please."], ["tt0133093"]),
    (["User: My kids love toys that come alive. Any animated film like that?"], ["tt0114709", "tt0266543"]),
    (["User: Looking for a funny Pixar movie about friendship between a cowboy and a spaceman."], ["tt0114709"]),
    (["User: I love tense heist movies with a great cop vs robber duel.", "System: Old or new?", "User: The nineties were great for that."], ["tt0113277", "tt0068646"]),
    (["User: Give me a crime thriller with Al Pacino and Robert De Niro facing off."], ["tt0113277"]),
    (["User: I want a really scary movie set in a creepy empty hotel in winter."], ["tt0081505", "tt0078748"]),
    (["User: A classic horror film about a writer going insane would be perfect."], ["tt0081505"]),
    (["User: I feel like a big romantic tearjerker about a shipwreck."], ["tt0120338", "tt0332280"]),
    (["User: Recommend an epic love story on an ocean liner."], ["tt0120338"]),
    (["User: We want an underwater animated adventure for the whole family."], ["tt0266543", "tt0114709"]),
    (["User: A cartoon about a father fish looking for his lost son?"], ["tt0266543"]),
    (["User: I'd like a mafia family saga, a true classic.", "System: Do you prefer gangster dramas over action?", "User: Yes, slow and dramatic."], ["tt0068646", "tt0113277"]),
    (["User: What is the best movie about an Italian-American crime family?"], ["tt0068646"]),
    (["User: My son loves dinosaurs. Any exciting dinosaur adventure?"], ["tt0107290"]),
    (["User: A thrilling movie about a theme park where cloned dinos escape."], ["tt0107290", "tt1392190"]),
    (["User: I want a witty romantic comedy about two friends who fall in love over the years."], ["tt0098635", "tt0107048"]),
    (["User: Something like a classic New York rom-com with great dialogue."], ["tt0098635"]),
    (["User: I like sci-fi horror, a monster hunting a crew in space."], ["tt0078748", "tt0081505"]),
    (["User: Recommend a claustrophobic spaceship horror movie."], ["tt0078748"]),
    (["User: A comedy where someone lives the same day again and again?"], ["tt0107048", "tt0098635"]),
    (["User: I want a feel-good fantasy comedy with Bill Murray."], ["tt0107048"]),
    (["User: I'm looking for an intense World War II film with realistic battles."], ["tt0120815"]),
    (["User: A war movie about soldiers searching for one missing paratrooper."], ["tt0120815"]),
    (["User: I want a romance that will make me cry, about lifelong love and memory."], ["tt0332280", "tt0120338"]),
    (["User: Something romantic about an old man reading to his wife with dementia."], ["tt0332280"]),
    (["User: Can you suggest a magical Japanese animated film?"], ["tt0245429", "tt0110357"]),
    (["User: An anime about a girl stuck in a world of spirits."], ["tt0245429"]),
    (["User: I want non-stop action, car chases in a post-apocalyptic desert."], ["tt1392190"]),
    (["User: Something with insane vehicle stunts and a wasteland tyrant."], ["tt1392190", "tt0107290"]),
    (["User: A psychological thriller with a brilliant serial killer, please."], ["tt0102926", "tt5052448"]),
    (["User: I'd like a movie about an FBI agent interviewing a cannibal."], ["tt0102926"]),
    (["User: I want a raunchy teen comedy about a wild high school party."], ["tt0829482"]),
    (["User: Something hilarious about two best friends before graduation."], ["tt0829482", "tt0098635"]),
    (["User: A clever heist movie set inside dreams.", "System: Do you like complex plots?", "User: The more layers the better."], ["tt1375666", "tt0133093"]),
    (["User: Give me a Christopher Nolan style film about dream infiltration."], ["tt1375666"]),
    (["User: A Disney animated movie about a lion prince and his destiny."], ["tt0110357"]),
    (["User: An emotional family cartoon with great songs, set in the African savanna."], ["tt0110357", "tt0245429"]),
    (["User: I want a smart horror movie about racism and a creepy family visit."], ["tt5052448"]),
    (["User: Recommend a modern social thriller with a horrifying twist about hypnosis."], ["tt5052448", "tt0102926"]),
]
assert len(EXAMPLES) == 40

# 40 pairs (first label of each example), batch 4 => 10 steps; checkpoints every 2 steps
CONFIG = {
    "batch_size": 4,
    "epochs": 1,
    "max_labels_per_context": 1,
    "query_max_len": 40,
    "item_max_len": 40,
    "checkpoint_every": 2,
    "seed": 7,
    "training_data": "hand-written movie requests",
}
TOTAL_STEPS = 10
JOB_TIMEOUT = 600


def _examples():
    return [{"context": c, "labels": labels} for c, labels in EXAMPLES]


def _launch(ws, root, **overrides):
    job_id = train.launch_training(ws, train.KIND_RETRIEVER, _examples(), ITEMS, {**CONFIG, **overrides}, jobs_root=root)
    return job_id, jobs.job_folder(ws, job_id)


def _wait_until(folder, pred, timeout=JOB_TIMEOUT, poll=0.1):
    deadline = time.monotonic() + timeout
    while True:
        st = jobs.job_state(folder)
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout waiting on {folder.name}: {st}\n{jobs.read_log(folder)}")
        time.sleep(poll)


def _assert_succeeded(st):
    assert st.state == "succeeded", f"{st}\n{jobs.read_log(st.folder)}"


@pytest.fixture
def ws(tmp_path):
    w = Workspace(tmp_path / "ws.duckdb")
    yield w
    w.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: (workspace path, job id, folder, final state)."""
    tmp = tmp_path_factory.mktemp("reference")
    w = Workspace(tmp / "ws.duckdb")
    t0 = time.monotonic()
    job_id, folder = _launch(w, tmp / "jobs")
    st = jobs.wait_for_job(folder, timeout=JOB_TIMEOUT, poll=0.2)
    _assert_succeeded(st)
    st.result["wall_seconds"] = time.monotonic() - t0
    yield w, job_id, folder, st
    w.close()


def test_retriever_job_runs_in_background_and_imports_once(reference):
    from sentence_transformers import SentenceTransformer

    w, job_id, folder, st = reference
    assert st.step == st.total_steps == TOTAL_STEPS
    res = st.result
    assert res["steps"] == TOTAL_STEPS and res["pairs"] == 40
    assert res["first_loss"] > 0 and res["final_loss"] >= 0
    print(f"\nretriever: {res['seconds_per_step']} s/step, wall {res['wall_seconds']:.1f} s for {TOTAL_STEPS} steps")
    # the worker was a separate process and wrote everything to the folder
    assert st.pid and st.pid != os.getpid() and not st.alive
    progress = jobs.read_progress(folder)
    assert [p["step"] for p in progress] == list(range(1, TOTAL_STEPS + 1))
    assert all(p["loss"] is not None and p["lr"] > 0 for p in progress)
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "succeeded" and status["total_steps"] == TOTAL_STEPS
    assert not list((folder).glob(".*tmp*")), "temp files left behind"
    assert jobs.list_checkpoints(folder) == []  # removed after success (the model is saved)

    # the saved folder is an ordinary sentence-transformers model, fine-tuned
    model_dir = Path(res["model_dir"])
    assert model_dir == folder / "model"
    st_model = SentenceTransformer(str(model_dir), device="cpu")
    emb = st_model.encode(["I want a scary movie set in a hotel in winter", ITEMS["tt0081505"], ITEMS["tt0114709"]],
                          normalize_embeddings=True)
    assert emb.shape == (3, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])

    # the jobs table follows the folder; a registered importer runs once, atomically
    calls = []

    def broken(cur, state):
        cur.execute("INSERT INTO runs (run_id, model) VALUES (?, 'half-written')", [state.job_id])
        raise RuntimeError("importer bug")

    def importer(cur, state):
        calls.append(state.job_id)
        cur.execute("INSERT INTO runs (run_id, model, training_data, config) VALUES (?, ?, ?, ?)",
                    [state.job_id, state.result["model_name"], state.config["training_data"],
                     json.dumps({"model_dir": state.result["model_dir"]})])

    jobs.IMPORTERS[train.KIND_RETRIEVER] = broken
    try:
        with pytest.raises(jobs.JobImportError, match="importer bug"):
            jobs.import_finished_jobs(w)
        assert w.count("runs") == 0  # rolled back with the imported flag
        assert w.scalar("SELECT imported FROM jobs WHERE job_id = ?", [job_id]) is False
        jobs.IMPORTERS[train.KIND_RETRIEVER] = importer
        assert jobs.import_finished_jobs(w) == [job_id]
        assert jobs.import_finished_jobs(w) == []
    finally:
        jobs.IMPORTERS.pop(train.KIND_RETRIEVER, None)
    assert calls == [job_id]
    row = w.cursor().execute("SELECT status, imported, finished_at FROM jobs WHERE job_id = ?", [job_id]).fetchone()
    assert row[0] == "succeeded" and row[1] is True and row[2] is not None
    run = w.cursor().execute("SELECT model, training_data, config FROM runs WHERE run_id = ?", [job_id]).fetchone()
    assert run[0].startswith("dense-retriever") and run[1] == "hand-written movie requests"
    assert json.loads(run[2])["model_dir"] == str(model_dir)
    (trained,) = train.trained_models(w)
    assert trained["job_id"] == job_id and trained["model_dir"] == str(model_dir)
    listed = {s.job_id: s for s in jobs.list_jobs(w)}
    assert listed[job_id].imported is True and listed[job_id].state == "succeeded"
    # a succeeded job cannot be resumed
    with pytest.raises(jobs.JobError, match="already succeeded"):
        jobs.resume_job(w, job_id)


def test_kill9_then_resume_reaches_the_same_final_step(ws, tmp_path, reference):
    _w, _id, ref_folder, ref = reference
    job_id, folder = _launch(ws, tmp_path / "jobs")
    st = _wait_until(folder, lambda s: s.step >= 5 or s.finished)
    assert not st.finished, "job finished before it could be killed"
    os.killpg(st.pid, signal.SIGKILL)
    dead = _wait_until(folder, lambda s: s.finished, timeout=30)
    assert dead.state == "failed" and dead.message == "failed (process died)"
    assert 5 <= dead.step < TOTAL_STEPS
    newest = jobs.list_checkpoints(folder)[0][0]
    assert newest in (4, 6, 8)

    jobs.refresh_jobs(ws)
    assert ws.scalar("SELECT status FROM jobs WHERE job_id = ?", [job_id]) == "failed"
    jobs.resume_job(ws, job_id)
    st = jobs.wait_for_job(folder, timeout=JOB_TIMEOUT, poll=0.2)
    _assert_succeeded(st)
    assert st.step == ref.step == TOTAL_STEPS
    assert st.result["steps"] == ref.result["steps"]
    assert st.result["resumed_from_step"] == newest
    assert st.attempt == 2
    assert f"resuming from checkpoint step {newest}" in jobs.read_log(folder)
    steps = [p["step"] for p in jobs.read_progress(folder)]
    assert steps == list(range(1, TOTAL_STEPS + 1))
    # same batches, same RNG: the resumed run follows the uninterrupted one
    ref_loss = {p["step"]: p["loss"] for p in jobs.read_progress(ref_folder)}
    for p in jobs.read_progress(folder):
        assert p["loss"] == pytest.approx(ref_loss[p["step"]], rel=1e-3, abs=1e-4), p["step"]
    assert jobs.import_finished_jobs(ws) == [job_id]


def test_two_stage_job_killed_in_stage2_resumes_without_repeating_stage1(ws, tmp_path):
    """Stage 1 on real + augmented labels (60 pairs, 15 steps), stage 2 on the real first labels
    (40 pairs, 10 steps) with the KL term; kill -9 in stage 2, resume."""
    real = [{"context": c, "labels": labels[:1]} for c, labels in EXAMPLES]
    augmented = [{"context": c, "labels": labels} for c, labels in EXAMPLES]
    full, rest = divmod(sum(len(labels) for _c, labels in EXAMPLES), 4)
    s1, s2 = full + (rest >= 2), TOTAL_STEPS  # a last batch of one pair has no negative: dropped
    config = {**CONFIG, "max_labels_per_context": 2, "labels": "two_stage", "alpha": 0.5}
    job_id = train.launch_training(ws, train.KIND_RETRIEVER, real, ITEMS, config, jobs_root=tmp_path / "jobs",
                                   augmented=augmented)
    folder = jobs.job_folder(ws, job_id)
    st = _wait_until(folder, lambda s: s.step >= s1 + 5 or s.finished)
    assert not st.finished, "job finished before it could be killed"
    assert st.total_steps == s1 + s2  # one progress axis over both stages
    os.killpg(st.pid, signal.SIGKILL)
    dead = _wait_until(folder, lambda s: s.finished, timeout=30)
    assert dead.state == "failed" and s1 + 5 <= dead.step < s1 + s2
    stage1 = folder / "stage1"
    assert (stage1 / "crs_model.json").is_file()
    stage1_mtime = (stage1 / "model.safetensors").stat().st_mtime_ns
    newest = jobs.list_checkpoints(folder)[0][0]
    assert newest in (4, 6, 8)  # stage-2 step numbers; stage 1's checkpoints are gone
    assert all(json.loads((p / "manifest.json").read_text())["meta"]["stage"] == 2
               for _s, p in jobs.list_checkpoints(folder))

    jobs.refresh_jobs(ws)
    jobs.resume_job(ws, job_id)
    st = jobs.wait_for_job(folder, timeout=JOB_TIMEOUT, poll=0.2)
    _assert_succeeded(st)
    log = jobs.read_log(folder)
    assert "stage 1 already done" in log and f"resuming from checkpoint step {newest}" in log
    assert (stage1 / "model.safetensors").stat().st_mtime_ns == stage1_mtime  # stage 1 not repeated
    res = st.result
    assert res["labels"] == "two_stage" and res["alpha"] == 0.5
    assert res["steps"] == st.step == s1 + s2 and res["resumed_from_step"] == s1 + newest
    assert res["stage1_steps"] == s1 and res["stage2_steps"] == s2 and res["pairs"] == 40
    assert [p["step"] for p in jobs.read_progress(folder)] == list(range(1, s1 + s2 + 1))
    assert "soft labels: stage-1 vectors of 40 queries" in log
    assert (Path(res["model_dir"]) / "model.safetensors").is_file()
    assert jobs.import_finished_jobs(ws) == [job_id]


def test_cancel_stops_at_a_step_boundary_with_a_checkpoint(ws, tmp_path):
    job_id, folder = _launch(ws, tmp_path / "jobs", epochs=20, checkpoint_every=100)
    _wait_until(folder, lambda s: s.step >= 2 or s.finished)
    st = jobs.cancel_job(folder, grace_seconds=120, wait=True)
    assert st.state == "cancelled", f"{st}\n{jobs.read_log(folder)}"
    assert not st.alive and st.cancel_requested
    assert "cancelled on request" in (st.message or "")
    assert 2 <= st.step < 200
    # the flag path saved a checkpoint exactly where it stopped, so nothing is lost
    assert jobs.list_checkpoints(folder)[0][0] == st.step
    jobs.verify_checkpoint(jobs.list_checkpoints(folder)[0][1])
    assert jobs.import_finished_jobs(ws) == []
    row = ws.cursor().execute("SELECT status, imported FROM jobs WHERE job_id = ?", [job_id]).fetchone()
    assert row == ("cancelled", False)
    # cancelling a finished job changes nothing
    assert jobs.cancel_job(folder).state == "cancelled"


def test_corrupt_last_checkpoint_resumes_from_the_previous_one(ws, tmp_path):
    job_id, folder = _launch(ws, tmp_path / "jobs")
    _wait_until(folder, lambda s: s.step >= 5 or s.finished)
    # no grace: SIGTERM at once (the worker stops mid-step; periodic checkpoints remain)
    st = jobs.cancel_job(folder, grace_seconds=0, wait=True)
    assert st.state == "cancelled" and not st.alive, f"{st}\n{jobs.read_log(folder)}"
    cps = jobs.list_checkpoints(folder)
    assert len(cps) == 2, cps  # only the newest two are kept
    (last_step, last), (prev_step, _prev) = cps
    assert last_step > prev_step
    with open(last / "model.pt", "r+b") as fh:  # damage the newest checkpoint
        fh.seek(1000)
        fh.write(b"\x00" * 64)
    with pytest.raises(jobs.CheckpointError, match="corrupt"):
        jobs.verify_checkpoint(last)

    jobs.resume_job(ws, job_id)
    st = jobs.wait_for_job(folder, timeout=JOB_TIMEOUT, poll=0.2)
    _assert_succeeded(st)
    assert st.step == TOTAL_STEPS
    assert st.result["resumed_from_step"] == prev_step
    assert any(f"step-{last_step} is unusable" in w for w in st.warnings)
    assert f"resuming from checkpoint step {prev_step}" in jobs.read_log(folder)


def _fake_row(ws, job_id, folder, status="running"):
    with ws.transaction() as cur:
        cur.execute("INSERT INTO jobs (job_id, kind, status, folder) VALUES (?, 'train_retriever', ?, ?)",
                    [job_id, status, str(folder)])


def test_old_format_version_is_a_clear_error(ws, tmp_path):
    folder = tmp_path / "jobs" / "old-job"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"format_version": 0, "job_id": "old-job", "kind": "train_retriever"}))
    (folder / "status.json").write_text(json.dumps({"state": "failed"}))
    _fake_row(ws, "old-job", folder, "failed")
    with pytest.raises(jobs.JobFormatError, match="older version of the studio") as err:
        jobs.job_state(folder)
    assert isinstance(err.value, CRSError) and "format 0" in str(err.value)
    with pytest.raises(jobs.JobFormatError, match="older version"):
        jobs.resume_job(ws, "old-job")
    (listed,) = jobs.list_jobs(ws)
    assert listed.job_id == "old-job" and "older version" in listed.error
    # the worker refuses it too, without touching the folder
    proc = subprocess.run([sys.executable, "-m", "crs_core.job_worker", str(folder)], capture_output=True,
                          text=True, cwd=str(jobs.PROJECT_ROOT), timeout=60)
    assert proc.returncode == 2 and "older version" in proc.stderr
    assert json.loads((folder / "status.json").read_text()) == {"state": "failed"}


def test_missing_folder_is_a_clear_error(ws, tmp_path):
    gone = tmp_path / "jobs" / "gone-job"
    with pytest.raises(jobs.JobNotFoundError, match="does not exist"):
        jobs.job_state(gone)
    with pytest.raises(jobs.JobNotFoundError):
        jobs.cancel_job(gone)
    _fake_row(ws, "gone-job", gone)
    with pytest.raises(jobs.JobNotFoundError, match="does not exist"):
        jobs.resume_job(ws, "gone-job")
    with pytest.raises(jobs.JobNotFoundError, match="no job"):
        jobs.resume_job(ws, "never-launched")
    (listed,) = jobs.list_jobs(ws)
    assert listed.state == "missing"
    assert jobs.import_finished_jobs(ws) == []
    assert ws.scalar("SELECT status FROM jobs WHERE job_id = 'gone-job'") == "missing"


def test_dead_worker_reads_as_failed_and_bad_launches_fail_early(ws, tmp_path):
    # a status that says running while its pid is gone (e.g. after a reboot)
    folder = tmp_path / "jobs" / "stale"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"format_version": jobs.FORMAT_VERSION, "job_id": "stale",
                                                    "kind": "train_retriever", "config": {}, "inputs": {}}))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (folder / "status.json").write_text(json.dumps({"state": "running", "pid": proc.pid, "step": 3, "total_steps": 9}))
    st = jobs.job_state(folder)
    assert st.state == "failed" and st.describe() == "failed (process died)" and st.step == 3
    (folder / "cancel").write_text("{}")
    assert jobs.job_state(folder).state == "cancelled"

    with pytest.raises(train.TrainingError, match="unknown RetrieverConfig option"):
        train.launch_training(ws, train.KIND_RETRIEVER, _examples(), ITEMS, {"learning_rate": 1e-3}, jobs_root=tmp_path / "j")
    with pytest.raises(CRSError, match="labels"):
        train.launch_training(ws, train.KIND_RETRIEVER, [{"context": ["hi"], "labels": "tt0133093"}], ITEMS,
                              jobs_root=tmp_path / "j")
    with pytest.raises(jobs.JobError, match="no runner"):
        jobs.launch_job(ws, "no-such-kind", {}, {}, jobs_root=tmp_path / "j")
    assert ws.count("jobs") == 0
    assert not (tmp_path / "j").exists() or not any((tmp_path / "j").iterdir())


def test_a_second_worker_waits_for_the_lock_then_gives_up_while_the_first_holds_it(tmp_path):
    folder = tmp_path / "jobs" / "locked-job"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"format_version": jobs.FORMAT_VERSION, "job_id": "locked-job",
                                                     "kind": "train_retriever"}))
    # another process holds the folder lock (a real flock), as a running worker does
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; fh = open(sys.argv[1], 'a+'); "
         "fcntl.flock(fh.fileno(), fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(folder / jobs.LOCK_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        assert not jobs.JobContext(folder).acquire_lock(wait=0.6)
        assert time.monotonic() - t0 >= 0.6  # it waited before giving up
        # the holder dies (like a worker under kill -9) while the next one waits: it gets the lock
        ctx = jobs.JobContext(folder)
        holder.kill()
        assert ctx.acquire_lock(wait=20)
    finally:
        holder.kill()
        holder.wait()


# -- issue 13, finding 4: short jobs resume, and resumed progress has each step once ----------------
def _folder(tmp_path, **config) -> Path:
    folder = tmp_path / "job-x"
    folder.mkdir(parents=True)
    jobs._write_json_atomic(folder / jobs.CONFIG_FILE, {"format_version": jobs.FORMAT_VERSION, "job_id": "job-x",
                                                         "kind": "test", "runner": "m:f", "config": config, "inputs": {}})
    return folder


def test_a_resumed_run_rewrites_the_steps_it_repeats(tmp_path):
    """Killed at step 4 with no checkpoint, a job starts again from 0: progress.jsonl held steps
    1-4 twice (the trim ran only after a checkpoint loaded)."""
    folder = _folder(tmp_path)
    first = jobs.JobContext(folder)
    for step in range(1, 5):
        first.report(step, 10, loss=1.0)
    again = jobs.JobContext(folder)  # the worker of the resumed attempt; no checkpoint to load
    for step in range(1, 4):
        again.report(step, 10, loss=0.5)
    steps = [json.loads(line)["step"] for line in (folder / jobs.PROGRESS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert [r["loss"] for r in jobs.read_progress(folder)] == [0.5, 0.5, 0.5]
    again.truncate_progress(2)  # what a trainer does after loading the checkpoint of step 2
    again.report(3, 10, loss=0.25)
    again.report(4, 10, loss=0.25)
    steps = [json.loads(line)["step"] for line in (folder / jobs.PROGRESS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_checkpoints_are_due_by_steps_and_by_time(tmp_path):
    ctx = jobs.JobContext(_folder(tmp_path, checkpoint_seconds=0.3))
    assert ctx.checkpoint_due(50, 50) and not ctx.checkpoint_due(3, 50)
    time.sleep(0.35)
    assert ctx.checkpoint_due(4, 50)  # 0.3 s since the worker started, long before step 50
    ctx.save_checkpoint(4, lambda tmp: (tmp / "w.txt").write_text("4"))
    assert not ctx.checkpoint_due(5, 50)  # the clock restarts at a checkpoint
    assert jobs.JobContext(_folder(tmp_path / "b", checkpoint_seconds=0)).checkpoint_due(7, 50) is False
    assert jobs.JobContext(_folder(tmp_path / "c")).checkpoint_seconds == jobs.CHECKPOINT_SECONDS


def test_a_job_killed_before_its_first_step_checkpoint_resumes_from_a_timed_one(ws, tmp_path):
    """CLI jobs checkpoint every 50 steps: one killed before step 50 started again from 0."""
    job_id, folder = _launch(ws, tmp_path / "jobs", checkpoint_every=100, checkpoint_seconds=0.01)
    _wait_until(folder, lambda st: st.step >= 3 and jobs.list_checkpoints(folder))
    os.kill(jobs.job_state(folder).pid, signal.SIGKILL)
    _wait_until(folder, lambda st: st.state == "failed")
    saved = jobs.list_checkpoints(folder)[0][0]
    assert 1 <= saved < TOTAL_STEPS
    jobs.resume_job(ws, job_id)
    st = _wait_until(folder, lambda st: st.state in jobs.FINAL_STATES)
    _assert_succeeded(st)
    result = json.loads((folder / jobs.RESULT_FILE).read_text())
    assert result["resumed_from_step"] >= saved and result["steps"] == TOTAL_STEPS
    steps = [json.loads(line)["step"] for line in (folder / jobs.PROGRESS_FILE).read_text().splitlines()]
    assert steps == list(range(1, TOTAL_STEPS + 1))
