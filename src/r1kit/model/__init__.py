"""The one r1kit model definition, its cache interface and its Hugging Face checkpoint I/O."""

from r1kit.config import ModelConfig
from r1kit.model.cache import ContiguousKVCache, KVCacheView
from r1kit.model.hf import load_config, save_model
from r1kit.model.transformer import R1kitForCausalLM

__all__ = ["ModelConfig", "ContiguousKVCache", "KVCacheView", "R1kitForCausalLM", "load_config", "save_model"]
