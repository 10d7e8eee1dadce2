"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

It speaks the chat-completions protocol as the real API does (``POST /v1/chat/completions``
with the real JSON shape, ``usage`` included, and ``GET /v1/models``) over HTTP/1.1 with
keep-alive, so the real ``openai`` client talks to it over HTTP; nothing is mocked. Each
request can be given a behaviour:

    with OpenAIStubServer(reply=lambda messages: "hello") as stub:
        stub.push(Fault.rate_limit(retry_after=1), Fault.server_error())   # next two requests
        stub.latency = 0.1                                                 # every request
        ... OpenAI(base_url=stub.base_url, api_key="x") ...
        stub.chat_requests         # how many chat requests arrived
        stub.max_in_flight         # most chat requests served at the same time

Faults: ``ok``, ``rate_limit`` (429, optional ``Retry-After``), ``server_error`` (500 or any
status), ``bad_request`` (400), ``unauthorized`` (401), ``hang`` (no answer for N seconds),
``malformed`` (200 with a body that is not JSON), ``truncated`` (the connection closes in the
middle of the body), ``truncated_json`` (a complete response whose JSON is cut off),
``empty_choices`` (200 with ``"choices": []``).

Structured replies: ``response_formats`` lists the ``response_format`` forms the server takes
(``"json_schema"``, ``"json_object+schema"``, ``"json_object"``, ``"text"``; None = any, the
default). A request with another form is refused as real endpoints refuse it: HTTP
``format_refusal_status`` (400 like OpenAI for a model without structured outputs; 500 like
llama_cpp.server 0.3.36 for ``json_schema``). A reply function that takes two arguments gets
the request body too (``reply(messages, body)``), so it can answer in the schema it was sent.

It stands in for a remote endpoint, so it should cost as little CPU as possible (benchmarks run
it on the same cores as the client they measure): one asyncio event loop in a background thread
serves every connection; a request costs a header parse, the reply function and one write. The
reply and behaviour functions run in that thread.

Run as a separate process (own GIL, for benchmarks)::

    python tests/openai_stub_server.py --latency 0.1      # prints "PORT <n>" then serves
                                                          # until its stdin closes

``GET /_stub/stats`` and ``GET /_stub/reset`` (not OpenAI routes) read and reset the counters
(stats also give the process's CPU seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http
import inspect
import json
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable

ReplyFn = Callable[[list[dict[str, Any]]], str]


@dataclass(frozen=True)
class Fault:
    """What the server does with one chat request."""

    kind: str = "ok"
    status: int = 200
    retry_after: float | None = None
    seconds: float = 0.0  # hang duration
    message: str = ""

    @staticmethod
    def ok() -> "Fault":
        return Fault("ok")

    @staticmethod
    def rate_limit(retry_after: float | None = None) -> "Fault":
        return Fault("error", 429, retry_after=retry_after, message="Rate limit reached (stub)")

    @staticmethod
    def server_error(status: int = 500) -> "Fault":
        return Fault("error", status, message="The server had an error (stub)")

    @staticmethod
    def bad_request(message: str = "Invalid request (stub)") -> "Fault":
        return Fault("error", 400, message=message)

    @staticmethod
    def unauthorized() -> "Fault":
        return Fault("error", 401, message="Incorrect API key provided (stub)")

    @staticmethod
    def hang(seconds: float) -> "Fault":
        return Fault("hang", seconds=seconds)

    @staticmethod
    def malformed() -> "Fault":
        return Fault("malformed")

    @staticmethod
    def truncated() -> "Fault":
        """Headers promise the whole body; half of it is sent, then the connection closes."""
        return Fault("truncated")

    @staticmethod
    def truncated_json() -> "Fault":
        """A complete HTTP response whose JSON body is cut in the middle."""
        return Fault("truncated_json")

    @staticmethod
    def empty_choices() -> "Fault":
        return Fault("empty_choices")


def default_reply(messages: list[dict[str, Any]]) -> str:
    last = messages[-1].get("content", "") if messages else ""
    if isinstance(last, list):  # content parts
        last = " ".join(str(p.get("text", "")) for p in last if isinstance(p, dict))
    return f"echo: {last}"


def count_tokens(text: str) -> int:
    """The stub's tokenizer: whitespace words (deterministic, easy to predict in tests)."""
    return len(str(text).split())


@dataclass
class RecordedRequest:
    path: str
    body: dict[str, Any] | None
    headers: dict[str, str]
    fault: Fault
    started: float
    finished: float | None = None


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                429: "rate_limit_exceeded"}
_CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
_MODEL_PATHS = ("/v1/models", "/models")


class OpenAIStubServer:
    """An asyncio HTTP/1.1 server in a background thread; see the module docstring."""

    def __init__(
        self,
        reply: ReplyFn | None = None,
        *,
        latency: float = 0.0,
        model: str = "stub-model",
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
        response_formats: tuple[str, ...] | None = None,
        format_refusal_status: int = 400,
    ):
        self.reply: ReplyFn = reply or default_reply
        try:
            self._reply_takes_body = len(inspect.signature(self.reply).parameters) >= 2
        except (TypeError, ValueError):
            self._reply_takes_body = False
        self.response_formats = response_formats
        self.format_refusal_status = format_refusal_status
        self.format_refusals = 0
        self.latency = latency
        self.model = model
        self.host = host
        self._port_wanted = port
        self.record = record  # keep every request (body, headers) in .requests
        # behaviour: queued faults first, then `behaviour(index, body)` if set, else ok
        self.behaviour: Callable[[int, dict[str, Any]], Fault | None] | None = None
        self._queue: collections.deque[Fault] = collections.deque()
        self._lock = threading.Lock()  # counters, queue and requests are read from other threads
        self.requests: list[RecordedRequest] = []
        self.chat_requests = 0
        self.model_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> "OpenAIStubServer":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-stub", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            self._serve_connection, self.host, self._port_wanted, reuse_address=True,
            backlog=256,  # many simultaneous connects (benchmarks at concurrency 64)
        ), self._loop).result()
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shut_down() -> None:
            self._server.close()
            for task in list(self._connections):  # hanging requests end now
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(shut_down(), loop).result(timeout=5)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                loop.close()
            self._loop = self._server = self._thread = None

    def __enter__(self) -> "OpenAIStubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._port is not None, "server not started"
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # -- behaviour ----------------------------------------------------------------------
    def push(self, *faults: Fault) -> None:
        """Queue behaviours for the next chat requests, in order (then back to normal)."""
        with self._lock:
            self._queue.extend(faults)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.chat_requests = 0
            self.model_requests = 0
            self.max_in_flight = self.in_flight

    def stats(self) -> dict[str, Any]:
        """The counters, and the CPU seconds this process has used so far (for benchmarks that
        run the stub in its own process)."""
        with self._lock:
            return {"chat_requests": self.chat_requests, "model_requests": self.model_requests,
                    "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                    "cpu_seconds": time.process_time()}

    def _next_fault(self, body: dict[str, Any]) -> tuple[int, Fault]:
        with self._lock:
            index = self.chat_requests
            self.chat_requests += 1
            fault = self._queue.popleft() if self._queue else None
        if fault is None and self.behaviour is not None:
            fault = self.behaviour(index, body)
        return index, fault or Fault.ok()

    def completion_body(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        text = self.reply(messages, body) if self._reply_takes_body else self.reply(messages)
        prompt_tokens = sum(count_tokens(m.get("content", "")) + 3 for m in messages)
        completion_tokens = count_tokens(text)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        finish = "stop"
        if max_tokens is not None and completion_tokens > int(max_tokens):
            words = text.split()[: int(max_tokens)]
            text, completion_tokens, finish = " ".join(words), len(words), "length"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "system_fingerprint": "fp_stub",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    # -- HTTP/1.1 -----------------------------------------------------------------------
    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One keep-alive connection: requests one after the other until either side closes."""
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            keep_open = True
            while keep_open:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
                method, path, version = request_line.split(" ", 2)
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                raw = await reader.readexactly(length) if length else b""
                keep_open = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                try:
                    keep_open &= await self._handle(method, path.rstrip("/"), headers, raw, writer)
                except Exception as exc:  # a failing reply function: the client sees a 500
                    traceback.print_exc()
                    self._respond(writer, 500, _error_payload(500, f"stub: {type(exc).__name__}: {exc}"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:  # stop(): ends here, so that asyncio has nothing to report
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _handle(self, method: str, path: str, headers: dict[str, str], raw: bytes,
                      writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is to be closed afterwards."""
        if method == "GET" and path == "/_stub/stats":  # not OpenAI: counters for benchmarks
            self._respond(writer, 200, self.stats())
        elif method == "GET" and path == "/_stub/reset":
            self.reset()
            self._respond(writer, 200, {"reset": True})
        elif method == "GET" and path in _MODEL_PATHS:
            with self._lock:
                self.model_requests += 1
            self._respond(writer, 200, {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "stub"}],
            })
        elif method == "POST" and path in _CHAT_PATHS:
            return await self._chat(path, headers, raw, writer)
        else:
            self._respond(writer, 404, _error_payload(404, f"no route {path}"))
        return True

    async def _chat(self, path: str, headers: dict[str, str], raw: bytes, writer: asyncio.StreamWriter) -> bool:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._respond(writer, 400, _error_payload(400, "request body is not JSON"))
            return True
        index, fault = self._next_fault(body)
        rec = RecordedRequest(path=path, body=body, headers=headers, fault=fault, started=time.monotonic())
        with self._lock:
            if self.record:
                self.requests.append(rec)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            if fault.kind == "hang":
                await asyncio.sleep(fault.seconds)
                if writer.is_closing():  # the client has given up by now
                    return False
                fault = Fault.ok()  # answer anyway (into a closed socket, maybe)
            return self._answer(fault, body, writer)
        finally:
            rec.finished = time.monotonic()
            with self._lock:
                self.in_flight -= 1

    def _answer(self, fault: Fault, body: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        form = response_format_form(body)
        if fault.kind == "ok" and form is not None and self.response_formats is not None \
                and form not in self.response_formats:
            with self._lock:
                self.format_refusals += 1
            status = self.format_refusal_status
            self._respond(writer, status, _error_payload(
                status, f"response_format of type {form!r} is not supported (stub accepts "
                        f"{', '.join(self.response_formats) or 'none'})"))
            return True
        if fault.kind == "error":
            extra = {}
            if fault.retry_after is not None:
                ra = fault.retry_after
                extra["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
            self._respond(writer, fault.status, _error_payload(fault.status, fault.message or "error"), extra)
            return True
        if fault.kind == "malformed":
            self._respond(writer, 200, b"<html>502 Bad Gateway: upstream sent garbage</html> {not json")
            return True
        payload = self.completion_body(body)
        if fault.kind == "empty_choices":
            payload["choices"] = []
        data = json.dumps(payload).encode()
        if fault.kind == "truncated":  # the headers promise the whole body; half comes, then the end
            self._respond(writer, 200, data, cut=len(data) // 2)
            return False
        if fault.kind == "truncated_json":
            data = data[: len(data) // 2]
        self._respond(writer, 200, data)
        return True

    @staticmethod
    def _respond(writer: asyncio.StreamWriter, status: int, payload: Any, headers: dict[str, str] | None = None,
                 *, cut: int | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "Content-Type: application/json",
                f"Content-Length: {len(data)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + (data if cut is None else data[:cut]))


def response_format_form(body: dict[str, Any]) -> str | None:
    """The form of a request's response_format: None (absent), 'text', 'json_object',
    'json_object+schema', 'json_schema' or another type as sent."""
    rf = body.get("response_format")
    if not isinstance(rf, dict):
        return None
    kind = str(rf.get("type"))
    if kind == "json_object" and rf.get("schema") is not None:
        return "json_object+schema"
    return kind


def _error_payload(status: int, message: str) -> dict[str, Any]:
    etype = _ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": etype, "param": None, "code": None}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per chat request")
    ap.add_argument("--model", default="stub-model")
    args = ap.parse_args(argv)
    server = OpenAIStubServer(
        latency=args.latency, model=args.model, host=args.host, port=args.port, record=False
    )
    server.start()
    print(f"PORT {server.port}", flush=True)
    try:
        # serve until stdin closes (the parent went away) or we are terminated
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
