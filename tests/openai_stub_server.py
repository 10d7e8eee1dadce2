"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

It speaks the chat-completions protocol as the real API does (``POST /v1/chat/completions``
with the real JSON shape, ``usage`` included, and ``GET /v1/models``), so the real ``openai``
client talks to it over HTTP; nothing is mocked. Each request can be given a behaviour:

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

Run as a separate process (own GIL, for benchmarks)::

    python tests/openai_stub_server.py --latency 0.1      # prints "PORT <n>" then serves
                                                          # until its stdin closes

``GET /_stub/stats`` and ``GET /_stub/reset`` (not OpenAI routes) read and reset the counters.
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class OpenAIStubServer:
    """A threading HTTP server in a background thread; see the module docstring."""

    def __init__(
        self,
        reply: ReplyFn | None = None,
        *,
        latency: float = 0.0,
        model: str = "stub-model",
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
    ):
        self.reply: ReplyFn = reply or default_reply
        self.latency = latency
        self.model = model
        self.host = host
        self._port_wanted = port
        self.record = record  # keep every request (body, headers) in .requests
        # behaviour: queued faults first, then `behaviour(index, body)` if set, else ok
        self.behaviour: Callable[[int, dict[str, Any]], Fault | None] | None = None
        self._queue: collections.deque[Fault] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests: list[RecordedRequest] = []
        self.chat_requests = 0
        self.model_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> "OpenAIStubServer":
        stub = self

        class Handler(_Handler):
            server_ref = stub

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 256  # many simultaneous connects (benchmarks at concurrency 64)

        self._httpd = Server((self.host, self._port_wanted), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"openai-stub:{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "OpenAIStubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

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
        text = self.reply(messages)
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


class _Handler(BaseHTTPRequestHandler):
    server_ref: OpenAIStubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet
        return None

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        etype = {
            400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
            429: "rate_limit_exceeded",
        }.get(status, "server_error")
        self._send_json(
            status,
            {"error": {"message": message, "type": etype, "param": None, "code": None}},
            headers,
        )

    def do_GET(self) -> None:
        stub = self.server_ref
        if self.path.rstrip("/") == "/_stub/stats":  # not OpenAI: counters for benchmarks
            with stub._lock:
                stats = {"chat_requests": stub.chat_requests, "model_requests": stub.model_requests,
                         "in_flight": stub.in_flight, "max_in_flight": stub.max_in_flight}
            self._send_json(200, stats)
        elif self.path.rstrip("/") == "/_stub/reset":
            stub.reset()
            self._send_json(200, {"reset": True})
        elif self.path.rstrip("/") in ("/v1/models", "/models"):
            with stub._lock:
                stub.model_requests += 1
            self._send_json(200, {
                "object": "list",
                "data": [{"id": stub.model, "object": "model", "created": 0, "owned_by": "stub"}],
            })
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        stub = self.server_ref
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route {self.path}")
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._error(400, "request body is not JSON")
            return
        index, fault = stub._next_fault(body)
        rec = RecordedRequest(
            path=self.path, body=body,
            headers={k.lower(): v for k, v in self.headers.items()}, fault=fault,
            started=time.monotonic(),
        )
        with stub._lock:
            if stub.record:
                stub.requests.append(rec)
            stub.in_flight += 1
            stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
        try:
            if stub.latency:
                stub._stop.wait(stub.latency)
            self._serve(fault, body)
        finally:
            rec.finished = time.monotonic()
            with stub._lock:
                stub.in_flight -= 1

    def _serve(self, fault: Fault, body: dict[str, Any]) -> None:
        stub = self.server_ref
        if fault.kind == "hang":
            stub._stop.wait(fault.seconds)
            # the client has given up by now; answer anyway (into a closed socket, maybe)
            fault = Fault.ok()
        if fault.kind == "error":
            headers = {}
            if fault.retry_after is not None:
                ra = fault.retry_after
                headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
            self._error(fault.status, fault.message or "error", headers)
            return
        if fault.kind == "malformed":
            self._send_json(200, b"<html>502 Bad Gateway: upstream sent garbage</html> {not json")
            return
        payload = stub.completion_body(body)
        if fault.kind == "empty_choices":
            payload["choices"] = []
        raw = json.dumps(payload).encode()
        try:
            if fault.kind == "truncated":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw[: len(raw) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if fault.kind == "truncated_json":
                raw = raw[: len(raw) // 2]
            self._send_json(200, raw)
        except (BrokenPipeError, ConnectionResetError):
            pass


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
