"""oneDNN-packed linear layers for CPU inference: same products as ``F.linear``, the same state dict,
and the layers that must keep plain weights (Top-K gather path, int4) left alone."""

import pytest
import torch
import torch.nn.functional as F
from devices import needs_cuda
from torch import nn

from r1kit import LLM, SamplingParams
from r1kit.infer.generate import generate
from r1kit.infer.weight_packing import (SMALL_WEIGHT, FusedGateUpFFN, FusedPackedLinear, FusedQKVAttention, PackedLinear, pack_linears,
                                        packing_supported)
from r1kit.model import R1kitForCausalLM
from r1kit.checkpoints import load_model
from r1kit.model.transformer import specialize

pytestmark = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.float32), reason="this torch build has no oneDNN packed linear")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1,), (5,), (2, 3), (0,)])
@pytest.mark.parametrize("features", [(48, 80), (512, 640)], ids=["small", "large"])
def test_packed_linear_equals_f_linear(bias, rows, features):
    linear = nn.Linear(*features, bias=bias)
    packed = PackedLinear.from_linear(linear)
    # a small layer keeps its plain weight for one-row products (MKL beats oneDNN's call overhead there)
    assert (packed.plain is not None) == (linear.weight.numel() <= SMALL_WEIGHT)
    x = torch.randn(*rows, features[0])
    with torch.inference_mode():
        got, want = packed(x), F.linear(x, linear.weight, linear.bias)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_linear_bfloat16_and_dtype_mismatch():
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x).float(), F.linear(x, linear.weight, linear.bias).float(), rtol=2e-2, atol=2e-2)
        with pytest.raises(TypeError, match="bfloat16 weights but got a torch.float32 input"):
            packed(x.float())


@pytest.mark.parametrize("attention", ["global", "hybrid"])
def test_packed_model_logits_and_state_dict(tiny_config, tmp_path, attention):
    model = R1kitForCausalLM(tiny_config(attention=attention, ffn=["dense", "topk"], tie_embeddings=True, qkv_bias=attention == "global")).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 61, (2, 9))
    with torch.inference_mode():
        want, want_one = model(tokens), model(tokens[:, :1])
    count = pack_linears(model)
    # per layer q/k/v/o (+ the hybrid gate's two), the dense FFN's three in layer 0, the Top-K FFN's W_gate
    # only (its gather path reads rows of W_up and W_down); plus the (tied) head
    expected = 2 * (4 + (2 if attention == "hybrid" else 0)) + 3 + 1 + 1
    assert count == expected
    topk = model.model.layers[1].mlp
    assert type(topk.up_proj) is nn.Linear and type(topk.down_proj) is nn.Linear and isinstance(topk.gate_proj, PackedLinear)
    assert isinstance(model.lm_head, PackedLinear)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    # q/k/v and gate/up each became one product, in layers swapped for their fused variants; their plain modules are gone
    assert isinstance(attn, FusedQKVAttention) and isinstance(mlp, FusedGateUpFFN) and type(topk) is not FusedGateUpFFN
    assert isinstance(attn.qkv_proj, FusedPackedLinear) and attn.qkv_proj.split_sizes == [32, 16, 16] and attn.q_proj is None
    assert isinstance(mlp.gate_up_proj, FusedPackedLinear) and mlp.up_proj is None and isinstance(mlp.down_proj, PackedLinear)
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), want, rtol=1e-4, atol=1e-5)
        # one token per row: the Top-K layer takes its gather path, through the packed W_gate
        torch.testing.assert_close(model(tokens[:, :1]), want_one, rtol=1e-4, atol=1e-5)
    packed_state = model.state_dict()
    assert packed_state.keys() == state.keys()
    for k in state:
        assert torch.equal(packed_state[k], state[k]), k
    model.save_pretrained(tmp_path)
    reloaded = load_model(tmp_path)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_engine_packs_its_copy_by_default_and_not_when_told(tiny_config):
    params = SamplingParams(temperature=0, max_tokens=6)
    prompt = [3, 1, 4, 1, 5, 9]
    model = R1kitForCausalLM(tiny_config()).eval()
    off = LLM(model, pack_weights=False, num_kv_blocks=8)
    on = LLM(model, num_kv_blocks=8)
    assert not any(isinstance(m, PackedLinear) for m in off.llm_engine.model.modules())
    assert any(isinstance(m, PackedLinear) for m in on.llm_engine.model.modules())
    assert isinstance(on.llm_engine.model.model.layers[0].self_attn, FusedQKVAttention)
    assert not any(isinstance(m, (PackedLinear, FusedQKVAttention)) for m in model.modules())  # the caller's model is left alone
    want = generate(model, prompt, params)  # the plain eager path over the untouched weights
    assert on.generate(prompt, params)[0].outputs[0].token_ids == off.generate(prompt, params)[0].outputs[0].token_ids == want


def test_fp16_and_int4_layers_are_not_packed(tiny_config):
    from r1kit.quant.int4_linear import QuantLinear

    model = R1kitForCausalLM(tiny_config()).eval()
    model.model.layers[0].self_attn.q_proj = QuantLinear(32, 32, group_size=32)
    count = pack_linears(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear) and count > 0
    half = R1kitForCausalLM(tiny_config()).eval().to(torch.float16)
    assert pack_linears(half) == 0  # oneDNN's fp16 path needs AVX512-FP16: plain F.linear stays
    assert not any(isinstance(m, PackedLinear) for m in half.modules())


def test_int4_qkv_and_gate_up_fuse_into_one_kernel_call(tiny_config):
    """A GPTQ model in the engine: q/k/v and gate/up each become one int4 kernel call with the same
    outputs as the separate layers; the checkpoint's tensors (the state dict) do not change."""
    from r1kit.quant import QuantConfig, quantize_model, to_quantized
    from r1kit.quant.int4_linear import FusedInt4Linear, QuantLinear

    cfg = tiny_config(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128, qkv_bias=True)
    model = R1kitForCausalLM(cfg).eval()
    qc = QuantConfig(group_size=32, method="rtn")
    to_quantized(model, quantize_model(model, qc), qc)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 61, (2, 7))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(3, 64)
    with torch.inference_mode():
        want_logits = model(tokens)
        parts = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    pack_linears(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, FusedInt4Linear) and isinstance(mlp.gate_up_proj, FusedInt4Linear)
    assert isinstance(attn.q_proj, QuantLinear) and attn.qkv_proj.split_sizes == [64, 32, 32]
    with torch.inference_mode():
        torch.testing.assert_close(attn.qkv_proj(x), parts, rtol=0, atol=1e-6)  # the same bf16 kernel, column by column
        torch.testing.assert_close(model(tokens), want_logits, rtol=1e-4, atol=1e-4)
    assert {k: v for k, v in model.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # the unfused int4 layers (o_proj, down_proj) are frozen: same outputs, no per-call weights check
    o_proj = attn.o_proj
    assert o_proj._frozen is not None
    with torch.inference_mode():
        frozen = o_proj(x)
        o_proj._frozen = None
        torch.testing.assert_close(frozen, o_proj(x), rtol=0, atol=0)
        o_proj.freeze()
    model.to(torch.bfloat16)  # a cast unfreezes: the kernel state is rebuilt for the new dtype
    assert o_proj._frozen is None and o_proj(x.bfloat16()).dtype == torch.bfloat16


def test_fusing_linears_with_and_without_bias_is_refused():
    from r1kit.infer.weight_packing import FusedPackedLinear

    with pytest.raises(ValueError, match="some have a bias and some do not"):
        FusedPackedLinear("qkv_proj", {"q_proj": nn.Linear(8, 8, bias=True), "k_proj": nn.Linear(8, 8, bias=False)})


FUSIONS_BY_OWNER = (("self_attn", FusedQKVAttention, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                    ("mlp", FusedGateUpFFN, "gate_up_proj", ("gate_proj", "up_proj")))


def _quantized(tiny_config, act_order=False):
    from r1kit.quant import QuantConfig, quantize_model, to_quantized

    model = R1kitForCausalLM(tiny_config(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128, qkv_bias=True)).eval()
    qc = QuantConfig(group_size=32, method="gptq" if act_order else "rtn", desc_act=act_order)
    calib = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(0))
    to_quantized(model, quantize_model(model, qc, calib if act_order else None), qc)
    return model


def test_int4_parts_stack_into_one_layer_that_saves_as_its_parts(tiny_config):
    """What the engine does with GPTQ q/k/v and gate/up on a GPU (one Triton launch each), checked on
    the CPU through the dequantize path: same outputs, and the state dict is the checkpoint's."""
    from r1kit.quant.int4_linear import QuantLinear, StackedInt4Linear

    model = _quantized(tiny_config)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = "dequant"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, x = torch.randint(0, 61, (2, 7)), torch.randn(3, 64)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.inference_mode():
        want_logits, want_qkv = model(tokens), torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    for layer in model.model.layers:  # the swap pack_linears makes on a GPU
        for owner, variant, name, parts in FUSIONS_BY_OWNER:
            module = getattr(layer, owner)
            stacked = StackedInt4Linear.stack(name, {p: getattr(module, p) for p in parts})
            assert stacked is not None and stacked.backend == "dequant"
            fused = specialize(module, variant, **{name: stacked})
            for p in parts:
                setattr(fused, p, None)
            setattr(layer, owner, fused)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv_proj.split_sizes == [64, 32, 32] and mlp.gate_up_proj.split_sizes == [128, 128]
    with torch.inference_mode():
        torch.testing.assert_close(attn.qkv_proj(x), want_qkv, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(tokens), want_logits, rtol=1e-5, atol=1e-5)
    saved = model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], v) for k, v in state.items())


def test_int4_parts_stack_only_with_one_grouping_of_their_inputs(tiny_config):
    from r1kit.quant.int4_linear import StackedInt4Linear

    attn = _quantized(tiny_config, act_order=True).model.layers[0].self_attn
    # act-order: q/k/v share their inputs' Hessian, hence one activation order, and stack
    parts = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj}
    x = torch.randn(3, 64)
    want = torch.cat([p.forward_dequant(x) for p in parts.values()], dim=-1)
    torch.testing.assert_close(StackedInt4Linear.stack("qkv_proj", parts).forward_dequant(x), want, rtol=0, atol=1e-6)
    attn.k_proj.g_idx = attn.k_proj.g_idx.flip(0)  # another input grouping
    assert StackedInt4Linear.stack("qkv_proj", parts | {"k_proj": attn.k_proj}) is None
    plain = _quantized(tiny_config).model.layers[0].self_attn
    plain.k_proj.bias = None  # one part without a bias
    assert StackedInt4Linear.stack("qkv_proj", {"q_proj": plain.q_proj, "k_proj": plain.k_proj}) is None


@needs_cuda
def test_int4_qkv_and_gate_up_stack_on_cuda(tiny_config):
    from r1kit.quant.int4_linear import StackedInt4Linear

    model = _quantized(tiny_config).to("cuda")
    tokens = torch.randint(0, 61, (2, 7), device="cuda")
    with torch.inference_mode():
        want = model(tokens)
    pack_linears(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, StackedInt4Linear) and isinstance(mlp.gate_up_proj, StackedInt4Linear) and attn.q_proj is None
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), want, rtol=1e-4, atol=1e-4)
