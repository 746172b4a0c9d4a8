"""Every int4 backend through the one interface (``available`` / ``prepare`` / ``matmul``) against the
exact formula on the dequantized weight: contiguous groups, a partial last group (576 inputs in
groups of 128), act-order ``g_idx``, bias, 1/5/20 rows, float32 and bfloat16 activations. A backend
that cannot run here is skipped with its own reason (the Triton kernels: ``triton_interpreted.py``
runs the same cases under Triton's interpreter). Also: the reasons, the choice, and the kept state."""

import pytest
import torch
from test_quant_helpers import one_thread  # noqa: F401 (one_thread: an autouse fixture)
from test_quant_packing import random_int4

from r1kit.quant import cpu_int4
from r1kit.quant.int4 import choose, cpu_kernel, cpu_layout, dequant, torch_kernel, triton_kernel

CPU = torch.device("cpu")
# (in_features, out_features, group_size, act_order, bias)
CASES = {
    "contiguous": (256, 64, 64, False, False),
    "partial-last-group": (576, 64, 128, False, True),
    "act-order": (256, 96, 64, True, True),
    "act-order-partial-group": (576, 32, 128, True, False),
}
ROWS = (1, 5, 20)
# max |Δ| as a share of max |reference|. The CPU kernels round activations to bfloat16 (the reference
# rounds them too); torch's also holds scales and zeros in bfloat16; bfloat16 outputs are rounded once.
RTOL = {
    (dequant.NAME, torch.float32): 1e-5, (dequant.NAME, torch.bfloat16): 2e-2,
    (cpu_kernel.NAME, torch.float32): 1e-4, (cpu_kernel.NAME, torch.bfloat16): 1e-2,
    (torch_kernel.NAME, torch.float32): 2e-2, (torch_kernel.NAME, torch.bfloat16): 2e-2,
}


def reference(layer, x: torch.Tensor, rounds_to_bf16: bool) -> torch.Tensor:
    """x · Wᵀ + bias in float64 on the activations the backend sees."""
    seen = x.bfloat16() if rounds_to_bf16 else x
    want = seen.double() @ layer.dequantized_weight(torch.float64).T
    return want if layer.bias is None else want + layer.bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", [dequant, cpu_kernel, torch_kernel, triton_kernel], ids=lambda b: b.NAME)
def test_backend_matches_the_reference(backend, case, rows, dtype):
    layer = random_int4(*CASES[case])
    reason = backend.available(layer, CPU, dtype)
    if reason is not None:
        pytest.skip(f"{backend.NAME} cannot run here: {reason}")
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
    out = backend.matmul(x, backend.prepare(layer))
    assert out.dtype == dtype and out.shape == (rows, layer.out_features)
    want = reference(layer, x, rounds_to_bf16=backend is not dequant)
    assert float((out.double() - want).abs().max() / want.abs().max()) <= RTOL[backend.NAME, dtype]


def test_unavailable_backends_say_why(monkeypatch):
    narrow, no_group, half_tile = random_int4(64, 24, 32), random_int4(200, 32, 64), random_int4(128, 48, 64)
    for backend in (cpu_kernel, torch_kernel):
        assert "not a multiple of 16" in backend.available(narrow, CPU, torch.float32)
        assert "no kernel group" in backend.available(no_group, CPU, torch.float32)  # groups of 64, 64, 64, 8
        assert backend.available(half_tile, torch.device("cuda"), torch.float32) == cpu_layout.NOT_CPU
    assert "does not fit" in cpu_kernel.available(half_tile, CPU, torch.float32)  # 48 outputs: not a whole 32-column tile
    assert torch_kernel.available(half_tile, CPU, torch.float32) is None
    assert "run on CUDA" in triton_kernel.available(half_tile, CPU, torch.float32)
    assert dequant.available(narrow, torch.device("cuda"), torch.float16) is None
    monkeypatch.setattr(cpu_int4, "load", lambda: None)  # as on a CPU without AVX512-BF16
    assert "not built here" in cpu_kernel.available(random_int4(128, 64, 64), CPU, torch.float32)
    monkeypatch.setattr(triton_kernel, "installed", lambda: False)
    assert "pip install triton" in triton_kernel.available(half_tile, torch.device("cuda"), torch.float32)


def test_auto_takes_the_first_available_and_the_reference_for_gradients():
    if cpu_int4.load() is None:
        pytest.skip("this CPU has no AVX512-BF16 or no C compiler: r1kit's int4 kernel is not built")
    wide, half_tile, narrow = random_int4(128, 64, 64), random_int4(128, 48, 64), random_int4(64, 24, 32)
    assert [choose.named(layer, "auto", CPU, torch.float32) for layer in (wide, half_tile, narrow)] == [cpu_kernel, torch_kernel, dequant]
    assert choose.resolved(half_tile, CPU, torch.float32) == "kernel" and choose.resolved(narrow, CPU, torch.float32) == "dequant"
    x = torch.randn(2, 128, requires_grad=True)
    assert choose.for_forward(wide, x) is dequant  # the kernels have no backward
    wide.backend = "kernel"
    with pytest.raises(RuntimeError, match="has no backward"):
        choose.for_forward(wide, x)
    assert choose.for_forward(wide, x.detach()) is cpu_kernel


def test_prepared_state_is_kept_until_the_tensors_change():
    layer = random_int4(128, 64, 64, bias=True)
    backend = choose.cpu_kernel_for(layer, CPU)
    state = layer.prepared(backend.prepare)
    assert layer.prepared(backend.prepare) is state
    with torch.no_grad():
        layer.scales.mul_(2)  # in place: a new version
    assert layer.prepared(backend.prepare) is not state
    state = layer.prepared(backend.prepare)
    layer.bias = torch.zeros(64)  # replaced: the state held the old one
    assert layer.prepared(backend.prepare) is not state
    x = torch.randn(3, 128)
    ref = layer.forward_dequant(x)
    assert (layer(x) - ref).abs().max() <= 1e-2 * ref.abs().max()  # the new (zero) bias, not the old one
