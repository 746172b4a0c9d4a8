"""Reasoning training: chat SFT (the cold start) and GRPO with verifiable rewards, on r1kit's own
model, trainer parts and engine. Sits above ``infer/`` and ``train/`` and below ``cli/``."""
