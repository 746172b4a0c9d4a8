"""Inference: sampling, the reference generation loop, and (later) the paged-KV engine."""
