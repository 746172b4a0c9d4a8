"""Decode attention that reads the paged KV pool in place: a small C kernel, built on first use.

Without it a decode step copies every sequence's whole context out of the pool into a padded
``[B, Hkv, n, D]`` tensor, for every layer, and SDPA then reads that copy: the context crosses memory
three times (read, write, read) and the copy is rebuilt each step although one token changed. The
kernel (``csrc/paged_decode_attention.c``) follows each sequence's block table and reads each key and
value once, for all the query heads that share it (GQA). One query token per sequence: prefill
chunks keep the gather path, where the copy is small beside their compute.

Build: ``$CC`` (default ``gcc``) compiles the C file with ``-O3 -march=native -ffast-math -fopenmp``
(fast-math at compile time only, see ``COMPILE_FLAGS``) into a cache folder (``$R1KIT_KERNEL_CACHE``,
default ``~/.cache/r1kit/kernels``) under a name hashed from the source, the flags, the compiler and
this CPU's feature flags; it is built in a temporary folder and renamed into place, so a concurrent
build never loads half a library. The library resolves ``libgomp.so.1`` to the copy torch already
loaded, so its threads are torch's threads (``torch.set_num_threads``). Where nothing can be built
(no compiler), :func:`load_kernel` returns None and the engine keeps the gather path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode_attention.c"
# -ffast-math lets the compiler vectorize the dot products' sums and expf; it must be a compile-only flag:
# linked with it, gcc adds crtfastmath.o, which flushes subnormals to zero for the whole process at load
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-funroll-loops", "-fopenmp", "-fPIC", "-std=c11")
LINK_FLAGS = ("-shared", "-fopenmp")
DTYPES = {torch.float32: "paged_decode_attention_f32", torch.bfloat16: "paged_decode_attention_bf16"}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    """``$R1KIT_KERNEL_CACHE``, else ``~/.cache/r1kit/kernels``, else (no writable home) the temp folder."""
    explicit = os.environ.get("R1KIT_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    home = Path.home() / ".cache" / "r1kit" / "kernels"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return Path(tempfile.gettempdir()) / "r1kit-kernels"


def build(cache: Path | None = None) -> Path:
    """Compile the kernel (or find it already built); the path of the shared library."""
    compiler = os.environ.get("CC", "gcc")
    source = SOURCE.read_bytes()
    flags = " ".join(COMPILE_FLAGS + LINK_FLAGS).encode()
    key = hashlib.sha256(b"\0".join([source, flags, compiler.encode(), platform.machine().encode(), _cpu_flags().encode()]))
    folder = cache or _cache_dir()
    target = folder / f"paged_decode_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        obj, lib = Path(tmp) / "kernel.o", Path(tmp) / target.name
        for args in ([*COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(obj)], [*LINK_FLAGS, str(obj), "-o", str(lib), "-lm"]):
            subprocess.run([compiler, *args], check=True, capture_output=True, text=True, timeout=120)
        os.replace(lib, target)
    return target


class PagedDecodeKernel:
    """The loaded library; :meth:`__call__` runs one layer's decode attention."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        pointer, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fns = {}
        for dtype, name in DTYPES.items():
            fn = getattr(lib, name)
            fn.argtypes = [pointer] * 5 + [i64, pointer, pointer] + [i64] * 5 + [ctypes.c_float]
            fn.restype = ctypes.c_int
            self._fns[dtype] = fn

    def supports(self, dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cpu" and dtype in self._fns

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 contexts: torch.Tensor, lowest: torch.Tensor, block_size: int) -> torch.Tensor:
        """``q`` [S, Hq, 1, D] (one token per sequence), pools [slots, Hkv, D], ``tables`` int64 [S, W]
        block ids, ``contexts``/``lowest`` int64 [S]: row ``s`` attends to positions
        ``[lowest[s], contexts[s])``. Returns [S, Hq, 1, D] in ``q``'s dtype."""
        seqs, hq, _, dim = q.shape
        hkv = k_pool.shape[1]
        for t, what in ((k_pool, "k_pool"), (v_pool, "v_pool"), (tables, "tables"), (contexts, "contexts"), (lowest, "lowest")):
            if not t.is_contiguous():
                raise ValueError(f"paged decode attention: {what} must be contiguous")
        if tables.dtype != torch.int64 or contexts.dtype != torch.int64 or lowest.dtype != torch.int64:
            raise TypeError("paged decode attention: tables, contexts and lowest must be int64")
        q32 = q.reshape(seqs, hq, dim).to(torch.float32).contiguous()
        out = torch.empty_like(q32)
        status = self._fns[k_pool.dtype](
            q32.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), out.data_ptr(), tables.data_ptr(), tables.shape[1],
            contexts.data_ptr(), lowest.data_ptr(), seqs, hq, hkv, dim, block_size, dim**-0.5,
        )
        if status:
            raise RuntimeError(f"paged decode attention failed (status {status}: {'bad head grouping' if status == 1 else 'out of memory'})")
        return out.to(q.dtype).view(seqs, hq, 1, dim)


@functools.cache
def load_kernel() -> PagedDecodeKernel | None:
    """The kernel, built once per process (and once per machine, cached on disk); None where it cannot be built."""
    try:
        return PagedDecodeKernel(build())
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("paged decode-attention kernel unavailable, decoding gathers K/V instead: %s", str(detail).strip()[:500])
        return None
