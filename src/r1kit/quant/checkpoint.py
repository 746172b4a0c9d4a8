"""GPTQ checkpoints: write r1kit's, read ours and other tools' (AutoGPTQ, GPTQModel, optimum) alike.

A directory holds ``config.json`` (the model's, with ``quantization_config``), ``quantize_config.json``
(the same mapping, for tools that read only that file) and safetensors weights where each quantized
linear ``X`` is ``X.qweight``/``X.qzeros``/``X.scales``/``X.g_idx`` [+ ``X.bias``] and everything else
is a float tensor under its usual name. Codes are 4 or 8 bits (``bits``); ``lm_head`` may be quantized
too (``quantization_config.lm_head``), with ``tie_word_embeddings: false`` and the embedding in float. Which linears are quantized is read from the tensors, not
assumed. Every mismatch (shape, bits, group size, format) is a :class:`CheckpointError` naming the
tensor and the fix. Files are written through :func:`r1kit.model.hf.save_model` (temp file + rename).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from r1kit.config import dump_json, read_json
from r1kit.errors import CheckpointError
from r1kit.quant.config import QuantConfig
from r1kit.quant.int4_linear import QuantLinear
from r1kit.quant.packing import default_g_idx, group_count
from r1kit.quant.rtn import QuantResult

QUANT_FILE = "quantize_config.json"
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


# -- writing -------------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, path: str | Path, config: QuantConfig, results: dict[str, QuantResult] | None = None,
                   dtype: torch.dtype | None = None) -> None:
    """Write ``model`` as a GPTQ checkpoint.

    ``results`` (from :func:`r1kit.quant.quantizer.quantize_model`) replaces those float linears' weights
    with packed codes; modules that already are :class:`QuantLinear` are written as they are. ``dtype``
    stores the float tensors (embeddings, norms, lm_head, biases) in another dtype (GPTQ checkpoints
    usually hold float16); scales are always float16.
    """
    from r1kit.device import DTYPES
    from r1kit.model.hf import save_model

    path = Path(path)
    state = dict(model.state_dict())
    for name, result in (results or {}).items():
        state.pop(f"{name}.weight")
        for key, tensor in result.pack(config).items():
            state[f"{name}.{key}"] = tensor
    for key, tensor in state.items():
        if key.endswith(".scales"):
            state[key] = tensor.to(torch.float16)
        elif dtype is not None and tensor.is_floating_point():
            state[key] = tensor.to(dtype)
    save_model(model, path, state=state)
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if dtype is not None:
        raw["torch_dtype"] = next(n for n, d in DTYPES.items() if d == dtype)
    raw["quantization_config"] = config.to_hf()
    dump_json(raw, path / "config.json")
    dump_json(config.to_hf(), path / QUANT_FILE)


# -- reading -------------------------------------------------------------------------------------------
def quantization_section(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The ``quantization_config`` mapping of a model directory (config.json first, then quantize_config.json)."""
    file = path / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except json.JSONDecodeError:
        return None, str(file)  # load_config reports the JSON error
    if isinstance(raw, dict) and raw.get("quantization_config") is not None:
        return raw["quantization_config"], f"{file} quantization_config"
    qfile = path / QUANT_FILE
    if qfile.is_file():
        return read_json(qfile, CheckpointError), str(qfile)
    return None, str(file)


def is_gptq_checkpoint(path: str | Path) -> bool:
    """True when a model directory says it holds GPTQ weights (so :func:`load_quantized` must read it)."""
    section, _ = quantization_section(Path(path))
    return isinstance(section, dict) and str(section.get("quant_method", "gptq")).lower() == "gptq"


def _weight_files(path: Path) -> list[Path]:
    from r1kit.model.hf import weight_files

    try:
        return weight_files(path)
    except CheckpointError:
        others = sorted(path.glob("*.safetensors"))  # AutoGPTQ's gptq_model-4bit-128g.safetensors and the like
        if len(others) == 1:
            return others
        raise


def expected_shapes(in_features: int, out_features: int, group_size: int, bits: int = 4) -> dict[str, tuple[int, ...]]:
    """The GPTQ tensors' shapes for one linear (``⌈in / group size⌉`` groups: GPTQModel's partial last group)."""
    groups = group_count(in_features, group_size)
    return {
        "qweight": (in_features * bits // 32, out_features),
        "qzeros": (groups, out_features * bits // 32),
        "scales": (groups, out_features),
        "g_idx": (in_features,),
    }


def load_quantized(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build the r1kit model with :class:`QuantLinear` layers from a GPTQ checkpoint directory.

    A quantized ``lm_head`` in a checkpoint whose config says the head is tied (a writer that kept
    the flag) is read untied: the head runs its codes, the embedding its float table."""
    from r1kit.device import DTYPES
    from r1kit.model.hf import check_weights, finish_load, load_config, read_safetensors
    from r1kit.model.transformer import R1kitForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    model_config = load_config(path)
    section, where = quantization_section(path)
    if section is None:
        raise CheckpointError(f"{path} has no quantization_config in config.json nor a {QUANT_FILE}: it is not a GPTQ checkpoint")
    qconfig = QuantConfig.from_hf(section, where)
    state = read_safetensors(_weight_files(path))
    if model_config.tie_embeddings and "lm_head.qweight" in state:
        model_config = dataclasses.replace(model_config, tie_embeddings=False)
    if model_config.tie_embeddings:
        state.pop("lm_head.weight", None)
    target = dtype or DTYPES.get(model_config.torch_dtype, torch.float32)

    with torch.device("meta"):
        model = R1kitForCausalLM(model_config)
    quantized = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")})
    if not quantized:
        raise CheckpointError(f"{path}: {where} says GPTQ but no tensor ends in .qweight; the weights are not quantized")
    for name in quantized:
        _swap_in_quantized(model, name, state, qconfig, path)

    expected = model.state_dict()
    check_weights(path, expected, state, model_config.tie_embeddings, optional={f"{n}.g_idx" for n in quantized})
    for name in quantized:
        if f"{name}.g_idx" not in state:  # some writers omit it: groups in input order
            layer = model.get_submodule(name)
            state[f"{name}.g_idx"] = default_g_idx(layer.in_features, layer.group_size)
        _check_codes(name, state, path)
    loaded = {}
    for key, tensor in state.items():
        if key not in expected:
            continue
        kind = key.rsplit(".", 1)[-1]
        if kind in ("qweight", "qzeros", "g_idx"):
            loaded[key] = tensor.to(device=device, dtype=torch.int32)
        elif kind == "scales" and _is_quantized(model, key):
            loaded[key] = tensor.to(device=device, dtype=torch.float16)
        else:
            loaded[key] = tensor.to(device=device, dtype=target)
    model = finish_load(model, loaded, device)
    model.quantization_config = qconfig
    return model


def _is_quantized(model: nn.Module, key: str) -> bool:
    return isinstance(model.get_submodule(key.rsplit(".", 1)[0]), QuantLinear)


def _swap_in_quantized(model: nn.Module, name: str, state: dict[str, torch.Tensor], qconfig: QuantConfig, path: Path) -> None:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"{path}: {name}.qweight names no linear layer of this model (config.json and the weights disagree)")
    for part in ("qzeros", "scales"):
        if f"{name}.{part}" not in state:
            raise CheckpointError(f"{path}: {name}.qweight has no {name}.{part}; the checkpoint is incomplete or not GPTQ")
    in_f, out_f, bits = linear.in_features, linear.out_features, qconfig.bits
    if in_f % (32 // bits) or out_f % (32 // bits):
        raise CheckpointError(f"{path}: {name} is {in_f}→{out_f}; {bits}-bit GPTQ packing needs multiples of {32 // bits}")
    for part, shape in expected_shapes(in_f, out_f, qconfig.group_size, bits).items():
        key = f"{name}.{part}"
        if key in state and tuple(state[key].shape) != shape:
            layout = {"qweight": "[in·bits/32, out]", "qzeros": "[groups, out·bits/32]", "scales": "[groups, out]", "g_idx": "[in]"}[part]
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, expected {shape} ({layout} for a {in_f}→{out_f} "
                f"linear, bits={bits}, group_size={qconfig.group_size}); the tensor is corrupt or quantization_config is wrong"
            )
    parent_name, _, attr = name.rpartition(".")
    bias = f"{name}.bias" in state
    with torch.device("meta"):
        layer = QuantLinear(in_f, out_f, qconfig.group_size, bias=bias, bits=bits, zero_offset=qconfig.zero_offset)
    setattr(model.get_submodule(parent_name), attr, layer)


def _check_codes(name: str, state: dict[str, torch.Tensor], path: Path) -> None:
    for part in ("qweight", "qzeros", "g_idx"):
        t = state[f"{name}.{part}"]
        if t.numel() and (t.dtype.is_floating_point or t.dtype == torch.bool):
            raise CheckpointError(f"{path}: {name}.{part} has dtype {t.dtype}; GPTQ stores it as int32")
    g = state[f"{name}.g_idx"]
    groups = state[f"{name}.scales"].shape[0]
    if int(g.min()) < 0 or int(g.max()) >= groups:
        raise CheckpointError(f"{path}: {name}.g_idx holds groups {int(g.min())}..{int(g.max())} but there are {groups} groups")
    if not torch.isfinite(state[f"{name}.scales"].float()).all():
        raise CheckpointError(f"{path}: {name}.scales holds NaN or infinite values; the checkpoint is corrupt")
