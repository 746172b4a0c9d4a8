"""Hugging Face checkpoints: ``config.json`` + ``model.safetensors`` (or shards with an index).

Reads Llama and Qwen2 checkpoints (DeepSeek-R1-Distill-Llama/-Qwen are these) as the r1kit model
with hybrid attention and sparsity off, and writes r1kit models in the same layout. A model that
only uses standard parts is written as ``LlamaForCausalLM``/``Qwen2ForCausalLM`` so the ecosystem
loads it as is; one that uses hybrid attention, Top-K FFNs, LayerNorm or GELU is written as
``R1kitForCausalLM`` (other tools must not load it as a Llama and silently drop the gate).
r1kit's own fields always sit under the ``"r1kit"`` key of ``config.json``.
Files are written to temporary names and renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from r1kit.config import ModelConfig, RopeScaling, dump_json, read_json
from r1kit.device import DTYPES, resolve_device
from r1kit.errors import CheckpointError, ConfigError

SUPPORTED = ("llama", "qwen2", "r1kit")
R1KIT_FIELDS = (
    "norm", "activation", "attention", "ffn", "local_window", "max_local_window", "window_growth",
    "window_growth_ratio", "hybrid_gate", "hybrid_global", "hybrid_compress_block", "hybrid_gate_threshold",
    "topk_sparsity", "topk_gradient", "topk_gather_max_tokens", "dropout",
)  # fmt: skip


# -- config.json <-> ModelConfig ---------------------------------------------------------------------
def config_from_hf(raw: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face ``config.json`` mapping into a :class:`ModelConfig`."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        archs = raw.get("architectures")
        raise CheckpointError(
            f"{where}: model_type={model_type!r} (architectures={archs}) is not supported; "
            f"r1kit reads {', '.join(SUPPORTED)} checkpoints (DeepSeek-R1-Distill-Llama/-Qwen are llama/qwen2)"
        )
    act = raw.get("hidden_act", "silu")
    if model_type != "r1kit" and act != "silu":
        raise CheckpointError(f"{where}: hidden_act={act!r} is not supported for {model_type}; only 'silu' (SwiGLU) is")
    if model_type == "llama" and (raw.get("attention_bias") or raw.get("mlp_bias")):
        raise CheckpointError(f"{where}: attention_bias/mlp_bias=true puts biases on o_proj/MLP, which r1kit's Llama layout does not have")
    rope = dict(raw.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and (scaling.get("rope_type") or scaling.get("type")) == "default":
        scaling = None
    fields: dict[str, Any] = dict(
        vocab_size=raw.get("vocab_size"),
        hidden_size=raw.get("hidden_size"),
        num_layers=raw.get("num_hidden_layers"),
        num_heads=raw.get("num_attention_heads"),
        num_kv_heads=raw.get("num_key_value_heads"),
        head_dim=raw.get("head_dim"),
        intermediate_size=raw.get("intermediate_size"),
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=RopeScaling.from_dict(scaling) if scaling else None,
        max_seq_len=raw.get("max_position_embeddings", 4096),
        qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        initializer_range=raw.get("initializer_range", 0.02),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype") or "float32",
    )
    if model_type == "qwen2":
        fields.update(_qwen2_sliding(raw, where))
    if model_type == "r1kit":
        extra = raw.get("r1kit")
        if not isinstance(extra, Mapping):
            raise CheckpointError(f"{where}: model_type 'r1kit' needs an 'r1kit' section with the architecture fields")
        unknown = sorted(set(extra) - set(R1KIT_FIELDS))
        if unknown:
            raise CheckpointError(f"{where}: unknown field(s) in the 'r1kit' section: {unknown}; known: {list(R1KIT_FIELDS)}")
        fields.update(extra)
    missing = [k for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size") if fields[k] is None]
    if missing:
        raise CheckpointError(f"{where}: missing required field(s) {missing} (Hugging Face names: num_hidden_layers, num_attention_heads, ...)")
    try:
        return ModelConfig.from_dict(fields, where=where)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def _qwen2_sliding(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    # Qwen2's sliding-window layers are r1kit's local layers with the same window semantics.
    if not raw.get("use_sliding_window"):
        return {}
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if not window or not layer_types:
        raise CheckpointError(f"{where}: use_sliding_window=true needs sliding_window and layer_types")
    kinds = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    return {"attention": kinds, "local_window": window, "max_local_window": max(window, 4096)}


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` for ``config``: standard Llama/Qwen2 fields plus an ``r1kit`` section."""
    if config.is_standard:
        model_type = "qwen2" if config.qkv_bias else "llama"
        arch = "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"
    else:
        model_type, arch = "r1kit", "R1kitForCausalLM"
    rope_scaling = None
    if config.rope_scaling is not None:
        rope_scaling = {k: v for k, v in dataclasses.asdict(config.rope_scaling).items() if v is not None}
        rope_scaling["rope_type"] = rope_scaling.pop("type")
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu" if config.activation == "swiglu" else "gelu_pytorch_tanh",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_theta": config.rope_theta, **(rope_scaling or {"rope_type": "default"})},
        "attention_bias": config.qkv_bias if model_type != "qwen2" else None,  # Qwen2 always has q/k/v biases
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": config.torch_dtype,
        "use_sliding_window": False,
        "r1kit": {name: getattr(config, name) for name in R1KIT_FIELDS},
    }
    out["r1kit"]["attention"] = list(config.attention)
    out["r1kit"]["ffn"] = list(config.ffn)
    if isinstance(config.topk_sparsity, tuple):
        out["r1kit"]["topk_sparsity"] = list(config.topk_sparsity)
    return {k: v for k, v in out.items() if v is not None or k in ("rope_scaling", "pad_token_id")}


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file} not found: a model directory holds config.json and model.safetensors")
    return config_from_hf(read_json(file, CheckpointError), where=str(file))


# -- weights -----------------------------------------------------------------------------------------
def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from the index when it is sharded."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc!r})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif single.is_file():
        files = [single]
    else:
        raise CheckpointError(f"{path} has no model.safetensors nor model.safetensors.index.json")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in the index but missing: the checkpoint is incomplete, download or copy it again")
    return files


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} cannot be read ({exc}); it is probably truncated or not a safetensors file") from None
    return state


def check_weights(path: Path, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], tied: bool, optional: set[str] = frozenset()) -> None:
    """Every weight the model needs is there with its shape, and nothing else is; else one clear error."""
    missing = sorted(k for k in expected if k not in state and k not in optional and not (tied and k == "lm_head.weight"))
    unexpected = sorted(k for k in state if k not in expected and not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match config.json; missing {missing[:8]}{'…' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in expected.items():
        if key in state and state[key].shape != tensor.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(state[key].shape)}, config.json implies {tuple(tensor.shape)}")


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Build the r1kit model from a float checkpoint directory; ``dtype`` defaults to the checkpoint's own.

    Every other kind (GPTQ, GGUF, a pulled model's name) goes through :func:`r1kit.checkpoints.load_model`,
    which calls this for float directories."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    config = load_config(path)
    if (path / "quantize_config.json").is_file() or "quantization_config" in json.loads((path / "config.json").read_text(encoding="utf-8")):
        raise CheckpointError(f"{path} holds quantized weights; load it with r1kit.checkpoints.load_model (int4 layers come from r1kit.quant)")
    return model_from_state(config, read_safetensors(weight_files(path)), path, dtype or DTYPES.get(config.torch_dtype, torch.float32), device)


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], where: Path, dtype: torch.dtype,
                     device: str | torch.device = "cpu"):
    """The model of ``config`` holding ``state`` (Hugging Face names, checked against the config) in ``dtype``."""
    from r1kit.model.transformer import R1kitForCausalLM

    device = resolve_device(device)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = R1kitForCausalLM(config)
    expected = model.state_dict()
    check_weights(where, expected, state, config.tie_embeddings)
    return finish_load(model, {k: v.to(device=device, dtype=dtype) for k, v in state.items() if k in expected}, device)


def finish_load(model, state: dict[str, torch.Tensor], device: str | torch.device):
    """Put ``state`` into a model built on the meta device: assign, re-tie, rebuild what is not stored."""
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    from r1kit.model.rope import RotaryEmbedding

    model.rotary = RotaryEmbedding(model.config).to(device)  # non-persistent buffers are rebuilt, not loaded
    return model.eval()


def save_model(model, path: str | Path, max_shard_bytes: int = 5 * 2**30, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``config.json`` and the weights (one file, or shards + index above ``max_shard_bytes``).

    ``state`` replaces ``model.state_dict()`` (a tensor-parallel model passes its gathered weights).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state if state is not None else model.state_dict()).items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    dtype_name = next((n for n, d in DTYPES.items() if d == model.dtype), "float32")
    # the sparsity each Top-K layer runs at now (training's controller moves it) is part of the model
    sparsity = tuple(getattr(layer.mlp, "sparsity", model.config.sparsity_for(i)) for i, layer in enumerate(model.model.layers))
    config = dataclasses.replace(
        model.config, torch_dtype=dtype_name, topk_sparsity=sparsity[0] if len(set(sparsity)) == 1 else sparsity
    )
    metadata = {"format": "pt"}
    if len(shards) == 1:
        (path / "model.safetensors.index.json").unlink(missing_ok=True)  # first: the loader prefers an index
        _atomic_save(shards[0], path / "model.safetensors", metadata)
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for shard, name in zip(shards, names):
            _atomic_save(shard, path / name, metadata)
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {key: name for shard, name in zip(shards, names) for key in shard}
        dump_json({"metadata": {"total_size": total}, "weight_map": weight_map}, path / "model.safetensors.index.json")
        (path / "model.safetensors").unlink(missing_ok=True)
    dump_json(config_to_hf(config), path / "config.json")


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(file)
