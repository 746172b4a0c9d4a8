"""`r1kit apps complete FILE --line L [--col C]`: complete code at a cursor with any r1kit model.

Prints the best candidate (the text to insert at the cursor); with ``-n`` above 1 and ``--all``,
every distinct candidate with its mean log-probability. ``--json`` prints the prompt's facts too.
"""

from __future__ import annotations

import argparse
import json
import sys

from r1kit.device import DTYPE_CHOICES

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the source file to complete in (UTF-8; language from the extension)")
    parser.add_argument("--line", type=int, required=True, help="1-based line of the cursor")
    parser.add_argument("--col", type=int, default=None, help="0-based column of the cursor (default: the end of the line)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model directory, .gguf file or pulled model name (default {DEFAULT_MODEL}: run `r1kit pull {DEFAULT_MODEL}` once)")
    parser.add_argument("-n", type=int, default=3, help="candidates to sample and rank (default 3)")
    parser.add_argument("--single-line", action="store_true", help="complete the current line only, not the block")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per candidate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.4, help="sampling temperature; 0 is one greedy candidate (default 0.4)")
    parser.add_argument("--context", type=int, default=8192, help="context window in tokens shared by prompt and completion (default 8192, the seed's)")
    parser.add_argument("--neighbours", type=int, default=3, help="other files of the same language from the file's folder to show the model (default 3)")
    parser.add_argument("--language", default=None, help="override the language read from the extension (python, c, cpp, java, ...)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--all", action="store_true", help="print every candidate with its score, best first")
    parser.add_argument("--json", action="store_true", help="print candidates and prompt facts as JSON")


def run(args: argparse.Namespace) -> int:
    from r1kit.apps.code.complete import CompletionConfig, complete_file, read_cursor
    from r1kit.checkpoints.load import resolve_model

    cursor = read_cursor(args.file, args.line, args.col, args.language)  # bad input fails before the model loads
    from r1kit.infer.llm import LLM

    llm = LLM(resolve_model(args.model), dtype=args.dtype, device=args.device)
    # the window is the seed's 8,192 tokens or the model's own, whichever is smaller
    config = CompletionConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              single_line=args.single_line, context_tokens=min(args.context, llm.llm_engine.max_model_len),
                              neighbour_files=args.neighbours, seed=args.seed)
    prompt, candidates = complete_file(llm, cursor, config)
    if args.json:
        print(json.dumps({
            "file": str(cursor.path), "language": cursor.language.name, "fim": prompt.fim.name if prompt.fim else None,
            "prompt_tokens": prompt.tokens, "neighbours": list(prompt.neighbours),
            "candidates": [{"text": c.text, "mean_logprob": c.mean_logprob, "tokens": c.tokens} for c in candidates],
        }, indent=2))
    elif args.all:
        for rank, candidate in enumerate(candidates, 1):
            print(f"--- candidate {rank}: mean log-probability {candidate.mean_logprob:.3f} over {candidate.tokens} tokens")
            print(candidate.text)
    else:
        sys.stdout.write(candidates[0].text + ("" if candidates[0].text.endswith("\n") else "\n"))
    return 0
