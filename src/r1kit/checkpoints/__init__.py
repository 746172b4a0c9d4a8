"""Checkpoints from outside r1kit: GGUF in and out, the model cache, ``r1kit pull``, one loader for every kind."""
