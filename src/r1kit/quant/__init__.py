"""Quantization: GPTQ and RTN to 4 bits, the GPTQ checkpoint format, and int4 linear layers."""

from r1kit.quant.checkpoint import is_gptq_checkpoint, load_quantized, save_quantized
from r1kit.quant.config import QuantConfig
from r1kit.quant.int4_linear import Int4Linear
from r1kit.quant.quantizer import quantize_model, to_int4

__all__ = ["Int4Linear", "QuantConfig", "is_gptq_checkpoint", "load_quantized", "quantize_model", "save_quantized", "to_int4"]
