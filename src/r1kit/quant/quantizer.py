"""Quantize an r1kit model: GPTQ block by block (each block's quantized outputs feed the next) or RTN.

GPTQ's calibration passes stop as soon as the linears being calibrated have their inputs (a
pre-hook raises), linears that read one input share its Hessian and are swept as one stacked
matrix, and each linear's output error is read off its Hessian (see docs/quant.md).

Which linears: every decoder layer's ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``,
and ``lm_head`` where the config asks for it (``QuantConfig.lm_head``; GPTQ calibrates it on the final
norm's outputs). A head tied to the embedding is untied first (:func:`untie_lm_head`): the head is
quantized, the embedding lookup keeps the float table, and the model says ``tie_embeddings=False``,
which is how GPTQ tools and vLLM read a checkpoint with a quantized head. The embeddings, norms and
the hybrid attention gate (``self_attn.gate``, a tiny MLP whose sigmoid decides the branch mix) stay
in float. Memory is bounded by one layer's activations
for the calibration set (kept in place: each batch's outputs overwrite its inputs) plus one
layer's Hessians; no full-model activations are kept.

After :func:`quantize_model` the model holds the dequantized weights in its float linears (so it
can be evaluated as is) and the returned codes are what :func:`to_quantized` and the checkpoint writer
turn into GPTQ tensors. This module must never write files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from r1kit.errors import ConfigError
from r1kit.model.ffn import TopKFFN
from r1kit.quant.config import LINEAR_BITS, QuantConfig
from r1kit.quant.gptq import Hessian, gptq_quantize, output_error
from r1kit.quant.int4_linear import QuantLinear
from r1kit.quant.rtn import QuantResult, quantize_rtn

# true-sequential order: a group is quantized before the next one's inputs are collected
SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
TARGETS = tuple(name for group in SEQUENTIAL for name in group)
HEAD = "lm_head"


def layer_linears(layer: nn.Module, names: tuple[str, ...] = TARGETS) -> dict[str, nn.Linear]:
    """The quantizable float linears of a decoder layer, by their names inside it."""
    out = {}
    for name in names:
        try:
            module = layer.get_submodule(name)
        except AttributeError:
            continue  # GELU FFNs have no gate_proj
        if isinstance(module, nn.Linear):
            out[name] = module
    return out


def targets(model: nn.Module, config: QuantConfig) -> dict[str, nn.Linear]:
    """Every linear the config quantizes, by its name in the model."""
    found = {f"model.layers.{i}.{name}": linear for i, layer in enumerate(model.model.layers) for name, linear in layer_linears(layer).items()}
    if config.lm_head:
        found[HEAD] = model.lm_head
    return found


def check_quantizable(model: nn.Module, config: QuantConfig) -> None:
    """Every target's in_features must split into whole words of codes and its out_features into whole
    words of zero points (a group size that does not divide in_features leaves a partial last group,
    which the format holds)."""
    per_word = 32 // config.bits
    for name, linear in targets(model, config).items():
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{name} is a {type(linear).__name__}, not a float linear: quantize the float model")
        if linear.in_features % per_word or linear.out_features % per_word:
            raise ConfigError(
                f"{name} is {linear.in_features}→{linear.out_features}: both must be multiples of "
                f"{per_word} to pack {config.bits}-bit codes"
            )


def untie_lm_head(model: nn.Module) -> None:
    """Give a head tied to the embedding its own copy of the weight, and say so in the model's config:
    quantizing the head then leaves the embedding's float table as it was."""
    if model.config.tie_embeddings:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=model.lm_head.weight.requires_grad)
        model.config = dataclasses.replace(model.config, tie_embeddings=False)


@contextlib.contextmanager
def _calibration_mode(layer: nn.Module) -> Iterator[None]:
    """Top-K FFNs take their masked path (the gather path skips the hooked linears' forward)."""
    saved = [(m, m.gather_max_tokens) for m in layer.modules() if isinstance(m, TopKFFN)]
    for m, _ in saved:
        m.gather_max_tokens = 0
    try:
        yield
    finally:
        for m, value in saved:
            m.gather_max_tokens = value


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: Callable[[Iterator], Iterator] | None = None,
    on_layer: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
) -> dict[str, QuantResult]:
    """Quantize ``model``'s linears in place (fake-quantized float weights); return the codes by module name.

    ``calibration``: token ids [nsamples, seqlen] (GPTQ only). ``progress`` wraps the layer loop (e.g. tqdm).
    GPTQ records each linear's ``output_error`` (``‖X(W − Q)ᵀ‖² / ‖XWᵀ‖²`` on its calibration inputs),
    the ``damp`` it took and its ``seconds`` in ``model.quant_errors`` by module name, and hands each
    layer's records to ``on_layer(layer index, records)`` as soon as the layer is done.
    """
    check_quantizable(model, config)
    model.eval()
    if config.lm_head:
        untie_lm_head(model)
    wrap = progress or (lambda it: it)
    layers = model.model.layers
    if config.method == "rtn":
        results = {}
        for i in wrap(range(len(layers))):
            for name, linear in layer_linears(layers[i]).items():
                results[f"model.layers.{i}.{name}"] = _rtn(linear, config)
        if config.lm_head:
            results[HEAD] = _rtn(model.lm_head, config)
        return results
    if calibration is None or calibration.numel() == 0:
        raise ConfigError("GPTQ needs calibration data (--calib shards or a text file)")
    return _gptq(model, config, calibration, batch_size, wrap, on_layer)


def _rtn(linear: nn.Linear, config: QuantConfig) -> QuantResult:
    result = quantize_rtn(linear.weight, config)
    linear.weight.data.copy_(result.weight(linear.weight.dtype))
    return result


class _Collected(Exception):
    """Raised by the last hook of a group: the rest of the layer's forward is not needed."""


# a sub-layer whose forward ends in one linear, applied to everything before it: attention's o_proj, the FFN's down_proj
REPLAYED = {"self_attn.o_proj": "self_attn", "mlp.down_proj": "mlp"}


class _Replay(nn.Module):
    """Stands in for a sub-layer (attention, FFN) whose forward ends in ``linear``: ``linear`` applied to
    its input as collected for batch ``batch``, so later passes over the layer skip all that led to it."""

    def __init__(self, linear: nn.Module, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.linear, self.inputs, self.batch = linear, inputs, 0

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.linear(self.inputs[self.batch])


@contextlib.contextmanager
def _replays(layer: nn.Module, replays: dict[str, _Replay]) -> Iterator[None]:
    """``layer``'s sub-layers swapped for their replays while inside (put back however it exits)."""
    saved = {name: layer.get_submodule(name) for name in replays}
    try:
        for name, replay in replays.items():
            setattr(layer, name, replay)
        yield
    finally:
        for name, module in saved.items():
            setattr(layer, name, module)


def _collect_hessians(linears: dict[str, nn.Linear], run: Callable[[int], None], batches: int,
                      keep: dict[str, list[torch.Tensor]] | None = None) -> dict[str, Hessian]:
    """Each linear's input Hessian over the calibration batches (``run(b)`` runs batch ``b``). Linears
    that read the same input tensor (q/k/v, gate/up) share one Hessian; each forward stops once every
    linear has its input. ``keep[name]`` collects that linear's inputs, batch by batch."""
    hessians: dict[str, Hessian] = {}
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre(_module, args):
            x = args[0]
            same = next((other for other, y in seen.items() if y is x), None)
            if name not in hessians:
                hessians[name] = hessians[same] if same is not None else Hessian(x.shape[-1], x.device)
            if same is None or hessians[same] is not hessians[name]:
                hessians[name].add(x)
            seen[name] = x
            if keep is not None and name in keep:
                keep[name].append(x)
            if len(seen) == len(linears):
                raise _Collected
        return pre

    handles = [linear.register_forward_pre_hook(hook(name)) for name, linear in linears.items()]
    try:
        for b in range(batches):
            seen.clear()
            try:
                run(b)
            except _Collected:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def _by_hessian(hessians: dict[str, Hessian]) -> list[list[str]]:
    """The linears' names grouped by the Hessian they share, in their order."""
    groups: dict[int, list[str]] = {}
    for name, hessian in hessians.items():
        groups.setdefault(id(hessian), []).append(name)
    return list(groups.values())


def _gptq(model, config: QuantConfig, tokens: torch.Tensor, batch_size: int, wrap, on_layer) -> dict[str, QuantResult]:
    device = model.device
    tokens = tokens.to(device)
    n, seqlen = tokens.shape
    batches = [slice(b, min(b + batch_size, n)) for b in range(0, n, batch_size)]
    # True-sequential passes run the layer again and again; once o_proj (down_proj) is quantized, its
    # inputs as collected stand for everything before it, so the passes after it run the attention
    # (FFN) as that one product: each part of the layer is computed about once instead of up to four times.
    replay = config.true_sequential
    xs = torch.cat([model.model.embed_tokens(tokens[b]) for b in batches])  # [n, seqlen, d]
    cos, sin = model.rotary(torch.arange(seqlen, device=device), xs.dtype)
    window = model.config.window_for(seqlen)
    results: dict[str, QuantResult] = {}
    model.quant_errors = {}
    groups = SEQUENTIAL if config.true_sequential else (TARGETS,)
    for i in wrap(range(len(model.model.layers))):
        layer = model.model.layers[i]
        records = {}
        replays: dict[str, _Replay] = {}

        def run(b: int, layer=layer, replays=replays) -> torch.Tensor:
            for r in replays.values():
                r.batch = b
            with _replays(layer, replays):
                return layer(xs[batches[b]], cos, sin, window)

        with _calibration_mode(layer):
            for group in groups:
                linears = layer_linears(layer, group)
                if not linears:
                    continue
                keep = {name: [] for name in linears if replay and name in REPLAYED}
                hessians = _collect_hessians(linears, run, len(batches), keep)
                for names in _by_hessian(hessians):
                    # linears reading one input share H, hence the column order and every update: one sweep
                    # over their stacked rows gives each its own result, in one pass instead of one each
                    start = time.perf_counter()
                    H = hessians[names[0]]
                    if H.nsamples == 0:
                        raise ConfigError(f"model.layers.{i}.{names[0]} saw no calibration inputs; check the calibration data")
                    weights = [linears[name].weight for name in names]
                    stacked, damp = gptq_quantize(torch.cat(weights), H.matrix, config)
                    seconds = time.perf_counter() - start
                    for name, weight, result in zip(names, weights, stacked.split_rows([w.shape[0] for w in weights])):
                        quantized = result.weight(weight.dtype)
                        key = f"model.layers.{i}.{name}"
                        records[key] = {"output_error": output_error(weight, quantized, H.matrix), "damp": damp, "seconds": seconds}
                        weight.data.copy_(quantized)
                        results[key] = result
                for name, inputs in keep.items():
                    if len(inputs) == len(batches):
                        replays[REPLAYED[name]] = _Replay(linears[name], inputs)
            for b, rows in enumerate(batches):  # the quantized layer's outputs are the next layer's inputs
                xs[rows] = run(b)
        model.quant_errors.update(records)
        if on_layer is not None:
            on_layer(i, records)
    if config.lm_head:  # its inputs: the final norm of the last quantized layer's outputs
        H = Hessian(xs.shape[-1], device)
        for b in batches:
            H.add(model.model.norm(xs[b]))
        results[HEAD] = _gptq_linear(model.lm_head, H, config, model.quant_errors, HEAD)
    return results


def _gptq_linear(linear: nn.Linear, H: Hessian, config: QuantConfig, records: dict, key: str) -> QuantResult:
    """GPTQ of one linear against its Hessian, its weight replaced by the dequantized one, its record kept."""
    start = time.perf_counter()
    result, damp = gptq_quantize(linear.weight, H.matrix, config)
    quantized = result.weight(linear.weight.dtype)
    records[key] = {"output_error": output_error(linear.weight, quantized, H.matrix), "damp": damp, "seconds": time.perf_counter() - start}
    linear.weight.data.copy_(quantized)
    return result


def to_quantized(model: nn.Module, results: dict[str, QuantResult], config: QuantConfig) -> nn.Module:
    """Swap the quantized float linears for :class:`QuantLinear` modules holding the packed codes."""
    if config.bits not in LINEAR_BITS:
        raise ConfigError(f"bits={config.bits}: r1kit's layers run {LINEAR_BITS} bits (the checkpoint can still be written)")
    for name, result in results.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        layer = QuantLinear.from_packed(
            {k: v.to(linear.weight.device) for k, v in result.pack(config).items()},
            linear.in_features, linear.out_features, config.group_size,
            bias=None if linear.bias is None else linear.bias.detach(),
            zero_offset=config.zero_offset, dtype=linear.weight.dtype, bits=config.bits,
        )
        setattr(parent, attr, layer)
    model.quantization_config = config
    return model

