"""GPTQ checkpoints: r1kit's own round trip, one written by hand as another tool would, and clear
errors for corrupt or mismatched ones."""

import json

import numpy as np
import pytest
import torch
from devices import DEVICES
from safetensors.torch import load_file, save_file
from test_quant_helpers import markov_tokens, one_thread, trained_model  # noqa: F401 (one_thread: an autouse fixture)

from r1kit.errors import CheckpointError
from r1kit.infer.generate import generate
from r1kit.infer.sampling import SamplingParams
from r1kit.checkpoints import load_model
from r1kit.model.hf import config_from_hf
from r1kit.model.transformer import R1kitForCausalLM
from r1kit.quant import QuantLinear, QuantConfig, quantize_model, save_quantized

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    """A GPTQ-quantized tiny trained model on disk, and its fake-quantized float twin."""
    model = trained_model()
    config = QuantConfig(group_size=64)
    results = quantize_model(model, config, markov_tokens(16, 64, seed=1), batch_size=8)
    path = tmp_path_factory.mktemp("gptq")
    save_quantized(model, path, config, results)
    return path, model


def test_own_checkpoint_round_trip_and_generate(quantized_dir):
    path, fake = quantized_dir
    raw = json.loads((path / "config.json").read_text())
    qc = raw["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    assert json.loads((path / "quantize_config.json").read_text()) == qc
    tensors = load_file(str(path / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.qweight"].dtype == torch.int32 and tensors[f"{q}.qweight"].shape == (128 // 8, 128)
    assert tensors[f"{q}.qzeros"].shape == (2, 128 // 8) and tensors[f"{q}.scales"].dtype == torch.float16
    assert tensors[f"{q}.g_idx"].tolist() == [i // 64 for i in range(128)]
    assert bool((tensors[f"{q}.qzeros"] == 0x77777777).all())  # symmetric v1: zero 8 stored as 7
    assert f"{q}.weight" not in tensors and "lm_head.weight" in tensors

    model = load_model(path)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.quantization_config.group_size == 64
    prompt = markov_tokens(1, 6, seed=9)[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(_dequant(model)(torch.tensor([prompt])), fake(torch.tensor([prompt])), atol=1e-5, rtol=1e-4)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = "auto"
    assert generate(model, prompt, GREEDY) == generate(fake, prompt, GREEDY)


def _dequant(model):
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = "dequant"
    return model


# -- a checkpoint written as another tool writes it --------------------------------------------------------
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float16",
}


def pack_by_hand(codes_in_out: np.ndarray, zeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The v1 layout from its definition, word by word (independent of r1kit.quant.packing)."""
    n_in, n_out = codes_in_out.shape
    qweight = np.zeros((n_in // 8, n_out), dtype=np.uint32)
    for r in range(n_in // 8):
        for j in range(8):
            qweight[r] |= codes_in_out[8 * r + j].astype(np.uint32) << np.uint32(4 * j)
    stored = (zeros - 1).astype(np.uint32)  # v1: zero - 1
    qzeros = np.zeros((zeros.shape[0], n_out // 8), dtype=np.uint32)
    for c in range(n_out // 8):
        for j in range(8):
            qzeros[:, c] |= stored[:, 8 * c + j] << np.uint32(4 * j)
    return qweight.view(np.int32), qzeros.view(np.int32)


def write_third_party(path, group_size=32, act_order=False, in_config_json=False, hf_config=LLAMA):
    """A GPTQ checkpoint of ``hf_config`` as AutoGPTQ/GPTQModel write one, packed by hand, and the float
    model its weights stand for. A group size that does not divide a layer's inputs leaves a partial
    last group (GPTQModel's layout: ⌈in/g⌉ groups, g_idx = i // g)."""
    rng = np.random.default_rng(0)
    config = config_from_hf(hf_config)
    with torch.device("meta"):
        skeleton = R1kitForCausalLM(config)
    tensors, float_weights = {}, {}
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            n_in, n_out = module.in_features, module.out_features
            groups = -(-n_in // group_size)
            codes = rng.integers(0, 16, size=(n_in, n_out))
            zeros = rng.integers(1, 16, size=(groups, n_out))
            scales = rng.uniform(0.005, 0.03, size=(groups, n_out)).astype(np.float16)
            g_idx = np.arange(n_in) // group_size
            if act_order:
                g_idx = rng.permutation(g_idx)
            qweight, qzeros = pack_by_hand(codes, zeros)
            tensors.update({f"{name}.qweight": torch.from_numpy(qweight), f"{name}.qzeros": torch.from_numpy(qzeros),
                            f"{name}.scales": torch.from_numpy(scales), f"{name}.g_idx": torch.from_numpy(g_idx.astype(np.int32))})
            w = scales.astype(np.float32)[g_idx] * (codes - zeros[g_idx])  # [in, out]
            float_weights[f"{name}.weight"] = torch.from_numpy(w.T.copy())
    for name, p in skeleton.state_dict().items():
        if f"{name}" not in float_weights and not name.rsplit(".", 1)[0].endswith("_proj"):
            t = torch.randn(p.shape) * 0.5 if "norm" not in name else torch.ones(p.shape)
            tensors[name] = t.half()
            float_weights[name] = t.half().float()
    save_file(tensors, str(path / f"gptq_model-4bit-{group_size}g.safetensors"), metadata={"format": "pt"})
    quant = {"bits": 4, "group_size": group_size, "damp_percent": 0.01, "desc_act": act_order, "static_groups": False,
             "sym": False, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq",
             "checkpoint_format": "gptq"}
    raw = dict(hf_config, quantization_config=quant) if in_config_json else hf_config
    (path / "config.json").write_text(json.dumps(raw))
    if not in_config_json:
        (path / "quantize_config.json").write_text(json.dumps(quant))
    reference = R1kitForCausalLM(config).eval()
    reference.load_state_dict(float_weights)
    return reference


@pytest.mark.parametrize("act_order,in_config_json", [(False, False), (True, True)])
def test_third_party_checkpoint_loads_and_generates(tmp_path, act_order, in_config_json):
    reference = write_third_party(tmp_path, act_order=act_order, in_config_json=in_config_json)
    model = load_model(tmp_path, dtype=torch.float32)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.group_size == 32
    torch.testing.assert_close(layer.dequantized_weight(), reference.model.layers[0].mlp.down_proj.weight)
    tokens = torch.tensor([[5, 17, 42, 8, 90]])
    with torch.no_grad():
        kernel = model(tokens)
        torch.testing.assert_close(_dequant(model)(tokens), reference(tokens), atol=1e-4, rtol=1e-4)
        ref = reference(tokens)
    assert (kernel - ref).abs().max() <= 2e-2 * ref.abs().max()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = "auto"
    out = generate(model, [5, 17, 42], GREEDY)
    assert len(out) == 8 and out == generate(reference, [5, 17, 42], GREEDY)


# -- corrupt and mismatched checkpoints --------------------------------------------------------------------
def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def _edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


Q = "model.layers.0.self_attn.q_proj"
CORRUPT = {
    "bits-3": (lambda p: _edit_config(p, bits=3), r"bits=3; r1kit's GPTQ layers run 4 and 8-bit checkpoints only"),
    # a group size other than the tensors' (one that leaves a partial group): the group count disagrees
    "group-size-mismatch": (lambda p: _edit_config(p, group_size=48), r"qzeros has shape \(\d+, 16\), expected \(\d+, 16\) .*group_size=48"),
    "group-zero": (lambda p: _edit_config(p, group_size=0), r"group_size=0 must be a positive integer or -1"),
    "format": (lambda p: _edit_config(p, checkpoint_format="marlin"), r"checkpoint_format='marlin' is not supported"),
    "group-type": (lambda p: _edit_config(p, group_size="128"), r"group_size='128' must be a positive integer"),
    "qweight-shape": (lambda p: _edit_tensors(p, lambda t: t.__setitem__(f"{Q}.qweight", t[f"{Q}.qweight"][:8])),
                      r"q_proj.qweight has shape \(8, 128\), expected \(16, 128\) \(\[in·bits/32, out\]"),
    "scales-shape": (lambda p: _edit_tensors(p, lambda t: t.__setitem__(f"{Q}.scales", t[f"{Q}.scales"][:, :64].contiguous())),
                     r"q_proj.scales has shape \(2, 64\), expected \(2, 128\)"),
    "missing-qzeros": (lambda p: _edit_tensors(p, lambda t: t.pop(f"{Q}.qzeros")), r"q_proj.qweight has no .*q_proj.qzeros"),
    "g_idx-range": (lambda p: _edit_tensors(p, lambda t: t.__setitem__(f"{Q}.g_idx", t[f"{Q}.g_idx"] + 5)), r"g_idx holds groups 5..6 but there are 2 groups"),
    "float-qweight": (lambda p: _edit_tensors(p, lambda t: t.__setitem__(f"{Q}.qweight", t[f"{Q}.qweight"].float())), r"qweight has dtype torch.float32; GPTQ stores it as int32"),
    "stray-qweight": (lambda p: _edit_tensors(p, lambda t: t.__setitem__("model.layers.0.input_layernorm.qweight", t[f"{Q}.qweight"].clone())),
                      r"input_layernorm.qweight names no linear layer"),
}


def test_a_float16_checkpoint_runs_on_the_cpu_engine_as_bfloat16(tmp_path):
    """Most GPTQ checkpoints from other tools say float16: the engine on the CPU runs them as bfloat16
    (r1kit's CPU kernels, as vLLM's CPU backend), with the int4 layers on the int4 kernel."""
    from r1kit import LLM
    from r1kit.quant.int4_linear import FusedInt4Linear

    write_third_party(tmp_path, act_order=False, in_config_json=True)
    model = load_model(tmp_path)
    assert model.dtype == torch.float16  # loading keeps the checkpoint's dtype
    scales = {name: m.scales.clone() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    inv_freq = model.rotary.inv_freq.clone()
    want = generate(load_model(tmp_path, dtype=torch.bfloat16), [5, 17, 42], GREEDY)
    llm = LLM(model, max_num_seqs=1, num_kv_blocks=16)
    assert model.dtype == torch.float16  # the caller's model is left as it was; the engine runs a bfloat16 copy
    model = llm.llm_engine.model
    assert model.dtype == torch.bfloat16
    # the cast rounds neither the checkpoint's scales nor the rotary frequencies through bfloat16
    assert all(torch.equal(model.get_submodule(name).scales, s) for name, s in scales.items())
    assert model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.rotary.inv_freq, inv_freq)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, FusedInt4Linear)
    assert llm.generate([[5, 17, 42]], GREEDY)[0].outputs[0].token_ids == want


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_or_mismatched_checkpoint_gives_clear_error(quantized_dir, tmp_path, case):
    path = _copy(quantized_dir[0], tmp_path)
    damage, message = CORRUPT[case]
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


@pytest.mark.parametrize("device", DEVICES)
def test_engine_serves_a_quantized_checkpoint(quantized_dir, device):
    from r1kit.infer.llm import LLM

    path, _ = quantized_dir
    model = load_model(path, device=device)
    prompts = [markov_tokens(1, n, seed=s)[0].tolist() for n, s in ((5, 11), (9, 12))]
    llm = LLM(path, block_size=4, device=device)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == generate(model, prompt, GREEDY)
