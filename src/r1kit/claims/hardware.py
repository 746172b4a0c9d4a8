"""Claim §2.1: the hardware table's throughputs (A100 40GB ×2: 12K tokens/s, H100 80GB ×4: 35K,
Jetson AGX Orin INT8: 1.2K) and the closing 32K tokens/s on an A100 cluster.

Those are GPU figures: on a machine without CUDA nothing comparable can be measured and the
experiment records why. With CUDA it measures what one of this machine's GPUs does with r1kit's
engine on the real pulled model (batched greedy generation of random prompts, bfloat16), which is
the nearest measurable figure; the guide's model and its exact setup are not stated, so the
comparison is reported, not judged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from r1kit.claims.results import CANNOT_MEASURE, Claim, Verdict
from r1kit.claims.scale import Scale

NAME = "hardware"
MODEL = "smollm2-135m-instruct"
CLAIMS = (Claim("throughput_a100", "2.1", "Research setup, A100 40GB ×2: inference throughput", "12K tokens/s"),
          Claim("throughput_h100", "2.1", "Production setup, H100 80GB ×4: inference throughput", "35K tokens/s"),
          Claim("throughput_orin", "2.1", "Edge setup, Jetson AGX Orin with INT8: inference throughput", "1.2K tokens/s"),
          Claim("throughput_cluster", "end", "Optimised deployment on an A100 cluster: inference throughput", "32K tokens/s"))  # fmt: skip


def run(scale: Scale, log: Callable[[str], None], model: str = MODEL) -> dict[str, Any]:
    """Engine throughput on the first CUDA device, or the reason there is none."""
    if not torch.cuda.is_available():
        return {"state": "no gpu", "reason": "no CUDA device on this machine: the table's figures are GPU throughputs"}
    from r1kit.checkpoints.pull import pull
    from r1kit.infer.benchmark import random_prompts, time_engine
    from r1kit.infer.llm import LLM

    llm = LLM(pull(model), device="cuda", dtype="bfloat16")
    requests = 64 if scale.tier in ("default", "large") else 16
    prompts = random_prompts(requests, 128, llm.llm_engine.model.config.vocab_size, seed=0)
    log(f"hardware: {requests} requests × 128 prompt tokens × 128 new tokens on {torch.cuda.get_device_name(0)}")
    time_engine(llm, prompts[:2], 8)  # warm-up: kernels and allocator
    timing = time_engine(llm, prompts, 128)
    return {"state": "measured", "gpu": torch.cuda.get_device_name(0), "model": model, "requests": requests, **timing}


def verdicts(result: dict[str, Any]) -> dict[str, Verdict]:
    if result["state"] != "measured":
        verdict = Verdict(measured="—", method="r1kit's engine, batched generation", verdict=CANNOT_MEASURE, why=result["reason"])
        return {claim.key: verdict for claim in CLAIMS}
    measured = f"{result['total_tps']:,.0f} tokens/s ({result['decode_tps']:,.0f} decode) on one {result['gpu']}"
    method = f"r1kit engine, {result['model']} in bfloat16, {result['requests']} concurrent requests of 128 + 128 tokens"
    why = "a different GPU and model than the guide's (which names neither model nor batch): reported, not judged"
    return {claim.key: Verdict(measured=measured, method=method, verdict=CANNOT_MEASURE, why=why) for claim in CLAIMS}
