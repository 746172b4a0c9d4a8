"""`r1kit apps intent train|eval`: train the customer-service intent head on a model's pooled hidden
states, or evaluate a recogniser (the trained head, or zero-shot label scoring) on a split of the
labelled set: accuracy, macro-F1, per-intent recall, latency p50/p95, and a confusion-matrix PNG."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_LAYER = 6  # of SmolLM2-135M's 30: the best of the layers measured on the shipped set (docs/support.md)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="intent_verb", metavar="ACTION", title="actions")
    train = sub.add_parser("train", help="train a linear intent head on pooled hidden states", description="train a linear intent head on pooled hidden states")
    evaluate = sub.add_parser("eval", help="evaluate the head or zero-shot scoring on a split", description="evaluate the head or zero-shot scoring on a split")
    for p in (train, evaluate):
        p.add_argument("--model", required=True, help="model directory, .gguf file or pulled model name")
        p.add_argument("--data", type=Path, help="labelled JSONL (text, intent, split); default: the shipped bilingual shop set")
        p.add_argument("--dtype", default="bfloat16", help="the recogniser's weights (default bfloat16)")
    train.add_argument("--out", type=Path, help="directory for the head (default: <model dir>/intent-head, beside the model)")
    train.add_argument("--layer", type=int, default=DEFAULT_LAYER, help=f"hidden states after this many layers, mean-pooled (default {DEFAULT_LAYER}; -1: the last)")
    train.add_argument("--weight-decay", type=float, default=1e-2, help="L2 penalty on the head's weights (default 0.01)")
    evaluate.add_argument("--method", choices=["head", "zero_shot"], default="head", help="the trained head (default) or zero-shot label scoring")
    evaluate.add_argument("--head", type=Path, help="the head's directory (default: <model dir>/intent-head)")
    evaluate.add_argument("--split", default="test", help="split to score (default test)")
    evaluate.add_argument("--limit", type=int, help="score only the first N messages of the split (zero-shot is slow on a CPU)")
    evaluate.add_argument("--threshold", type=float, default=0.5, help="below this confidence: out_of_scope (default 0.5)")
    evaluate.add_argument("--out", type=Path, help="directory for confusion.png and eval.json (default: the head's directory, or ./intent-eval)")


def run(args: argparse.Namespace) -> int:
    from r1kit.errors import ConfigError

    if args.intent_verb is None:
        raise ConfigError("name an action: r1kit apps intent train|eval")
    return train(args) if args.intent_verb == "train" else evaluate(args)


def _load(args):
    from r1kit.chat_template import ChatTemplate
    from r1kit.checkpoints.load import load_model, resolve_model
    from r1kit.device import resolve_dtype
    from r1kit.tokenizer import load_tokenizer

    model_dir = resolve_model(args.model)
    model = load_model(model_dir, dtype=resolve_dtype(args.dtype, "--dtype")).eval()
    return model_dir, model, load_tokenizer(model_dir), ChatTemplate.from_model_dir(model_dir)


def train(args: argparse.Namespace) -> int:
    from r1kit.apps.support.dataset import load_examples, split
    from r1kit.apps.support.features import pooled_features
    from r1kit.apps.support.head import train_head
    from r1kit.apps.support.intent import default_head_dir

    examples = split(load_examples(args.data), "train")
    model_dir, model, tokenizer, _ = _load(args)
    start = time.perf_counter()
    features = pooled_features(model, tokenizer, [e.text for e in examples], args.layer, progress=True)
    head = train_head(features, [e.intent for e in examples], args.layer, model_dir.name, weight_decay=args.weight_decay)
    out = args.out or default_head_dir(model_dir)
    head.save(out, {"train_examples": len(examples), "data": str(args.data or "shipped")})
    print(f"trained a head for {len(head.labels)} intents on {len(examples)} messages (layer {args.layer}, "
          f"temperature {head.temperature:.3f}) in {time.perf_counter() - start:.1f} s -> {out}")  # fmt: skip
    return 0


def evaluate(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from r1kit.apps.support.dataset import load_examples, split
    from r1kit.apps.support.intent import build_recognizer, default_head_dir
    from r1kit.apps.support.report import plot_confusion
    from r1kit.apps.support.scoring import scores

    examples = split(load_examples(args.data), args.split)[: args.limit]
    model_dir, model, tokenizer, template = _load(args)
    head_dir = args.head or default_head_dir(model_dir)
    recognizer = build_recognizer(args.method, model, tokenizer, template, args.threshold, head_dir if args.method == "head" else None)
    results, latencies = [], []
    for example in tqdm(examples, desc=f"{args.method} on {args.split}", unit="msg"):
        start = time.perf_counter()
        (result,) = recognizer.recognize([example.text])
        latencies.append(time.perf_counter() - start)
        results.append(result)
    gold = [e.intent for e in examples]
    labels = sorted(set(gold) | set(recognizer.labels))
    final = scores(gold, [r.intent for r in results], labels)
    top1 = scores(gold, [r.predicted for r in results], labels)
    p50, p95 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 95))
    print(f"{args.method} on {len(examples)} {args.split} messages: accuracy {final['accuracy']:.4f} (top-1 before the "
          f"threshold {top1['accuracy']:.4f}), macro-F1 {final['macro_f1']:.4f}, latency p50 {p50:.1f} ms, p95 {p95:.1f} ms")  # fmt: skip
    print("recall per intent:")
    for label, value in final["recall"].items():
        if label in gold:
            print(f"  {label:18s} {value:.3f}")
    out = args.out or (head_dir if args.method == "head" else Path("intent-eval"))
    out.mkdir(parents=True, exist_ok=True)
    png = plot_confusion(final["confusion"], labels, out / "confusion.png", f"{args.method}: accuracy {final['accuracy']:.3f} ({args.split})")
    report = {"method": args.method, "split": args.split, "messages": len(examples), **final, "top1_accuracy": top1["accuracy"],
              "latency_ms": {"p50": p50, "p95": p95}, "labels": labels}  # fmt: skip
    from r1kit.data.records import AtomicWriter

    with AtomicWriter(out / "eval.json") as f:
        f.file.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print(f"confusion matrix: {png}")
    return 0
