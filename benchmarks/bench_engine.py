"""Benchmark: the r1kit engine vs the reference loop and Hugging Face ``generate`` (issue 5).

On the same Qwen2-architecture weights (random, created locally by ``transformers`` and loaded by
both libraries), float32 on the CPU unless ``--device``/``--dtype`` say otherwise, for each model size
it prints, in one run:

* decode tokens/s at each batch size (concurrent requests): the r1kit engine, the r1kit reference
  loop (requests one after another: its rate does not depend on the batch, so it is timed on at most
  ``--reference-requests`` of them), and ``transformers`` ``generate`` on the left-padded batch,
  with the engine's ratio to each. Decode rate = tokens after the first / time after the first token
  (for ``transformers``: the difference between a run of N and a run of 1 new token);
* achieved memory bandwidth at batch 1 (weight bytes × tokens/s) as a share of the machine's copy
  bandwidth (read + write of a 256 MiB tensor) and of its read bandwidth (a sum over it): decoding
  only reads its weights, so the read figure is its hardware limit;
* continuous batching: throughput when the requests arrive two per step (most steps mix prefill
  chunks with decodes, in one forward) against all of them queued at once;
* decode attention: the engine running module by module reading K/V in place (the paged decode
  kernel: C on the CPU, Triton on CUDA) vs gathering them out of the pool, at the largest batch;
* on the CPU, at each batch size: the whole decode step in one C call (``r1kit.infer.decode_step``,
  which takes steps of up to 16 decodes) vs the same engine running the model module by module;
* time to first token of a ``--prefix-len`` prompt, cold vs with its prefix cached;
* with ``--profile N``: where the host's time goes in N decode steps of one request (cProfile,
  the 20 functions with the most time of their own; on a GPU, time spent waiting for it lands in
  the first call that reads a result back).

All measurements of a model are taken round-robin for ``--repeats`` rounds and the best of each is
reported, so a machine shared with other work disturbs the ratios as little as it can.

Usage: python benchmarks/bench_engine.py [--models 11m,100m] [--batch-sizes 1,8,16] [--prompt-len 128]
       [--new-tokens 128] [--prefix-len 2048] [--threads 2] [--no-hf] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from r1kit.infer.benchmark import (
    memory_bandwidth,
    model_bytes,
    random_prompts,
    time_arrivals,
    time_engine,
    time_prefix_ttft,
    time_reference,
)

ARRIVAL_TOKENS = 32  # new tokens of each request in the continuous-batching comparison

SIZES = {
    "11m": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768),
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048),
}


def make_checkpoint(size: str, path: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=4096, **SIZES[size])
    Qwen2ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


def time_hf(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Decode tokens/s of ``generate`` on the batch: (run of N tokens − run of 1 token)."""
    ids = torch.tensor(prompts, device=model.device)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return time.perf_counter() - t0

    one = run(1)
    full = run(new_tokens)
    return len(prompts) * (new_tokens - 1) / max(full - one, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="11m,100m", help="model sizes to run: 11m, 100m")
    ap.add_argument("--batch-sizes", default="1,8,16", help="numbers of concurrent requests")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per request")
    ap.add_argument("--prefix-len", type=int, default=2048, help="prompt length of the cold vs cached TTFT test (0: skip)")
    ap.add_argument("--reference-requests", type=int, default=2, help="requests timed with the sequential reference loop")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers generate")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin rounds; the best of each is reported")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile N decode steps of one request (0: skip)")
    ap.add_argument("--device", default="cpu", help="torch device of both engines, e.g. cuda (default cpu)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights dtype of both engines")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    on_cpu = torch.device(args.device).type == "cpu"
    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    from r1kit.checkpoints import load_model
    from r1kit.infer.decode_step import MAX_BATCH
    from r1kit.infer.llm import LLM

    bandwidth, read = memory_bandwidth(args.device)
    where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads" if on_cpu else torch.cuda.get_device_name(args.device)
    print(f"# r1kit engine benchmark: {where}, torch {torch.__version__}, {args.dtype}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens")
    print(f"# memory bandwidth: copy (read + write) {bandwidth / 1e9:.1f} GB/s, read {read / 1e9:.1f} GB/s")
    for size in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            make_checkpoint(size, tmp)
            model = load_model(tmp, dtype=dtype, device=args.device).eval()
            # the engine packs its model's weights in place; the reference loop runs the plain model
            plain = load_model(tmp, dtype=dtype, device=args.device).eval()
            hf = None
            if not args.no_hf:
                from transformers import AutoModelForCausalLM

                hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
        nbytes = model_bytes(model)
        nparams = sum(p.numel() for p in model.parameters())
        max_len = max(args.prompt_len + max(args.new_tokens, ARRIVAL_TOKENS), args.prefix_len + 1)
        llm = LLM(model, max_num_seqs=max(sizes), max_model_len=max_len)
        # the same model (already packed) with decodes gathering K/V out of the pool, as prefills do
        gather = LLM(model, max_num_seqs=max(sizes), max_model_len=max_len, decode_kernel=False)
        # the same engine going module by module, not in one call (r1kit.infer.decode_step)
        modules = LLM(model, max_num_seqs=max(sizes), max_model_len=max_len, decode_step=False)
        time_engine(llm, random_prompts(2, 16, 32000, 99), 4)  # warm-up
        # round-robin rounds; the best of each (the least disturbed by other processes) is reported
        engine = {b: [] for b in sizes}
        ttft = {b: [] for b in sizes}
        hf_tps = {b: [] for b in sizes}
        by_module = {b: [] for b in sizes}
        reference, gathered = [], []
        for _ in range(args.repeats):
            gathered.append(time_engine(gather, random_prompts(max(sizes), args.prompt_len, 32000, max(sizes)), args.new_tokens)["decode_tps"])
            reference.append(time_reference(plain, random_prompts(args.reference_requests, args.prompt_len, 32000, 7), args.new_tokens)["decode_tps"])
            for b in sizes:
                prompts = random_prompts(b, args.prompt_len, 32000, b)
                eng = time_engine(llm, prompts, args.new_tokens)
                engine[b].append(eng["decode_tps"])
                by_module[b].append(time_engine(modules, prompts, args.new_tokens)["decode_tps"])
                ttft[b].append(eng["ttft"])
                hf_tps[b].append(time_hf(hf, prompts, args.new_tokens) if hf is not None else float("nan"))
        ref = max(reference)
        print(f"\n## {size}: {nparams / 1e6:.1f}M parameters, {nbytes / 2**20:.0f} MiB "
              f"(best of {args.repeats} rounds)")
        print("| batch | r1kit engine tok/s | reference loop tok/s (sequential) | engine/reference | transformers tok/s | engine/transformers | engine TTFT s |")
        print("|---|---|---|---|---|---|---|")
        for b in sizes:
            e, h = max(engine[b]), max(hf_tps[b])
            print(f"| {b} | {e:.1f} | {ref:.1f} | {e / ref:.2f}x | {h:.1f} | {e / h:.2f}x | {min(ttft[b]):.3f} |")
        if 1 in sizes:
            achieved = nbytes * max(engine[1])
            print(f"batch-1 achieved bandwidth: {achieved / 1e9:.1f} GB/s = {100 * achieved / bandwidth:.0f}% of copy, {100 * achieved / read:.0f}% of read bandwidth")
        one_call = "one call per step" if llm.llm_engine.runner.step is not None else "no one-call step for this model and device"
        for b in sizes:
            print(f"batch {b}: engine ({one_call} up to {MAX_BATCH} sequences) {max(engine[b]):.1f} tok/s, module by module "
                  f"{max(by_module[b]):.1f} tok/s ({max(engine[b]) / max(by_module[b]):.2f}x)")
        e = max(by_module[max(sizes)])
        print(f"decode attention at batch {max(sizes)}, module by module: paged kernel {e:.1f} tok/s, gathering K/V {max(gathered):.1f} tok/s "
              f"({e / max(gathered):.2f}x)")
        # continuous batching: the same requests arriving a few per step (mixed prefill + decode steps)
        arrivals = random_prompts(2 * max(sizes), args.prompt_len, 32000, 5)
        at_once = max(time_arrivals(llm, arrivals, ARRIVAL_TOKENS, None) for _ in range(2))
        trickle = max(time_arrivals(llm, arrivals, ARRIVAL_TOKENS, 2) for _ in range(2))
        print(f"{len(arrivals)} requests x {ARRIVAL_TOKENS} tokens, max_num_seqs {max(sizes)}: all at once {at_once:.1f} tok/s, "
              f"two joining per step {trickle:.1f} tok/s ({100 * trickle / at_once:.0f}%)")
        if args.prefix_len:
            cold, cached, hit = time_prefix_ttft(llm, args.prefix_len, 32000, 0)
            print(f"TTFT of a {args.prefix_len}-token prompt: cold {cold:.3f} s, cached ({hit} tokens hit) {cached:.4f} s -> {cold / cached:.1f}x")
        if args.profile:
            profile_decode(llm, args.prompt_len, args.profile)


def profile_decode(llm, prompt_len: int, steps: int) -> None:
    import cProfile
    import pstats

    from r1kit.infer.sampling import SamplingParams

    engine = llm.llm_engine
    engine.add_request(None, random_prompts(1, prompt_len, 32000, 3)[0], SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
    engine.step()  # the prefill
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    while engine.has_unfinished_requests():
        engine.step()
    profiler.disable()
    print(f"\n{steps} decode steps of one request: {(time.perf_counter() - start) / steps * 1e3:.2f} ms a step under cProfile")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
