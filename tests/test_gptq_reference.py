"""GPTQ against a slow reference written here from the paper, and against RTN, on a small trained model.

The reference (Frantar et al. 2022, the OBS update of section 3 without its lazy blocks or Cholesky
trick) quantizes one column at a time in float64, keeps the explicit inverse Hessian of the columns
not yet quantized and removes each quantized column from it by Gaussian elimination. It shares no
code with r1kit: its grid, its clipping search and its column orders are written below. Every
option (damp, static groups, act-order, act-group-aware order, the clipping search, partial and
per-channel groups) is held to it on real layer inputs.
"""

import pytest
import torch
from test_quant_helpers import markov_tokens, one_thread, trained_model  # noqa: F401 (one_thread: an autouse fixture)

from r1kit.errors import ConfigError
from r1kit.quant import QuantConfig, quantize_model
from r1kit.quant.gptq import gptq_quantize, inverse_cholesky, output_error
from r1kit.quant.rtn import quantize_rtn

MAXQ = 15  # 4 bits


# -- the reference ---------------------------------------------------------------------------------------
def ref_grid(w: torch.Tensor, sym: bool, mse: float, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero spanning [min(w, 0), max(w, 0)] (fp16 scales), shrunk by the best of
    1.00, 0.99, … 0.21 for Σ weights·|error|^mse when ``mse`` > 0."""
    xmin, xmax = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin[flat], xmax[flat] = -1.0, 1.0
    best = None
    for p in [1 - k / 100 for k in range(80)] if mse > 0 else [1.0]:
        scale = ((p * xmax - p * xmin) / MAXQ).clamp(min=1e-7).half().double()
        zero = torch.full_like(scale, 8.0) if sym else torch.round(-p * xmin / scale).clamp(1, MAXQ)
        err = ((ref_dequant(w, scale, zero) - w).abs() ** mse * weights).sum(1) if mse > 0 else torch.zeros_like(scale)
        if best is None:
            best = [err, scale, zero]
        else:
            better = err < best[0]
            for slot, new in enumerate((err, scale, zero)):
                best[slot] = torch.where(better, new, best[slot])
    return best[1], best[2]


def ref_dequant(w, scale, zero):
    q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, MAXQ)
    return scale[:, None] * (q - zero[:, None])


def ref_order(diag: list[float], size: int, order: str) -> list[int]:
    cols = list(range(len(diag)))
    if order == "desc_act":
        return sorted(cols, key=lambda c: -diag[c])
    if order == "act_group_aware":
        groups = [cols[g : g + size] for g in range(0, len(cols), size)]
        groups = sorted(groups, key=lambda g: -max(diag[c] for c in g))
        return [c for g in groups for c in sorted(g, key=lambda c: -diag[c])]
    return cols


def reference_gptq(weight, H, size, damp=0.01, order="natural", static=False, mse=0.0, sym=True):
    """The dequantized weight, column by column with the explicit OBS update."""
    W, H = weight.double().clone(), H.double().clone()
    cols = W.shape[1]
    size = cols if size == -1 else size
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = H.diagonal().clone()
    sequence = ref_order(diag.tolist(), size, order)
    group = {c: c // size for c in range(cols)}
    if order == "desc_act" and not static:  # dynamic act-order groups: runs of `size` columns of the sweep
        group = {c: k // size for k, c in enumerate(sequence)}
    members = {}
    for c in sequence:
        members.setdefault(group[c], []).append(c)
    grids = {}
    if static:
        for g, cs in members.items():
            cs = sorted(cs)
            grids[g] = ref_grid(W[:, cs], sym, mse, diag[cs])
    Hinv = torch.linalg.inv(H + damp * diag.mean() * torch.eye(cols, dtype=H.dtype))
    Q = torch.zeros_like(W)
    for k, c in enumerate(sequence):
        g = group[c]
        if g not in grids:  # a group's grid from the weights as they stand when the sweep reaches it
            grids[g] = ref_grid(W[:, members[g]], sym, mse, diag[members[g]])
        scale, zero = grids[g]
        Q[:, c] = ref_dequant(W[:, c : c + 1], scale, zero)[:, 0]
        err = (W[:, c] - Q[:, c]) / Hinv[c, c]
        rest = sequence[k + 1 :]
        W[:, rest] -= err[:, None] * Hinv[c, rest][None, :]
        Hinv = Hinv - Hinv[:, c : c + 1] @ Hinv[c : c + 1, :] / Hinv[c, c]
    return Q


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layer_inputs():
    """A trained model's layer-0 q_proj and down_proj with their inputs on calibration text."""
    model = trained_model()
    xs = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda _m, inp, _o, n=n: xs.__setitem__(n, inp[0].reshape(-1, inp[0].shape[-1])))
             for n in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")]
    with torch.no_grad():
        model(markov_tokens(16, 32, seed=1))
    for h in hooks:
        h.remove()
    return {n: (model.get_submodule(n).weight.detach().clone(), x) for n, x in xs.items()}


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.double().T @ x.double()


def direct_error(x, weight, quantized) -> float:
    """‖X(W − Q)ᵀ‖² / ‖XWᵀ‖², straight from the inputs."""
    x, weight, quantized = x.double(), weight.detach().double(), quantized.detach().double()
    return float((x @ (quantized - weight).T).pow(2).sum() / (x @ weight.T).pow(2).sum())


OPTIONS = {  # on top of the defaults: act-group-aware order, damp 0.05, the clipping search (mse 2.4)
    "defaults": dict(),
    "damp 0.01": dict(damp_percent=0.01),
    "damp 0.2": dict(damp_percent=0.2),
    "act-order": dict(desc_act=True, act_group_aware=False),
    "act-order + static groups": dict(desc_act=True, act_group_aware=False, static_groups=True),
    "static groups": dict(static_groups=True, act_group_aware=False),
    "no clipping search": dict(mse=0.0),
    "r1kit's former defaults": dict(damp_percent=0.01, act_group_aware=False, mse=0.0),
    "asymmetric": dict(sym=False),
    "partial last group": dict(group_size=48),
    "per channel": dict(group_size=-1),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_gptq_matches_the_reference(layer_inputs, option):
    config = QuantConfig(**{"group_size": 32, **OPTIONS[option]})
    order = "desc_act" if config.desc_act else "act_group_aware" if config.act_group_aware else "natural"
    # q_proj (128 inputs) for every option; down_proj (256) too where its width matters
    names = list(layer_inputs) if option in ("defaults", "partial last group") else ["model.layers.0.self_attn.q_proj"]
    for name in names:
        weight, x = layer_inputs[name]
        H = hessian(x)
        result, damp = gptq_quantize(weight, H.float(), config)
        assert damp == config.damp_percent
        ours = result.weight()
        want = reference_gptq(weight, H, config.group_size, config.damp_percent, order, config.static_groups, config.mse, config.sym)
        same = float((ours.double() - want).abs().le(1e-5 * weight.abs().max()).double().mean())
        assert same >= 0.98, (name, same)  # a float32 rounding tie may flip a code and what follows it in its row
        ours_err, ref_err, rtn_err = (direct_error(x, weight, q) for q in (ours, want, quantize_rtn(weight, config).weight()))
        assert ours_err <= 1.02 * ref_err, (name, ours_err, ref_err)
        assert ours_err <= rtn_err, (name, ours_err, rtn_err)
        assert output_error(weight, ours, H.float()) == pytest.approx(ours_err, rel=1e-3)
        g_idx = result.g_idx.long()
        contiguous = bool((g_idx == torch.arange(weight.shape[1]) // (config.group_size if config.group_size > 0 else weight.shape[1])).all())
        assert contiguous == (not config.desc_act or config.static_groups), name  # only dynamic act-order permutes groups


def test_damp_grows_until_the_factorization_succeeds():
    eigen = torch.linspace(-0.03, 2.0, 64).double()  # one negative eigenvalue: 3% of the largest (mean diag ~1)
    basis, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    H = (basis * eigen) @ basis.T
    mean = float(H.diagonal().mean())
    U, damp = inverse_cholesky(H.float(), 0.01, 0.01)
    assert damp * mean > 0.03 and (damp - 0.01) * mean <= 0.03 + 1e-6  # the first step of the grid that makes H positive
    torch.testing.assert_close(U.double().T @ U.double(), torch.linalg.inv(H + damp * mean * torch.eye(64, dtype=torch.float64)),
                               rtol=1e-3, atol=1e-3 * float(U.abs().max()) ** 2)
    with pytest.raises(ConfigError, match="not positive definite even with damp"):
        inverse_cholesky(H.float(), 0.01, 0.0)


@pytest.mark.parametrize("options", [dict(), dict(desc_act=True, act_group_aware=False, static_groups=True)], ids=["defaults", "act-order+static"])
def test_every_layer_moves_less_than_with_rtn(options):
    """Through the whole model (true-sequential, inputs from the layers already quantized): on the
    float model's inputs for held-out text, every linear's outputs move less than under RTN."""
    fp = trained_model()
    held_out = markov_tokens(8, 64, seed=7)
    xs, hooks = {}, []
    for name, module in fp.named_modules():
        if name.endswith("_proj"):
            hooks.append(module.register_forward_hook(lambda _m, inp, _o, name=name: xs.__setitem__(name, inp[0].reshape(-1, inp[0].shape[-1]))))
    with torch.no_grad():
        fp(held_out)
    for h in hooks:
        h.remove()
    errors = {}
    for method in ("rtn", "gptq"):
        model = trained_model()
        quantize_model(model, QuantConfig(method=method, group_size=32, **options), markov_tokens(32, 64, seed=1), batch_size=8)
        errors[method] = {n: direct_error(x, fp.get_submodule(n).weight, model.get_submodule(n).weight) for n, x in xs.items()}
        if method == "gptq":
            assert set(model.quant_errors) == set(xs)
            assert all(0 < r["output_error"] < 0.05 and r["damp"] == QuantConfig().damp_percent for r in model.quant_errors.values())
    for name in xs:
        assert errors["gptq"][name] <= errors["rtn"][name], (name, errors["gptq"][name], errors["rtn"][name])
