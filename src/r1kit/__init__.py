"""r1kit: build, train, compress, serve and apply R1-style reasoning language models."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # lazy, so `import r1kit` (and the CLI's --help) does not import torch
    if name == "LLM":
        from r1kit.infer.llm import LLM

        return LLM
    if name == "SamplingParams":
        from r1kit.infer.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'r1kit' has no attribute {name!r}")
