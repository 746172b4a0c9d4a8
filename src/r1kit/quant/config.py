"""The quantization settings and their ``quantization_config`` JSON, as GPTQ checkpoints carry them.

Written to ``quantize_config.json`` and to ``config.json["quantization_config"]`` (the place
transformers/optimum, GPTQModel and vLLM look). Reading validates every field with a message that
names it; this module must never touch tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from r1kit.errors import CheckpointError, ConfigError
from r1kit.quant.packing import group_span

LINEAR_BITS = (4, 8)  # the widths r1kit's GPTQ layers run (QuantLinear's codes)

FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what is subtracted from each stored zero


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (all input features)
    desc_act: bool = False  # act-order: quantize columns by decreasing Hessian diagonal
    sym: bool = True
    damp_percent: float = 0.05  # dampening, a fraction of the mean Hessian diagonal (GPTQModel's default; see docs/quant.md)
    damp_auto_increment: float = 0.01  # added to damp_percent until the Cholesky factorization succeeds
    block_size: int = 128  # GPTQ's lazy-update block
    true_sequential: bool = True
    # groups in order of their largest Hessian diagonal, columns sorted inside each (where desc_act is off);
    # defaults: what measured best on SmolLM2-135M (docs/quant.md)
    act_group_aware: bool = True
    static_groups: bool = False  # every group's grid from the original weights, before GPTQ updates them
    mse: float = 2.4  # clipping search: the norm of the rounding error it minimises (0: off; see docs/quant.md)
    checkpoint_format: str = "gptq"
    method: str = "gptq"  # how the codes were found: gptq | rtn (both write the same format)
    # the output head quantized too (GPTQModel's ``lm_head`` field; a tied embedding is untied and stays float)
    lm_head: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ConfigError(f"bits={self.bits}: r1kit quantizes to 2, 4 or 8 bits (its layers run 4 and 8)")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size} must be positive, or -1 for one group per output channel")
        if not 0 <= self.damp_percent < 1:
            raise ConfigError(f"damp={self.damp_percent} must be in [0, 1) (a fraction of the mean Hessian diagonal; 0.01 is usual)")
        if not 0 <= self.damp_auto_increment < 1:
            raise ConfigError(f"damp_auto_increment={self.damp_auto_increment} must be in [0, 1) (0: fail instead of damping more)")
        if self.mse < 0:
            raise ConfigError(f"mse={self.mse} must be 0 (no clipping search) or a positive norm such as 2.4")
        if self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size} must be positive")
        if self.checkpoint_format not in FORMATS:
            raise ConfigError(f"checkpoint_format={self.checkpoint_format!r}: expected one of {sorted(FORMATS)}")
        if self.method not in ("gptq", "rtn"):
            raise ConfigError(f"method={self.method!r}: expected 'gptq' or 'rtn'")

    @property
    def zero_offset(self) -> int:
        return FORMATS[self.checkpoint_format]

    def group_for(self, in_features: int) -> int:
        return group_span(in_features, self.group_size)

    def to_hf(self) -> dict[str, Any]:
        """The ``quantization_config`` mapping (field names as AutoGPTQ/GPTQModel write them)."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "damp_percent": self.damp_percent,
            "damp_auto_increment": self.damp_auto_increment,
            "true_sequential": self.true_sequential,
            "static_groups": self.static_groups,
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
            "lm_head": self.lm_head,
            "meta": {"quantizer": ["r1kit"], "method": self.method, "act_group_aware": self.act_group_aware, "mse": self.mse},
        }

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], where: str) -> QuantConfig:
        """Validate a ``quantization_config`` read from a checkpoint (ours or another tool's)."""
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{where}: quantization_config must be a JSON object, got {type(raw).__name__}")
        method = raw.get("quant_method", "gptq")
        if method != "gptq":
            raise CheckpointError(f"{where}: quant_method={method!r}; r1kit loads GPTQ checkpoints (quant_method 'gptq') only")
        fmt = raw.get("checkpoint_format") or raw.get("format") or "gptq"
        if raw.get("is_marlin_format") or fmt not in FORMATS:
            raise CheckpointError(f"{where}: checkpoint_format={fmt!r} is not supported; r1kit reads {sorted(FORMATS)}")
        bits = raw.get("bits")
        if bits not in LINEAR_BITS:
            raise CheckpointError(
                f"{where}: bits={bits!r}; r1kit's GPTQ layers run {' and '.join(map(str, LINEAR_BITS))}-bit checkpoints only "
                "(re-quantize with --bits 4 or --bits 8)"
            )
        group_size = raw.get("group_size", 128)
        if not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
            raise CheckpointError(f"{where}: group_size={group_size!r} must be a positive integer or -1")
        meta = raw.get("meta") if isinstance(raw.get("meta"), Mapping) else {}
        try:
            return cls(
                bits=bits,
                group_size=group_size,
                desc_act=bool(raw.get("desc_act", False)),
                sym=bool(raw.get("sym", True)),
                damp_percent=float(raw.get("damp_percent", 0.01)),
                damp_auto_increment=float(raw.get("damp_auto_increment", 0.01)),
                true_sequential=bool(raw.get("true_sequential", True)),
                static_groups=bool(raw.get("static_groups", False)),
                lm_head=bool(raw.get("lm_head", False)),
                checkpoint_format=fmt,
                method=meta.get("method", "gptq") if meta.get("method") in ("gptq", "rtn") else "gptq",
            )
        except ConfigError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
