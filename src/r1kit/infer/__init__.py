"""Inference: the sampler, the reference generation loop, and the engine.

The engine (``LLM`` / ``LLMEngine``) is built as nano-vllm's, one concept per module:
``sequence`` (a request's tokens and blocks), ``block_manager`` (block ids, prefix cache, LRU
eviction), ``paged_cache`` (the K/V pool and the model's cache view), ``scheduler`` (continuous
batching, chunked prefill, preemption), ``model_runner`` (one forward), ``sampler`` (per-request
controls), ``engine`` (the streaming loop), ``llm`` (the offline API), ``outputs``.
"""
