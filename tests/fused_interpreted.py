"""The fused Triton kernels (``r1kit.fused``) on the CPU under Triton's interpreter, forward and
backward, against their PyTorch formulas written out here; and a model through them against the
plain model. Run by ``test_quant_triton.py`` in the same subprocess as ``triton_interpreted.py``
(``TRITON_INTERPRET=1``). The kernel code is the one a GPU runs; only its execution is emulated."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from r1kit.fused.apply import apply_fused_kernels, self_check, triton_ops
from r1kit.fused.layers import (
    FusedDecoderLayer,
    FusedGELUFFN,
    FusedLayerNorm,
    FusedRMSNorm,
    SwiGLUActivation,
)
from r1kit.fused.linear_gelu import linear_gelu
from r1kit.fused.residual_norm import add_norm
from r1kit.fused.swiglu import swiglu
from r1kit.model import R1kitForCausalLM

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_quant_triton.py (TRITON_INTERPRET=1)"

# max |Δ| as a share of max |reference|: float32 differs only in summation order; half precision
# rounds the inputs' products (the reference computes in float32 from the same rounded inputs)
RTOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def outputs_and_grads(fn, *inputs):
    """``fn``'s tensor outputs, then the gradients of its tensor inputs, under a fixed random cotangent."""
    leaves = [t if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    g = torch.Generator().manual_seed(1)
    sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]


def assert_close(got, want, dtype):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
        assert (a.double() - b.double()).abs().max() <= RTOL[dtype] * b.double().abs().max(), i


def naive_add_norm(x, delta, weight, bias, eps, rms):
    """The pre-norm step as the model's eager layers compute it, in float32 after the residual add."""
    h = x if delta is None else x + delta
    hf = h.float()
    if rms:
        y = hf / torch.sqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    else:
        y = F.layer_norm(hf, hf.shape[-1:], weight.float(), None if bias is None else bias.float(), eps)
    return y.to(torch.promote_types(h.dtype, weight.dtype)), (None if delta is None else h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
@pytest.mark.parametrize("shape,residual", [((2, 5, 64), True), ((7, 37), True), ((3, 100), False), ((1, 1, 1000), True)],
                         ids=["pow2", "odd-width", "no-residual", "wide-one-row"])
def test_add_norm_matches_its_formula(dtype, rms, shape, residual):
    g = torch.Generator().manual_seed(shape[-1])
    D = shape[-1]
    x, delta = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    weight, bias = (torch.randn(D, generator=g) + 1).to(dtype), None if rms else torch.randn(D, generator=g).to(dtype)
    d = delta if residual else None
    got = outputs_and_grads(lambda *t: add_norm(*t, 1e-5, rms), x, d, weight, bias)
    # the formula on float32 copies (gradients then cast to the inputs' dtypes, as the kernel returns them)
    want = outputs_and_grads(lambda *t: naive_add_norm(*t, 1e-5, rms), *(t if t is None else t.float() for t in (x, d, weight, bias)))
    want = [w.to(dtype) for w in want]
    assert_close(got, want, dtype)


def test_add_norm_mixed_dtypes_as_under_autocast():
    """A float32 residual plus a bfloat16 sublayer output: ``h`` float32, the gradient of each input in its dtype."""
    x, delta, weight = torch.randn(6, 48), torch.randn(6, 48).bfloat16(), torch.randn(48)
    got = outputs_and_grads(lambda *t: add_norm(*t, None, 1e-6, True), x, delta, weight)
    want = outputs_and_grads(lambda *t: naive_add_norm(*t, None, 1e-6, True), x, delta, weight)
    assert [t.dtype for t in got] == [torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float32]
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(4, 96), (3, 5, 1100), (1, 7)], ids=["pow2-ish", "two-blocks-odd", "tiny"])
def test_swiglu_matches_its_formula(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    gate, up = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    got = outputs_and_grads(swiglu, gate, up)
    want = [w.to(dtype) for w in outputs_and_grads(lambda a, b: a * torch.sigmoid(a) * b, gate.float(), up.float())]
    assert_close(got, want, dtype)


def test_swiglu_reads_the_halves_of_one_product_in_place():
    both = torch.randn(2, 3, 2 * 70)
    gate, up = both.chunk(2, dim=-1)  # strided views, as the engine's packed gate/up product gives
    got = outputs_and_grads(lambda b: swiglu(*b.chunk(2, dim=-1)), both)
    want = outputs_and_grads(lambda b: F.silu(b.chunk(2, dim=-1)[0]) * b.chunk(2, dim=-1)[1], both)
    assert not gate.is_contiguous()
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])  # the interpreter's bf16 dot is wrong
@pytest.mark.parametrize("rows,k,n", [(1, 48, 72), (5, 100, 130), (40, 64, 200), (2 * 9, 33, 17)],
                         ids=["decode-row", "odd-sizes", "many-rows", "17-wide"])
def test_linear_gelu_matches_its_formula(dtype, rows, k, n):
    g = torch.Generator().manual_seed(rows + k)
    x, w = torch.randn(rows, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    got = outputs_and_grads(linear_gelu, x, w)

    def formula(x, w):  # 0.5·u·(1 + tanh(√(2/π)·(u + 0.044715·u³)))
        u = x @ w.T
        return 0.5 * u * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (u + 0.044715 * u**3)))

    want = [t.to(dtype) for t in outputs_and_grads(formula, x.float(), w.float())]
    assert_close(got, want, dtype)


def test_linear_gelu_without_a_gradient_keeps_no_pre_activation():
    x, w = torch.randn(3, 4, 40), torch.randn(24, 40) / 40**0.5
    with torch.no_grad():
        y = linear_gelu(x, w)
    assert y.shape == (3, 4, 24) and y.grad_fn is None
    torch.testing.assert_close(y, F.gelu(x @ w.T, approximate="tanh"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])  # the interpreter's bf16 dot is wrong
def test_self_check_passes_under_the_interpreter(dtype):
    self_check(triton_ops(), torch.device("cpu"), dtype)


@pytest.mark.parametrize("kind", ["rmsnorm-swiglu", "layernorm-gelu"])
def test_a_model_through_the_kernels_equals_the_plain_model(tiny_config, kind):
    """Logits and every parameter's gradient, with the kernels swapped in (asked for on the CPU by passing them)."""
    overrides = {"rmsnorm-swiglu": {}, "layernorm-gelu": {"norm": "layernorm", "activation": "gelu"}}[kind]
    model = R1kitForCausalLM(tiny_config(hidden_size=40, intermediate_size=56, ffn=("dense", "topk"), **overrides))
    fused = copy.deepcopy(model)
    assert apply_fused_kernels(fused, ops=triton_ops()) == 8  # 2 layers, 4 norms + the final one, 1 dense FFN
    kinds = {type(m) for m in fused.modules()}
    assert FusedDecoderLayer in kinds and (FusedRMSNorm in kinds) == (kind == "rmsnorm-swiglu")
    assert (FusedLayerNorm in kinds and FusedGELUFFN in kinds) == (kind == "layernorm-gelu")
    assert any(isinstance(m, SwiGLUActivation) for m in fused.modules()) == (kind == "rmsnorm-swiglu")
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    want, got = model(tokens), fused(tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.logsumexp(-1).mean().backward()
    got.logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
