"""`r1kit generate`: sample a continuation from a model directory, streaming tokens as they come.

It runs on the engine (paged KV cache, the full sampler); ``--reference`` runs the slow, obviously
correct reference loop instead (same greedy tokens).
"""

from __future__ import annotations

import argparse
import sys

import torch

from r1kit.infer.sampling import SamplingParams

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256, the seed's §6.2)")
    parser.add_argument("--temperature", type=float, default=0.9, help="0 is greedy; default 0.9 (the seed's §6.2)")
    parser.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens; 0 turns it off (default 50)")
    parser.add_argument("--top-p", type=float, default=0.92, help="nucleus: keep the smallest set reaching this probability (default 0.92)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p × the top probability (default 0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.2, help="> 1 discourages repeats (default 1.2)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weights dtype (default: the checkpoint's; float16 runs as bfloat16 in the engine on the CPU)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--show-ids", action="store_true", help="print the generated token ids after the text")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable); the text ends before it")
    parser.add_argument("--thinking-budget", type=int, default=None, help="after this many reasoning tokens, force </think>")
    parser.add_argument("--reference", action="store_true", help="use the reference decoding loop instead of the engine")


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        max_tokens=args.max_new_tokens,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
    )
    if args.reference:
        return _run_reference(args, params)
    from r1kit.data.tokenizer import load_tokenizer
    from r1kit.infer.llm import LLM

    params = params.replace(stop=tuple(args.stop), thinking_budget=args.thinking_budget)
    tokenizer = load_tokenizer(args.model)
    llm = LLM(args.model, tokenizer, dtype=DTYPES[args.dtype], device=args.device, max_num_seqs=1)
    engine = llm.llm_engine
    engine.add_request("cli", args.prompt, params)
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


def _run_reference(args: argparse.Namespace, params: SamplingParams) -> int:
    from r1kit.data.tokenizer import EOS, load_tokenizer
    from r1kit.infer.generate import stream_tokens
    from r1kit.model.hf import load_model

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    eos = model.config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, tuple) else [eos if eos is not None else tokenizer.token_to_id(EOS)]
    prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    generated: list[int] = []
    printed = ""
    sys.stdout.write(args.prompt)
    for token in stream_tokens(model, prompt_ids, params, [e for e in eos_ids if e is not None]):
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
