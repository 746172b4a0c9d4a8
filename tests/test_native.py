"""The C build helper: a library is rebuilt when its source or a shared header changes, and found in
the cache otherwise."""

import ctypes
import shutil

import pytest
import torch

from r1kit import native

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")


def test_a_changed_header_is_a_new_build(tmp_path, monkeypatch):
    include, cache = tmp_path / "include", tmp_path / "cache"
    include.mkdir()
    monkeypatch.setattr(native, "INCLUDE", include)
    source = tmp_path / "answer.c"
    source.write_text('#include "answer.h"\nint answer(void) { return ANSWER; }\n')
    (include / "answer.h").write_text("#define ANSWER 41\n")
    first = native.build(source, cache)
    assert native.build(source, cache) == first  # cached: the same library
    (include / "answer.h").write_text("#define ANSWER 42\n")
    second = native.build(source, cache)
    assert second != first and ctypes.CDLL(str(first)).answer() == 41 and ctypes.CDLL(str(second)).answer() == 42


def test_no_compiler_is_no_library_and_a_warning_that_says_what_runs_instead(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("R1KIT_KERNEL_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "answer.c"
    source.write_text("int answer(void) { return 42; }\n")
    with caplog.at_level("WARNING"):
        assert native.load(source, "PyTorch's path runs") is None
    assert "answer.c unavailable, PyTorch's path runs" in caplog.text


def test_huge_empty_is_aligned_lasting_memory_in_large_pages_where_the_kernel_has_them():
    import gc
    import re
    from pathlib import Path

    small = native.huge_empty(100, torch.float32)
    assert small.shape == (100,) and small.dtype == torch.float32  # under one large page: an ordinary tensor
    numel = 3 * native.HUGE_PAGE // 2 + 5  # bfloat16: 3 large pages and a bit
    big = native.huge_empty(numel, torch.bfloat16)
    assert big.shape == (numel,) and big.dtype == torch.bfloat16 and big.data_ptr() % native.HUGE_PAGE == 0
    big.fill_(2.0)
    gc.collect()  # the map lives as long as the tensor: nothing else holds it
    assert float(big.float().sum()) == 2.0 * numel
    copy = native.huge_copy(torch.arange(12.0).view(3, 4).t())
    assert copy.shape == (4, 3) and copy.is_contiguous() and torch.equal(copy, torch.arange(12.0).view(3, 4).t())
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.is_file() or "[never]" in mode.read_text():
        return
    # the kernel backs the touched block with 2 MB pages: its map in smaps shows them
    start = big.data_ptr()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        lo, hi = (int(v, 16) for v in block.split()[0].split("-"))
        if lo <= start < hi:
            assert int(re.search(r"AnonHugePages:\s+(\d+) kB", block).group(1)) >= 2048
            return
    raise AssertionError("the block's map is not in /proc/self/smaps")
