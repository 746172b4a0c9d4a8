"""The GPU (Triton) kernels (int4 matmul, paged decode attention and its hybrid call), checked on the CPU:
``triton_interpreted.py``, ``triton_interpreted_hybrid.py`` and ``fused_interpreted.py`` (the fused kernels of ``r1kit.fused``) run in one subprocess under Triton's interpreter. Also: ``auto`` picks Triton on CUDA only, and a missing package is a clear error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_quant_helpers import one_thread  # noqa: F401 (one_thread: an autouse fixture)
from test_quant_packing import random_int4

from r1kit.quant.int4 import triton_kernel

HERE = Path(__file__).parent
# max |Δ| as a share of max |reference|: float32 runs an IEEE dot (only summation order differs);
# float16/bfloat16 round the activations, the weight tile and the output
RTOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.skipif(not triton_kernel.installed(), reason="triton is not installed (pip install triton)")
def test_triton_kernel_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "triton_interpreted.py"), str(HERE / "triton_interpreted_hybrid.py"),
         str(HERE / "fused_interpreted.py")],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def test_auto_backend_choice(monkeypatch):
    layer = random_int4(128, 64, 64)
    assert layer.resolved_backend(torch.device("cpu")) == "kernel"
    from r1kit.quant import triton_int4

    monkeypatch.setattr(triton_kernel, "installed", lambda: True)
    checked = []
    monkeypatch.setattr(triton_int4, "verified", lambda device, dtype: checked.append((device.type, dtype)) or True)
    assert layer.resolved_backend(torch.device("cuda"), torch.bfloat16) == "triton"
    assert checked == [("cuda", torch.bfloat16)]  # asked about this device and dtype
    monkeypatch.setattr(triton_int4, "verified", lambda device, dtype: False)  # kernels that failed their self-check
    assert layer.resolved_backend(torch.device("cuda")) == "dequant"
    monkeypatch.setattr(triton_kernel, "installed", lambda: False)
    assert layer.resolved_backend(torch.device("cuda")) == "dequant"
    layer.backend = "triton"
    with pytest.raises(RuntimeError, match="pip install triton"):
        layer(torch.randn(2, 128))
    with pytest.raises(ValueError, match="backend"):
        layer.backend = "fast"
    # a new backend undoes freeze(): the frozen CPU kernel must not keep answering
    layer.backend = "auto"
    assert layer.freeze() and layer._frozen is not None
    layer.backend = "dequant"
    assert layer._frozen is None


@pytest.mark.skipif(not (torch.cuda.is_available() and triton_kernel.installed()), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("rows,act_order", [(1, False), (7, True), (40, True)], ids=["gemv", "dot-act-order", "dequant-cublas"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_kernel_on_cuda(dtype, rows, act_order):
    """The same kernels compiled for the GPU (what `auto` runs on CUDA), against the dequantize
    reference: one row, a few rows (launch shape chosen by timing), many rows (dequantize + cuBLAS)."""
    layer = random_int4(256, 96, 64, act_order=act_order, bias=True).to("cuda", dtype)
    x = torch.randn(rows, 256, device="cuda").to(dtype)
    ref = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias.float())
    assert layer.resolved_backend(x.device, dtype) == "triton"  # the kernels passed their self-check on this GPU
    out = layer(x)
    assert out.dtype == dtype and (out.float() - ref).abs().max() <= RTOL[dtype] * ref.abs().max()
