"""The engine loop on a thread of its own, with an asyncio face: requests stream from it as async iterators.

The engine is not thread-safe, so one thread owns it: HTTP handlers send commands (add, abort)
through a queue, and the loop runs ``step()`` while work remains, handing each output to its
request's asyncio queue on the event loop. A request whose consumer stops listening (a client that
disconnected) is aborted, which frees its KV blocks at once. ``r1kit serve`` runs the loop on the
main thread (``run()``) and the HTTP server on another: on this project's 2-vCPU machines a chain of
oneDNN linears ran slower called from a second thread than from the process's first
(benchmarks/README.md, "Server overhead").
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import uuid
from r1kit.errors import ConfigError, R1kitError
from r1kit.infer.outputs import RequestOutput, coalesce
from r1kit.infer.sampling import SamplingParams
from r1kit.infer.tensor_parallel import EngineDeadError


class QueueFull(R1kitError):
    """Too many requests are waiting; the server answers 503 and the client retries later."""


class EngineUnavailable(R1kitError):
    """The engine loop is not running (stopped, or broken by an error); the server answers 503."""


_ACCEPTED = object()


def _put_all(items: list) -> None:
    for stream, item in items:
        stream.put_nowait(item)


class AsyncEngine:
    """``stream_interval``: a streaming request hears from the engine once it has this many new
    tokens (its first token and its end at once), as SGLang's and vLLM's ``--stream-interval``: fewer,
    larger chunks, so less server work per token, at the cost of smoothness."""

    def __init__(self, engine, max_waiting: int = 256, observer=None, stream_interval: int = 1) -> None:
        if stream_interval < 1:
            raise ConfigError(f"stream_interval={stream_interval} must be >= 1 (tokens per streamed chunk)")
        self.engine = engine
        self.max_waiting = max_waiting
        self.stream_interval = stream_interval
        self._held: dict[str, RequestOutput] = {}  # engine thread: streamed outputs waiting for stream_interval tokens
        self.observer = observer  # on the engine thread: observer.on_step(engine, outputs), observer.on_abort(engine)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, bool]] = {}  # loop, queue, every step?
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._done = threading.Event()
        self.error: BaseException | None = None

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop on a new thread (returns once it runs)."""
        threading.Thread(target=self.run, name="r1kit-engine", daemon=True).start()
        self._running.wait()

    def run(self) -> None:
        """Run the loop in the calling thread until :meth:`stop` (or :meth:`request_stop`)."""
        self._running.set()
        try:
            self._loop()
        finally:
            self._running.clear()
            self._done.set()

    def request_stop(self) -> None:
        """Ask the loop to stop after its current step (safe from any thread or a signal handler)."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop; requests still waiting get an error instead of waiting forever."""
        self.request_stop()
        if self._running.is_set():
            self._done.wait(timeout)
        self._fail_waiting(EngineUnavailable("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self._running.is_set() and self.error is None

    # -- requests ---------------------------------------------------------------------------------
    async def submit(self, prompt, params: SamplingParams, request_id: str | None = None, stream: bool = True) -> RequestStream:
        """Hand a request to the engine and wait only until it is accepted; returns its outputs
        (cumulative, with deltas) as a :class:`RequestStream`, or with ``stream=False`` only the final
        one (the event loop then wakes once for the request, not once per step). Closing the stream
        early aborts the request.

        Raises the engine's validation error (a prompt too long, …), :class:`QueueFull` when
        ``max_waiting`` requests are in flight, :class:`EngineUnavailable` when the loop is down.
        """
        if len(self._streams) >= self.max_waiting:
            raise QueueFull(f"{len(self._streams)} requests are in flight (the limit is {self.max_waiting}); retry later")
        request_id = request_id or uuid.uuid4().hex
        queue_: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue_, stream)
        if not self.alive:  # checked after registering: a loop that dies later fails this stream itself
            self._streams.pop(request_id, None)
            raise EngineUnavailable("the engine loop is not running")
        self._commands.put(("add", request_id, prompt, params))
        self._wake.set()
        try:
            first = await queue_.get()
        except BaseException:
            self.abort(request_id)
            raise
        if isinstance(first, BaseException):
            self._streams.pop(request_id, None)
            raise first
        return RequestStream(self, request_id, queue_)

    def abort(self, request_id: str) -> None:
        """Stop a request: its stream is dropped at once, the engine frees its blocks at its next step."""
        self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))
        self._wake.set()

    def abort_all(self, reason: str) -> None:
        """Stop every request (a shutdown whose grace period is over): each consumer gets
        :class:`EngineUnavailable` with ``reason``, so that a stream ends with an error event rather
        than being cut. Safe from any thread."""
        self._commands.put(("abort_all", reason))
        self._wake.set()

    # -- the engine thread ------------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None and not target[0].is_closed():  # closed: the HTTP server, and its clients, are gone
            target[0].call_soon_threadsafe(target[1].put_nowait, item)

    def _deliver_many(self, outputs: list[RequestOutput]) -> None:
        # one wake-up of each event loop per step, not one per request: at 32 streams the per-call
        # cost of call_soon_threadsafe is a visible share of a small model's step
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            held = self._held.pop(out.request_id, None)
            if target is None or not (target[2] or out.finished):
                continue
            if held is not None:
                out = coalesce(held, out)
            if not out.finished and not self._chunk_due(out):
                self._held[out.request_id] = out
                continue
            by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _chunk_due(self, out: RequestOutput) -> bool:
        """A streamed output goes out with its first token, or once it carries ``stream_interval`` new ones."""
        fresh = max(len(c.delta_token_ids) for c in out.outputs)
        first = any(len(c.token_ids) == len(c.delta_token_ids) > 0 for c in out.outputs)
        return fresh >= self.stream_interval or first

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if self.engine.has_unfinished_requests():
                    try:
                        outputs = self.engine.step()
                    except EngineDeadError:  # a tensor-parallel rank is gone: no later step can run either
                        raise
                    except Exception as exc:  # fail these requests, keep serving the next ones
                        self._fail_all(exc)
                        continue
                    self._deliver_many(outputs)
                    self._observe("on_step", outputs)
                else:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        except BaseException as exc:  # anything else breaks the loop: fail every waiting request, /health says so
            self.error = exc
            self._fail_waiting(EngineUnavailable(f"the engine failed: {exc!r}"))
            raise

    def _observe(self, event: str, *args) -> None:
        # metrics must never take the engine down
        if self.observer is not None:
            try:
                getattr(self.observer, event)(self.engine, *args)
            except Exception as exc:  # noqa: BLE001
                print(f"r1kit serve: metrics observer failed: {exc!r}", file=sys.stderr)

    def _fail_waiting(self, exc: Exception) -> None:
        for request_id in list(self._streams):
            self._deliver(request_id, exc)

    def _fail_all(self, exc: Exception) -> None:
        """A step raised: every request the engine holds (running or queued) fails and is dropped."""
        for request_id in list(self.engine.requests):
            self._held.pop(request_id, None)
            self.engine.abort(request_id)
            self._deliver(request_id, RuntimeError(f"the engine failed on a step with this request: {exc!r}"))
        self._observe("on_abort")

    def _abort_all(self, reason: str) -> None:
        for request_id in list(self.engine.requests):
            self._held.pop(request_id, None)
            self.engine.abort(request_id)
            self._observe("on_abort")
        self._fail_waiting(EngineUnavailable(reason))

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "abort":
                self._held.pop(command[1], None)
                if self.engine.abort(command[1]):
                    self._observe("on_abort")
                continue
            if command[0] == "abort_all":
                self._abort_all(command[1])
                continue
            _, request_id, prompt, params = command
            if request_id not in self._streams:  # the client left before the engine saw it
                continue
            try:
                self.engine.add_request(request_id, prompt, params)
            except R1kitError as exc:
                self._deliver(request_id, exc)
            except Exception as exc:  # noqa: BLE001 (one bad request must not stop the loop)
                self._deliver(request_id, RuntimeError(f"the engine could not take the request: {exc!r}"))
            else:
                self._deliver(request_id, _ACCEPTED)


class RequestStream:
    """One accepted request's outputs, as an async iterator. Leaving early (:meth:`close`, the reading
    task cancelled while it waits, or the stream dropped unread) aborts the request: a client that
    left must not keep its engine slot, whether or not its handler ever started reading."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue) -> None:
        self._engine, self.request_id, self._outputs = engine, request_id, outputs
        self._ahead = None  # an item read ahead while coalescing, handed out next
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = self._ahead if self._ahead is not None else await self._outputs.get()
        except BaseException:  # cancelled: the consumer is gone
            self.close()
            raise
        self._ahead = None
        # A consumer that fell behind (the engine stepped several times since it last read) gets one
        # output with all those steps' new tokens: fewer, larger chunks under load.
        while not isinstance(item, BaseException) and not item.finished and not self._outputs.empty():
            nxt = self._outputs.get_nowait()
            if isinstance(nxt, BaseException):
                self._ahead = nxt
                break
            item = coalesce(item, nxt)
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self._done = True
            self._engine._streams.pop(self.request_id, None)
        return item

    def close(self) -> None:
        """Abort the request unless it finished (idempotent)."""
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    __del__ = close
