"""Top-K sparse FFN against the dense FFN, and its gather path against its masked path."""

import pytest
import torch

from r1kit.model.ffn import DenseFFN, TopKFFN
from r1kit.model.sparsity import SparsityControl, SparsityController
from r1kit.model.transformer import R1kitForCausalLM


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_topk_with_every_neuron_equals_dense(tiny_config, activation):
    cfg = tiny_config(activation=activation, ffn="topk", topk_sparsity=0.0)
    sparse = TopKFFN(cfg).eval()
    dense = DenseFFN(cfg).eval()
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse.forward_masked(x), dense(x))
        torch.testing.assert_close(sparse.forward_gather(x), dense(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("sparsity", [0.3, 0.6, 0.8, 0.95])
def test_gather_path_equals_masked_path(tiny_config, activation, sparsity):
    ffn = TopKFFN(tiny_config(activation=activation, ffn="topk", topk_sparsity=sparsity)).eval()
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(ffn.forward_gather(x), ffn.forward_masked(x), atol=1e-5, rtol=1e-5)


def test_masked_path_keeps_exactly_k_neurons(tiny_config):
    ffn = TopKFFN(tiny_config(ffn="topk", topk_sparsity=0.75))
    seen = {}
    ffn.down_proj.register_forward_hook(lambda mod, inp, out: seen.setdefault("h", inp[0]))
    ffn.eval()
    with torch.no_grad():
        ffn.forward_masked(torch.randn(5, 32))
    assert ((seen["h"] != 0).sum(-1) == ffn.k).all() and ffn.k == 12


def test_gather_path_chosen_only_for_few_tokens_at_inference(tiny_config):
    ffn = TopKFFN(tiny_config(ffn="topk", topk_gather_max_tokens=2)).eval()
    calls = []
    ffn.forward_gather = lambda x: calls.append("gather") or TopKFFN.forward_gather(ffn, x)
    with torch.no_grad():
        ffn(torch.randn(1, 2, 32))
        ffn(torch.randn(1, 3, 32))
    assert calls == ["gather"]


def test_gather_rebuilds_transposed_weights_after_an_update(tiny_config):
    ffn = TopKFFN(tiny_config(ffn="topk")).eval()
    x = torch.randn(1, 32)
    with torch.no_grad():
        ffn.forward_gather(x)
        ffn.down_proj.weight.mul_(2.0)
        torch.testing.assert_close(ffn.forward_gather(x), ffn.forward_masked(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["ste", "masked"])
def test_gradient_modes(tiny_config, mode):
    """masked: switched-off neurons get no gradient through up_proj; ste: they do."""
    ffn = TopKFFN(tiny_config(ffn="topk", topk_sparsity=0.9, topk_gradient=mode)).train()
    x = torch.randn(1, 32)
    ffn(x).sum().backward()
    grad_rows = (ffn.up_proj.weight.grad.abs().sum(-1) > 0).sum().item()
    if mode == "masked":
        assert grad_rows == ffn.k
    else:
        assert grad_rows == 48
    assert 0 < float(ffn.last_retained) <= 1


def test_controller_moves_toward_target_within_bounds(tiny_config):
    model = R1kitForCausalLM(tiny_config(ffn=["topk", "dense"], topk_sparsity=0.3, num_layers=2))
    ctl = SparsityController(model, SparsityControl(target=0.6, rate=0.5, retained_floor=0.0))
    model.train()
    trace = []
    for _ in range(20):
        model(torch.randint(0, 61, (2, 8)))
        trace.append(ctl.step(loss=3.0)[0])
    assert list(ctl.sparsities()) == [0]  # only the Top-K layer is controlled
    assert all(a <= b for a, b in zip(trace, trace[1:])) and abs(trace[-1] - 0.6) < 0.01
    assert model.model.layers[0].mlp.sparsity == trace[-1]


def test_controller_holds_back_unhealthy_layers_and_backs_off_on_loss_spikes(tiny_config):
    model = R1kitForCausalLM(tiny_config(ffn="topk", topk_sparsity=0.4))
    ctl = SparsityController(model, SparsityControl(rate=0.5, retained_floor=0.99))
    for _, ffn in model.topk_layers():
        ffn.last_retained = torch.tensor(0.6)  # far below the floor: no room to give up neurons
    ctl.step(1.0)
    assert ctl.sparsities() == {0: 0.4, 1: 0.4}
    ctl.step(5.0)  # the loss jumps: back off toward the lower bound
    assert all(0.3 <= s < 0.4 for s in ctl.sparsities().values())
    state = ctl.state_dict()
    other = SparsityController(model)
    other.load_state_dict(state)
    assert other.sparsities() == ctl.sparsities()


def test_gather_path_inside_inference_mode_and_across_modes(tiny_config):
    """Weights made under inference_mode have no version counter; buffers must not leak across modes."""
    cfg = tiny_config(ffn="topk", topk_sparsity=0.8)
    with torch.inference_mode():
        ffn = TopKFFN(cfg).eval()
        x = torch.randn(1, 32)
        torch.testing.assert_close(ffn.forward_gather(x), ffn.forward_masked(x), atol=1e-5, rtol=1e-5)
    built = TopKFFN(cfg).eval()
    x = torch.randn(1, 32)
    with torch.inference_mode():
        a = built.forward_gather(x)
    with torch.no_grad():
        torch.testing.assert_close(built.forward_gather(x), a)
