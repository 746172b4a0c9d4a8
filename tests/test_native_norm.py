"""The one-call RMSNorm of CPU inference: against the model's own RMSNorm (float32 and bfloat16, one
row and many, contiguous or not), the way back to PyTorch's where it does not apply, and the swap
the engine makes."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit import LLM
from r1kit.infer import native_norm
from r1kit.model import R1kitForCausalLM
from r1kit.model.transformer import RMSNorm

KERNEL = native_norm.load()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C compiler: the model keeps PyTorch's rms_norm")


def pair(dim: int, dtype: torch.dtype, seed: int = 0) -> tuple[RMSNorm, native_norm.NativeRMSNorm]:
    norm = RMSNorm(dim, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    norm = norm.to(dtype)
    return norm, native_norm.NativeRMSNorm(norm)


@settings(max_examples=40, deadline=None)
@given(rows=st.sampled_from([1, 3, 17, 200]), dim=st.sampled_from([8, 64, 768, 1000]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2**16))
def test_equals_the_models_rmsnorm(rows, dim, dtype, scale, seed):
    norm, fast = pair(dim, dtype, seed)
    x = (torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    with torch.inference_mode():
        want, got = norm(x), fast(x)
    assert got.dtype == dtype and got.shape == x.shape
    # float32: the sum of squares in another order; bfloat16: the normed value may round one step
    # apart, and its product with the weight one more (a step is at most 2^-7 of the value)
    tolerance = 1e-6 if dtype == torch.float32 else 2 * 2**-7
    assert ((got.float() - want.float()).abs() <= tolerance * want.float().abs().clamp_min(1e-30) + 1e-30).all()


def test_strided_and_batched_inputs_and_the_parallel_path():
    norm, fast = pair(768, torch.float32)
    x = torch.randn(4, 200, 768)  # 614,400 elements: rows spread over threads
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), norm(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fast(x[:, ::7]), norm(x[:, ::7]), rtol=1e-6, atol=1e-6)  # the model's `x[:, select]`


def test_gradients_and_other_dtypes_go_pytorchs_way():
    norm, fast = pair(64, torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    fast(x).sum().backward()
    want = x.grad.clone()
    x.grad = None
    norm(x).sum().backward()
    torch.testing.assert_close(want, x.grad)
    # a gradient for the weight alone (frozen inputs) is kept too
    y = fast(torch.randn(3, 64))
    assert y.requires_grad
    y.sum().backward()
    assert fast.weight.grad is not None
    half = torch.randn(3, 64).half()
    torch.testing.assert_close(fast.to(torch.float16)(half), norm.to(torch.float16)(half))
    with pytest.raises(ValueError, match="of one dtype"):
        KERNEL(torch.randn(2, 64), torch.ones(64, dtype=torch.bfloat16), 1e-6)


def test_the_swap_keeps_the_norms_weights_and_results(tiny_config):
    model = R1kitForCausalLM(tiny_config()).eval()
    plain = copy.deepcopy(model)  # the reference: never swapped
    state = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.model.layers[0].input_layernorm.weight
    assert native_norm.use_native_norms(model) == 5
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(isinstance(m, native_norm.NativeRMSNorm) for m in norms)
    assert model.model.layers[0].input_layernorm.weight is weight  # the same parameter, under the same name
    assert set(model.state_dict()) == set(state) and not any(m.training for m in norms)
    copy.deepcopy(model.model.norm)  # holds no library handle: copies and pickles like any module
    assert not any(isinstance(m, native_norm.NativeRMSNorm) for m in plain.modules())
    tokens = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), plain(tokens), rtol=1e-4, atol=1e-4)


def test_the_engine_swaps_its_copys_norms_not_the_callers(tiny_config):
    model = R1kitForCausalLM(tiny_config()).eval()
    engine_model = LLM(model, num_kv_blocks=16).llm_engine.model
    norms = [m for m in engine_model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(isinstance(m, native_norm.NativeRMSNorm) for m in norms)
    assert all(type(m) is RMSNorm for m in model.modules() if isinstance(m, RMSNorm))
