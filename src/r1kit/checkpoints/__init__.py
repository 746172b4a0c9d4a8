"""Checkpoints from outside r1kit and back: one loader for every kind (float safetensors, GPTQ, GGUF,
pulled names), GGUF in and out, the model cache, ``r1kit pull``."""

from r1kit.checkpoints.load import load_model, resolve_model

__all__ = ["load_model", "resolve_model"]
