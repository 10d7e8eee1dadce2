"""The one asyncio event loop every teacher of the process makes its calls on (a daemon thread),
and the helpers that run a coroutine on it from other threads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from typing import Any, Callable

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None


def teacher_loop() -> asyncio.AbstractEventLoop:
    """The event loop every teacher of this process makes its calls on: one daemon thread,
    started on first use (again in a forked child, which has no such thread)."""
    global _loop, _loop_pid
    with _lock:
        if _loop is None or _loop_pid != os.getpid():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="teacher-loop", daemon=True).start()
            _loop_pid = os.getpid()
        return _loop


def on_loop(coro: Any, timeout: float | None = None) -> Any:
    """Run a coroutine on the teacher loop and wait for its result (from any other thread)."""
    return asyncio.run_coroutine_threadsafe(coro, teacher_loop()).result(timeout)


def close_soon(client: Any) -> None:
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(client.close(), teacher_loop())


async def pause(seconds: float, cancelled: Callable[[], bool]) -> bool:
    """Sleep, looking at ``cancelled`` every 0.1 s; True if it said so before the time was up."""
    end = time.monotonic() + seconds
    while not cancelled():
        left = end - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, 0.1))
    return True

