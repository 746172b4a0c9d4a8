"""Benchmark: 4-bit GPTQ vs RTN vs fp32 — perplexity, size on disk, quantization time, decode speed (issue 7).

Two models, both built here (no download):

* **quality**: an r1kit model trained briefly (plain AdamW) on the embedded corpus — the standard
  library's ``.py`` sources — with a byte-level BPE trained on the same text. Files are split into
  train and held-out by a hash of their path. It reports held-out perplexity for fp32, RTN 4-bit and
  GPTQ 4-bit (same group size), the quantization time of each, and the checkpoint size on disk.
* **speed**: a randomly initialised Qwen2-architecture model (~90M parameters by default: hidden 768,
  12 layers, GQA 12/4 heads, SwiGLU 2048, q/k/v bias). Weights do not change decode speed, so it is
  RTN-quantized. It reports greedy decode tokens/s (``r1kit.infer.generate``, batch 1) for fp32,
  bf16, the int4 CPU kernel, the int4 dequantize-then-matmul path, and int4 linears with the rest of
  the model (lm_head, activations) in bf16, in the same run, with ratios, and
  as gpt-fast does, the achieved weight-read bandwidth (bytes of weights per token × tokens/s);
  then the same four on the engine, which packs float weights for oneDNN (about twice the
  reference loop's fp32 speed), fuses the int4 q/k/v and gate/up calls and freezes the int4 layers,
  and fp32 against int4 there at ``--engine-batches`` concurrent requests; then r1kit's int4 CPU
  kernel against torch's on the speed model's products (and 4096×4096), weights streamed from memory.

* **the int8 kernel** (q8_0 class): r1kit's int8 CPU kernel against a oneDNN-packed bfloat16 product and
  r1kit's int4 kernel at SmolLM2-135M's shapes (576×576, 576×192, 576×1536, 1536×576, the 576×49152
  head), batch 1 and 8, weights streamed from memory, with the ratios; alone::

      python benchmarks/bench_quant.py --skip-quality --skip-real --skip-speed --skip-head

* **the quantized head on the engine** (``--real-model``): bf16 against int8 and int4 (RTN, group 64),
  each with the output head float and quantized (``--quantize-lm-head``), decode tokens/s at batch 1
  and 8 with the ratios and the weight bytes a step reads; alone::

      python benchmarks/bench_quant.py --skip-quality --skip-real --skip-speed --skip-int8-kernel --threads 1

* **a real model** (``--real-model``, SmolLM2-135M-Instruct by default, ``r1kit pull``-ed once): the issue's
  protocol with texts every Python install holds (:func:`protocol_texts`: calibration 128 × 512 tokens,
  half Python's documentation topics, half standard-library source; perplexity on 16 × 512 held-out
  documentation tokens through r1kit's int4 layers). Perplexity and quantization time of r1kit RTN,
  r1kit GPTQ with its defaults and with ``REAL_BEST`` added, at group 64 and 128 (``--real-groups``;
  576-wide layers leave a partial last group at 128), and GPTQModel's where it is installed.

  GPTQModel 7.7.0 needs torch >= 2.14.1 (r1kit's environment pins another), so it lives in its own
  environment, run as a subprocess on the same calibration token ids; r1kit scores its checkpoint::

      python -m venv /tmp/gptqmodel-venv
      /tmp/gptqmodel-venv/bin/pip install gptqmodel==7.7.0      # brings its own torch (>= 2.14.1)
      python benchmarks/bench_quant.py --skip-quality --skip-speed --gptqmodel-python /tmp/gptqmodel-venv/bin/python

  Without it the section says GPTQModel is absent and quotes the issue's figure. ``--real-nsamples 16
  --real-seqlen 256`` gives a quicker, rougher table.

Sizes: the seed's "12.5%" is 4/32 bits, relative to fp32 *linear weights*; fp16 group scales,
packed zeros and g_idx add to it, and the embeddings and ``lm_head`` stay float. Both the
linear-only ratio and the whole-checkpoint ratio are printed.

Usage: python benchmarks/bench_quant.py [--steps 300] [--nsamples 128] [--group-sizes 128,-1] [--threads 1,2]
       [--real-nsamples 128 --real-seqlen 512 --real-groups 64,128 --gptqmodel-python PATH] [--skip-real] [--skip-real-best]
       [--speed-hidden 768 --speed-layers 12 --decode-tokens 32] [--engine-batches 8,16] [--skip-quality] [--skip-speed]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import platform
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from r1kit.checkpoints import load_model
from r1kit.config import ModelConfig
from r1kit.infer.generate import generate
from r1kit.infer.sampling import SamplingParams
from r1kit.model.transformer import R1kitForCausalLM
from r1kit.quant import (
    QuantLinear,
    QuantConfig,
    quantize_model,
    save_quantized,
    to_quantized,
)
from r1kit.quant.quantizer import layer_linears
from r1kit.tokenizer import train_tokenizer


# -- data --------------------------------------------------------------------------------------------
def corpus(max_bytes: int) -> tuple[list[str], list[str]]:
    """(train, held-out) texts from the stdlib sources, split 9:1 by a hash of the path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val, total = [], [], 0
    for file in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in file.parts[-2:][0] or file.name.startswith("test"):
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        bucket = val if hashlib.blake2b(str(file.relative_to(root)).encode(), digest_size=2).digest()[0] < 26 else train
        bucket.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return train, val


def windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    n = (ids.numel() - 1) // seqlen
    return ids[: n * seqlen + 1].unfold(0, seqlen + 1, seqlen)  # [n, seqlen + 1], one token of overlap


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    for b in range(0, blocks.shape[0], batch):
        x = blocks[b : b + batch]
        logits = model(x[:, :-1]).float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(total / count)


def train(model, blocks: torch.Tensor, steps: int, batch: int, lr: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        for group in opt.param_groups:  # warm-up, then cosine to 10%
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = blocks[torch.randint(0, blocks.shape[0], (batch,), generator=g)]
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return float(loss.detach())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def linear_bytes(model) -> tuple[int, int]:
    """(fp32 bytes of the quantizable linears' weights, bytes of their GPTQ tensors incl. scales/zeros/g_idx)."""
    fp, q = 0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            fp += m.in_features * m.out_features * 4
            q += sum(t.numel() * t.element_size() for t in (m.qweight, m.qzeros, m.scales.half(), m.g_idx))
    return fp, q


@torch.no_grad()
def linear_inputs(model, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every quantizable linear's inputs [tokens, in] when the float model reads ``blocks``."""
    inputs, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, linear in layer_linears(layer).items():
            hooks.append(linear.register_forward_hook(
                lambda _m, inp, _out, key=f"model.layers.{i}.{name}": inputs.__setitem__(key, inp[0].reshape(-1, inp[0].shape[-1]))))
    try:
        model(blocks[:, :-1])
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


@torch.no_grad()
def output_errors(state: dict[str, torch.Tensor], quantized, inputs: dict[str, torch.Tensor]) -> list[float]:
    """Per linear, ‖X·(W − Q)ᵀ‖² / ‖X·Wᵀ‖² on held-out inputs X: the error GPTQ minimises (on its
    calibration inputs), measured on text it did not see."""
    errors = []
    for key, x in inputs.items():
        w = state[f"{key}.weight"]
        q = quantized.get_submodule(key).weight
        errors.append(float((x @ (w - q).T).square().sum() / (x @ w.T).square().sum()))
    return errors


# -- quality -------------------------------------------------------------------------------------------
def bench_quality(args) -> None:
    torch.set_num_threads(args.threads[0])
    t0 = time.perf_counter()
    train_texts, val_texts = corpus(args.corpus_bytes)
    tok = train_tokenizer(train_texts, vocab_size=args.vocab)
    enc = lambda texts: torch.tensor([i for t in texts for i in tok.encode(t).ids])
    train_ids, val_ids = enc(train_texts), enc(val_texts)
    train_blocks, val_blocks = windows(train_ids, args.seqlen), windows(val_ids, args.seqlen)[: args.eval_blocks]
    if args.arch == "qwen2":  # Qwen2's shape: GQA 3:1, q/k/v bias, tied embeddings
        shape = dict(num_kv_heads=max(1, args.hidden // 192), intermediate_size=args.ffn or args.hidden * 8 // 3, qkv_bias=True,
                     tie_embeddings=True)
    else:  # Llama's: GQA 2:1, no bias, separate lm_head
        shape = dict(num_kv_heads=max(1, args.hidden // 128), intermediate_size=args.ffn or args.hidden * 3, tie_embeddings=False)
    config = ModelConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
        max_seq_len=args.seqlen, **shape,
    )
    torch.manual_seed(0)
    model = R1kitForCausalLM(config)
    print(f"quality model: {args.arch} shape, {config.num_parameters() / 1e6:.2f}M parameters ({args.layers} layers, hidden {args.hidden}, vocab "
          f"{config.vocab_size}); corpus {train_ids.numel()} train / {val_ids.numel()} held-out tokens ({time.perf_counter() - t0:.0f}s to prepare)")
    t0 = time.perf_counter()
    last = train(model, train_blocks, args.steps, args.batch, args.lr)
    model.eval()
    print(f"trained {args.steps} steps × {args.batch} × {args.seqlen} tokens in {time.perf_counter() - t0:.0f}s (last loss {last:.3f})")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = train_blocks[torch.randperm(train_blocks.shape[0], generator=torch.Generator().manual_seed(1))[: args.nsamples], :-1]
    rows = [("fp32", perplexity(model, val_blocks), 0.0, None)]
    held_out_inputs = linear_inputs(model, val_blocks[: args.error_blocks])
    errors: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "fp32")
        fp_size = dir_bytes(Path(tmp) / "fp32")
        for group_size in args.group_sizes:
            for method in ("rtn", "gptq"):
                m = R1kitForCausalLM(config).eval()
                m.load_state_dict(state)
                qc = QuantConfig(group_size=group_size, method=method, desc_act=args.desc_act)
                t0 = time.perf_counter()
                results = quantize_model(m, qc, calib if method == "gptq" else None, batch_size=8)
                seconds = time.perf_counter() - t0
                if group_size == args.group_sizes[0]:  # m holds the fake-quantized float weights now
                    errors[method] = output_errors(state, m, held_out_inputs)
                out = Path(tmp) / f"{method}{group_size}"
                save_quantized(m, out, qc, results)
                loaded = load_model(out)  # perplexity through the int4 layers, as served
                name = f"{method} 4-bit " + (f"g{group_size}" if group_size != -1 else "per-channel")
                rows.append((name, perplexity(loaded, val_blocks), seconds, dir_bytes(out)))
                if group_size == args.group_sizes[0]:
                    lin_fp, lin_q = linear_bytes(loaded)
    base = rows[0][1]
    print(f"\nheld-out perplexity ({val_blocks.shape[0]} × {args.seqlen} tokens); GPTQ calibration {calib.shape[0]} × {calib.shape[1]} tokens")
    print(f"{'model':<24}{'perplexity':>12}{'vs fp32':>10}{'quant time':>12}{'size on disk':>16}{'vs fp32':>9}")
    for name, ppl, seconds, size in rows:
        size = size or fp_size
        print(f"{name:<24}{ppl:>12.3f}{100 * (ppl / base - 1):>+9.2f}%{seconds:>11.1f}s{size / 2**20:>13.2f} MiB{100 * size / fp_size:>8.1f}%")
    rtn, gptq = errors["rtn"], errors["gptq"]
    print(f"layer-output error on held-out text (g{args.group_sizes[0]}, {len(rtn)} linears, ‖X(W−Q)ᵀ‖²/‖XWᵀ‖²): "
          f"RTN mean {100 * sum(rtn) / len(rtn):.3f}%, GPTQ mean {100 * sum(gptq) / len(gptq):.3f}% "
          f"({sum(g < r for g, r in zip(gptq, rtn))}/{len(rtn)} linears lower with GPTQ, GPTQ/RTN {sum(gptq) / sum(rtn):.2f})")
    print(f"quantized linears alone (g{args.group_sizes[0]}): {lin_q / 2**20:.2f} MiB vs {lin_fp / 2**20:.2f} MiB fp32 = {100 * lin_q / lin_fp:.2f}% "
          f"(4/32 = 12.5% + scales/zeros/g_idx); embeddings and lm_head stay fp32")


# -- a real model: SmolLM2-135M-Instruct against GPTQModel ---------------------------------------------------
# the protocol: 128 × 512 calibration tokens of English docs and Python code, perplexity on 16 × 512
# held-out English tokens; the defaults (act-group-aware order, damp 0.05, clipping search) measured best per layer
# in docs/quant.md; REAL_BEST is the other ordering that measured well there (act-order with static groups)
REAL_BEST = {"desc_act": True, "static_groups": True}
GPTQMODEL_SCRIPT = """
import json, sys, time
import gptqmodel
from gptqmodel import GPTQModel, QuantizeConfig
# GPTQModel 7.7.0 sizes its CPU pool at (cores + 1) // 2 workers and then asks for a 2-worker model
# loader under it, which a 2-core machine refuses ("requests 2 workers but parent 'cpu' only has 1")
gptqmodel._default_cpu_workers = lambda: 2
model_dir, calib_file, out, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = json.load(open(calib_file))
model = GPTQModel.load(model_dir, QuantizeConfig(bits=4, group_size=group, desc_act=False, sym=True), device="cpu")
start = time.perf_counter()
model.quantize([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows], batch_size=1)
seconds = time.perf_counter() - start
model.save(out)
print(json.dumps({"seconds": seconds}))
"""


def protocol_texts(directory: Path) -> tuple[Path, Path]:
    """(calibration, held-out) text files from what every Python install holds, fixed by hashes of names.

    Python's documentation topics (``pydoc_data.topics``, English prose about the language) are split
    by a hash of each topic's name, about 85% for calibration and 15% held out; the calibration file
    then gets as many characters of standard-library source (``.py`` files in name order, no tests), so
    random windows of it are half English docs and half Python code. The held-out file is English only.
    """
    import pydoc_data.topics

    held = lambda name: hashlib.blake2b(name.encode(), digest_size=2).digest()[0] < 70
    topics = sorted(pydoc_data.topics.topics.items())
    docs = "\n\n".join(text for name, text in topics if not held(name))
    code, size = [], 0
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if not file.name.startswith("test") and size < len(docs):
            code.append(file.read_text(encoding="utf-8", errors="replace"))
            size += len(code[-1])
    calib, heldout = directory / "calib.txt", directory / "heldout.txt"
    calib.write_text(docs + "\n\n" + "\n\n".join(code), encoding="utf-8")
    heldout.write_text("\n\n".join(text for name, text in topics if held(name)), encoding="utf-8")
    return calib, heldout


def gptqmodel_python(args) -> str | None:
    """The Python of the environment GPTQModel is installed in (see the module docstring), if there is one."""
    import os
    import shutil

    candidate = args.gptqmodel_python or os.environ.get("GPTQMODEL_PYTHON") or "/tmp/gptqmodel-venv/bin/python"
    return candidate if shutil.which(candidate) else None


def bench_real_model(args) -> None:
    """ppl of fp32, r1kit RTN, r1kit GPTQ (defaults and REAL_BEST) and GPTQModel at each group size, with quantization time."""
    import json
    import subprocess

    from r1kit.checkpoints import resolve_model
    from r1kit.evaluate import blocks_from
    from r1kit.evaluate import perplexity as score
    from r1kit.quant.calibration import load_calibration

    torch.set_num_threads(args.threads[0])
    model_dir = resolve_model(args.real_model)
    peer = gptqmodel_python(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib_file, heldout = protocol_texts(tmp)
        calibration = load_calibration(calib_file, model_dir, args.real_nsamples, args.real_seqlen, seed=0)
        blocks = blocks_from(str(heldout), model_dir, 512, 16)
        ppl = lambda model: score(model, blocks, 1, 4)["ppl"]
        print(f"\n{args.real_model}: calibration {calibration.shape[0]} × {calibration.shape[1]} tokens of docs + code, "
              f"perplexity on {len(blocks)} × 512 held-out tokens through r1kit's int4 layers")
        rows = [("float32", ppl(load_model(model_dir)), None)]
        (tmp / "calib.json").write_text(json.dumps(calibration.tolist()))
        for group in args.real_groups:
            runs = [(f"r1kit RTN g{group}", QuantConfig(group_size=group, method="rtn")),
                    (f"r1kit GPTQ g{group}", QuantConfig(group_size=group))]
            if not args.skip_real_best:
                runs.append((f"r1kit GPTQ g{group} {' '.join(f'{k}={v}' for k, v in REAL_BEST.items())}", QuantConfig(group_size=group, **REAL_BEST)))
            for name, config in runs:
                model = load_model(model_dir)
                start = time.perf_counter()
                results = quantize_model(model, config, calibration if config.method == "gptq" else None, batch_size=8)
                seconds = time.perf_counter() - start
                save_quantized(model, tmp / "q", config, results)
                rows.append((name, ppl(load_model(tmp / "q")), seconds))
                print(f"  {name}: {rows[-1][1]:.3f} ({seconds:.0f}s)", flush=True)
            if peer is None:
                continue
            # in the temporary folder: GPTQModel writes its logs/ folder into the working directory
            done = subprocess.run([peer, "-c", GPTQMODEL_SCRIPT, str(model_dir), str(tmp / "calib.json"), str(tmp / "peer"), str(group)],
                                  capture_output=True, text=True, check=False, cwd=tmp)
            if done.returncode != 0:
                print(f"  GPTQModel failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
                continue
            seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
            rows.append((f"GPTQModel g{group}", ppl(load_model(tmp / "peer")), seconds))
    base = rows[0][1]
    print(f"{'checkpoint':<52}{'perplexity':>12}{'vs float':>10}{'quant time':>12}")
    for name, value, seconds in rows:
        print(f"{name:<52}{value:>12.3f}{100 * (value / base - 1):>+9.1f}%{'' if seconds is None else f'{seconds:>11.0f}s':>12}")
    if peer is None:
        print("GPTQModel is absent (no --gptqmodel-python, $GPTQMODEL_PYTHON or /tmp/gptqmodel-venv): its column is not measured here; "
              "the issue measured GPTQModel 7.7.0 at g64 (128 × 512 calibration) at 17.262 against float 14.941")


# -- speed ---------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_rate(model, prompt: list[int], tokens: int, repeats: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    generate(model, prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up (int4 repack)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, prompt, params)
        best = min(best, time.perf_counter() - start)
    return tokens / best


def engine_rate(model, prompt_tokens: int, tokens: int, repeats: int, batch: int = 1) -> float:
    """Decode tokens/s of ``batch`` concurrent requests on the engine (which packs ``model`` in place: pass a copy)."""
    from r1kit.infer.benchmark import random_prompts, time_engine
    from r1kit.infer.llm import LLM

    llm = LLM(model, max_num_seqs=batch, max_model_len=prompt_tokens + tokens + 1)
    prompts = random_prompts(batch, prompt_tokens, model.config.vocab_size, 0)
    time_engine(llm, prompts, 2)  # warm-up
    return max(time_engine(llm, prompts, tokens)["decode_tps"] for _ in range(repeats))


def bench_kernels(shapes: list[tuple[int, int]], rows: list[int], group: int, repeats: int) -> None:
    """r1kit's int4 CPU kernel against torch's on the same products, weights streamed from memory:
    each product cycles through copies of its weight adding up to 400 MB, so none is in cache."""
    from r1kit.quant import cpu_int4
    from r1kit.quant.int4 import cpu_kernel
    from r1kit.quant.int4_linear import int4_matmul, pack_for_torch_kernel

    if cpu_int4.load() is None:
        print("\nr1kit's int4 CPU kernel is not built here (no AVX512-BF16 or no C compiler): torch's serves, nothing to compare")
        return
    print(f"\nint4 kernels, one product, weights from memory (µs, best of {repeats} × 100 calls; float32 activations in and out)")
    print(f"{'in x out':<12}{'rows':>5}{'torch':>9}{'r1kit':>9}{'ratio':>8}{'r1kit GB/s':>12}")
    g = torch.Generator().manual_seed(0)
    for k, n in shapes:
        codes = torch.randint(0, 16, (k, n), generator=g)
        scales = torch.rand(k // group, n, generator=g) * 0.01
        zeros = torch.randint(0, 16, (k // group, n), generator=g).float()
        copies = max(2, int(400e6 // (k * n // 2)))
        states = {"torch": [pack_for_torch_kernel(codes, scales, zeros, None, group) for _ in range(copies)],
                  "r1kit": [cpu_kernel.pack(codes, scales, zeros, None, group) for _ in range(copies)]}
        for m in rows:
            x = torch.randn(m, k, generator=g)
            micros = {}
            for name, cycle in states.items():
                best = math.inf
                for _ in range(repeats):
                    start = time.perf_counter()
                    for i in range(100):
                        int4_matmul(x, cycle[i % copies])
                    best = min(best, (time.perf_counter() - start) / 100)
                micros[name] = best * 1e6
            print(f"{f'{k}x{n}':<12}{m:>5}{micros['torch']:>9.1f}{micros['r1kit']:>9.1f}{micros['torch'] / micros['r1kit']:>7.2f}×"
                  f"{k * n / 2 / micros['r1kit'] / 1e3:>12.1f}")


SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # q/o, k/v, gate/up, down, the head


def bench_int8_kernel(shapes: list[tuple[int, int]], rows: list[int], group: int, repeats: int, budget: float = 256e6) -> None:
    """r1kit's int8 kernel (q8_0 class) against a bfloat16 product (oneDNN-packed, as the engine runs
    bf16 weights) and r1kit's int4 kernel, on the same shapes, weights streamed from memory: each
    variant cycles through copies of its weight adding up to ``budget`` bytes, so none is in cache."""
    from r1kit.infer.weight_packing import PackedLinear, packing_supported
    from r1kit.quant import cpu_int4, cpu_int8

    int8, int4 = cpu_int8.load(), cpu_int4.load()
    if int8 is None:
        print("\nr1kit's int8 CPU kernel is not built here (no C compiler): 8-bit layers dequantize, nothing to compare")
        return
    print(f"\nint8 kernel ({'AVX512-VNNI' if int8.vnni else 'portable loop'}) vs bf16 (oneDNN packed) vs int4 kernel, one product, "
          f"weights from memory (µs, best of {repeats} × 50 calls; activations bf16 for bf16, float32 for the kernels; groups of {group})")
    print(f"{'in x out':<12}{'rows':>5}{'bf16':>9}{'int4':>9}{'int8':>9}{'int8 GB/s':>11}{'bf16/int8':>11}{'int4/int8':>11}")
    g = torch.Generator().manual_seed(0)
    for k, n in shapes:
        codes = torch.randint(0, 256, (k, n), generator=g)
        scales = torch.rand(k // group, n, generator=g) * 0.01
        zeros = torch.full((k // group, n), 128.0)

        def copies(nbytes: int) -> int:
            return max(2, int(budget // nbytes))

        weight = torch.randn(n, k, generator=g).bfloat16()
        variants = {"int8": (torch.float32, [cpu_int8.pack(codes, scales, zeros, None, group) for _ in range(copies(k * n))], int8)}
        if int4 is not None:
            variants["int4"] = (torch.float32, [cpu_int4.pack(codes % 16, scales, zeros / 16, None, group) for _ in range(copies(k * n // 2))], int4)
        if packing_supported(torch.device("cpu"), torch.bfloat16):
            packed = [PackedLinear(weight, None) for _ in range(copies(2 * k * n))]
            variants["bf16"] = (torch.bfloat16, packed, lambda x, layer: layer(x))
        for m in rows:
            micros = {}
            for name, (dtype, cycle, run) in variants.items():
                x = torch.randn(m, k, generator=g).to(dtype)
                best = math.inf
                for _ in range(repeats):
                    start = time.perf_counter()
                    for i in range(50):
                        run(x, cycle[i % len(cycle)])
                    best = min(best, (time.perf_counter() - start) / 50)
                micros[name] = best * 1e6
            bf16, int4_us, int8_us = micros.get("bf16", math.nan), micros.get("int4", math.nan), micros["int8"]
            print(f"{f'{k}x{n}':<12}{m:>5}{bf16:>9.1f}{int4_us:>9.1f}{int8_us:>9.1f}{k * n / int8_us / 1e3:>11.1f}"
                  f"{bf16 / int8_us:>10.2f}×{int4_us / int8_us:>10.2f}×")


def bench_head(args) -> None:
    """Engine decode tokens/s on the real model: bf16 against int8 and int4 (RTN, group 64), each with the
    output head left float and quantized (``--quantize-lm-head``), at batch 1 and 8, in one run."""
    from r1kit.checkpoints import resolve_model

    torch.set_num_threads(args.threads[0])
    base = load_model(resolve_model(args.real_model))
    models = {"bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for bits in (8, 4):
        for head in (False, True):
            model = copy.deepcopy(base)
            config = QuantConfig(bits=bits, group_size=64, method="rtn", lm_head=head)
            to_quantized(model, quantize_model(model, config), config)
            models[f"int{bits}" + (" + head" if head else "")] = model
    print(f"\n{args.real_model} on the engine, {args.prompt_tokens}-token prompts + {args.decode_tokens} tokens, best of {args.repeats}, "
          f"{args.threads[0]} thread(s); MiB/token: weights read per decode step")
    for batch in (1, 8):
        rates = {name: engine_rate(copy.deepcopy(model), args.prompt_tokens, args.decode_tokens, args.repeats, batch) for name, model in models.items()}
        print(f"batch {batch}: " + ", ".join(f"{name} {rate:.1f} tok/s ({rate / rates['bf16']:.2f}× bf16, {step_bytes(models[name]) / 2**20:.0f} MiB)"
                                            for name, rate in rates.items()))


def step_bytes(model) -> int:
    """:func:`weight_bytes` with a tied head counted (it is read whole every step, as the embedding it shares)."""
    head = model.lm_head.weight if model.config.tie_embeddings else None
    return weight_bytes(model) + (0 if head is None else head.numel() * head.element_size())


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "rotary" in name or t.data_ptr() in seen or name.endswith("embed_tokens.weight"):
            continue  # an embedding row read per token is negligible
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def bench_speed(args) -> None:
    config = ModelConfig(
        vocab_size=args.speed_vocab, hidden_size=args.speed_hidden, num_layers=args.speed_layers, num_heads=args.speed_hidden // 64,
        num_kv_heads=args.speed_hidden // 192, intermediate_size=args.speed_ffn, qkv_bias=True, max_seq_len=1024,
    )
    torch.manual_seed(0)
    fp32 = R1kitForCausalLM(config).eval()
    print(f"\nspeed model: Qwen2 architecture, random weights, {config.num_parameters() / 1e6:.1f}M parameters "
          f"(hidden {config.hidden_size}, {config.num_layers} layers, ffn {config.intermediate_size}, vocab {config.vocab_size})")
    state = fp32.state_dict()
    int4 = R1kitForCausalLM(config).eval()
    int4.load_state_dict(state)
    qc = QuantConfig(group_size=args.group_size, method="rtn")
    t0 = time.perf_counter()
    to_quantized(int4, quantize_model(int4, qc), qc)
    rtn_seconds = time.perf_counter() - t0
    bf16 = R1kitForCausalLM(config).eval()
    bf16.load_state_dict(state)
    bf16 = bf16.to(torch.bfloat16)
    int4_bf16 = copy.deepcopy(int4).to(torch.bfloat16)  # int4 linears, everything else (and activations) bf16
    with tempfile.TemporaryDirectory() as tmp:
        fp32.save_pretrained(Path(tmp) / "fp32")
        save_quantized(int4, Path(tmp) / "int4", qc)
        save_quantized(int4, Path(tmp) / "int4-fp16", qc, dtype=torch.float16)
        fp_size, q_size, q16_size = (dir_bytes(Path(tmp) / n) for n in ("fp32", "int4", "int4-fp16"))
    lin_fp, lin_q = linear_bytes(int4)
    print(f"RTN quantization {rtn_seconds:.1f}s; checkpoint {q_size / 2**20:.1f} MiB vs {fp_size / 2**20:.1f} MiB fp32 = {100 * q_size / fp_size:.1f}% "
          f"with fp32 embeddings/lm_head, {q16_size / 2**20:.1f} MiB = {100 * q16_size / fp_size:.1f}% with them in fp16 (--save-dtype float16); "
          f"linears alone {100 * lin_q / lin_fp:.2f}%")
    prompt = list(range(1, args.prompt_tokens + 1))
    for threads in args.threads:
        torch.set_num_threads(threads)
        variants = [("fp32", fp32, None), ("bf16", bf16, None), ("int4 kernel", int4, "auto"), ("int4 dequant", int4, "dequant"),
                    ("int4 + bf16 rest", int4_bf16, "auto")]
        rates = {}
        for name, model, backend in variants:
            for m in model.modules():
                if isinstance(m, QuantLinear) and backend:
                    m.backend = backend
            rates[name] = (decode_rate(model, prompt, args.decode_tokens, args.repeats), weight_bytes(model))
        print(f"\ndecode, batch 1, greedy, {args.prompt_tokens}-token prompt + {args.decode_tokens} tokens, best of {args.repeats}, "
              f"{threads} thread(s)")
        print(f"{'weights':<18}{'tokens/s':>10}{'vs fp32':>9}{'MiB/token':>11}{'GB/s':>8}")
        for name, (rate, nbytes) in rates.items():
            print(f"{name:<18}{rate:>10.1f}{rate / rates['fp32'][0]:>8.2f}×{nbytes / 2**20:>11.1f}{rate * nbytes / 1e9:>8.1f}")
        print(f"int4 kernel vs dequantize path: {rates['int4 kernel'][0] / rates['int4 dequant'][0]:.2f}×")
        # the same in the engine (what `r1kit generate` and `r1kit serve` run): float linears packed
        # for oneDNN, int4 q/k/v and gate/up fused into one kernel call each
        for m in int4.modules():
            if isinstance(m, QuantLinear):
                m.backend = "auto"
        served = {name: engine_rate(copy.deepcopy(model), len(prompt), args.decode_tokens, args.repeats)
                  for name, model in (("fp32", fp32), ("bf16", bf16), ("int4", int4), ("int4 + bf16 rest", int4_bf16))}
        print("engine, batch 1: " + ", ".join(f"{name} {rate:.1f} tok/s ({rate / served['fp32']:.2f}×)" for name, rate in served.items()))
        for batch in args.engine_batches:
            rates = {name: engine_rate(copy.deepcopy(model), len(prompt), args.decode_tokens, args.repeats, batch)
                     for name, model in (("fp32", fp32), ("int4", int4))}
            print(f"engine, batch {batch}: fp32 {rates['fp32']:.1f} tok/s, int4 {rates['int4']:.1f} tok/s ({rates['int4'] / rates['fp32']:.2f}×)")
    h, f = args.speed_hidden, args.speed_ffn
    bench_kernels([(h, h + 2 * (h // 192) * 64), (h, h), (h, 2 * f), (f, h), (4096, 4096)], [1, 16], args.group_size, args.repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus-bytes", type=int, default=3_000_000, help="stdlib source bytes to read (train + held-out)")
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary of the quality model")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the quality model")
    p.add_argument("--layers", type=int, default=4, help="layers of the quality model")
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama", help="shape of the quality model")
    p.add_argument("--ffn", type=int, default=None, help="FFN size of the quality model (default 3x hidden, Qwen2 8/3x)")
    p.add_argument("--seqlen", type=int, default=128, help="training / evaluation / calibration sequence length")
    p.add_argument("--steps", type=int, default=300, help="training steps of the quality model")
    p.add_argument("--batch", type=int, default=16, help="training batch (sequences)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--eval-blocks", type=int, default=256, help="held-out sequences for perplexity")
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration samples")
    p.add_argument("--error-blocks", type=int, default=16, help="held-out sequences for the layer-output errors")
    p.add_argument("--group-size", type=int, default=128, help="group size of the speed model")
    p.add_argument("--group-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[128, -1],
                   help="group sizes of the quality comparison (default 128,-1: -1 is per output channel)")
    p.add_argument("--desc-act", action="store_true", help="GPTQ act-order")
    p.add_argument("--speed-hidden", type=int, default=768)
    p.add_argument("--speed-layers", type=int, default=12)
    p.add_argument("--speed-ffn", type=int, default=2048)
    p.add_argument("--speed-vocab", type=int, default=8192)
    p.add_argument("--engine-batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[8, 16],
                   help="concurrent requests to time fp32 and int4 on the engine at, besides 1 (comma-separated; empty: none)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[torch.get_num_threads()],
                   help="comma-separated thread counts to time decoding at (default: torch's); the first also trains and quantizes")
    p.add_argument("--real-model", default="smollm2-135m-instruct", help="model of the real-model section (a pulled name or directory)")
    p.add_argument("--real-nsamples", type=int, default=128, help="calibration samples of the real-model section")
    p.add_argument("--real-seqlen", type=int, default=512, help="tokens per calibration sample of the real-model section")
    p.add_argument("--real-groups", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128], help="group sizes of the real-model section")
    p.add_argument("--gptqmodel-python", help="python of an environment with gptqmodel installed (default $GPTQMODEL_PYTHON or /tmp/gptqmodel-venv/bin/python)")
    p.add_argument("--skip-real", action="store_true", help="skip the real-model section")
    p.add_argument("--skip-real-best", action="store_true", help="real-model section: r1kit's defaults only, not REAL_BEST too")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-int8-kernel", action="store_true", help="skip the int8 kernel section (SmolLM2-135M's shapes, batch 1 and 8)")
    p.add_argument("--skip-head", action="store_true", help="skip the engine section: bf16 vs int8/int4 with the head float or quantized")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if not args.skip_quality:
        bench_quality(args)
    if not args.skip_real:
        bench_real_model(args)
    if not args.skip_speed:
        bench_speed(args)
    if not args.skip_int8_kernel:
        bench_int8_kernel(SMOLLM2_SHAPES, [1, 8], 64, args.repeats)
    if not args.skip_head:
        bench_head(args)


if __name__ == "__main__":
    main()
