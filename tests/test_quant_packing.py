"""GPTQ v1 packing: property round-trips, the documented bit order by hand, and the int4 kernel
against the dequantized reference."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_quant_helpers import one_thread  # noqa: F401 (one_thread: an autouse fixture)

from r1kit.quant import packing
from r1kit.quant.int4_linear import QuantLinear

KERNEL_RTOL = 1e-2  # kernel vs dequantized reference: max |Δ| <= 1% of max |reference| (bf16 activations and scales)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    per_word = 32 // bits
    rows = per_word * draw(st.integers(1, 4))
    cols = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    codes = torch.from_numpy(np.random.default_rng(seed).integers(0, 2**bits, size=(rows, cols))).to(torch.int32)
    return codes, bits


@settings(max_examples=80, deadline=None)
@given(codes_and_bits())
def test_rows_and_cols_round_trip(case):
    codes, bits = case
    words = packing.pack_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (codes.shape[0] * bits // 32, codes.shape[1])
    assert torch.equal(packing.unpack_rows(words, bits), codes)
    t = codes.t().contiguous()
    cwords = packing.pack_cols(t, bits)
    assert cwords.shape == (t.shape[0], t.shape[1] * bits // 32)
    assert torch.equal(packing.unpack_cols(cwords, bits), t)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.sampled_from([8, 16, 32]), st.booleans(), st.integers(0, 2**31 - 1))
def test_gptq_tensors_round_trip_with_v1_zero_offset(groups, out_words, group_size, v1, seed):
    rng = np.random.default_rng(seed)
    in_f, out_f = groups * group_size, out_words * 8
    codes = torch.from_numpy(rng.integers(0, 16, size=(out_f, in_f))).to(torch.int32)  # nn.Linear layout
    offset = 1 if v1 else 0
    zeros = torch.from_numpy(rng.integers(offset, 16 + offset, size=(groups, out_f))).to(torch.int32)
    scales = torch.from_numpy(rng.uniform(0.01, 1.0, size=(groups, out_f))).half()
    g_idx = packing.default_g_idx(in_f, group_size)
    t = packing.pack_gptq(codes, zeros, scales, g_idx, bits=4, zero_offset=offset)
    assert t["qweight"].shape == (in_f // 8, out_f) and t["qzeros"].shape == (groups, out_f // 8)
    got_codes, got_zeros = packing.unpack_gptq(t["qweight"], t["qzeros"], 4, zero_offset=offset)
    assert torch.equal(got_codes, codes.t()) and torch.equal(got_zeros, zeros)
    w = packing.dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, offset)
    expect = scales.float()[g_idx.long()].t() * (codes.float() - zeros.float()[g_idx.long()].t())
    torch.testing.assert_close(w, expect)


def test_bit_order_by_hand():
    # Output 0 has codes 1..8 on input features 0..7: feature j sits in bits 4j..4j+3 (LSB first),
    # so the word reads 0x87654321 (the top nibble 8 sets the sign bit of the int32).
    codes = torch.zeros(8, 2, dtype=torch.int32)  # [in, out], as qweight's rows are input features
    codes[:, 0] = torch.arange(1, 9)
    codes[:, 1] = torch.tensor([15, 0, 0, 0, 0, 0, 0, 0])
    words = packing.pack_rows(codes, 4)
    assert words.tolist() == [[0x87654321 - 2**32, 0x0000000F]]
    # qzeros: outputs 0..7 share a word; symmetric 4-bit zero 8 is stored as 7 in v1 -> 0x77777777
    t = packing.pack_gptq(torch.zeros(16, 8, dtype=torch.int32), torch.full((1, 16), 8), torch.ones(1, 16), packing.default_g_idx(8, 8), 4)
    assert t["qzeros"].tolist() == [[0x77777777, 0x77777777]]
    # zeros 1..8 on outputs 0..7 (v1 stores 0..7): 0x76543210
    t = packing.pack_gptq(torch.zeros(8, 8, dtype=torch.int32), torch.arange(1, 9)[None], torch.ones(1, 8), packing.default_g_idx(8, 8), 4)
    assert t["qzeros"].tolist() == [[0x76543210]]
    # 2-bit: 16 features per word, feature j at bits 2j
    two = packing.pack_rows(torch.tensor([[3]] + [[0]] * 14 + [[1]], dtype=torch.int32), 2)
    assert two.tolist() == [[0x40000003]]


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError, match="codes must lie in"):
        packing.pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="zero points"):
        packing.pack_gptq(torch.zeros(8, 8, dtype=torch.int32), torch.zeros(1, 8), torch.ones(1, 8), packing.default_g_idx(8, 8), 4)


def random_int4(in_f, out_f, group_size, act_order=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = packing.group_count(in_f, group_size)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 16, (groups, out_f), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, out_f, generator=g) * 0.05 + 0.01).half()
    g_idx = packing.default_g_idx(in_f, group_size)
    if act_order:  # act-order checkpoints: groups follow a column permutation
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    tensors = packing.pack_gptq(codes, zeros, scales, g_idx, 4)
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_packed(tensors, in_f, out_f, group_size, bias=b)


@pytest.mark.parametrize(
    "in_f,out_f,group_size,act_order,bias",
    [(128, 64, 128, False, False), (256, 48, 32, False, True), (512, 32, 512, False, False), (256, 64, -1, False, False),
     (256, 32, 64, True, False), (128, 16, 128, True, True), (576, 64, 128, False, True), (576, 32, 128, True, False)],
)
def test_kernel_matches_dequantized_reference(in_f, out_f, group_size, act_order, bias):
    layer = random_int4(in_f, out_f, group_size, act_order, bias)
    assert layer.kernel_applies(torch.device("cpu"))
    x = torch.randn(3, 5, in_f)
    ref = layer.forward_dequant(x)
    out = layer.forward_kernel(x)
    assert out.shape == ref.shape == (3, 5, out_f) and out.dtype == x.dtype
    assert (out - ref).abs().max() <= KERNEL_RTOL * ref.abs().max()
    # the reference itself is the plain formula on unpacked tensors
    torch.testing.assert_close(ref, torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias))


def test_backends_and_fallback():
    layer = random_int4(64, 24, 32)  # 24 outputs: not a multiple of 16, so the kernel does not apply
    assert not layer.kernel_applies(torch.device("cpu"))
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), layer.forward_dequant(x))
    layer.backend = "kernel"
    with pytest.raises(RuntimeError, match="does not apply"):
        layer(x)
    # a moved/cast module drops its kernel copies and recomputes them
    layer = random_int4(128, 32, 64)
    y = layer(torch.randn(1, 128))
    assert layer._kernel is not None
    scales = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer._kernel is None
    assert layer(torch.randn(1, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16 and y.dtype == torch.float32
    assert torch.equal(layer.scales, scales)  # the checkpoint's float16 scales survive a model cast bit for bit
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"}
