"""The fused kernels' application (``r1kit.fused``): the layer swap, its self-check and its fallback,
on the CPU with the kernels replaced by their PyTorch references; and on CUDA (skipped here) the
Triton kernels themselves in a model, a training step and the engine. The kernels against their
formulas run under Triton's interpreter in ``fused_interpreted.py`` (through ``test_quant_triton.py``)."""

import copy
import dataclasses
import json

import pytest
import torch
from devices import needs_cuda
from test_train import MODEL, make, shards  # noqa: F401 (shards: a module-scoped fixture, the training corpus)

from r1kit.fused import apply as fused_apply
from r1kit.fused.apply import apply_fused_kernels
from r1kit.fused.layers import (
    REFERENCE_OPS,
    FusedDecoderLayer,
    FusedGELUFFN,
    FusedLayerNorm,
    FusedRMSNorm,
    SwiGLUActivation,
)
from r1kit.infer.weight_packing import FusedGateUpFFN, pack_linears
from r1kit.model import R1kitForCausalLM
from r1kit.model.ffn import DenseFFN, TopKFFN
from r1kit.model.transformer import DecoderLayer

KINDS = {"rmsnorm-swiglu": {}, "layernorm-gelu": {"norm": "layernorm", "activation": "gelu"}}


def model_of(tiny_config, kind, **overrides):
    return R1kitForCausalLM(tiny_config(hidden_size=40, intermediate_size=56, ffn=("dense", "topk"), **KINDS[kind], **overrides))


def logits_and_grads(model, tokens):
    logits = model(tokens)
    logits.logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "activation-checkpointing"])
def test_swapped_model_equals_the_plain_model(tiny_config, kind, checkpointing):
    model = model_of(tiny_config, kind, dropout=0.0)
    model.gradient_checkpointing = checkpointing
    fused = copy.deepcopy(model)
    weights = [id(p) for p in fused.parameters()]
    assert apply_fused_kernels(fused, ops=REFERENCE_OPS) == 8  # 2 layers, 4 norms + the final one, the dense FFN
    assert [id(p) for p in fused.parameters()] == weights  # the variants hold the same parameters
    assert list(fused.state_dict()) == list(model.state_dict())  # names unchanged: checkpoints load as before
    layers = fused.model.layers
    assert all(type(layer) is FusedDecoderLayer for layer in layers)
    norm_cls = FusedRMSNorm if kind == "rmsnorm-swiglu" else FusedLayerNorm
    assert all(type(n) is norm_cls for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm))
    assert type(fused.model.norm) is norm_cls
    dense, topk = layers[0].mlp, layers[1].mlp
    assert type(topk) is TopKFFN  # Top-K keeps its own path
    assert isinstance(dense, SwiGLUActivation) if kind == "rmsnorm-swiglu" else type(dense) is FusedGELUFFN
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    want, want_grads = logits_and_grads(model.train(), tokens)
    got, got_grads = logits_and_grads(fused.train(), tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_layer_seam_is_the_eager_step(tiny_config):
    """``DecoderLayer.add_norm`` is exactly the residual add and the norm, so the eager model is unchanged."""
    layer = R1kitForCausalLM(tiny_config()).model.layers[0]
    x, delta = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    h, normed = layer.add_norm(x, delta, layer.post_attention_layernorm)
    assert torch.equal(h, x + delta) and torch.equal(normed, layer.post_attention_layernorm(x + delta))


def test_a_trained_step_through_the_swapped_model_moves_the_same_weights(tiny_config):
    model = model_of(tiny_config, "rmsnorm-swiglu", dropout=0.0)
    fused = copy.deepcopy(model)
    apply_fused_kernels(fused, ops=REFERENCE_OPS)
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    for m in (model, fused):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            m(tokens).logsumexp(-1).mean().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5, msg=name)


def test_swiglu_goes_over_the_engines_packed_gate_up_product(tiny_config):
    model = model_of(tiny_config, "rmsnorm-swiglu").eval()
    packed = copy.deepcopy(model)
    pack_linears(packed)
    if type(packed.model.layers[0].mlp) is not FusedGateUpFFN:
        pytest.skip("no oneDNN packing on this CPU")
    assert apply_fused_kernels(packed, ops=REFERENCE_OPS) == 8
    mlp = packed.model.layers[0].mlp
    assert isinstance(mlp, SwiGLUActivation) and isinstance(mlp, FusedGateUpFFN)  # the packed product is kept
    assert apply_fused_kernels(packed, ops=REFERENCE_OPS) == 0  # applied twice: nothing more to swap
    tokens = torch.randint(0, 61, (1, 7))
    with torch.inference_mode():
        torch.testing.assert_close(packed(tokens), model(tokens), atol=1e-4, rtol=1e-4)


def test_a_failing_self_check_leaves_the_model_as_it_was(tiny_config, caplog):
    def off_by_five_percent(x, delta, weight, bias, eps, rms):
        y, h = REFERENCE_OPS.add_norm(x, delta, weight, bias, eps, rms)
        return y * 1.05, h

    broken = dataclasses.replace(REFERENCE_OPS, add_norm=off_by_five_percent)
    model = model_of(tiny_config, "rmsnorm-swiglu")
    before = {n: type(m) for n, m in model.named_modules()}
    with caplog.at_level("WARNING"):
        assert apply_fused_kernels(model, ops=broken) == 0
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert "fused kernels not applied" in caplog.text and "add_norm(rms=True, residual=True)" in caplog.text


def test_kernels_that_crash_fall_back_too(tiny_config, caplog):
    def crashes(x, weight):
        raise RuntimeError("PTX assembly failed")

    model = model_of(tiny_config, "layernorm-gelu")
    with caplog.at_level("WARNING"):
        assert apply_fused_kernels(model, ops=dataclasses.replace(REFERENCE_OPS, linear_gelu=crashes)) == 0
    assert "PTX assembly failed" in caplog.text and not any(type(m) is FusedGELUFFN for m in model.modules())


def test_the_triton_kernels_are_applied_on_cuda_only(tiny_config, caplog):
    model = model_of(tiny_config, "rmsnorm-swiglu")
    with caplog.at_level("WARNING"):
        assert apply_fused_kernels(model) == 0
    assert "run on CUDA; the model is on cpu" in caplog.text
    assert all(type(m) in (DecoderLayer, DenseFFN, TopKFFN) for m in model.modules() if isinstance(m, (DecoderLayer, DenseFFN)))
    assert fused_apply.unavailable(REFERENCE_OPS, torch.device("cpu"), [torch.float32]) is None


# -- CUDA: the Triton kernels themselves (skipped without a GPU) ---------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_kernels_on_cuda(tiny_config, kind, dtype):
    """The Triton kernels swapped into a CUDA model (after their self-check there): logits and
    gradients as the plain model's, and the engine's copy runs them with the same greedy tokens."""
    from r1kit import LLM, SamplingParams

    model = model_of(tiny_config, kind, dropout=0.0, hidden_size=96, intermediate_size=200).to("cuda", dtype)
    fused = copy.deepcopy(model)
    assert apply_fused_kernels(fused) == 8
    tokens = torch.randint(0, 61, (2, 33), device="cuda")
    want, want_grads = logits_and_grads(model, tokens)
    got, got_grads = logits_and_grads(fused, tokens)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(got, want, **tol)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name].float(), grad.float(), **{k: 5 * v for k, v in tol.items()}, msg=name)
    llm = LLM(model.eval(), num_kv_blocks=16)
    assert any(isinstance(m, FusedDecoderLayer) for m in llm.llm_engine.model.modules())
    if dtype == torch.float32:  # bfloat16 greedy tokens may flip on a rounding step
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        from r1kit.infer.generate import generate

        assert llm.generate([[3, 5, 7, 9]], params)[0].outputs[0].token_ids == generate(model, [3, 5, 7, 9], params)


# -- the trainer's switch ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_trainer_switch(shards, tmp_path, device, caplog):  # noqa: F811
    """``train.fused_kernels``: on CUDA the trained model runs the kernels, its losses as without them
    (bfloat16 autocast); on the CPU the run says why not and trains its eager layers."""
    from r1kit.train.trainer import Trainer

    model = dataclasses.replace(MODEL, ffn="dense", dropout=0.0)
    steps = 1 if device == "cpu" else 3
    runs = {}
    for fused in ((True,) if device == "cpu" else (False, True)):
        cfg = make(shards, tmp_path / str(fused), device=device, precision="bf16", fused_kernels=fused, max_steps=steps, save_every=10)
        with caplog.at_level("WARNING"):
            trainer = Trainer(model, cfg)
            trainer.run()
        runs[fused] = [json.loads(line)["loss"] for line in (tmp_path / str(fused) / "metrics.jsonl").read_text().splitlines()]
        assert any(isinstance(m, FusedDecoderLayer) for m in trainer.model.modules()) == (device == "cuda" and fused)
    assert len(runs[True]) == steps
    if device == "cpu":
        assert "run on CUDA; the model is on cpu" in caplog.text
    else:
        assert runs[True] == pytest.approx(runs[False], rel=2e-2)
