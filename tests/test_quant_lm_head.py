"""A quantized output head (``QuantConfig.lm_head``, ``r1kit quantize --quantize-lm-head``), 4 and 8 bits,
tied and untied: the logits against a float model holding the dequantized weights, the tied embedding
left in float, the checkpoint read back by ``load_model`` and served by the engine, and the command line."""

import copy
import dataclasses
import json

import pytest
import torch
from test_quant_helpers import markov_tokens, one_thread, trained_model  # noqa: F401 (one_thread: an autouse fixture)

from r1kit.checkpoints import load_model
from r1kit.cli import main
from r1kit.infer.engine import EngineConfig, LLMEngine
from r1kit.infer.sampling import SamplingParams
from r1kit.model.transformer import R1kitForCausalLM
from r1kit.quant import (
    QuantConfig,
    QuantLinear,
    packing,
    quantize_model,
    save_quantized,
    to_quantized,
)

TOKENS = markov_tokens(2, 24, seed=5)
# the int8 kernel rounds activations to int8 per block of 32, the int4 one to bfloat16
RTOL = {4: 1e-2, 8: 2e-2}


def tied(model: R1kitForCausalLM) -> R1kitForCausalLM:
    """``model`` with its head tied to its embedding (the trained model's untied weights, one training shared)."""
    model.config = dataclasses.replace(model.config, tie_embeddings=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def dequantized_reference(model: R1kitForCausalLM, float_embedding: torch.Tensor) -> R1kitForCausalLM:
    """A plain float model (untied) whose every linear holds its quantized layer's dequantized weight:
    :func:`r1kit.quant.packing.dequantize` on the stored tensors and ``F.linear``, no kernel."""
    reference = R1kitForCausalLM(model.config)
    state = {}
    for key, tensor in model.state_dict().items():
        name, _, kind = key.rpartition(".")
        if kind in ("qzeros", "scales", "g_idx"):
            continue
        if kind == "qweight":
            layer = model.get_submodule(name)
            state[f"{name}.weight"] = packing.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.zero_offset)
        else:
            state[key] = tensor
    reference.load_state_dict(state)
    assert torch.equal(reference.model.embed_tokens.weight, float_embedding)
    return reference.eval()


def logits_close(got: torch.Tensor, want: torch.Tensor, bits: int) -> None:
    assert float((got - want).abs().max()) <= RTOL[bits] * float(want.abs().max())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_quantized_head_runs_its_codes_and_keeps_the_embedding_float(tie, bits):
    model = tied(trained_model()) if tie else trained_model()
    embedding = model.model.embed_tokens.weight.detach().clone()
    config = QuantConfig(bits=bits, group_size=32, method="rtn", lm_head=True)
    results = quantize_model(model, config)
    assert "lm_head" in results and not model.config.tie_embeddings
    quantized = to_quantized(model, results, config)
    head = quantized.lm_head
    assert isinstance(head, QuantLinear) and head.bits == bits and head.out_features == model.config.vocab_size
    assert head.qweight.data_ptr() != quantized.model.embed_tokens.weight.data_ptr()
    reference = dequantized_reference(quantized, embedding)
    with torch.no_grad():
        logits_close(quantized(TOKENS), reference(TOKENS), bits)


def test_gptq_calibrates_the_head_on_the_final_norms_outputs():
    model = tied(trained_model())
    quantize_model(model, QuantConfig(bits=4, group_size=32, lm_head=True), markov_tokens(16, 32, seed=1))
    record = model.quant_errors["lm_head"]
    assert 0 < record["output_error"] < 0.05


@pytest.fixture(scope="module")
def head_checkpoint(tmp_path_factory):
    """A tied model with its head quantized to 8 bits (RTN), saved; and the in-memory quantized model."""
    path = tmp_path_factory.mktemp("lm_head") / "q8"
    model = tied(trained_model())
    config = QuantConfig(bits=8, group_size=32, method="rtn", lm_head=True)
    results = quantize_model(model, config)
    save_quantized(model, path, config, results)
    return path, to_quantized(model, results, config)


def test_the_checkpoint_is_untied_and_loads_to_the_same_logits(head_checkpoint):
    path, quantized = head_checkpoint
    raw = json.loads((path / "config.json").read_text())
    assert raw["tie_word_embeddings"] is False and raw["quantization_config"]["lm_head"] is True
    assert json.loads((path / "quantize_config.json").read_text())["lm_head"] is True
    loaded = load_model(path)
    assert isinstance(loaded.lm_head, QuantLinear) and type(loaded.model.embed_tokens) is torch.nn.Embedding
    assert loaded.quantization_config.lm_head
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), quantized(TOKENS))


def test_a_tied_config_with_a_quantized_head_is_read_untied(head_checkpoint, tmp_path):
    """Another writer may keep ``tie_word_embeddings: true`` beside ``lm_head.qweight``."""
    path, quantized = head_checkpoint
    copy_dir = tmp_path / "tied"
    copy_dir.mkdir()
    for file in path.iterdir():
        (copy_dir / file.name).write_bytes(file.read_bytes())
    raw = json.loads((copy_dir / "config.json").read_text())
    raw["tie_word_embeddings"] = True
    (copy_dir / "config.json").write_text(json.dumps(raw))
    loaded = load_model(copy_dir)
    assert not loaded.config.tie_embeddings and isinstance(loaded.lm_head, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), quantized(TOKENS))


def test_the_engine_serves_a_quantized_head_with_the_module_paths_tokens(head_checkpoint):
    from r1kit.infer.generate import generate

    path, _ = head_checkpoint
    model = load_model(path)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    prompts = [TOKENS[0, :10].tolist(), TOKENS[1, :7].tolist()]
    want = [generate(copy.deepcopy(model), p, params) for p in prompts]
    engine = LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=40))
    assert isinstance(engine.model.lm_head, QuantLinear) and engine.model.lm_head._frozen is not None  # packed: the kernel fixed
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    got = {}
    while engine.has_unfinished_requests():
        got.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
    assert [got[str(i)] for i in range(len(prompts))] == want


def test_quantize_cli_int8_with_the_head(tmp_path):
    model = tied(trained_model())
    model.save_pretrained(tmp_path / "fp")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tmp_path / "fp"), "--out", str(out), "--method", "rtn", "--bits", "8",
                 "--group-size", "32", "--quantize-lm-head", "--no-progress"]) == 0
    loaded = load_model(out)
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.bits == 8
    assert loaded.model.layers[0].mlp.down_proj.bits == 8
    with torch.no_grad():
        logits_close(loaded(TOKENS), model(TOKENS), 8)
