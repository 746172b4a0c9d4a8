"""The Triton paged decode-attention kernel compiled for a GPU, against the naive attention over the
slots each row's block table names (the same kernel is checked on the CPU under Triton's interpreter
in ``triton_interpreted.py``; the engine through it on CUDA in ``test_engine.py``)."""

import pytest
import torch
from devices import needs_cuda
from test_decode_attention import assert_matches_eager_local, assert_matches_naive, random_case

from r1kit.infer.triton_decode_attention import load_triton_kernel


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,dim,block_size", [(1, 64, 16), (3, 40, 4), (4, 128, 1)])
def test_triton_decode_attention_on_cuda(dtype, group, dim, block_size):
    kernel = load_triton_kernel(torch.device("cuda"))
    assert kernel is not None, "the kernel failed its self-check on this GPU (see the warning)"
    # several loop steps, a short row, a window
    assert_matches_naive(kernel, random_case(3, 2, group, dim, block_size, [70, 5, 200], [0, 0, 150], dtype, group * dim), "cuda")


@needs_cuda
@pytest.mark.parametrize("window", [1, 7, 64])
def test_triton_decode_attention_under_the_window_rule_on_cuda(window):
    kernel = load_triton_kernel(torch.device("cuda"))
    assert kernel is not None, "the kernel failed its self-check on this GPU (see the warning)"
    assert_matches_eager_local(kernel, random_case(3, 2, 2, 64, 4, [70, 5, 200], [0, 0, 0], torch.float32, window), window, "cuda")
