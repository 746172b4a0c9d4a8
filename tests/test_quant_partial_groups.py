"""Partial last groups: a group size that does not divide a layer's inputs, as real models need.

SmolLM2-135M's layers are 576 and 1536 wide; GPTQModel quantizes them at group size 128 with
⌈576/128⌉ groups, the last one holding the remaining inputs, ``g_idx[i] = i // 128``. Here: such a
checkpoint, packed by hand (``test_quant_checkpoint.write_third_party``), loads and runs on every
CPU backend against the dequantized raw tensors (the Triton kernels: ``triton_interpreted.py``);
r1kit's RTN and GPTQ quantize such layers themselves (act-order too) and the result round-trips;
and ``r1kit quantize`` keeps every file of the model directory.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_quant_checkpoint import LLAMA, write_third_party
from test_quant_helpers import markov_tokens, one_thread, tiny_config  # noqa: F401 (one_thread: an autouse fixture)
from test_quant_packing import random_int4

from r1kit.cli import main
from r1kit.infer.generate import generate
from r1kit.infer.llm import LLM
from r1kit.infer.sampling import SamplingParams
from r1kit.checkpoints import load_model
from r1kit.model.transformer import R1kitForCausalLM
from r1kit.quant import QuantLinear, QuantConfig, cpu_int4, quantize_model, save_quantized
from r1kit.quant.int4 import choose, cpu_kernel, torch_kernel
from r1kit.quant.int4_linear import FusedInt4Linear, StackedInt4Linear

GROUP = 128
# SmolLM2-135M's widths (9 heads of 64, 3 KV heads), one layer
WIDTHS = dict(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, num_layers=1)
SMOL = dict(LLAMA, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=1)
# max |Δ| as a share of max |reference|: the kernels round activations to bfloat16 (the references here
# round them too); torch's kernel also holds scales and zeros in bfloat16
RTOL = {"dequant": 1e-5, "r1kit-kernel": 1e-4, "torch-kernel": 2e-2}
GREEDY = SamplingParams(temperature=0, max_tokens=6)


def group_sizes(g_idx: torch.Tensor) -> list[int]:
    return torch.bincount(g_idx.long()).tolist()


def expected_group_sizes(in_features: int) -> list[int]:
    full, rest = divmod(in_features, GROUP)
    return [GROUP] * full + ([rest] if rest else [])


def int4_layers(model) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def relative_error(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.detach().double(), want.detach().double()
    return float((out - want).abs().max() / want.abs().max())


# -- GPTQModel's checkpoint -------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["contiguous", "act-order"])
def smol(request, tmp_path_factory):
    """(directory, float model the raw tensors stand for, act-order) of a g128 SmolLM2-wide checkpoint."""
    path = tmp_path_factory.mktemp("smol")
    reference = write_third_party(path, GROUP, act_order=request.param, in_config_json=True, hf_config=SMOL)
    return path, reference, request.param


def test_gptqmodel_layout_loads_with_its_partial_group(smol):
    path, reference, act_order = smol
    model = load_model(path, dtype=torch.float32)
    layers = int4_layers(model)
    assert len(layers) == 7
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.scales.shape == (5, 576) and q.qzeros.shape == (5, 576 * 4 // 32)
    for name, layer in layers.items():
        assert group_sizes(layer.g_idx) == expected_group_sizes(layer.in_features), name
        assert bool((layer.g_idx.diff() >= 0).all()) != act_order
        torch.testing.assert_close(layer.dequantized_weight(), reference.get_submodule(name).weight, rtol=0, atol=0)


def _cpu_backend(backend: str, monkeypatch) -> str:
    """Make ``backend`` the one an QuantLinear's ``kernel`` means here; its ``backend`` attribute value."""
    if backend == "r1kit-kernel" and cpu_int4.load() is None:
        pytest.skip("this CPU has no AVX512-BF16 or no C compiler: r1kit's int4 kernel is not built (torch's serves)")
    if backend == "torch-kernel":
        if not torch_kernel.installed():
            pytest.skip("this torch has no _weight_int4pack_mm_for_cpu (torch < 2.6)")
        monkeypatch.setattr(cpu_int4, "load", lambda: None)  # as on a CPU without AVX512-BF16
    return "dequant" if backend == "dequant" else "kernel"


@pytest.mark.parametrize("backend", list(RTOL))
def test_every_cpu_backend_runs_the_checkpoint(smol, backend, monkeypatch):
    path, reference, act_order = smol
    kind = _cpu_backend(backend, monkeypatch)
    model = load_model(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    for name, layer in int4_layers(model).items():
        layer.backend = kind
        x = torch.randn(5, layer.in_features, generator=g)
        # the reference from the raw tensors on the activations the kernels see (rounded to bfloat16)
        seen = x if kind == "dequant" else x.bfloat16().float()
        want = seen.double() @ reference.get_submodule(name).weight.double().T
        assert relative_error(layer(x), want) <= RTOL[backend], name
        if kind == "kernel":
            kernel = choose.cpu_kernel_for(layer, x.device)
            assert kernel.NAME == backend
            state = layer.prepared(kernel.prepare)
            group, order = (state.packed.group, state.packed.order) if kernel is cpu_kernel else (state.group, state.order)
            # a kernel group that divides every GPTQ group, the partial one too
            assert group == (64 if layer.in_features == 576 else GROUP) and (order is not None) == act_order
    tokens = torch.tensor([[5, 17, 42, 8, 90]])
    with torch.no_grad():
        assert relative_error(model(tokens), reference(tokens)) <= (1e-4 if kind == "dequant" else 2e-2)


def test_fused_and_stacked_layers_run_it(smol):
    path, reference, act_order = smol
    model = load_model(path, dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    parts = {name: getattr(attn, name) for name in ("q_proj", "k_proj", "v_proj")}
    weight = torch.cat([reference.model.layers[0].self_attn.get_submodule(n).weight for n in parts]).double()
    x = torch.randn(3, 576)
    want, want_bf16 = x.double() @ weight.T, x.bfloat16().double() @ weight.T  # the kernels round x to bfloat16
    fused, stacked = FusedInt4Linear.fuse(list(parts.values())), StackedInt4Linear.stack("qkv_proj", parts)
    if act_order:  # this writer permutes each part's inputs its own way: they run one by one
        assert fused is None and stacked is None
        return
    assert relative_error(fused(x), want_bf16) <= RTOL["torch-kernel"]
    assert_stacked_runs(stacked, x, want, want_bf16)


def assert_stacked_runs(stacked: StackedInt4Linear, x: torch.Tensor, want: torch.Tensor, want_bf16: torch.Tensor) -> None:
    assert stacked.scales.shape == (5, stacked.out_features)
    stacked.backend = "dequant"
    assert relative_error(stacked(x), want) <= RTOL["dequant"]
    assert relative_error(stacked.forward_kernel(x), want_bf16) <= RTOL["torch-kernel"]


def test_engine_serves_it(smol):
    path, _, act_order = smol
    model = load_model(path, dtype=torch.float32)
    prompts = [[5, 17, 42], [9, 3, 60, 11]]
    want = [generate(model, p, GREEDY) for p in prompts]
    llm = LLM(model, block_size=4, num_kv_blocks=16)
    # gate/up fused into one int4 kernel call, where their inputs share one order
    assert isinstance(getattr(llm.llm_engine.model.model.layers[0].mlp, "gate_up_proj", None), FusedInt4Linear) != act_order  # the engine's copy
    assert [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)] == want


def test_widths_no_kernel_group_divides_fall_back_to_dequantize():
    layer = random_int4(200, 32, 64)  # groups of 64, 64, 64, 8: no kernel group of 32 or more divides them
    assert layer.scales.shape == (4, 32) and group_sizes(layer.g_idx) == [64, 64, 64, 8]
    assert not layer.kernel_applies(torch.device("cpu"))
    x = torch.randn(2, 200)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized_weight()))
    layer.backend = "kernel"
    with pytest.raises(RuntimeError, match="group size and in_features that are both multiples of 32"):
        layer(x)
    with pytest.raises(ValueError, match="group_size=0 must be a positive integer, or -1"):
        QuantLinear(64, 32, group_size=0)


# -- r1kit quantizes such layers --------------------------------------------------------------------------
CONFIGS = {"rtn": QuantConfig(group_size=GROUP, method="rtn"), "gptq": QuantConfig(group_size=GROUP),
           "gptq-act-order": QuantConfig(group_size=GROUP, desc_act=True)}


@pytest.fixture(scope="module")
def quantized():
    """The float SmolLM2-wide model, its calibration inputs per linear, and each config's (model, results)."""
    torch.manual_seed(0)
    float_model = R1kitForCausalLM(tiny_config(**WIDTHS)).eval()
    calib = markov_tokens(8, 32, seed=3)
    inputs, hooks = {}, []

    def keep(name):
        def hook(_module, inp, _out):
            inputs[name] = inp[0].reshape(-1, inp[0].shape[-1])
        return hook

    for name, module in float_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            hooks.append(module.register_forward_hook(keep(name)))
    with torch.no_grad():
        float_model(calib)
    for hook in hooks:
        hook.remove()
    out = {}
    for key, config in CONFIGS.items():
        model = copy.deepcopy(float_model)
        out[key] = model, quantize_model(model, config, None if config.method == "rtn" else calib, batch_size=8)
    return float_model, inputs, out


@pytest.mark.parametrize("key", list(CONFIGS))
def test_quantize_save_load_round_trip(quantized, key, tmp_path):
    _, _, runs = quantized
    model, results = runs[key]
    config = CONFIGS[key]
    q = results["model.layers.0.self_attn.q_proj"]
    assert q.scales.shape == (5, 576) and group_sizes(q.g_idx) == expected_group_sizes(576)
    assert bool((q.g_idx.diff() >= 0).all()) != config.desc_act  # act-order: the groups follow a permutation
    save_quantized(model, tmp_path, config, results)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["model.layers.0.mlp.gate_proj.qzeros"].shape == (5, 1536 // 8)
    assert tensors["model.layers.0.mlp.down_proj.scales"].shape == (12, 576)
    loaded = load_model(tmp_path)
    g = torch.Generator().manual_seed(1)
    for name, result in results.items():
        layer = loaded.get_submodule(name)
        assert torch.equal(layer.g_idx, result.g_idx) and torch.equal(layer.dequantized_weight(), result.weight())
        assert layer.kernel_applies(torch.device("cpu"))  # the partial group keeps the CPU kernel, act-order too
        x = torch.randn(3, layer.in_features, generator=g)
        assert relative_error(layer.forward_kernel(x), F.linear(x.bfloat16().double(), result.weight().double())) <= RTOL["torch-kernel"]
    # q/k/v see the same inputs, so act-order permutes them alike and they still stack
    parts = {n: loaded.model.layers[0].self_attn.get_submodule(n) for n in ("q_proj", "k_proj", "v_proj")}
    weight = torch.cat([p.dequantized_weight() for p in parts.values()]).double()
    x = torch.randn(3, 576, generator=g)
    assert_stacked_runs(StackedInt4Linear.stack("qkv_proj", parts), x, x.double() @ weight.T, x.bfloat16().double() @ weight.T)
    tokens = markov_tokens(2, 12, seed=5)
    for layer in int4_layers(loaded).values():
        layer.backend = "dequant"
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=1e-5, rtol=1e-4)  # model: the fake-quantized weights


@pytest.mark.parametrize("gptq", ["gptq", "gptq-act-order"])
def test_gptq_output_error_is_at_most_rtns(quantized, gptq):
    float_model, inputs, runs = quantized
    rtn, ours = runs["rtn"][1], runs[gptq][1]
    for name, x in inputs.items():
        w = float_model.get_submodule(name).weight.detach().double()
        errors = [float((x.double() @ (r[name].weight().double() - w).T).pow(2).sum()) for r in (rtn, ours)]
        assert errors[1] <= errors[0], (name, errors)


# -- the quantize CLI keeps the model directory's other files ---------------------------------------------
COMPANIONS = {
    "tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 256}', "special_tokens_map.json": '{"eos_token": "</s>"}',
    "generation_config.json": '{"eos_token_id": 2}', "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "chat_template.json": '{"chat_template": "{{ messages }}"}', "added_tokens.json": '{"<think>": 64}',
    "vocab.json": '{"a": 0}', "merges.txt": "#version: 0.2\na b\n", "tokenizer.model": "sentencepiece bytes", "README.md": "# tiny\n",
}


def test_quantize_cli_keeps_every_other_file(tmp_path, capsys):
    src, out = tmp_path / "fp", tmp_path / "int4"
    torch.manual_seed(0)
    R1kitForCausalLM(tiny_config()).save_pretrained(src)
    for name, text in COMPANIONS.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "pytorch_model.bin").write_bytes(b"old float weights")  # weights: replaced, never copied
    (src / ".gitattributes").write_text("*.bin filter=lfs\n")  # hidden: left behind
    (src / "onnx").mkdir()  # directories: left behind
    # a group size that leaves a partial last group: the CLI takes it
    args = ["quantize", "--model", str(src), "--out", str(out), "--method", "rtn", "--group-size", "48", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    for name, text in COMPANIONS.items():
        assert (out / name).read_text(encoding="utf-8") == text, name
    assert not (out / "pytorch_model.bin").exists() and not (out / ".gitattributes").exists() and not (out / "onnx").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 48
    model = load_model(out)
    assert model.model.layers[0].self_attn.q_proj.scales.shape == (3, 128)
