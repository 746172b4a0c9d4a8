"""Serving: an OpenAI-compatible HTTP API over the engine, with reasoning output, health and metrics."""
