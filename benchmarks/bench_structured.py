"""Benchmark: structured output's grammar libraries, and what constraining costs the engine (issue 17).

With a real tokenizer (SmolLM2-135M-Instruct's 49152-token byte-level BPE, pulled with ``r1kit pull
smollm2-135m-instruct``) and a typical extraction schema (required fields, an enum, bounded numbers,
an array, a nested object), it prints, in one run, for each library that is installed:

* setup: the tokenizer's vocabulary read into the library (once per engine);
* compile: the schema turned into what the library masks with (once per distinct schema);
* mask: the time to fill one sequence's allowed-token bitmask, per token of a valid document
  (median and mean over its tokens, warm), and for a batch of 16 sequences at different places in
  the document (one call each, and the library's batch call where it has one); for r1kit, also what
  its sampler spends per step on 16 constrained rows (fill, then apply to the logits);

xgrammar is timed through r1kit's own adapter (``r1kit.infer.structured``), llguidance and
outlines-core (JSON schema as a regular expression: no ``json_object`` nor grammars) directly.
Then the engine on the real model: decode tokens/s of ``--batch`` chat requests constrained to the
schema against the same requests unconstrained, each request generating the same number of tokens
in both, measured round-robin (best of ``--repeats``), their ratio, and the share of the constrained
runs' time spent in r1kit's grammar calls (a figure that, unlike the ratio, a busy machine barely moves).

Usage: python benchmarks/bench_structured.py [--model smollm2-135m-instruct] [--batch 4] [--repeats 3]
       [--threads 2] [--no-engine | --no-libraries]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from tqdm import tqdm

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "status": {"enum": ["open", "closed", "pending"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "age", "status"],
}
DOCUMENT = (
    '{"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "status": "open", "score": 0.75, '
    '"tags": ["math", "poetry"], "address": {"city": "London", "zip": "W1"}}'
)
BATCH = 16
QUESTIONS = ["Maria Silva, 34, maria@mail.pt, complaint about a late parcel to Lisbon.",
             "Tom (tom@x.org), aged 51, asks to close his account; he lives in Leeds.",
             "Customer Ana, 28, from Porto, reports a broken charger, email ana@porto.pt.",
             "Ken, 45, ken@k.jp, pending refund, Osaka."]  # fmt: skip


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _per_token(fill, advance, ids) -> list[float]:
    times = []
    for token in ids:
        start = time.perf_counter()
        fill()
        times.append(time.perf_counter() - start)
        advance(token)
    return times


def bench_xgrammar(tok, vocab: int, ids: list[int], eos: int) -> dict:
    from r1kit.infer.sampling import StructuredOutputs
    from r1kit.infer.structured import Grammars, _tokenizer_info, mask_disallowed

    spec = StructuredOutputs(json=SCHEMA)  # loads the library: not part of the setup time
    _, setup = _timed(lambda: _tokenizer_info(tok, vocab))  # what Grammars does once, on its first spec
    grammars = Grammars(tok, vocab)
    grammars.compile(StructuredOutputs(json_object=True))
    _, compile_s = _timed(lambda: grammars.compile(spec))
    bitmask = torch.empty((BATCH, -(-vocab // 32)), dtype=torch.int32)

    def walk():
        (state,) = grammars.states(spec, [eos], 1)
        return _per_token(lambda: state.fill(bitmask, 0), state.accept, ids)

    walk()
    states = grammars.states(spec, [eos], BATCH)
    for b, state in enumerate(states):
        for token in ids[: b * len(ids) // BATCH]:
            state.accept(token)
    _, batch = _timed(lambda: [s.fill(bitmask, b) for b, s in enumerate(states)])
    logits = torch.randn(BATCH, vocab)
    mask_disallowed(logits, list(range(BATCH)), states)
    _, applied = _timed(lambda: mask_disallowed(logits, list(range(BATCH)), states))  # masking masked logits: the same work
    print(f"(r1kit's sampler mask for {BATCH} rows, fill + apply to the logits: {applied * 1e6:.0f} µs)")
    return {"setup": setup, "compile": compile_s, "mask": walk(), "batch": batch, "batch_call": None}


def bench_llguidance(tok, vocab: int, ids: list[int], eos: int) -> dict:
    import llguidance
    import llguidance.torch as llt

    lltok, setup = _timed(lambda: llguidance.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=eos))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": True})
    _, compile_s = _timed(lambda: llguidance.LLMatcher(lltok, grammar))  # no compile step: a matcher parses lazily
    bitmask = llt.allocate_token_bitmask(BATCH, vocab)

    def walk():
        matcher = llguidance.LLMatcher(lltok, grammar)
        return _per_token(lambda: llt.fill_next_token_bitmask(matcher, bitmask, 0), matcher.consume_token, ids)

    walk()
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(BATCH)]
    for b, matcher in enumerate(matchers):
        matcher.consume_tokens(ids[: b * len(ids) // BATCH])
    _, batch = _timed(lambda: [llt.fill_next_token_bitmask(m, bitmask, b) for b, m in enumerate(matchers)])
    executor = llguidance.LLExecutor()
    _, batch_call = _timed(lambda: llt.fill_next_token_bitmask_par(executor, [(m, b) for b, m in enumerate(matchers)], bitmask))
    return {"setup": setup, "compile": compile_s, "mask": walk(), "batch": batch, "batch_call": batch_call}


def _byte_vocabulary(tok, eos: int):
    """outlines-core wants each token's bytes: undo the byte-level BPE's printable byte alphabet."""
    from outlines_core import Vocabulary

    byte_of = {char: b for b, char in enumerate(_GPT2_CHARS)}
    tokens: dict[bytes, list[int]] = {}
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    for text, i in tok.get_vocab(with_added_tokens=True).items():
        if i not in special and i != eos:
            tokens.setdefault(bytes(byte_of[c] for c in text), []).append(i)
    return Vocabulary(eos, tokens)


# GPT-2's byte-to-character table, in byte order: the printable bytes keep their own code point, the
# others take the code points from 256 on, in order
_PRINTABLE = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
_GPT2_CHARS = [chr(b) if b in _PRINTABLE else chr(256 + sum(1 for x in range(b) if x not in _PRINTABLE)) for b in range(256)]


def bench_outlines(tok, vocab: int, ids: list[int], eos: int) -> dict:
    from outlines_core import Guide, Index
    from outlines_core.json_schema import build_regex_from_schema

    vocabulary, setup = _timed(lambda: _byte_vocabulary(tok, eos))
    index, compile_s = _timed(lambda: Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary))
    bitmask = torch.zeros((BATCH, -(-vocab // 32)), dtype=torch.int32)

    def fill(guide, row):
        guide.write_mask_into(bitmask[row].data_ptr(), bitmask[row].numel(), 4)

    def walk():
        guide = Guide(index)
        return _per_token(lambda: fill(guide, 0), lambda t: guide.advance(t, return_tokens=False), ids)

    walk()
    guides = [Guide(index) for _ in range(BATCH)]
    for b, guide in enumerate(guides):
        for token in ids[: b * len(ids) // BATCH]:
            guide.advance(token, return_tokens=False)
    _, batch = _timed(lambda: [fill(g, b) for b, g in enumerate(guides)])
    return {"setup": setup, "compile": compile_s, "mask": walk(), "batch": batch, "batch_call": None}


LIBRARIES = {"xgrammar (r1kit)": bench_xgrammar, "llguidance": bench_llguidance, "outlines-core": bench_outlines}


def compare_libraries(tok, vocab: int, eos: int) -> None:
    ids = tok.encode(DOCUMENT, add_special_tokens=False).ids
    print(f"schema: {len(SCHEMA['properties'])} properties; document: {len(ids)} tokens; vocabulary {vocab}")
    print(f"{'library':18} {'setup ms':>9} {'compile ms':>11} {'mask µs/token':>14} {'(mean)':>8} {'batch16 µs':>11} {'batch call µs':>14}")
    for name, bench in LIBRARIES.items():
        try:
            r = bench(tok, vocab, ids, eos)
        except ImportError as exc:
            print(f"{name:18} not installed ({exc.name})")
            continue
        call = "-" if r["batch_call"] is None else f"{r['batch_call'] * 1e6:.0f}"
        print(f"{name:18} {r['setup'] * 1e3:9.1f} {r['compile'] * 1e3:11.2f} {statistics.median(r['mask']) * 1e6:14.1f} "
              f"{statistics.mean(r['mask']) * 1e6:8.1f} {r['batch'] * 1e6:11.0f} {call:>14}")  # fmt: skip


def compare_engine(model: str, batch: int, repeats: int) -> None:
    from r1kit.chat_template import ChatTemplate
    from r1kit.checkpoints import resolve_model
    from r1kit.infer.llm import LLM
    from r1kit.infer.sampling import SamplingParams, StructuredOutputs

    path = resolve_model(model)
    llm = LLM(str(path))
    template = ChatTemplate.from_model_dir(path)
    ask = "Extract the customer as JSON (name, age, email, status, city): "
    prompts = [template.render([{"role": "user", "content": ask + QUESTIONS[i % len(QUESTIONS)]}]) for i in range(batch)]
    guided = SamplingParams(temperature=0, max_tokens=200, structured=StructuredOutputs(json=SCHEMA))
    lengths = [len(o.outputs[0].token_ids) for o in llm.generate(prompts, guided, use_tqdm=False)]  # also compiles the grammar
    free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    best = {"constrained": 0.0, "unconstrained": 0.0}
    grammar_work = _GrammarClock()
    for _ in tqdm(range(repeats), desc="engine rounds"):
        for kind, params in (("constrained", guided), ("unconstrained", free)):
            with grammar_work if kind == "constrained" else contextlib.nullcontext():
                outs, seconds = _timed(lambda params=params: llm.generate(prompts, params, use_tqdm=False))
            best[kind] = max(best[kind], sum(len(o.outputs[0].token_ids) for o in outs) / seconds)
            if kind == "constrained":
                grammar_work.wall += seconds
    print(f"\nengine, {path.name}, {batch} requests, {sum(lengths)} tokens each way (prefill included), best of {repeats}:")
    for kind, rate in best.items():
        print(f"  {kind:14} {rate:8.1f} tok/s")
    print(f"  constrained / unconstrained: {best['constrained'] / best['unconstrained']:.3f}")
    print(f"  grammar work in the constrained runs: masks {grammar_work.mask * 1e3:.0f} ms + advancing {grammar_work.accept * 1e3:.0f} ms "
          f"= {100 * (grammar_work.mask + grammar_work.accept) / grammar_work.wall:.2f}% of their {grammar_work.wall:.1f} s "
          "(the ratio above moves with the machine's load; this share does not)")  # fmt: skip


class _GrammarClock:
    """While entered, times r1kit's two per-step grammar calls: the sampler's mask and the engine's
    advance of each sequence's state."""

    def __init__(self) -> None:
        self.mask = self.accept = self.wall = 0.0

    def __enter__(self):
        from r1kit.infer import sampler, structured

        self._saved = sampler.mask_disallowed, structured.GrammarState.accept
        sampler.mask_disallowed = self._timing(self._saved[0], "mask")
        structured.GrammarState.accept = self._timing(self._saved[1], "accept")
        return self

    def __exit__(self, *exc) -> None:
        from r1kit.infer import sampler, structured

        sampler.mask_disallowed, structured.GrammarState.accept = self._saved

    def _timing(self, fn, name: str):
        def timed(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                setattr(self, name, getattr(self, name) + time.perf_counter() - start)

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model directory or pulled name (its tokenizer for the library table)")
    parser.add_argument("--batch", type=int, default=4, help="concurrent requests in the engine comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-engine", action="store_true", help="only the library table")
    parser.add_argument("--no-libraries", action="store_true", help="only the engine comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from r1kit.checkpoints import resolve_model
    from r1kit.tokenizer import load_tokenizer

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    vocab, eos = config["vocab_size"], config["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    print(f"threads {args.threads}; timings on a shared machine are noisy: compare the rows of one run")
    if not args.no_libraries:
        compare_libraries(tok, vocab, eos)
    if not args.no_engine:
        compare_engine(args.model, args.batch, args.repeats)


if __name__ == "__main__":
    main()
