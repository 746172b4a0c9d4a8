"""Where the per-chunk work runs: in this process, a local process pool, or a Dask cluster.

Every engine offers ``map(fn, chunks)``, which yields ``fn(chunk)`` in the order of ``chunks`` while
keeping only a bounded number of chunks in flight (so a corpus streams through, never held whole).
The same worker functions run on every engine, which is why they give the same results. This
module must never hold cluster logic of its own: Dask schedules, we only submit.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from r1kit.errors import ConfigError


class Engine:
    """Runs chunks in this process (``workers == 1``): the reference the others must match."""

    workers = 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return _Done(fn(*args))

    def map(self, fn: Callable[..., Any], chunks: Iterable[Any], *args: Any) -> Iterator[Any]:
        """``fn(chunk, *args)`` for every chunk, in order, at most ~2 chunks per worker in flight."""
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(self.submit(fn, chunk, *args))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        pass


class _Done:
    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


class LocalEngine(Engine):
    """A pool of worker processes on this machine (spawned: safe beside threads of Rust libraries)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class DaskEngine(Engine):
    """A Dask cluster: an existing scheduler at ``address``, or a LocalCluster of ``workers`` processes."""

    def __init__(self, workers: int, address: str | None = None):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise ConfigError("engine='dask' needs Dask: pip install 'dask[distributed]' (or use engine='local')") from None

        self.cluster = None
        if address:
            self.client = Client(address)
        else:
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)
        self.workers = max(1, len(self.client.scheduler_info()["workers"]))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_engine(kind: str, workers: int, address: str | None = None) -> Engine:
    """The engine a config asks for; ``workers == 0`` means one per CPU core."""
    workers = workers or os.cpu_count() or 1
    if kind == "dask":
        return DaskEngine(workers, address)
    return Engine() if workers == 1 else LocalEngine(workers)
