"""The worker processes of tensor-parallel inference, and rank 0's handle on them.

:func:`launch` (called by the engine, which is rank 0, vLLM's driver worker) cuts the model into
shards, starts one process per other rank (``torch.multiprocessing``, spawn) with its shard, and
joins two process groups on a store at a port the system picks: ``control`` (gloo) carries rank
0's step messages (:mod:`~r1kit.infer.tensor_parallel.channel`), ``compute`` (gloo on the CPU,
NCCL on GPUs, one GPU a rank) the model's collectives. A worker (:func:`worker_main`) adds the
collectives to its shard, packs it as the engine packs its own, builds a ModelRunner over its part
of the KV pool and runs each step rank 0 sends until told to stop.

A dead worker never leaves the engine waiting: gloo fails a collective at once when a peer's
connection closes, the compute group has a timeout for a peer that hangs, and rank 0 checks its
workers before each step; any of these raises :class:`EngineDeadError` naming the rank, and every
later step raises it again. A worker whose rank 0 is gone fails its next receive and exits.
"""

from __future__ import annotations

import copy
import datetime
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1kit.errors import ConfigError
from r1kit.infer.tensor_parallel.channel import POOL, STEP, STOP, PoolShape, StepChannel, decode_step
from r1kit.infer.tensor_parallel.layers import CollectiveClock, parallelize
from r1kit.infer.tensor_parallel.sharding import check_shardable, shard_model

START_TIMEOUT = datetime.timedelta(seconds=180)  # every rank joins within this (imports, unpickling a shard)
STEP_TIMEOUT = datetime.timedelta(seconds=300)  # a collective whose peer neither answers nor dies
IDLE_TIMEOUT = datetime.timedelta(days=3650)  # a worker waits for the next step as long as the engine is idle


class EngineDeadError(RuntimeError):
    """A tensor-parallel rank is gone: the engine cannot run another step (the server stops)."""


@dataclass
class Groups:
    control: dist.ProcessGroup
    compute: dist.ProcessGroup


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: the CPU, or the ``rank``-th GPU from rank 0's."""
    return device if device.type == "cpu" else torch.device(device.type, (device.index or 0) + rank)


def connect(store: dist.Store, rank: int, size: int, device: torch.device) -> Groups:
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, IDLE_TIMEOUT)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = STEP_TIMEOUT
        compute = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, size, options)
    else:
        compute = dist.ProcessGroupGloo(dist.PrefixStore("compute", store), rank, size, STEP_TIMEOUT)
    return Groups(control, compute)


def launch(model, size: int, pack_weights: bool) -> tuple[TensorParallelWorkers, torch.nn.Module]:
    """Start ranks 1 … ``size - 1`` of ``model`` (unpacked; the caller's copy, read but not changed) and
    return the handle on them and rank 0's shard, its collectives added (unpacked: the engine packs it)."""
    check_shardable(model.config, size)
    device = model.device
    if device.type == "cuda" and (device.index or 0) + size > torch.cuda.device_count():
        raise ConfigError(f"tensor_parallel_size={size} from {device} needs {size} GPUs, one a rank; this machine has "
                          f"{torch.cuda.device_count()}")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"tensor parallelism runs on the CPU (gloo) or CUDA GPUs (NCCL), not {device.type}")
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=START_TIMEOUT, wait_for_workers=False)
    context = mp.get_context("spawn")
    processes = []
    try:
        for rank in range(1, size):
            shard = shard_model(model, rank, size)
            if device.type != "cpu":  # sent through shared memory; the worker moves it to its own GPU
                # a copy first: the shard's unsplit tensors are the model's, which .to() would move along with it
                shard = copy.deepcopy(shard).to("cpu")
            process = context.Process(target=worker_main, name=f"r1kit-tp-rank{rank}", daemon=True,
                                      args=(rank, size, store.port, shard, rank_device(device, rank), torch.get_num_threads(), pack_weights))
            process.start()
            processes.append(process)
            del shard
        groups = connect(store, 0, size, device)
    except BaseException:
        for process in processes:
            process.kill()
        raise
    clock = CollectiveClock()
    shard = parallelize(shard_model(model, 0, size), groups.compute, 0, size, clock)
    return TensorParallelWorkers(processes, groups, store, clock), shard


class TensorParallelWorkers:
    """Rank 0's handle: the worker processes, the groups, the step channel. ``clock``: rank 0's
    collectives; ``channel.seconds``: its step broadcasts."""

    def __init__(self, processes: list, groups: Groups, store: dist.Store, clock: CollectiveClock) -> None:
        self.processes, self.groups, self.store, self.clock = processes, groups, store, clock
        self.channel = StepChannel(groups.control)
        self.dead: EngineDeadError | None = None
        self.closed = False
        self._finalizer = weakref.finalize(self, _stop_processes, processes, self.channel)

    @property
    def size(self) -> int:
        return len(self.processes) + 1

    def runner(self, model, num_blocks: int, block_size: int, decode_kernel: bool = True, window_blocks: int = 0, window_tables=None,
               decode_step: bool = True):
        """Rank 0's :class:`~r1kit.infer.tensor_parallel.runner.TensorParallelRunner` over ``model`` (its
        packed shard), the workers building the same pool over theirs (ModelRunner's arguments)."""
        from r1kit.infer.tensor_parallel.runner import TensorParallelRunner

        return TensorParallelRunner(self, model, num_blocks, block_size, decode_kernel, window_blocks, window_tables, decode_step)

    def send(self, command: int, payload: list[int]) -> None:
        self.check()
        try:
            self.channel.send(command, payload)
        except RuntimeError as exc:
            raise self.lost(exc) from exc

    def check(self) -> None:
        """Raise :class:`EngineDeadError` if a worker has exited (or one did before)."""
        if self.dead is None and self.closed:
            self.dead = EngineDeadError("the engine was closed: its tensor-parallel workers are stopped")
        if self.dead is None:
            for rank, process in enumerate(self.processes, start=1):
                if process.exitcode is not None:
                    self._fail(rank, process, None)
        if self.dead is not None:
            raise self.dead

    def watch(self, on_death, interval: float = 1.0) -> None:
        """Call ``on_death(error)`` from a thread of its own once a worker is found dead (a server stops
        then, not at its next request); nothing after :meth:`close`."""

        def loop() -> None:
            while not self.closed:
                time.sleep(interval)
                if self.dead is None and any(p.exitcode is not None for p in self.processes) and not self.closed:
                    try:
                        self.check()
                    except EngineDeadError as exc:
                        on_death(exc)
                        return

        threading.Thread(target=loop, name="r1kit-tp-watchdog", daemon=True).start()

    def lost(self, exc: BaseException, wait: float = 3.0) -> EngineDeadError:
        """The error for a collective that failed with ``exc``: which worker died (waiting up to ``wait``
        seconds for its exit to show), or the collective's own error where none did."""
        if self.dead is None:
            deadline = time.monotonic() + wait
            while self.dead is None and time.monotonic() < deadline:
                for rank, process in enumerate(self.processes, start=1):
                    if process.exitcode is not None:
                        self._fail(rank, process, exc)
                        break
                else:
                    time.sleep(0.05)
            if self.dead is None:
                self.dead = EngineDeadError(f"a tensor-parallel collective failed and the engine cannot continue: {exc}")
                self.close()
        return self.dead

    def _fail(self, rank: int, process, exc: BaseException | None) -> None:
        code = process.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        cause = f" (rank 0 saw: {exc})" if exc is not None else ""
        self.dead = EngineDeadError(f"tensor-parallel worker rank {rank} (pid {process.pid}) {how}; the engine cannot run another step, "
                                    f"start a new one{cause}")
        self.close()

    def close(self) -> None:
        """Stop the workers (a stop message, then a kill for any that linger); idempotent."""
        self.closed = True
        self._finalizer()


def _stop_processes(processes: list, channel: StepChannel, wait: float = 5.0) -> None:
    if all(p.exitcode is None for p in processes):
        try:
            channel.send(STOP, [])
        except RuntimeError:
            wait = 0.0
    else:  # a rank is gone: the others wait in collectives that will never complete
        wait = 0.0
    deadline = time.monotonic() + wait
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            process.kill()
            process.join(1.0)


def worker_main(rank: int, size: int, port: int, shard, device: torch.device, threads: int, pack_weights: bool) -> None:
    """A worker process: join the groups, run each step rank 0 sends, exit on its stop (or its loss)."""
    from r1kit.infer.engine import prepare_model
    from r1kit.infer.model_runner import ModelRunner

    torch.set_num_threads(threads)
    code = 0
    try:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=START_TIMEOUT)
        groups = connect(store, rank, size, device)
        model = prepare_model(parallelize(shard.to(device), groups.compute, rank, size, CollectiveClock()), pack_weights)
        del shard
        channel = StepChannel(groups.control)
        runner = None
        while True:
            command, payload = channel.receive()
            if command == STOP:
                break
            if command == POOL:
                pool = PoolShape.decode(payload)
                runner = ModelRunner(model, pool.num_blocks, pool.block_size, pool.decode_kernel, pool.window_blocks,
                                     (lambda row: row.window_table) if pool.window_tables else None)
            elif command == STEP:
                runner.run(decode_step(payload))
    except BaseException:  # noqa: BLE001 (reported, then the process ends: rank 0 names this rank)
        print(f"r1kit tensor-parallel worker rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        code = 1
    sys.stdout.flush()
    # interpreter teardown with live gloo threads can abort: leave without it
    os._exit(code)
