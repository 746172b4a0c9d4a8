"""The Triton int4 kernel on the CPU under Triton's interpreter, against the dequantize reference.

Run by ``test_quant_triton.py`` in a subprocess with ``TRITON_INTERPRET=1`` (Triton reads it when a
kernel is defined, so it must be set before ``r1kit.quant.triton_int4`` is imported). The kernel code
is the one a GPU runs; only its execution is emulated.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decode_attention import assert_matches_naive, random_case
from test_quant_checkpoint import write_third_party
from test_quant_helpers import trained_model
from test_quant_partial_groups import GROUP, SMOL
from test_quant_packing import random_int4
from test_int4_backends import CASES, ROWS, reference
from test_quant_triton import RTOL

from r1kit import LLM
from r1kit.infer.generate import generate
from r1kit.infer.triton_decode_attention import TritonPagedDecode, load_triton_kernel
from r1kit.model import R1kitForCausalLM
from r1kit.checkpoints import load_model
from r1kit.infer.sampling import SamplingParams
from r1kit.quant import QuantConfig, quantize_model, to_quantized
from r1kit.quant import triton_int4
from r1kit.quant.int4 import triton_kernel
from r1kit.quant.int4_linear import QuantLinear, StackedInt4Linear
from r1kit.quant.triton_int4 import Tiles, TileChooser, candidate_tiles, default_tiles, dequantize, int4_gptq_matmul

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_quant_triton.py (TRITON_INTERPRET=1)"



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "in_f,out_f,group_size,act_order,bias,rows",
    [(128, 64, 128, False, False, 1), (256, 48, 32, False, True, 5), (200, 24, -1, False, False, 17),
     (256, 72, 64, True, False, 40), (128, 16, 128, True, True, 3)],
)
def test_triton_matches_dequantized_reference(dtype, in_f, out_f, group_size, act_order, bias, rows):
    layer = random_int4(in_f, out_f, group_size, act_order, bias).to(dtype)
    x = torch.randn(rows, in_f).to(dtype)
    ref = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), None if layer.bias is None else layer.bias.float())
    layer.backend = "triton"
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, out_f)
    assert (out.float() - ref).abs().max() <= RTOL[dtype] * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_backend_matches_the_reference(case, dtype):
    """``test_int4_backends.py``'s cases through the backend interface (asked for by name: on the CPU
    ``available`` says the kernels run on CUDA)."""
    layer = random_int4(*CASES[case])
    state = triton_kernel.prepare(layer)
    assert state.group_k == (0 if CASES[case][3] else CASES[case][2])
    for rows in ROWS:  # one-row kernel, 16-row tile, dequantize + matmul
        x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
        out = triton_kernel.matmul(x, state)
        want = reference(layer, x, rounds_to_bf16=False)
        assert out.dtype == dtype and float((out.double() - want).abs().max() / want.abs().max()) <= RTOL[dtype], rows


@pytest.mark.parametrize("act_order", [False, True], ids=["contiguous-groups", "act-order"])
@pytest.mark.parametrize(
    "tiles", [Tiles(1, 32, 64, split_k=2), Tiles(16, 64, 64, split_k=3), Tiles(16, 32, 128), Tiles(1, 128, 128, split_k=2)],
    ids=["gemv-split2", "dot-split3-uneven", "dot-group-not-a-tile-multiple", "gemv-wide"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launch_shapes_split_k_and_group_paths_agree(tiles, dtype, act_order):
    layer = random_int4(320, 96, 64, act_order=act_order).to(dtype)
    x = torch.randn(tiles.block_m if tiles.block_m == 1 else 5, 320).to(dtype)
    ref = torch.nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32))
    group_k = triton_kernel.prepare(layer).group_k
    assert group_k == (0 if act_order else 64)
    out = int4_gptq_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.zero_offset, group_k, tiles)
    assert out.dtype == dtype and (out.float() - ref).abs().max() <= RTOL[dtype] * ref.abs().max()


@pytest.mark.parametrize("act_order", [False, True])
def test_many_rows_dequantize_then_multiply(act_order):
    layer = random_int4(256, 48, 32, act_order=act_order)
    assert torch.equal(dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.zero_offset, torch.float32),
                       layer.dequantized_weight(torch.float32).t())
    x = torch.randn(2, 20, 256)  # 40 rows: above SMALL_M
    out = int4_gptq_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.zero_offset)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.dequantized_weight(torch.float32)), atol=1e-5, rtol=1e-5)


def test_candidate_tiles():
    assert default_tiles(1).block_m == 1 and default_tiles(7).block_m == 16
    tiles = candidate_tiles(1, 4096)
    assert len(tiles) == 16 and {t.block_m for t in tiles} == {1} and {t.split_k for t in tiles} == {1, 2, 4, 8}
    assert all(512 >= 2 * t.block_k * t.split_k for t in candidate_tiles(16, 512))  # every split keeps two k-steps
    assert candidate_tiles(16, 64) == []  # too short to split or tile twice: the default runs


def test_tile_chooser_times_the_candidates_once_and_skips_the_ones_that_fail(monkeypatch):
    layer = random_int4(512, 64, 128)
    x = torch.randn(1, 512)
    tensors = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.zero_offset, 128)
    launched = []
    launch = triton_int4._launch
    monkeypatch.setattr(triton_int4, "_launch", lambda *args: launched.append(args[-1]) or launch(*args))

    def timer(fn):  # stands in for CUDA events: runs the launch, then "times" its tiles by a rule
        fn()
        t = launched[-1]
        if t.block_n == 128 and t.block_k == 128:
            raise RuntimeError("out of resources")  # as a GPU refuses a tile too large for it
        return abs(t.split_k - 2) + t.block_n / 1000

    chooser = TileChooser(timer, devices=("cpu",))
    assert chooser(x, *tensors) == Tiles(1, 64, 64, split_k=2)
    runs = 2 * len(candidate_tiles(1, 512))  # each candidate: once checked against the reference, once timed
    assert len(launched) == runs
    assert chooser(x, *tensors) == Tiles(1, 64, 64, split_k=2) and len(launched) == runs  # kept
    assert TileChooser(timer)(x, *tensors) == default_tiles(1)  # a device it does not time: the default

    def failing(fn):
        raise RuntimeError("out of resources")

    # no shape runs: None, and the product dequantizes instead (still right)
    assert TileChooser(failing, devices=("cpu",))(x, *tensors) is None
    monkeypatch.setattr(triton_int4, "choose_tiles", TileChooser(failing, devices=("cpu",)))
    ref = torch.nn.functional.linear(x, layer.dequantized_weight())
    assert (int4_gptq_matmul(x, *tensors) - ref).abs().max() <= 1e-5 * ref.abs().max()
    # an input that cannot judge (all zeros: every shape agrees) runs the default and decides nothing
    chooser = TileChooser(lambda fn: 0.0, devices=("cpu",))
    assert chooser(torch.zeros(1, 512), *tensors) == default_tiles(1) and not chooser.chosen
    # a shape that runs but miscomputes is never chosen, however fast
    monkeypatch.setattr(triton_int4, "_launch", lambda *args: launch(*args) * (1.1 if args[-1].split_k == 2 else 1.0))
    chosen = TileChooser(lambda fn: abs(fn.args[-1].split_k - 2), devices=("cpu",))(x, *tensors)
    assert chosen.split_k != 2


@pytest.mark.parametrize("act_order", [False, True], ids=["contiguous-groups", "act-order"])
def test_triton_runs_a_gptqmodel_checkpoint_with_a_partial_group(tmp_path, act_order):
    """GPTQModel's g128 layout of 576-wide layers (a partial last group) through every path, and the
    stacked q/k/v (the interpreter is slow: the narrowest layers with the partial group)."""
    reference = write_third_party(tmp_path, GROUP, act_order=act_order, in_config_json=True, hf_config=SMOL)
    model = load_model(tmp_path, dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    for name in ("k_proj", "v_proj"):
        layer = getattr(attn, name)
        layer.backend = "triton"
        weight = reference.model.layers[0].self_attn.get_submodule(name).weight.detach().double()
        for rows in (1, 5, 20):  # one-row kernel, 16-row tile, dequantize + matmul
            x = torch.randn(rows, layer.in_features, generator=g)
            ref = x.double() @ weight.T
            assert (layer(x).double() - ref).abs().max() <= RTOL[torch.float32] * ref.abs().max(), (name, rows)
    parts = {n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")}
    stacked = StackedInt4Linear.stack("qkv_proj", parts)
    if act_order:  # this writer permutes each part's inputs its own way: they do not stack
        assert stacked is None
        return
    stacked.backend = "triton"
    x = torch.randn(1, 576, generator=g)
    ref = x.double() @ torch.cat([reference.model.layers[0].self_attn.get_submodule(n).weight.detach() for n in parts]).double().T
    assert (stacked(x).double() - ref).abs().max() <= RTOL[torch.float32] * ref.abs().max()


def test_triton_model_generates_as_the_reference():
    model = trained_model()
    qc = QuantConfig(group_size=64, method="rtn")
    to_quantized(model, quantize_model(model, qc), qc)
    prompt = [3, 17, 5, 9]
    params = SamplingParams(temperature=0, max_tokens=6)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = "dequant"
    expected = generate(model, prompt, params)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = "triton"
    assert generate(model, prompt, params) == expected


# -- the paged decode-attention kernel (r1kit.infer.triton_decode_attention) ---------------------------

@st.composite
def decode_problems(draw):
    seqs, hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3, 4]))
    dim = draw(st.sampled_from([16, 40, 64]))
    block_size = draw(st.sampled_from([1, 4, 16]))
    contexts = [draw(st.integers(1, 70)) for _ in range(seqs)]  # up to three 32-position steps
    lowest = [draw(st.integers(0, c - 1)) for c in contexts]
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return seqs, hkv, group, dim, block_size, contexts, lowest, dtype, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(decode_problems())
def test_triton_decode_attention_equals_naive(problem):
    assert_matches_naive(TritonPagedDecode(), random_case(*problem))


def test_triton_decode_kernel_loads_after_its_self_check():
    assert isinstance(load_triton_kernel(torch.device("cpu")), TritonPagedDecode)
    with pytest.raises(ValueError, match="do not group"):
        TritonPagedDecode()(torch.zeros(1, 3, 1, 16), torch.zeros(4, 2, 16), torch.zeros(4, 2, 16), torch.zeros(1, 1, dtype=torch.long),
                            torch.tensor([1]), torch.tensor([0]), 4)


def test_engine_decodes_through_the_triton_kernel(tiny_config):
    model = R1kitForCausalLM(tiny_config(attention=("local", "hybrid"), local_window=5, hidden_size=64)).eval()
    prompts = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 10, 11], [3, 1, 4]]
    params = SamplingParams(temperature=0, max_tokens=10)
    want = [generate(model, p, params) for p in prompts]
    llm = LLM(model, block_size=4, num_kv_blocks=32, decode_kernel=False)
    kernel, calls = TritonPagedDecode(), []

    def counting(*args):
        calls.append(args[0].shape[0])
        return kernel(*args)

    llm.llm_engine.runner.pool.decode_kernel = counting  # what a CUDA engine holds (set by hand: this is the CPU)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    assert calls and max(calls) == 2  # both rows' decodes went through it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_passes_and_catches_a_wrong_kernel(dtype, monkeypatch, caplog):
    cpu = torch.device("cpu")  # the interpreter runs the kernels on the CPU
    triton_int4._self_check(cpu, dtype)  # every path agrees with the reference
    real = triton_int4._launch
    monkeypatch.setattr(triton_int4, "_launch", lambda *args: real(*args) * 1.05)  # a kernel 5% off
    with pytest.raises(RuntimeError, match="self-check mismatch"):
        triton_int4._self_check(cpu, dtype)
    triton_int4.verified.cache_clear()
    with caplog.at_level("WARNING"):
        assert not triton_int4.verified(cpu, dtype)
    assert "int4 layers dequantize instead" in caplog.text
    triton_int4.verified.cache_clear()
