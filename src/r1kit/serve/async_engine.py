"""The engine on its own thread, with an asyncio face: requests stream from it as async iterators.

The engine is not thread-safe, so one thread owns it: HTTP handlers send commands (add, abort)
through a queue, and the thread runs ``step()`` while work remains, handing each output to its
request's asyncio queue on the event loop. A request whose consumer stops listening (a client that
disconnected) is aborted, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from typing import AsyncIterator

from r1kit.errors import R1kitError
from r1kit.infer.outputs import RequestOutput
from r1kit.infer.sampling import SamplingParams


class QueueFull(R1kitError):
    """Too many requests are waiting; the server answers 503 and the client retries later."""


_ACCEPTED = object()


def _put_all(items: list) -> None:
    for stream, item in items:
        stream.put_nowait(item)


class AsyncEngine:
    def __init__(self, engine, max_waiting: int = 256, observer=None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.observer = observer  # on the engine thread: observer.on_step(engine, outputs), observer.on_abort(engine)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="r1kit-engine", daemon=True)
        self.last_beat = time.monotonic()
        self.error: BaseException | None = None

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # -- requests ---------------------------------------------------------------------------------
    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request; yields its outputs (cumulative, with deltas) until it finishes.

        Raises the engine's validation error (a prompt too long, …) before yielding anything, and
        :class:`QueueFull` when ``max_waiting`` requests are already in flight.
        """
        if len(self._streams) >= self.max_waiting:
            raise QueueFull(f"{len(self._streams)} requests are in flight (the limit is {self.max_waiting}); retry later")
        if not self.alive:
            raise RuntimeError("the engine loop is not running")
        request_id = request_id or uuid.uuid4().hex
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", request_id, prompt, params))
        self._wake.set()
        finished = False
        try:
            first = await stream.get()
            if isinstance(first, BaseException):
                raise first
            assert first is _ACCEPTED
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))
                self._wake.set()

    # -- the engine thread ------------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _deliver_many(self, outputs: list[RequestOutput]) -> None:
        # one wake-up of each event loop per step, not one per request: at 32 streams the per-call
        # cost of call_soon_threadsafe is a visible share of a small model's step
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.last_beat = time.monotonic()
                self._drain_commands()
                if self.engine.has_unfinished_requests():
                    try:
                        outputs = self.engine.step()
                    except Exception as exc:  # fail the step's requests, keep serving the next ones
                        self._fail_all(exc)
                        continue
                    self._deliver_many(outputs)
                    if self.observer is not None:
                        self.observer.on_step(self.engine, outputs)
                else:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        except BaseException as exc:  # anything else breaks the loop: fail every waiting request, /health says so
            self.error = exc
            for request_id in list(self._streams):
                self._deliver(request_id, RuntimeError(f"the engine failed: {exc!r}"))
            raise

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver(request_id, RuntimeError(f"the engine failed on this request's step: {exc!r}"))

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "abort":
                if self.engine.abort(command[1]) and self.observer is not None:
                    self.observer.on_abort(self.engine)
                continue
            _, request_id, prompt, params = command
            if request_id not in self._streams:  # the client left before the engine saw it
                continue
            try:
                self.engine.add_request(request_id, prompt, params)
            except R1kitError as exc:
                self._deliver(request_id, exc)
            else:
                self._deliver(request_id, _ACCEPTED)
