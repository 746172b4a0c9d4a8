"""`r1kit generate`: sample a continuation from a model directory, streaming tokens as they come.

It runs on the engine (paged KV cache, the full sampler); ``--reference`` runs the slow, obviously
correct reference loop instead (same greedy tokens). A sampling flag left out takes the model's
``generation_config.json`` value (``--generation-config auto``, as vLLM), else the seed's §6.2 recipe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from r1kit.device import DTYPE_CHOICES, resolve_dtype
from r1kit.generation_config import MODES, GenerationConfig
from r1kit.infer.sampling import SamplingParams

# the seed's §6.2 recipe against repetitive output: the defaults when neither a flag nor the model sets one
RECIPE = {"temperature": 0.9, "top_k": 50, "top_p": 0.92, "min_p": 0.0, "repetition_penalty": 1.2, "max_tokens": 256}
FLAGS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "repetition_penalty": "repetition_penalty", "max_tokens": "max_new_tokens"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer.json), .gguf file or pulled model name")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, help="most tokens to generate (default: the model's, else 256, the seed's §6.2)")
    parser.add_argument("--temperature", type=float, help="0 is greedy (default: the model's, else 0.9, the seed's §6.2)")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens; 0 turns it off (default: the model's, else 50)")
    parser.add_argument("--top-p", type=float, help="nucleus: keep the smallest set reaching this probability (default: the model's, else 0.92)")
    parser.add_argument("--min-p", type=float, help="drop tokens below min_p × the top probability (default: the model's, else 0: off)")
    parser.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (default: the model's, else 1.2)")
    parser.add_argument("--generation-config", choices=MODES, default="auto",
                        help="auto (default): the model's generation_config.json fills the sampling flags left out; none: the seed's recipe")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="weights dtype (default: the checkpoint's; float16 runs as bfloat16 in the engine on the CPU)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--show-ids", action="store_true", help="print the generated token ids after the text")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable); the text ends before it")
    parser.add_argument("--thinking-budget", type=int, default=None, help="after this many reasoning tokens, force </think>")
    parser.add_argument("--reference", action="store_true", help="use the reference decoding loop instead of the engine")


def sampling_params(args: argparse.Namespace, generation: GenerationConfig) -> SamplingParams:
    """The flags given, over the model's generation_config.json, over the seed's recipe."""
    given = {name: getattr(args, flag) for name, flag in FLAGS.items() if getattr(args, flag) is not None}
    return SamplingParams(**{**RECIPE, **generation.sampling_defaults(), **given}, ignore_eos=args.ignore_eos, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from r1kit.checkpoints.load import resolve_model

    model_dir = resolve_model(args.model)
    generation = GenerationConfig.for_model(model_dir, args.generation_config)
    params = sampling_params(args, generation)
    if args.reference:
        return _run_reference(args, model_dir, params, generation)
    from r1kit.tokenizer import load_tokenizer
    from r1kit.infer.llm import LLM

    params = params.replace(stop=tuple(args.stop), thinking_budget=args.thinking_budget)
    tokenizer = load_tokenizer(model_dir)
    llm = LLM(model_dir, tokenizer, dtype=resolve_dtype(args.dtype, "--dtype"), device=args.device, generation_config=args.generation_config, max_num_seqs=1)
    engine = llm.llm_engine
    engine.add_request("cli", args.prompt, llm.request_params(params))
    sys.stdout.write(args.prompt)
    generated: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
            generated = out.outputs[0].token_ids
    sys.stdout.write("\n")
    if args.show_ids:
        print(f"ids: {generated}")
    return 0


def _run_reference(args: argparse.Namespace, model_dir: Path, params: SamplingParams, generation: GenerationConfig) -> int:
    from r1kit.checkpoints.load import load_model
    from r1kit.tokenizer import EOS, load_tokenizer
    from r1kit.infer.generate import stream_tokens

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=resolve_dtype(args.dtype, "--dtype"), device=args.device)
    eos = model.config.eos_token_id
    eos_ids = [e for e in (eos if isinstance(eos, tuple) else [eos if eos is not None else tokenizer.token_to_id(EOS)]) if e is not None]
    params = params.with_eos_ids(generation.extra_stop_ids(eos_ids, model.config.vocab_size))
    prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=True).ids  # as the engine encodes a text prompt
    generated: list[int] = []
    printed = ""
    sys.stdout.write(args.prompt)
    for token in stream_tokens(model, prompt_ids, params, eos_ids):
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    sys.stdout.write("\n")
    if args.show_ids:
        print(f"ids: {generated}")
    return 0
