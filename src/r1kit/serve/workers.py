"""The server's CPU work that is not the engine's (tokenizing, detokenizing, rendering chat templates,
building long responses), on a small pool of threads instead of the event loop.

On the event loop, tokenizing one 1 MiB prompt held every other client for over a second (``/health``
included). The pool is bounded twice: a fixed number of threads, and a fixed number of jobs queued
for them; past that, a request gets the same 503 as a full engine queue. Tokenizers' batch calls
release the GIL (their single-text ``encode`` does not), so ``encode``/``decode`` here go through them.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from r1kit.errors import R1kitError

T = TypeVar("T")


class WorkersBusy(R1kitError):
    """Every worker thread is busy and the queue in front of them is full; the server answers 503."""


class Workers:
    """``threads`` threads, at most ``max_queued`` jobs waiting for them."""

    def __init__(self, threads: int = 2, max_queued: int = 64) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="r1kit-text")
        self._capacity = threads + max_queued
        # released from the worker thread when a job ends, even one whose client left meanwhile:
        # the count is of jobs the threads still hold, not of requests still waiting for them
        self._slots = threading.BoundedSemaphore(self._capacity)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread; raises :class:`WorkersBusy` when the queue is full."""
        if not self._slots.acquire(blocking=False):
            raise WorkersBusy(f"{self._capacity} tokenizing jobs are queued or running (the limit); retry later")
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)

    async def finish(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread, past the queue bound: for requests the engine already
        admitted (its ``max_waiting`` bounds them), whose finished work a 503 would throw away."""
        return await asyncio.wrap_future(self._pool.submit(fn, *args))


def encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text (on a worker: the batch call releases the GIL)."""
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]


def decode(tokenizer, ids: list[int]) -> str:
    """The text of ``ids``, special tokens kept (on a worker: the batch call releases the GIL)."""
    return tokenizer.decode_batch([ids], skip_special_tokens=False)[0]
