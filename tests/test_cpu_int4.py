"""r1kit's int4 CPU kernel (AVX512-BF16): its layout by hand, and its products against the exact
formula on the same bfloat16-rounded activations, for every row count, dtype, bias and act-order."""

import ctypes
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_quant_packing import random_int4

from r1kit.quant import cpu_int4
from r1kit.quant.int4 import choose, cpu_kernel, torch_kernel

KERNEL = cpu_int4.load()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="this CPU has no AVX512-BF16 (torch's int4 kernel serves instead)")


def reference(x, codes, scales, zeros, order, group):
    """x [m, k] rounded to bf16 (as the kernel rounds it), in float64: Σ x · scale · (code − zero)."""
    w = (codes.double() - zeros.double().repeat_interleave(group, 0)) * scales.double().repeat_interleave(group, 0)
    xb = x.bfloat16().double()
    if order is not None:
        xb = xb[:, order]
    return xb @ w


def random_case(k, n, group, seed, act_order=False):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.05 + 0.001).half().float()  # what GPTQ stores: float16
    zeros = torch.randint(0, 16, (k // group, n), generator=g).float()
    order = torch.randperm(k, generator=g) if act_order else None
    return codes, scales, zeros, order


def test_layout_by_hand():
    # two input rows, 32 columns: byte 2j + r holds row r's code of column j (low nibble) and 16 + j (high)
    codes = torch.zeros(4, 32, dtype=torch.int64)
    codes[0, 3], codes[1, 3], codes[0, 19], codes[1, 19] = 5, 9, 12, 7
    codes[2, 0], codes[3, 31] = 1, 15
    packed = cpu_int4.pack(codes, torch.ones(1, 32), torch.zeros(1, 32), None, 4)
    assert packed.weight.shape == (1, 2, 32) and packed.weight.dtype == torch.uint8
    first, second = packed.weight[0, 0].tolist(), packed.weight[0, 1].tolist()
    assert first[6] == 5 | 12 << 4 and first[7] == 9 | 7 << 4
    assert sum(1 for b in first if b) == 2
    assert second[0] == 1 and second[31] == 15 << 4 and sum(1 for b in second if b) == 2
    assert packed.scale_zero.shape == (1, 1, 2, 32) and packed.scale_zero.dtype == torch.float16


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_match_the_formula(rows, dtype):
    k, n, group = 256, 96, 64
    codes, scales, zeros, order = random_case(k, n, group, seed=rows)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(n)
    out = KERNEL(x, cpu_int4.pack(codes, scales, zeros, order, group), bias)
    want = reference(x.float(), codes, scales, zeros, order, group) + bias.double()
    assert out.dtype == dtype and out.shape == (rows, n)
    # float32 out: only the float32 sums differ; bfloat16 out: one rounding of the result
    tol = 1e-5 if dtype == torch.float32 else 2**-8
    assert (out.double() - want).abs().max() <= tol * want.abs().max()


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    k_groups=st.integers(1, 6), group=st.sampled_from([4, 8, 32, 128]), tiles=st.integers(1, 5), rows=st.integers(1, 11),
    act_order=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_any_fitting_shape_matches_the_formula(k_groups, group, tiles, rows, act_order, seed):
    k, n = k_groups * group, tiles * cpu_int4.TILE
    codes, scales, zeros, order = random_case(k, n, group, seed, act_order)
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((2, rows, k), dtype=np.float32))
    out = KERNEL(x, cpu_int4.pack(codes, scales, zeros, order, group))
    want = reference(x.reshape(-1, k), codes, scales, zeros, order, group).view(2, rows, n)
    assert out.shape == (2, rows, n)
    assert (out.double() - want).abs().max() <= 1e-5 * max(want.abs().max(), 1e-3)


@needs_kernel
def test_bad_inputs_are_clear_errors():
    codes, scales, zeros, _ = random_case(64, 32, 32, seed=0)
    packed = cpu_int4.pack(codes, scales, zeros, None, 32)
    with pytest.raises(ValueError, match="input has 48 features, the weight 64"):
        KERNEL(torch.randn(1, 48), packed)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        KERNEL(torch.randn(1, 64).half(), packed)
    assert KERNEL(torch.randn(0, 64), packed).shape == (0, 32)  # an empty batch is an empty answer
    with pytest.raises(ValueError, match="bias must be 32 values"):
        KERNEL(torch.randn(1, 64), packed, torch.randn(31))
    # a strided bias is read as the values it shows, not as its storage
    bias = torch.randn(64)[::2]
    x = torch.randn(2, 64)
    torch.testing.assert_close(KERNEL(x, packed, bias), KERNEL(x, packed) + bias, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_int4.pack(codes[:, :16], scales[:, :16], zeros[:, :16], None, 32)  # 16 outputs: not a tile


@needs_kernel
def test_int4_linear_uses_it_where_it_fits_and_torchs_kernel_elsewhere(monkeypatch):
    fits, narrow = random_int4(256, 64, 64, act_order=True, bias=True), random_int4(256, 48, 64)
    x = torch.randn(3, 256)
    for layer in (fits, narrow):
        out = layer.forward_kernel(x)
        ref = layer.forward_dequant(x)
        assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()
    cpu = torch.device("cpu")
    assert choose.cpu_kernel_for(fits, cpu) is cpu_kernel
    assert choose.cpu_kernel_for(narrow, cpu) is torch_kernel  # 48 outputs are not a whole tile
    want = fits.forward_kernel(x)
    # and where the kernel cannot be had (no AVX512-BF16, no compiler), torch's serves the same layer
    monkeypatch.setattr(cpu_int4, "load", lambda: None)
    torch_layer = random_int4(256, 64, 64, act_order=True, bias=True)
    assert choose.cpu_kernel_for(torch_layer, cpu) is torch_kernel
    assert (torch_layer.forward_kernel(x) - want).abs().max() <= 1e-2 * want.abs().max()


@needs_kernel
def test_float16_activations_and_gradients():
    layer = random_int4(128, 64, 64, bias=True)
    x = torch.randn(3, 128)
    ref = layer.forward_dequant(x)
    half = layer(x.half())  # the kernel takes float32 or bfloat16: float16 goes through float32
    assert choose.named(layer, "auto", x.device, torch.float16) is cpu_kernel and half.dtype == torch.float16
    assert (half.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    # the kernels have no backward: a forward that needs gradients takes the dequantize path
    x.requires_grad_(True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand(3, -1))
    layer.backend = "kernel"
    with pytest.raises(RuntimeError, match="has no backward"):
        layer(x)


def test_the_library_reports_whether_this_cpu_has_the_kernel():
    from r1kit import native

    try:
        library = cpu_int4.Int4CpuKernel(ctypes.CDLL(str(native.build(cpu_int4.SOURCE))))
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no C compiler")
    flags = native.cpu_flags().split()
    # never claimed without the CPU's flags (a compiler too old for AVX512-BF16 may decline it even with them)
    assert not library.available or ("avx512_bf16" in flags and "avx512bw" in flags)
    assert (KERNEL is not None) == library.available
