"""GPTQ against RTN on a tiny trained model, the grid, and quantization of every attention/FFN kind."""

import pytest
import torch
from devices import DEVICES
from test_quant_helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    markov_tokens,
    one_thread,
    perplexity,
    tiny_config,
    trained_model,
)

from r1kit.errors import ConfigError
from r1kit.infer.generate import generate
from r1kit.infer.sampling import SamplingParams
from r1kit.model.transformer import R1kitForCausalLM
from r1kit.quant import QuantLinear, QuantConfig, quantize_model, to_quantized
from r1kit.quant.rtn import grid_params, quantize_rtn


def linear_inputs(model, tokens):
    """Each quantizable linear's inputs on ``tokens`` (hooks on the float model)."""
    xs, hooks = {}, []
    for name, module in model.named_modules():
        if name.endswith("_proj"):
            hooks.append(module.register_forward_hook(lambda _m, inp, _o, name=name: xs.__setitem__(name, inp[0].detach())))
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    return xs


def output_error(model, reference, xs):
    """Σ ||X (W_q − W)ᵀ||² per linear: how far each quantized layer's outputs move on held-out inputs."""
    return {n: float((torch.nn.functional.linear(x, model.get_submodule(n).weight.detach() - reference.get_submodule(n).weight.detach())).pow(2).sum()) for n, x in xs.items()}


@pytest.mark.parametrize("group_size,desc_act", [(128, False), (32, True)])
def test_gptq_beats_rtn_on_every_layer_of_a_trained_model(group_size, desc_act):
    fp = trained_model()
    held_out = markov_tokens(16, 65, seed=7)
    calib = markov_tokens(32, 64, seed=1)
    xs = linear_inputs(fp, held_out[:, :-1])
    assert len(xs) == 14  # 2 layers × q, k, v, o, gate, up, down
    errors, ppl = {}, {}
    for method in ("rtn", "gptq"):
        model = trained_model()
        results = quantize_model(model, QuantConfig(method=method, group_size=group_size, desc_act=desc_act), calib, batch_size=8)
        assert set(results) == set(xs)
        errors[method] = output_error(model, fp, xs)
        ppl[method] = perplexity(model, held_out)
    for name in xs:  # GPTQ's outputs move much less than RTN's on every layer (typically 5-10x)
        assert errors["gptq"][name] < 0.5 * errors["rtn"][name], (name, errors["gptq"][name], errors["rtn"][name])
    assert ppl["gptq"] <= ppl["rtn"]
    assert ppl["gptq"] <= 1.01 * perplexity(fp, held_out)


def test_grid_symmetric_and_asymmetric():
    w = torch.tensor([[-1.0, 0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    scale, zero = grid_params(w, 4, sym=True)
    assert zero.tolist() == [8, 8, 8]
    assert scale[0] == pytest.approx(2 / 15, rel=1e-3)  # max |w| = 1 spans [-1, 1] in 15 steps
    scale, zero = grid_params(w, 4, sym=False)
    assert 1 <= zero.min() and zero.max() <= 15  # v1 stores zero - 1: zero 0 would not fit
    result = quantize_rtn(torch.randn(16, 64), QuantConfig(group_size=32, sym=False))
    assert result.codes.min() >= 0 and result.codes.max() <= 15 and result.scales.shape == (2, 16)
    torch.testing.assert_close(result.scales, result.scales.half().float())  # what the fp16 checkpoint holds


def test_widths_must_pack_and_gptq_needs_calibration():
    model = R1kitForCausalLM(tiny_config(hidden_size=100, intermediate_size=192, num_heads=2, num_kv_heads=2))
    with pytest.raises(ConfigError, match="model.layers.0.self_attn.q_proj is 100→100: both must be multiples of 8"):
        quantize_model(model, QuantConfig(method="rtn"))
    with pytest.raises(ConfigError, match="group_size=0 must be positive"):
        QuantConfig(group_size=0)
    model = R1kitForCausalLM(tiny_config(hidden_size=96, intermediate_size=192, num_heads=3, num_kv_heads=3))
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize_model(model, QuantConfig(group_size=32))


KINDS = {
    "local+topk": dict(attention="local", ffn="topk", topk_sparsity=0.5, local_window=8),
    "hybrid+gelu": dict(attention="hybrid", activation="gelu", norm="layernorm"),
    "hybrid-head+qkv-bias+topk": dict(attention=["hybrid", "global"], ffn=["topk", "dense"], hybrid_gate="head", qkv_bias=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_attention_and_ffn_kind_quantizes_and_decodes(kind, device):
    torch.manual_seed(0)
    model = R1kitForCausalLM(tiny_config(**KINDS[kind])).eval().to(device)
    calib = markov_tokens(8, 32, seed=3).to(device)
    results = quantize_model(model, QuantConfig(group_size=64, block_size=32), calib, batch_size=4)
    with torch.no_grad():
        fake = model(calib)
    to_quantized(model, results, QuantConfig(group_size=64))
    for layer in model.model.layers:
        attn = layer.self_attn
        assert isinstance(attn.q_proj, QuantLinear) and isinstance(layer.mlp.down_proj, QuantLinear)
        if attn.kind == "hybrid":  # the gate stays float
            assert all(isinstance(m, torch.nn.Linear) for m in attn.gate if not isinstance(m, torch.nn.SiLU))
    with torch.no_grad():
        out = model(calib)  # the int4 kernel (CPU: bf16 activations; CUDA: Triton)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.backend = "dequant"
        reference = model(calib)
    torch.testing.assert_close(reference, fake, atol=1e-5, rtol=1e-4)  # the checkpoint's codes are the fake-quantized weights
    # Top-K selections can flip on bf16 rounding, so compare means here (per-layer parity: test_quant_packing)
    assert (out - reference).abs().mean() <= 2e-2 * reference.abs().mean()
    tokens = generate(model, [1, 2, 3], SamplingParams(temperature=0, max_tokens=6))  # decode: Top-K takes its masked path
    assert len(tokens) == 6


@pytest.mark.parametrize("kind", list(KINDS))
def test_replayed_passes_quantize_exactly_as_full_forwards(kind, monkeypatch):
    """Once o_proj (down_proj) is quantized, later passes run the attention (FFN) as that one product on
    its collected inputs: the codes and every layer's outputs must be those of full forwards."""
    from r1kit.quant import quantizer

    calib = markov_tokens(8, 32, seed=3)
    runs = {}
    for replay in (True, False):
        if not replay:
            monkeypatch.setattr(quantizer, "REPLAYED", {})
        torch.manual_seed(0)
        model = R1kitForCausalLM(tiny_config(**KINDS[kind])).eval()
        runs[replay] = quantize_model(model, QuantConfig(group_size=64, block_size=32), calib, batch_size=3), model
    (fast, fast_model), (full, full_model) = runs[True], runs[False]
    assert set(fast) == set(full)
    for name in full:
        assert torch.equal(fast[name].codes, full[name].codes) and torch.equal(fast[name].scales, full[name].scales), name
    torch.testing.assert_close(fast_model.state_dict(), full_model.state_dict(), atol=0, rtol=0)
