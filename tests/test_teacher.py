"""The teacher layer against a real OpenAI-compatible HTTP server on 127.0.0.1.

No mocks: the real ``openai`` client talks HTTP to tests/openai_stub_server.py, whose faults
(429 + Retry-After, 500, hangs, malformed / truncated bodies, empty choices) are injected per
request.
"""

from __future__ import annotations

import json
import logging
import pickle
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from crs_core.errors import CRSError  # noqa: E402
from crs_core.store import Workspace  # noqa: E402
from crs_core.teacher import (  # noqa: E402
    Budget,
    BudgetExceeded,
    BudgetExhausted,
    ChatRequest,
    Completion,
    JsonlCache,
    MemoryCache,
    Price,
    Secret,
    Teacher,
    TeacherConfig,
    TeacherError,
    TeacherFailure,
    TeacherSetupError,
    import_cache_entries,
    price_for,
    redact_secrets,
    summarize,
)
from openai_stub_server import Fault, OpenAIStubServer  # noqa: E402

KEY = "sk-test-THIS-KEY-MUST-NEVER-BE-STORED-7f3a9c"


def msgs(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are a movie expert."}, {"role": "user", "content": text}]


@pytest.fixture()
def stub():
    with OpenAIStubServer() as server:
        yield server


def make_teacher(stub: OpenAIStubServer, cache=None, budget=None, **kw) -> Teacher:
    cfg = dict(timeout=5.0, max_attempts=4, backoff_base=0.02, backoff_max=0.1)
    cfg.update(kw)
    model = cfg.pop("model", "gpt-4o-mini")
    return Teacher(TeacherConfig.openai(stub.base_url, model, api_key=KEY, **cfg), cache=cache, budget=budget)


# -- basics --------------------------------------------------------------------------------
def test_chat_returns_text_tokens_and_cost(stub):
    teacher = make_teacher(stub)
    c = teacher.chat(msgs("recommend a heist movie"), max_tokens=50)
    assert isinstance(c, Completion) and c.ok
    assert c.text == "echo: recommend a heist movie"
    # stub tokenizer: words + 3 per message
    assert c.prompt_tokens == (5 + 3) + (4 + 3)
    assert c.completion_tokens == 5
    assert c.cost == pytest.approx((15 * 0.15 + 5 * 0.60) / 1e6)
    assert not c.cached and c.attempts == 1 and c.finish_reason == "stop"
    body = stub.requests[0].body
    assert body["model"] == "gpt-4o-mini" and body["temperature"] == 0.8 and body["max_tokens"] == 50
    assert body["messages"] == msgs("recommend a heist movie")
    assert stub.requests[0].headers["authorization"] == f"Bearer {KEY}"  # the key is used...
    assert teacher.ping() == ["stub-model"]


def test_parameters_reach_the_server(stub):
    teacher = make_teacher(stub, temperature=0.3, max_tokens=77)
    teacher.chat(msgs("a"), response_format={"type": "json_object"}, seed=7)
    body = stub.requests[-1].body
    assert body["temperature"] == 0.3 and body["max_tokens"] == 77
    assert body["response_format"] == {"type": "json_object"} and body["seed"] == 7


def test_stub_reply_function_and_json():
    with OpenAIStubServer(reply=lambda messages: '```json\n{"titles": ["Heat (1995)"]}\n```') as server:
        c = make_teacher(server).chat(msgs("list"), response_format={"type": "json_object"})
        assert c.json() == {"titles": ["Heat (1995)"]}
        assert server.chat_requests == 1 and server.model_requests == 0



def test_price_table_prefix_and_unpriced(stub):
    assert price_for("gpt-4o-2024-08-06", {"gpt-4o": Price(1, 2), "gpt-4o-mini": Price(3, 4)}) == Price(1, 2)
    assert price_for("gpt-4o-mini-2024", {"gpt-4o": Price(1, 2), "gpt-4o-mini": Price(3, 4)}) == Price(3, 4)
    teacher = make_teacher(stub, model="my-own-model")
    c = teacher.chat(msgs("x"))
    assert c.cost is None and teacher.tally().unpriced_calls == 1
    with pytest.raises(TeacherSetupError, match="price"):
        make_teacher(stub, model="my-own-model", budget=Budget(max_cost=1.0))
    custom = make_teacher(stub, model="my-own-model", prices={"my-own": Price(1.0, 2.0)})
    c = custom.chat(msgs("y"))
    assert c.cost == pytest.approx((c.prompt_tokens * 1.0 + c.completion_tokens * 2.0) / 1e6)


# -- cache ---------------------------------------------------------------------------------
def test_second_identical_call_makes_no_request(stub):
    teacher = make_teacher(stub)
    first = teacher.chat(msgs("hello"))
    second = teacher.chat(msgs("hello"))
    assert stub.chat_requests == 1
    assert second.cached and second.text == first.text and second.prompt_tokens == first.prompt_tokens
    assert teacher.tally().cached_hits == 1 and teacher.tally().calls == 1
    # anything that changes the answer changes the key
    teacher.chat(msgs("hello"), temperature=0.1)
    teacher.chat(msgs("hello"), max_tokens=9)
    teacher.chat(msgs("hello"), response_format={"type": "json_object"})
    teacher.chat(msgs("hello"), cache_salt=1)
    teacher.chat(msgs("hello"), cache_salt=2)
    assert stub.chat_requests == 6
    assert isinstance(teacher.cache, MemoryCache) and len(teacher.cache) == 6


def test_cache_key_ignores_the_api_key(stub):
    a = make_teacher(stub)
    b = Teacher(TeacherConfig.openai(stub.base_url, "gpt-4o-mini", api_key="sk-other"), cache=a.cache)
    assert a.cache_key(msgs("x")) == b.cache_key(msgs("x"))
    a.chat(msgs("x"))
    assert b.chat(msgs("x")).cached and stub.chat_requests == 1
    # but the endpoint and model are part of it
    c = Teacher(TeacherConfig.openai(stub.base_url, "gpt-4o"), cache=a.cache)
    assert c.cache_key(msgs("x")) != a.cache_key(msgs("x"))


def test_workspace_cache_survives_a_restart(stub, tmp_path):
    path = tmp_path / "ws.duckdb"
    with Workspace(path) as ws:
        teacher = make_teacher(stub, cache=ws)
        teacher.chat(msgs("one"))
        row = ws.cursor().execute(
            "SELECT provider, model, request, prompt_tokens, completion_tokens, cost FROM llm_cache"
        ).fetchone()
        assert row[0] == "openai" and row[1] == "gpt-4o-mini"
        assert json.loads(row[2])["messages"] == msgs("one") and row[3] > 0 and row[4] > 0 and row[5] > 0
    with Workspace(path) as ws:  # a new process would see the same
        teacher = make_teacher(stub, cache=ws)
        c = teacher.chat(msgs("one"))
        assert c.cached and c.text == "echo: one"
    assert stub.chat_requests == 1


def test_workspace_cache_group_commits_concurrent_results(stub, tmp_path):
    stub.latency = 0.02
    with Workspace(tmp_path / "ws.duckdb") as ws:
        teacher = make_teacher(stub, cache=ws)
        committed_when_reported = []

        def on_result(i, r):  # a result is in the workspace before it is reported done
            committed_when_reported.append(ws.scalar("SELECT count(*) FROM llm_cache WHERE cache_key = ?", [r.cache_key]))

        results = teacher.chat_many([msgs(f"g{i}") for i in range(48)], concurrency=16, on_result=on_result)
        assert all(r.ok for r in results) and committed_when_reported == [1] * 48
        assert ws.count("llm_cache") == 48
        # a row written meanwhile by someone else is kept, not an error
        cache = teacher.cache
        entry = cache.get(results[0].cache_key)
        cache.put(results[0].cache_key, dict(entry, response={"text": "other"}))
        assert cache.get(results[0].cache_key)["response"]["text"] == "echo: g0"
        assert set(cache.get_many([r.cache_key for r in results[:5]] + ["missing"])) == {r.cache_key for r in results[:5]}


def test_jsonl_cache_for_jobs_survives_a_crash_and_imports_into_the_workspace(stub, tmp_path):
    path = tmp_path / "job" / "llm_cache.jsonl"
    teacher = make_teacher(stub, cache=path)  # a path: a JSON-lines cache (a job's folder)
    assert isinstance(teacher.cache, JsonlCache)
    teacher.chat_many([msgs(f"j{i}") for i in range(6)], concurrency=3)
    teacher.cache.close()
    with open(path, "a") as f:  # a crash in the middle of writing a line
        f.write('{"cache_key": "torn", "entry": {"te')
    again = make_teacher(stub, cache=JsonlCache(path))
    results = again.chat_many([msgs(f"j{i}") for i in range(7)])
    assert [r.cached for r in results] == [True] * 6 + [False]
    assert stub.chat_requests == 7
    assert len(JsonlCache(path)) == 7  # the line written after the torn one is intact
    assert KEY.encode() not in path.read_bytes()
    with Workspace(tmp_path / "ws.duckdb") as ws:
        assert import_cache_entries(ws, again.cache.entries()) == 7
        assert import_cache_entries(ws, again.cache.entries()) == 7  # again: existing rows kept
        assert ws.count("llm_cache") == 7
        assert make_teacher(stub, cache=ws).chat(msgs("j3")).cached


def test_identical_requests_in_flight_are_made_once(stub):
    stub.latency = 0.2
    teacher = make_teacher(stub)
    results = teacher.chat_many([msgs("same")] * 8, concurrency=8)
    assert stub.chat_requests == 1
    assert all(r.ok and r.text == "echo: same" for r in results)
    assert sum(r.cached for r in results) == 7


def test_identical_requests_beyond_the_concurrency_limit_are_made_once(stub):
    stub.latency = 0.05
    teacher = make_teacher(stub)
    results = teacher.chat_many([msgs("again")] * 40, concurrency=2)
    assert stub.chat_requests == 1
    assert all(r.ok and r.text == "echo: again" for r in results) and sum(r.cached for r in results) == 39


def test_a_lookup_that_missed_just_before_an_identical_call_committed_pays_nothing(stub):
    class StaleLookups(MemoryCache):
        """A cache whose lookups always miss: every request looks as if its calling thread read
        the cache just before an identical call elsewhere committed its result."""

        def get(self, key):
            return None

        def get_many(self, keys):
            return {}

    teacher = make_teacher(stub, cache=StaleLookups())
    first = teacher.chat(msgs("race"))
    again = teacher.chat(msgs("race"))
    assert stub.chat_requests == 1
    assert not first.cached and again.cached and again.text == first.text == "echo: race"


def test_results_are_committed_before_they_count_so_a_crash_repeats_no_call(stub, tmp_path):
    stub.latency = 0.02
    path = tmp_path / "ws.duckdb"
    requests = [msgs(f"query {i}") for i in range(20)]

    class Crash(Exception):
        pass

    def crash_after_five(index, result):
        if crash_after_five.n == 5:
            raise Crash()
        crash_after_five.n += 1

    crash_after_five.n = 0
    with Workspace(path) as ws:
        with pytest.raises(Crash):
            make_teacher(stub, cache=ws).chat_many(requests, concurrency=4, on_result=crash_after_five)
        made_before = stub.chat_requests
        assert 6 <= made_before < 20
        assert ws.count("llm_cache") == made_before  # every call made was committed
    with Workspace(path) as ws:  # restart
        teacher = make_teacher(stub, cache=ws)
        results = teacher.chat_many(requests, concurrency=4)
    assert [r.text for r in results] == [f"echo: query {i}" for i in range(20)]
    assert stub.chat_requests == 20  # no call was repeated
    assert teacher.tally().cached_hits == made_before


class SlowCache(MemoryCache):
    """A cache whose writes take `delay` seconds; records when and where each write ran."""

    def __init__(self, delay: float = 0.3, fail: Exception | None = None):
        super().__init__()
        self.delay, self.fail = delay, fail
        self.writes: list[dict] = []  # thread, keys, start, end (time.monotonic, as the stub's)
        self.on_write = None  # called at the end of each write, before it returns

    def put_many(self, items):
        start = time.monotonic()
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        super().put_many(items)
        if self.on_write is not None:
            self.on_write()
        self.writes.append({"thread": threading.current_thread().name, "keys": [k for k, _ in items],
                            "start": start, "end": time.monotonic()})


def test_commits_run_in_a_writer_thread_and_a_slot_is_free_during_its_commit(stub):
    cache = SlowCache(delay=0.3)
    teacher = make_teacher(stub, cache=cache)
    reported = []  # (index, the result's key already in the cache) when reported

    def on_result(i, r):
        reported.append((i, cache.get(r.cache_key) is not None, time.monotonic()))

    results = teacher.chat_many([msgs(f"w{i}") for i in range(3)], concurrency=1, on_result=on_result)
    assert [r.text for r in results] == [f"echo: w{i}" for i in range(3)]
    assert all(w["thread"] == "teacher-cache-writer" for w in cache.writes)  # never the event loop
    assert all(in_cache for _, in_cache, _ in reported)  # committed before reported done
    first_commit_end = next(w["end"] for w in cache.writes if results[0].cache_key in w["keys"])
    # concurrency 1: the second request was sent while the first result was being committed
    assert stub.requests[1].started < first_commit_end
    assert teacher.tally().calls == 3 and teacher.tally().in_flight == 0


def test_results_waiting_for_their_commit_are_bounded(stub):
    cache = SlowCache(delay=0.5)
    made_when_first_commit_ends = []
    cache.on_write = lambda: made_when_first_commit_ends.append(stub.chat_requests)
    teacher = make_teacher(stub, cache=cache)
    results = teacher.chat_many([msgs(f"bound {i}") for i in range(12)], concurrency=2)
    assert all(r.ok for r in results) and stub.chat_requests == 12
    # while the first commit runs, the slots go on (more than 2 requests made), but at most
    # 2 x concurrency calls are between their start and their commit
    assert 2 < made_when_first_commit_ends[0] <= 4
    assert stub.max_in_flight <= 2


def test_budget_is_settled_when_the_response_arrives_not_after_the_commit(stub):
    # worst case of one call: 27 tokens (estimate 17 + max_tokens 10); real use: 14 tokens. The
    # budget fits one worst case at a time, so the second call waits for the first to settle.
    cache = SlowCache(delay=0.4)
    teacher = make_teacher(stub, cache=cache, max_tokens=10, budget=Budget(max_tokens=45))
    results = teacher.chat_many([msgs("b0"), msgs("b1"), msgs("b2")], concurrency=2)
    assert sorted(type(r).__name__ for r in results) == ["BudgetExhausted", "Completion", "Completion"]
    assert teacher.tally().total_tokens == 28 <= 45 and stub.chat_requests == 2
    first = stub.requests[0].body["messages"][-1]["content"]
    first_commit_end = next(w["end"] for w in cache.writes
                            if teacher.cache_key(msgs(first)) in w["keys"])
    assert stub.requests[1].started < first_commit_end  # did not wait for the first commit


def test_a_cache_that_cannot_be_written_is_a_setup_error(stub):
    teacher = make_teacher(stub, cache=SlowCache(delay=0.0, fail=OSError("disk full")))
    with pytest.raises(TeacherSetupError, match="could not write the LLM cache: disk full"):
        teacher.chat_many([msgs("x"), msgs("y")], concurrency=2)
    with pytest.raises(TeacherSetupError, match="disk full"):
        teacher.chat(msgs("z"))
    assert teacher.tally().calls == 0  # nothing counts as done


def test_workspace_writes_are_grouped_while_requests_are_in_flight(stub, tmp_path):
    stub.latency = 0.02
    with Workspace(tmp_path / "ws.duckdb") as ws:
        teacher = make_teacher(stub, cache=ws)
        results = teacher.chat_many([msgs(f"grp {i}") for i in range(64)], concurrency=16)
        assert all(r.ok for r in results) and ws.count("llm_cache") == 64
        assert teacher._writer.commits <= 32  # not one transaction per result
        # a lone call (nothing else in flight) is written at once
        t0 = time.monotonic()
        assert teacher.chat(msgs("alone")).ok and time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("expecting", [True, False], ids=["results-on-their-way", "lone-results"])
def test_the_writer_paces_itself_only_while_more_results_are_on_their_way(monkeypatch, expecting):
    import asyncio

    from crs_core.teacher.cache import CacheWriter

    monkeypatch.setattr(CacheWriter, "max_wait", 0.5)
    cache = SlowCache(delay=0.1)
    writer = CacheWriter(cache, expecting=lambda: expecting)
    entry = {"request": {}, "response": {"text": "x"}}

    async def main():
        if expecting:  # a result every 20 ms
            pending = []
            for i in range(20):
                pending.append(writer.write(f"k{i}", entry))
                await asyncio.sleep(0.02)
            await asyncio.gather(*pending)
        else:  # one result at a time
            for i in range(3):
                await writer.write(f"k{i}", entry)

    asyncio.run(main())
    writer.stop()
    assert sum(len(w["keys"]) for w in cache.writes) == (20 if expecting else 3)
    gaps = [b["start"] - a["start"] for a, b in zip(cache.writes, cache.writes[1:])]
    if expecting:  # the next write starts >= 3 x the last one's duration after it started
        assert all(g >= 3 * (a["end"] - a["start"]) - 0.01 for g, a in zip(gaps, cache.writes))
        assert len(cache.writes) <= 5  # ~ every 0.3 s over 0.4 s, rather than every 0.1 s
    else:  # written at once
        assert all(b["start"] - a["end"] < 0.15 for a, b in zip(cache.writes, cache.writes[1:]))


def test_the_writer_thread_ends_when_idle_and_comes_back(stub, monkeypatch):
    from crs_core.teacher.cache import CacheWriter

    monkeypatch.setattr(CacheWriter, "idle_exit", 0.1)
    teacher = make_teacher(stub)
    teacher.chat(msgs("first"))
    writer = teacher._writer
    assert writer._thread is not None and writer._thread.is_alive()
    deadline = time.monotonic() + 3
    while writer._thread is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer._thread is None  # gone
    assert not teacher.chat(msgs("second")).cached  # written by a new writer thread
    assert teacher.chat(msgs("second")).cached and stub.chat_requests == 2


def test_use_cache_false_always_calls(stub):
    teacher = make_teacher(stub)
    teacher.chat(msgs("z"))
    teacher.chat(msgs("z"), use_cache=False)
    assert stub.chat_requests == 2


# -- retries -------------------------------------------------------------------------------
def test_429_is_retried_after_retry_after_seconds(stub):
    teacher = make_teacher(stub)
    stub.push(Fault.rate_limit(retry_after=1))
    t0 = time.monotonic()
    c = teacher.chat(msgs("busy"))
    elapsed = time.monotonic() - t0
    assert c.text == "echo: busy" and c.attempts == 2 and stub.chat_requests == 2
    assert elapsed >= 1.0  # honoured Retry-After, not the 0.02 s backoff
    assert teacher.tally().retries == 1 and teacher.tally().requests == 2


def test_429_without_retry_after_backs_off_exponentially(stub):
    teacher = make_teacher(stub, backoff_base=0.1, backoff_max=10.0, max_attempts=4)
    stub.push(Fault.rate_limit(), Fault.rate_limit(), Fault.rate_limit())
    t0 = time.monotonic()
    c = teacher.chat(msgs("busy"))
    elapsed = time.monotonic() - t0
    assert c.attempts == 4
    # equal jitter: waits within [0.05, 0.1] + [0.1, 0.2] + [0.2, 0.4]
    assert 0.35 <= elapsed < 2.0


@pytest.mark.parametrize("fault", [Fault.server_error(500), Fault.server_error(502), Fault.server_error(503)])
def test_5xx_is_retried(stub, fault):
    teacher = make_teacher(stub)
    stub.push(fault, fault)
    c = teacher.chat(msgs("flaky"))
    assert c.text == "echo: flaky" and c.attempts == 3 and stub.chat_requests == 3


def test_timeout_is_retried(stub):
    teacher = make_teacher(stub, timeout=0.5)
    stub.push(Fault.hang(3))
    t0 = time.monotonic()
    c = teacher.chat(msgs("slow"))
    assert c.text == "echo: slow" and c.attempts == 2
    assert 0.5 <= time.monotonic() - t0 < 2.5


def test_timeout_on_every_attempt_gives_a_clear_error(stub):
    teacher = make_teacher(stub, timeout=0.3, max_attempts=2)
    stub.push(Fault.hang(2), Fault.hang(2))
    with pytest.raises(TeacherError) as info:
        teacher.chat(msgs("slow"))
    assert info.value.kind == "timeout" and info.value.attempts == 2
    assert "did not answer within 0.3 s" in str(info.value) and "after 2 attempts" in str(info.value)


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = Teacher(TeacherConfig.openai(f"http://127.0.0.1:{port}/v1", "gpt-4o-mini", api_key=KEY,
                                           max_attempts=3, backoff_base=0.01))
    with pytest.raises(TeacherError) as info:
        teacher.chat(msgs("anyone?"))
    assert info.value.kind == "connection" and info.value.attempts == 3
    assert f"127.0.0.1:{port}" in str(info.value)
    assert teacher.tally().failures == 1 and teacher.tally().requests == 3


@pytest.mark.parametrize(
    "fault", [Fault.malformed(), Fault.truncated(), Fault.truncated_json(), Fault.empty_choices()],
    ids=["malformed", "truncated", "truncated_json", "empty_choices"],
)
def test_unusable_responses_are_retried(stub, fault):
    teacher = make_teacher(stub)
    stub.push(fault)
    c = teacher.chat(msgs("garbled"))
    assert c.text == "echo: garbled" and c.attempts == 2 and stub.chat_requests == 2


@pytest.mark.parametrize(
    "fault,kind",
    [(Fault.malformed(), "bad_response"), (Fault.truncated(), "connection"),
     (Fault.truncated_json(), "bad_response"), (Fault.empty_choices(), "bad_response")],
    ids=["malformed", "truncated", "truncated_json", "empty_choices"],
)
def test_unusable_responses_on_every_attempt_give_a_clear_error(stub, fault, kind):
    teacher = make_teacher(stub, max_attempts=2)
    stub.push(fault, fault)
    with pytest.raises(TeacherError) as info:
        teacher.chat(msgs("garbled"))
    assert info.value.kind == kind and info.value.attempts == 2
    assert stub.base_url in str(info.value)
    assert len(teacher.cache) == 0  # nothing unusable is cached


@pytest.mark.parametrize("fault,status", [(Fault.bad_request("model 'x' does not exist"), 400),
                                          (Fault.unauthorized(), 401), (Fault.server_error(404), 404)])
def test_4xx_other_than_429_is_not_retried(stub, fault, status):
    teacher = make_teacher(stub)
    stub.push(fault)
    with pytest.raises(TeacherError) as info:
        teacher.chat(msgs("bad"))
    assert info.value.status == status and info.value.attempts == 1 and stub.chat_requests == 1
    assert f"HTTP {status}" in str(info.value) and fault.message in str(info.value)


def test_last_attempt_error_names_status_and_message(stub):
    teacher = make_teacher(stub, max_attempts=3)
    stub.push(Fault.server_error(503), Fault.server_error(503), Fault.server_error(503))
    with pytest.raises(TeacherError) as info:
        teacher.chat(msgs("down"))
    err = info.value
    assert isinstance(err, CRSError) and err.status == 503 and err.attempts == 3 and stub.chat_requests == 3
    assert "HTTP 503" in str(err) and "The server had an error (stub)" in str(err) and "after 3 attempts" in str(err)


# -- concurrency ---------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [1, 4, 16])
def test_chat_many_honours_the_concurrency_limit_and_keeps_order(stub, limit):
    stub.latency = 0.03
    teacher = make_teacher(stub)
    requests = [msgs(f"q{i}") for i in range(48)]
    results = teacher.chat_many(requests, concurrency=limit)
    assert [r.text for r in results] == [f"echo: q{i}" for i in range(48)]
    assert stub.chat_requests == 48
    assert stub.max_in_flight <= limit
    assert stub.max_in_flight >= min(limit, 2)  # and it is actually concurrent


def test_chat_many_accepts_request_objects_and_dicts(stub):
    teacher = make_teacher(stub)
    results = teacher.chat_many([
        ChatRequest(msgs("a"), max_tokens=3), {"messages": msgs("b"), "temperature": 0.1}, msgs("c"),
    ])
    assert [r.text for r in results] == ["echo: a", "echo: b", "echo: c"]
    assert [r.body["max_tokens"] for r in sorted(stub.requests, key=lambda r: r.body["messages"][1]["content"])] == [3, 512, 512]


def test_chat_many_puts_failures_in_place_and_goes_on(stub):
    stub.behaviour = lambda i, body: Fault.bad_request("no") if "bad" in body["messages"][-1]["content"] else None
    teacher = make_teacher(stub)
    results = teacher.chat_many([msgs("ok 0"), msgs("bad 1"), msgs("ok 2"), msgs("bad 3")], concurrency=2)
    assert [r.ok for r in results] == [True, False, True, False]
    assert isinstance(results[1], TeacherFailure) and results[1].status == 400 and results[1].kind == "http"
    assert summarize(results) == {"completed": 2, "cached": 0, "failed": 2, "budget": 0, "cancelled": 0}


def test_progress_and_live_tally(stub):
    stub.latency = 0.05
    teacher = make_teacher(stub)
    seen, in_flight = [], []
    stop_watch = threading.Event()

    def watch():  # another thread (the app's display) reads the tally while calls run
        while not stop_watch.is_set():
            in_flight.append(teacher.tally().in_flight)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    results = teacher.chat_many([msgs(f"p{i}") for i in range(12)], concurrency=4,
                                progress=lambda done, total: seen.append((done, total, teacher.tally().calls)))
    stop_watch.set()
    watcher.join()
    assert [d for d, _, _ in seen] == list(range(1, 13)) and all(t == 12 for _, t, _ in seen)
    assert all(calls >= done for done, _, calls in seen)  # counted before reported done
    assert max(in_flight) >= 2 and max(in_flight) <= 4
    t = teacher.tally()
    assert t.calls == 12 and t.in_flight == 0
    assert t.prompt_tokens == sum(r.prompt_tokens for r in results)
    assert t.completion_tokens == sum(r.completion_tokens for r in results)
    assert t.cost == pytest.approx(sum(r.cost for r in results))
    assert t.as_dict()["total_tokens"] == t.total_tokens


def test_stop_event_cancels_what_has_not_started(stub):
    stub.latency = 0.1
    teacher = make_teacher(stub)
    stop = threading.Event()

    def on_result(i, r):
        stop.set()

    results = teacher.chat_many([msgs(f"s{i}") for i in range(20)], concurrency=2, stop=stop, on_result=on_result)
    counts = summarize(results)
    assert counts["completed"] >= 1 and counts["cancelled"] >= 15
    assert stub.chat_requests <= 4


# -- budget --------------------------------------------------------------------------------
def test_call_budget_stops_cleanly(stub):
    stub.latency = 0.02
    teacher = make_teacher(stub, budget=Budget(max_calls=5))
    results = teacher.chat_many([msgs(f"b{i}") for i in range(12)], concurrency=4)
    done = [r for r in results if isinstance(r, Completion)]
    markers = [r for r in results if isinstance(r, BudgetExhausted)]
    assert len(done) == 5 and len(markers) == 7 and stub.chat_requests == 5
    assert all(not m.ok and m.kind == "budget" and "call limit" in m.message for m in markers)
    assert teacher.tally().budget_refused == 7 and teacher.budget_exhausted
    with pytest.raises(BudgetExceeded):
        teacher.chat(msgs("one more"))
    # cached results still come back (they cost nothing)
    assert teacher.chat(msgs("b0")).cached
    assert stub.chat_requests == 5


def test_token_budget_is_never_crossed(stub):
    teacher = make_teacher(stub, max_tokens=10, budget=Budget(max_tokens=150))
    results = teacher.chat_many([msgs(f"t{i} " + "word " * 5) for i in range(20)], concurrency=4)
    done = [r for r in results if isinstance(r, Completion)]
    assert 0 < len(done) < 20
    assert sum(r.total_tokens for r in done) <= 150
    assert teacher.tally().total_tokens <= 150
    assert all(isinstance(r, BudgetExhausted) for r in results if not isinstance(r, Completion))
    assert "token limit" in teacher.budget_exhausted


def test_money_budget_is_never_crossed(stub):
    teacher = make_teacher(stub, model="pricey", prices={"pricey": Price(1000.0, 2000.0)}, max_tokens=8,
                           budget=Budget(max_cost=0.5))
    results = teacher.chat_many([msgs(f"m{i}") for i in range(40)], concurrency=8)
    done = [r for r in results if isinstance(r, Completion)]
    assert 0 < len(done) < 40 and stub.chat_requests == len(done)
    assert teacher.tally().cost <= 0.5
    assert "money limit" in teacher.budget_exhausted


@pytest.mark.parametrize("budget", [Budget(max_calls=0), Budget(max_tokens=0), Budget(max_cost=0.0)])
def test_zero_budget_makes_no_call(stub, budget):
    teacher = make_teacher(stub, budget=budget)
    with pytest.raises(BudgetExceeded, match="budget is 0"):
        teacher.chat(msgs("anything"))
    results = teacher.chat_many([msgs("a"), msgs("b")])
    assert all(isinstance(r, BudgetExhausted) and "no call is made" in r.message for r in results)
    assert stub.chat_requests == 0


def test_set_budget_starts_a_new_budget(stub):
    teacher = make_teacher(stub, budget=Budget(max_calls=1))
    teacher.chat(msgs("1"))
    with pytest.raises(BudgetExceeded):
        teacher.chat(msgs("2"))
    teacher.set_budget(Budget(max_calls=1))
    assert teacher.chat(msgs("2")).ok
    assert teacher.budget.describe() == "1 calls"


# -- the API key ---------------------------------------------------------------------------
def test_api_key_is_never_persisted_or_shown(stub, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the openai client's included
    ws_path = tmp_path / "ws.duckdb"
    cfg = TeacherConfig.openai(stub.base_url, "gpt-4o-mini", api_key=KEY, max_attempts=2, backoff_base=0.01)
    for text in (repr(cfg), str(cfg), f"{cfg}", repr(cfg.api_key), str(cfg.api_key), f"{cfg.api_key}",
                 json.dumps(cfg.to_dict())):
        assert KEY not in text
    assert "api_key" not in cfg.to_dict()
    with pytest.raises(TypeError):
        pickle.dumps(cfg)
    with Workspace(ws_path) as ws:
        teacher = Teacher(cfg, cache=ws)
        stub.push(Fault.server_error(500))
        teacher.chat_many([msgs("a"), msgs("b")])
        stub.push(Fault.bad_request("rejected"))
        failure = teacher.chat_many([msgs("c")])[0]
        ws.set_meta("teacher_config", cfg.to_dict())  # what the app may store
        for text in (repr(teacher), str(teacher.tally()), str(failure), repr(teacher.cache)):
            assert KEY not in text
        cached = ws.df("SELECT * FROM llm_cache").to_json()
        assert KEY not in cached and ws.count("llm_cache") == 2
    assert stub.requests[0].headers["authorization"] == f"Bearer {KEY}"
    # the database files themselves
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    # the key from the environment (for the endpoint it is fixed to) is not copied into the config either
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("CRS_TEACHER_BASE_URL", stub.base_url)
    env_cfg = TeacherConfig.openai(stub.base_url, "gpt-4o-mini")
    assert env_cfg.api_key is None and env_cfg.resolve_api_key() == KEY
    Teacher(env_cfg).chat(msgs("from env"))
    assert stub.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(env_cfg) and KEY not in json.dumps(env_cfg.to_dict())
    assert "retry" in caplog.text and KEY not in caplog.text  # logs
    assert TeacherConfig.from_dict(cfg.to_dict()) == cfg  # round trip without the key
    assert Secret(KEY) == cfg.api_key and pickle.dumps(env_cfg)  # no key inside: picklable


def test_remote_endpoint_without_key_is_a_setup_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    teacher = Teacher(TeacherConfig.openai("https://teacher.example.invalid/v1", "gpt-4o"))
    with pytest.raises(TeacherSetupError, match=r"OPENAI_API_KEY"):
        teacher.chat(msgs("x"))
    with pytest.raises(TeacherSetupError):  # chat_many raises it too, instead of N failures
        teacher.chat_many([msgs("x"), msgs("y")])


def test_config_from_env(monkeypatch):
    monkeypatch.delenv("CRS_TEACHER_BASE_URL", raising=False)
    assert TeacherConfig.from_env().provider == "local"
    monkeypatch.setenv("CRS_TEACHER_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("CRS_TEACHER_MODEL", "gpt-4o")
    cfg = TeacherConfig.from_env()
    assert (cfg.provider, cfg.base_url, cfg.model, cfg.temperature) == ("openai", "http://127.0.0.1:9/v1", "gpt-4o", 0.8)
    with pytest.raises(TeacherSetupError):
        TeacherConfig(provider="nonsense")


# -- issue 13: a key goes only where it is fixed to; messages never carry one; 401 stops ----------
def test_the_environment_key_is_sent_only_to_its_fixed_endpoint(stub, monkeypatch):
    """An anonymous studio visitor set the base URL to their own server (and the key variable's
    name to another secret of the server): $OPENAI_API_KEY goes only to $CRS_TEACHER_BASE_URL
    (api.openai.com when unset), and no other variable is ever read for a key."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("CRS_TEACHER_BASE_URL", raising=False)
    monkeypatch.setenv("CRS_TEACHER_API_KEY_ENV", "OTHER_SECRET")  # the removed indirection
    monkeypatch.setenv("OTHER_SECRET", "sk-other-secret-of-the-server-123456")
    with pytest.raises(TypeError):
        TeacherConfig.openai(stub.base_url, "gpt-4o-mini", api_key_env="OTHER_SECRET")
    attacker = TeacherConfig.openai(stub.base_url, "gpt-4o-mini")
    assert attacker.resolve_api_key() is None
    Teacher(attacker).chat(msgs("who am I talking to?"))
    assert stub.requests[-1].headers["authorization"] == "Bearer sk-no-key-required"  # loopback: no key
    remote = Teacher(TeacherConfig.openai("https://attacker.example.invalid/v1", "gpt-4o-mini"))
    with pytest.raises(TeacherSetupError, match=r"OPENAI_API_KEY is sent only to https://api.openai.com/v1"):
        remote.chat(msgs("x"))
    assert TeacherConfig.openai(None, "gpt-4o").resolve_api_key() == KEY  # its own endpoint
    monkeypatch.setenv("CRS_TEACHER_BASE_URL", stub.base_url + "/")  # the operator fixes it here
    Teacher(TeacherConfig.from_env()).chat(msgs("now with the key"))
    assert stub.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert all("sk-other-secret" not in r.headers.get("authorization", "") for r in stub.requests)


def test_a_given_key_is_fixed_to_its_base_url_and_dropped_when_it_changes(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with OpenAIStubServer() as first, OpenAIStubServer() as second:
        cfg = TeacherConfig.openai(first.base_url, "gpt-4o-mini", api_key=KEY)
        assert cfg.resolve_api_key() == KEY and cfg.api_key_endpoint == first.base_url
        moved = replace(cfg, base_url=second.base_url)  # what editing the base URL does
        assert moved.resolve_api_key() is None and "enter it again" in moved.missing_key_reason()
        assert KEY not in moved.missing_key_reason()
        Teacher(moved).chat(msgs("hello"))
        assert second.requests[-1].headers["authorization"] == "Bearer sk-no-key-required"
        with pytest.raises(TeacherSetupError, match="entered for .* enter it again"):
            Teacher(replace(cfg, base_url="https://elsewhere.example.invalid/v1")).chat(msgs("x"))
        again = moved.with_api_key(KEY)  # entered again, for the new endpoint
        Teacher(again).chat(msgs("hello again"))
        assert second.requests[-1].headers["authorization"] == f"Bearer {KEY}"
        assert first.chat_requests == 0
        assert "api_key_endpoint" not in cfg.to_dict()


def test_redact_secrets_removes_keys_and_bearer_tokens():
    text = (f"Incorrect API key provided: {KEY}. Header was 'Authorization: Bearer abc.DEF-123_456'; "
            "api_key=ghp_0123456789abcdef, also sk-proj-ABCDEFGHIJKLMNOP and the session key MY-KEY-VALUE-42")
    out = redact_secrets(text, "MY-KEY-VALUE-42")
    for secret in (KEY, "abc.DEF-123_456", "ghp_0123456789abcdef", "sk-proj-ABCDEFGHIJKLMNOP", "MY-KEY-VALUE-42"):
        assert secret not in out
    assert out.count("[redacted]") == 5 and "Incorrect API key provided" in out


def test_a_401_stops_at_once_with_its_reason_and_no_message_carries_the_key(stub, caplog):
    """A 401 showed "failed: 2" without its reason until three failures in a row, and an endpoint
    that echoes the key had it printed verbatim."""
    caplog.set_level(logging.DEBUG)
    echo = f"Incorrect API key provided: {KEY[:12]}...{KEY[-4:]} (sent as Bearer {KEY})"
    teacher = make_teacher(stub)
    stub.push(Fault.server_error(500), Fault("error", 500, message=f"upstream rejected {KEY}"))
    assert teacher.chat(msgs("after two 500s")).ok
    stub.push(Fault("error", 401, message=echo))
    with pytest.raises(TeacherSetupError) as info:
        teacher.chat_many([msgs(f"q{i}") for i in range(5)], concurrency=1)
    err = info.value
    assert err.status == 401 and "HTTP 401" in str(err) and "refused the API key" in str(err)
    assert "Incorrect API key provided" in str(err) and KEY not in str(err) and KEY[:12] not in str(err)
    assert stub.chat_requests == 4  # 3 for the first call, then the 401 ended the run
    assert KEY not in caplog.text and "upstream rejected [redacted]" in caplog.text


# -- issue 13, finding 5: requests in flight at a crash --------------------------------------------
_CRASHING_RUN = """
import sys
from crs_core.store import Workspace
from crs_core.teacher import Teacher, TeacherConfig
ws = Workspace(sys.argv[1])
cfg = TeacherConfig.openai(sys.argv[2], "gpt-4o-mini", api_key="sk-test-crash", timeout=60, max_attempts=1)
Teacher(cfg, cache=ws).chat_many([[{"role": "user", "content": f"q{i}"}] for i in range(8)], concurrency=8)
"""


def test_requests_in_flight_at_a_kill_are_recorded_and_counted_when_resent(stub, tmp_path):
    import os
    import signal
    import subprocess

    path = tmp_path / "ws.duckdb"
    stub.latency = 60.0  # the replies never come before the kill
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_RUN, str(path), stub.base_url], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while stub.in_flight < 8:
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not send its 8 requests"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    first_keys = sorted(r.headers["idempotency-key"] for r in stub.requests)
    assert len(set(first_keys)) == 8 and all(k.startswith("crs-") for k in first_keys)
    stub.latency = 0.0
    with Workspace(path) as ws:
        assert ws.count("llm_inflight") == 8 and ws.count("llm_cache") == 0
        teacher = make_teacher(stub, cache=ws)
        assert teacher.interrupted_calls() == 8
        results = teacher.chat_many([[{"role": "user", "content": f"q{i}"}] for i in range(10)], concurrency=4)
        assert all(r.ok for r in results)
        assert teacher.tally().resent == 8 and teacher.tally().calls == 10
        # sent again with the same idempotency keys: an endpoint that honours them bills once
        assert set(first_keys) <= {r.headers["idempotency-key"] for r in stub.requests[8:]}
        assert ws.count("llm_inflight") == 0 and ws.count("llm_cache") == 10
        assert make_teacher(stub, cache=ws).interrupted_calls() == 0
        stub.push(Fault.bad_request("no"))  # a failed call clears its mark too
        with pytest.raises(TeacherError):
            teacher.chat(msgs("fails"))
        teacher.close()  # the writer has written what was queued
        assert ws.count("llm_inflight") == 0


# -- structured replies: the response_format an endpoint takes, decided once per endpoint ----------
from crs_core.teacher import (  # noqa: E402
    FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA, FORMAT_NONE, forget_structured_formats, response_format_for,
)
from openai_stub_server import response_format_form  # noqa: E402

PICKS = {"type": "object", "title": "picks", "properties": {"picks": {"type": "array", "items": {"type": "integer",
         "enum": [1, 2, 3]}, "maxItems": 2}}, "required": ["picks"], "additionalProperties": False}


def forms(server: OpenAIStubServer) -> list:
    return [response_format_form(r.body) for r in server.requests]


def test_response_format_forms():
    assert response_format_for(PICKS, FORMAT_JSON_SCHEMA) == {
        "type": "json_schema", "json_schema": {"name": "picks", "schema": PICKS, "strict": True}}
    assert response_format_for(PICKS, FORMAT_JSON_OBJECT) == {"type": "json_object", "schema": PICKS}
    assert response_format_for(PICKS, FORMAT_NONE) is None
    with pytest.raises(TeacherSetupError):
        response_format_for(PICKS, "xml")


def test_an_endpoint_that_takes_json_schema_gets_it_at_once(stub):
    forget_structured_formats()
    stub.response_formats = ("json_schema",)
    teacher = make_teacher(stub)
    assert teacher.structured_format() is None
    teacher.chat(msgs("pick"), json_schema=PICKS)
    teacher.chat(msgs("pick again"), json_schema=PICKS)
    assert forms(stub) == ["json_schema", "json_schema"] and stub.format_refusals == 0
    assert teacher.structured_format() == FORMAT_JSON_SCHEMA
    body = stub.requests[0].body["response_format"]
    assert body["json_schema"]["schema"] == PICKS


def test_llama_cpp_style_refusal_is_not_retried_and_json_object_is_used(stub):
    """llama_cpp.server 0.3.36 answers json_schema with HTTP 500 (retryable for any other
    request): the probe moves on at once, and every later call sends json_object + schema."""
    forget_structured_formats()
    stub.response_formats, stub.format_refusal_status = ("json_object+schema",), 500
    teacher = make_teacher(stub, max_attempts=5)
    c = teacher.chat(msgs("pick"), json_schema=PICKS)
    assert c.ok and forms(stub) == ["json_schema", "json_object+schema"] and stub.format_refusals == 1
    assert teacher.structured_format() == FORMAT_JSON_OBJECT
    # the decision holds for the endpoint: another teacher object asks no more
    other = make_teacher(stub)
    other.chat(msgs("another"), json_schema=PICKS)
    assert forms(stub)[-1] == "json_object+schema" and stub.format_refusals == 1
    # a real 500 on a decided endpoint is retried as before
    stub.push(Fault.server_error())
    assert other.chat(msgs("third"), json_schema=PICKS).attempts == 2


def test_an_endpoint_refusing_every_form_gets_plain_requests(stub):
    forget_structured_formats()
    stub.response_formats = ()
    teacher = make_teacher(stub)
    reqs = [ChatRequest(msgs(f"pick {i}"), json_schema=PICKS) for i in range(6)]
    seen = []
    results = teacher.chat_many(reqs, concurrency=4, on_result=lambda i, r: seen.append(i))
    assert all(isinstance(r, Completion) for r in results) and sorted(seen) == list(range(6))
    assert [r.text for r in results] == [f"echo: pick {i}" for i in range(6)]  # in request order
    # one request tried the two schema forms, then none; the other five went plain at once
    assert stub.format_refusals == 2 and forms(stub) == ["json_schema", "json_object+schema"] + [None] * 6
    assert teacher.structured_format() == FORMAT_NONE


def test_a_cached_answer_decides_the_form_without_a_call(stub, tmp_path):
    forget_structured_formats()
    stub.response_formats, stub.format_refusal_status = ("json_object+schema",), 500
    with Workspace(tmp_path / "ws.duckdb") as ws:
        first = make_teacher(stub, cache=ws).chat(msgs("pick"), json_schema=PICKS)
        n = stub.chat_requests
        forget_structured_formats()  # a new process: nothing decided
        again = make_teacher(stub, cache=ws).chat(msgs("pick"), json_schema=PICKS)
    assert again.cached and again.text == first.text
    assert stub.chat_requests == n + 1 and forms(stub)[-1] == "json_schema"  # one refused probe, then the cache


def test_a_probe_that_fails_for_another_reason_decides_nothing(stub):
    forget_structured_formats()
    stub.push(Fault.bad_request("context length exceeded"))
    stub.response_formats = None  # takes anything: the 400 is not about the format...
    teacher = make_teacher(stub, max_attempts=1)
    # ...but a probe cannot tell: it moves on; the request then succeeds with json_object
    assert teacher.chat(msgs("pick"), json_schema=PICKS).ok
    assert teacher.structured_format() == FORMAT_JSON_OBJECT
    forget_structured_formats()
    stub.push(Fault.rate_limit(), Fault.rate_limit())
    with pytest.raises(TeacherError, match="429"):
        make_teacher(stub, max_attempts=2).chat(msgs("limited"), json_schema=PICKS)
    assert make_teacher(stub).structured_format() is None  # a rate limit says nothing about the form


def test_an_explicit_response_format_is_sent_as_is(stub):
    forget_structured_formats()
    stub.response_formats = ("json_object",)
    teacher = make_teacher(stub)
    teacher.chat(msgs("json please"), response_format={"type": "json_object"}, json_schema=PICKS)
    assert forms(stub) == ["json_object"] and teacher.structured_format() is None
