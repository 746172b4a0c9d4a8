"""8-bit GPTQ weights (the q8_0 class): the int8 CPU kernel against plain PyTorch formulas (its own
activation rounding emulated, and the float product), its portable loop against its VNNI path, 8-bit
packing round trips, RTN and GPTQ to 8 bits, a checkpoint round trip through ``load_model``, and the
real model's greedy tokens in int8 against float."""

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_quant_helpers import markov_tokens, one_thread, trained_model  # noqa: F401 (one_thread: an autouse fixture)

from r1kit import native
from r1kit.checkpoints import load_model
from r1kit.quant import (
    QuantConfig,
    QuantLinear,
    cpu_int8,
    packing,
    quantize_model,
    save_quantized,
    to_quantized,
)
from r1kit.quant.int4 import choose, int8_kernel

KERNEL = cpu_int8.load()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C compiler for the int8 kernel")
CPU = torch.device("cpu")


def random_case(k: int, n: int, group: int, seed: int, act_order: bool = False, dtype: torch.dtype = torch.float64):
    """Codes [K, N] (0..255, kernel input order), scales and zeros [K/group, N], the input order, and the
    weight [K, N] in the original input order, in ``dtype`` (the formula written out, not the packer's)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (k, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 1e-3).half().float()
    zeros = torch.randint(1, 257, (k // group, n), generator=g).float()
    order = torch.randperm(k, generator=g) if act_order else None
    w = scales.to(dtype).repeat_interleave(group, 0) * (codes.to(dtype) - zeros.to(dtype).repeat_interleave(group, 0))
    weight = torch.empty_like(w)
    weight[order if order is not None else slice(None)] = w
    return codes, scales, zeros, order, weight


def q8_activations(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """x as the kernel sees it: columns in its order, each 32-block rounded to int8 steps of max|x|/127,
    then put back in the original column order (float64)."""
    xo = x.float() if order is None else x.float()[:, order]
    blocks = xo.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    seen = (torch.round(blocks * inv).double() * (amax.double() / 127)).view_as(xo)
    if order is None:
        return seen
    out = torch.empty_like(seen)
    out[:, order] = seen
    return out


SHAPES = [(576, 576, 64), (576, 192, 64), (576, 1536, 64), (1536, 576, 128), (96, 64, 32), (256, 96, 256)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 8, 5])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_the_formula(shape, rows, dtype):
    k, n, group = shape
    codes, scales, zeros, order, weight = random_case(k, n, group, seed=k + n + rows, act_order=rows == 5)
    bias = torch.randn(n) if rows != 1 else None
    x = torch.randn(rows, k).to(dtype)
    out = KERNEL(x, cpu_int8.pack(codes, scales, zeros, order, group), bias)
    assert out.dtype == dtype and out.shape == (rows, n)
    extra = 0 if bias is None else bias.double()
    emulated = q8_activations(x, order) @ weight + extra  # the kernel's own rounding of x, exactly
    exact = x.double() @ weight + extra  # the dequantize reference on the float activations
    scale = float(exact.abs().max())
    # the emulation may round an activation that sits on a half step the other way (the kernel's
    # reciprocal differs from PyTorch's in the last bit): a few thousandths, ten times below the next bound
    assert float((out.double() - emulated).abs().max()) <= (2e-3 if dtype == torch.float32 else 8e-3) * scale
    assert float((out.double() - exact).abs().max()) <= 2e-2 * scale


@needs_kernel
def test_the_head_shape_at_batch_1_and_8():
    k, n, group = 576, 49152, 64  # SmolLM2's output head
    codes, scales, zeros, _, weight = random_case(k, n, group, seed=7, dtype=torch.float32)
    packed = cpu_int8.pack(codes, scales, zeros, None, group)
    for rows in (1, 8):
        x = torch.randn(rows, k)
        want = q8_activations(x, None).float() @ weight
        assert float((KERNEL(x, packed) - want).abs().max()) <= 1e-4 * float(want.abs().max())


@needs_kernel
def test_the_portable_loop_computes_what_vnni_does(tmp_path):
    """The library built without AVX512-VNNI (a CPU that lacks it) takes its plain C loop."""
    compiler = "gcc"
    obj, lib = tmp_path / "k.o", tmp_path / "k.so"
    flags = [{"-O3": "-O1"}.get(f, f) for f in native.COMPILE_FLAGS if f not in ("-march=native", "-funroll-loops")]  # quick to build
    try:
        subprocess.run([compiler, *flags, f"-I{native.INCLUDE}", "-c", str(cpu_int8.SOURCE), "-o", str(obj)], check=True, capture_output=True)
        subprocess.run([compiler, *native.LINK_FLAGS, str(obj), "-o", str(lib), "-lm"], check=True, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no C compiler")
    portable = cpu_int8.Int8CpuKernel(ctypes.CDLL(str(lib)))
    assert not portable.vnni
    cpu_int8.self_check(portable)
    codes, scales, zeros, order, _ = random_case(192, 64, 64, seed=3, act_order=True)
    packed = cpu_int8.pack(codes, scales, zeros, order, 64)
    x = torch.randn(6, 192)
    torch.testing.assert_close(portable(x, packed), KERNEL(x, packed), rtol=1e-5, atol=1e-5)


def test_the_library_reports_vnni_as_the_cpu_has_it():
    if KERNEL is None:
        pytest.skip("no C compiler")
    assert KERNEL.vnni == ("avx512_vnni" in native.cpu_flags().split())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.sampled_from([4, 8, 32]), st.booleans(), st.integers(0, 2**31 - 1))
def test_8_bit_gptq_tensors_round_trip(groups, out_words, group_size, v1, seed):
    rng = np.random.default_rng(seed)
    in_f, out_f = groups * group_size, out_words * 4
    codes = torch.from_numpy(rng.integers(0, 256, size=(out_f, in_f))).to(torch.int32)
    offset = 1 if v1 else 0
    zeros = torch.from_numpy(rng.integers(offset, 256 + offset, size=(groups, out_f))).to(torch.int32)
    scales = torch.from_numpy(rng.uniform(0.01, 1.0, size=(groups, out_f))).half()
    g_idx = packing.default_g_idx(in_f, group_size)
    t = packing.pack_gptq(codes, zeros, scales, g_idx, bits=8, zero_offset=offset)
    assert t["qweight"].shape == (in_f // 4, out_f) and t["qzeros"].shape == (groups, out_f // 4)
    # four codes per word, the first input in the least significant byte
    assert int(t["qweight"][0, 0]) & 0xFF == int(codes[0, 0])
    got_codes, got_zeros = packing.unpack_gptq(t["qweight"], t["qzeros"], 8, zero_offset=offset)
    assert torch.equal(got_codes, codes.t()) and torch.equal(got_zeros, zeros)


def random_layer(k: int, n: int, group: int, act_order: bool = False, bias: bool = False, seed: int = 0) -> QuantLinear:
    """An 8-bit layer of random codes (a group size that does not divide ``k``: a partial last group)."""
    g = torch.Generator().manual_seed(seed)
    groups = packing.group_count(k, group)
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 257, (groups, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 1e-3).half()
    g_idx = packing.default_g_idx(k, group)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    tensors = packing.pack_gptq(codes, zeros, scales, g_idx, 8)
    return QuantLinear.from_packed(tensors, k, n, group, bias=torch.randn(n) if bias else None, bits=8)


@needs_kernel
@pytest.mark.parametrize("case", [(576, 64, 128, False, True), (256, 96, 64, True, False)], ids=["partial-last-group", "act-order"])
def test_an_8_bit_layer_runs_the_kernel_and_matches_its_dequantized_weight(case):
    layer = random_layer(*case)
    assert choose.named(layer, "auto", CPU, torch.float32) is int8_kernel
    assert choose.resolved(layer, CPU, torch.float32) == "kernel"
    x = torch.randn(3, layer.in_features)
    want = x.double() @ layer.dequantized_weight(torch.float64).T + layer_bias(layer)
    for out in (layer(x), layer.forward_kernel(x)):
        assert float((out.double() - want).abs().max()) <= 2e-2 * float(want.abs().max())
    torch.testing.assert_close(layer.forward_dequant(x).double(), want, rtol=1e-4, atol=1e-4)
    assert layer.freeze()
    torch.testing.assert_close(layer(x), layer.forward_kernel(x))
    # the 4-bit kernels say why they cannot run it; an explicit triton backend is refused
    for backend in choose.AUTO:
        if backend not in (int8_kernel, choose.dequant):
            assert backend.available(layer, CPU, torch.float32) is not None
    with pytest.raises(RuntimeError, match="runs 4-bit weights"):
        layer.forward_triton(x)


def layer_bias(layer: QuantLinear):
    return 0 if layer.bias is None else layer.bias.double()


def output_mse(model, reference, tokens) -> float:
    with torch.no_grad():
        return float((model(tokens) - reference(tokens)).pow(2).mean())


def test_gptq_8_bit_beats_rtn_8_bit_on_the_calibration_set():
    calib = markov_tokens(32, 32, seed=1)
    float_model = trained_model()
    errors = {}
    for method in ("rtn", "gptq"):
        model = trained_model()
        quantize_model(model, QuantConfig(bits=8, group_size=32, method=method), calib if method == "gptq" else None)
        errors[method] = output_mse(model, float_model, calib)
    assert 0 < errors["gptq"] < errors["rtn"]


@needs_kernel
def test_an_8_bit_checkpoint_loads_to_the_same_logits(tmp_path):
    config = QuantConfig(bits=8, group_size=64, method="rtn")
    model = trained_model()
    results = quantize_model(model, config)
    save_quantized(model, tmp_path / "q8", config, results)
    quantized = to_quantized(model, results, config)
    loaded = load_model(tmp_path / "q8")
    assert loaded.quantization_config.bits == 8
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.bits == 8 and layer.qweight.shape == (128 // 4, 128)
    tokens = markov_tokens(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), quantized(tokens))


def test_real_model_int8_rtn_greedy_tokens_equal_float(smollm2_dir):
    from r1kit.infer.generate import generate
    from r1kit.infer.sampling import SamplingParams
    from r1kit.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(smollm2_dir))
    prompt = tok.encode("The capital of France is").ids
    params = SamplingParams(max_tokens=8, temperature=0.0)
    model = load_model(smollm2_dir)
    want = generate(model, prompt, params)
    config = QuantConfig(bits=8, group_size=64, method="rtn")
    to_quantized(model, quantize_model(model, config), config)
    assert generate(model, prompt, params) == want
