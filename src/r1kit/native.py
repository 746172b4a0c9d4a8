"""Builds r1kit's C kernels on first use, for this CPU, into an on-disk cache.

``$CC`` (default ``gcc``) compiles a C file with ``-O3 -march=native -ffast-math -fopenmp``
(fast-math at compile time only, see ``COMPILE_FLAGS``) into a cache folder (``$R1KIT_KERNEL_CACHE``,
default ``~/.cache/r1kit/kernels``) under a name hashed from the source, the shared headers
(``csrc/*.h``, and the ``*.h`` beside the source), the flags, the compiler and this CPU's feature flags; it is built in a temporary folder and renamed into place, so a concurrent
build never loads half a library. A library resolves ``libgomp.so.1`` to the copy torch already
loaded (torch's Linux wheels bring one under that name), so its threads are torch's threads
(``torch.set_num_threads``). Callers treat a failed build
(no compiler, :func:`load` returns None) as "no kernel" and keep their PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # bytes in a large (transparent huge) page on x86-64 and arm64 Linux

# -ffast-math lets the compiler vectorize sums and expf; it must be a compile-only flag: linked with
# it, gcc adds crtfastmath.o, which flushes subnormals to zero for the whole process at load
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-funroll-loops", "-fopenmp", "-fPIC", "-std=c11")
LINK_FLAGS = ("-shared", "-fopenmp")
INCLUDE = Path(__file__).parent / "csrc"  # headers the kernels share (bf16.h); part of every build's hash


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
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


def build(source: Path, cache: Path | None = None) -> Path:
    """Compile ``source`` into a shared library (or find it already built); the library's path.
    Raises OSError or subprocess.SubprocessError where it cannot be built."""
    compiler = os.environ.get("CC", "gcc")
    # the shared headers, then those beside the source (a family of kernels sharing their pieces)
    compile_flags = (*COMPILE_FLAGS, f"-I{INCLUDE}", f"-I{source.parent}")
    flags = " ".join(compile_flags + LINK_FLAGS).encode()
    headers = [h.read_bytes() for folder in (INCLUDE, source.parent) for h in sorted(folder.glob("*.h"))]
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, flags, compiler.encode(), platform.machine().encode(), cpu_flags().encode()]))
    folder = cache or cache_dir()
    target = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        obj, lib = Path(tmp) / "kernel.o", Path(tmp) / target.name
        for args in ([*compile_flags, "-c", str(source), "-o", str(obj)], [*LINK_FLAGS, str(obj), "-o", str(lib), "-lm"]):
            subprocess.run([compiler, *args], check=True, capture_output=True, text=True, timeout=120)
        os.replace(lib, target)
    return target


def load(source: Path, fallback: str) -> ctypes.CDLL | None:
    """``source`` built (:func:`build`) and loaded; None where it cannot be built, with a warning that
    says what runs instead (``fallback``)."""
    try:
        return ctypes.CDLL(str(build(source)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("%s unavailable, %s: %s", source.name, fallback, str(detail).strip()[:500])
        return None


def huge_empty(numel: int, dtype) -> "torch.Tensor":
    """An uninitialised 1-D CPU tensor of ``numel`` ``dtype`` elements in memory Linux may back with
    2 MB pages: an anonymous map aligned to them and marked ``MADV_HUGEPAGE`` before it is touched
    (transparent huge pages in ``madvise`` mode, the common default, give large pages only to memory
    that asks). Kernels that stream a large block once per call read it faster in large pages: fewer
    TLB misses, and the hardware prefetchers do not stop every 4 KB. Where the system has no such
    pages the map is ordinary memory; a block under one large page is an ordinary tensor."""
    import torch

    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE or advise is None:
        return torch.empty(numel, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared maps get no THP
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    try:
        region.madvise(advise)
    except OSError:  # a kernel without transparent huge pages: ordinary pages
        pass
    # the tensor holds the map (torch.frombuffer keeps its buffer alive)
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=(-start) % HUGE_PAGE).view(dtype)


def huge_copy(tensor: "torch.Tensor") -> "torch.Tensor":
    """A contiguous copy of a CPU ``tensor``, same shape and dtype, in :func:`huge_empty`'s memory."""
    return huge_empty(tensor.numel(), tensor.dtype).view(tensor.shape).copy_(tensor)
