"""The architecture a plan is made for, read from a model argument without loading any weight.

``--model`` takes what every verb takes (a model directory, a ``.gguf`` file, a pulled name: through
:func:`r1kit.checkpoints.resolve_model`) or a config file: a YAML of :class:`~r1kit.config.ModelConfig`
fields (``configs/*.yaml``, at the top level or under ``model:``) or a JSON, either a Hugging Face
``config.json`` or r1kit's fields. A GPTQ checkpoint's ``quantization_config`` comes along, so a
plan for it counts its packed weights. This module only reads configs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from r1kit.config import ModelConfig, read_json
from r1kit.errors import CheckpointError, ConfigError
from r1kit.quant.config import QuantConfig


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What the planner knows of a model: its architecture, its GPTQ settings where it is a GPTQ
    checkpoint (None: float weights), and where both were read."""

    config: ModelConfig
    quant: QuantConfig | None
    where: str


def read_model(model: str | Path) -> ModelSource:
    """The :class:`ModelSource` of a ``--model`` argument (see the module's note)."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return ModelSource(ModelConfig.from_yaml(path), None, str(path))
    if path.is_file() and path.suffix.lower() == ".json":
        return _from_json(path)
    from r1kit.checkpoints import resolve_model
    from r1kit.model.hf import load_config
    from r1kit.quant.checkpoint import is_gptq_checkpoint, quantization_section

    folder = resolve_model(model)
    quant = None
    if is_gptq_checkpoint(folder):
        section, where = quantization_section(folder)
        quant = QuantConfig.from_hf(section, where)
    return ModelSource(load_config(folder), quant, str(folder))


def _from_json(path: Path) -> ModelSource:
    from r1kit.model.hf import config_from_hf

    raw = read_json(path, ConfigError, mapping=True)
    if "model_type" not in raw:  # r1kit's own field names
        return ModelSource(ModelConfig.from_dict(raw, where=str(path)), None, str(path))
    quant = raw.get("quantization_config")
    try:
        return ModelSource(config_from_hf(raw, where=str(path)), QuantConfig.from_hf(quant, str(path)) if quant else None, str(path))
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
