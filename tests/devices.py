"""The devices that device-parametrized tests run on: the CPU always, CUDA where there is one.

Their CUDA cases carry ``cuda`` in their ids, so ``pytest -k cuda`` on a GPU machine runs exactly
the GPU checks (they skip here)."""

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = pytest.param("cuda", marks=needs_cuda)
DEVICES = ["cpu", CUDA]
