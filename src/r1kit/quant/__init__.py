"""Quantization: GPTQ and RTN to 4 or 8 bits, the GPTQ checkpoint format, and the layers that run it."""

from r1kit.quant.checkpoint import is_gptq_checkpoint, load_quantized, save_quantized
from r1kit.quant.config import QuantConfig
from r1kit.quant.int4_linear import QuantLinear
from r1kit.quant.quantizer import quantize_model, to_quantized

__all__ = ["QuantConfig", "QuantLinear", "is_gptq_checkpoint", "load_quantized", "quantize_model", "save_quantized", "to_quantized"]
