"""The memory planner (`r1kit plan`) held to what r1kit really allocates for small models on the CPU:
the bytes of a built model (float, and GPTQ int4/int8 from RTN), of the engine's KV pool, of the
tensors autograd saves in a training forward, and of AdamW's state after a step; the CLI end to end;
the ``--gpus`` grammar as a property."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.cli import main
from r1kit.config import ModelConfig
from r1kit.errors import ConfigError
from r1kit.model.transformer import R1kitForCausalLM
from r1kit.plan import Workload, make_plan
from r1kit.plan.devices import CATALOG, parse_gpus
from r1kit.plan.memory import activations, kv_cache, train_state, weight_bytes
from r1kit.plan.source import read_model

SHAPES = {
    "global": {},
    "local+hybrid": dict(attention=["local", "hybrid"], hybrid_gate="head", tie_embeddings=True, qkv_bias=True),
    "compressed": dict(attention=["local", "hybrid"], hybrid_global="compressed", hybrid_compress_block=8, ffn="topk", topk_gradient="masked"),
    "gelu-layernorm": dict(activation="gelu", norm="layernorm", dropout=0.1, attention="local"),
}


def config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, local_window=8, max_seq_len=128)
    return ModelConfig(**{**base, **overrides})


def held_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("shape", SHAPES)
def test_float_weights_are_the_built_models_bytes(shape):
    cfg = config(**SHAPES[shape])
    assert weight_bytes(cfg, "float32") == held_bytes(R1kitForCausalLM(cfg))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_are_the_rtn_models_bytes(bits):
    from r1kit.quant.config import QuantConfig
    from r1kit.quant.quantizer import quantize_model, to_quantized

    cfg = config(**SHAPES["local+hybrid"], intermediate_size=96)  # 96: a partial last group of 32 in down_proj
    model = R1kitForCausalLM(cfg)
    qc = QuantConfig(bits=bits, group_size=40, method="rtn")
    to_quantized(model, quantize_model(model, qc), qc)
    assert weight_bytes(cfg, f"int{bits}", float_dtype="float32", group_size=40) == held_bytes(model)


@pytest.mark.parametrize("shape", ["global", "local+hybrid", "compressed", "gelu-layernorm"])
def test_kv_cache_is_the_engines_pool(shape):
    """The engine sized by the plan's bytes takes exactly the plan's blocks, and its pool tensors hold
    exactly the plan's bytes (a model with a window group included)."""
    from r1kit.infer.engine import EngineConfig, LLMEngine

    cfg = config(**SHAPES[shape])
    context, batch, chunk = 100, 3, 24
    plan = kv_cache(cfg, context, batch, "float32", block_size=8, max_chunk=chunk)
    engine = LLMEngine(R1kitForCausalLM(cfg), config=EngineConfig(block_size=8, max_num_seqs=batch, max_num_batched_tokens=chunk, max_model_len=context,
                                                                   kv_cache_memory=plan.bytes, pack_weights=False, decode_kernel=False))
    pool = engine.runner.pool
    assert (engine.num_blocks, engine.window_blocks) == (plan.blocks, plan.window_blocks)
    assert sum(t.numel() * t.element_size() for t in pool.k + pool.v + pool.ck + pool.cv if t is not None) == plan.bytes
    assert sum(plan.by_kind.values()) == plan.bytes
    assert (plan.window_blocks > 0) == (shape in ("local+hybrid", "compressed"))


def saved_by_autograd(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd still holds for the backward once the loss is computed
    (parameters excluded: they are the weights, not activations)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(tokens).float().flatten(0, 1), tokens.flatten())
    storages = {}
    for ref in refs:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del loss
    return sum(storages.values())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_activations_are_what_autograd_saves(shape, checkpointing):
    """Within 2 % (the loss's scalar and small index tensors are not counted; measured within 0.3 %),
    sequences longer than the local window so the blocked local path runs."""
    cfg = config(**SHAPES[shape])
    model = R1kitForCausalLM(cfg).train()
    model.gradient_checkpointing = checkpointing
    micro_batch, seq = 2, 40
    measured = saved_by_autograd(model, torch.randint(0, cfg.vocab_size, (micro_batch, seq)))
    planned = activations(cfg, micro_batch, seq, "fp32", checkpointing).saved
    assert planned == pytest.approx(measured, rel=0.02)


def test_training_state_is_adamws_after_a_step():
    from r1kit.train.trainer import build_adamw

    cfg = config(**SHAPES["local+hybrid"])
    model = R1kitForCausalLM(cfg)
    opt = build_adamw(model, 1e-3, 0.01, (0.9, 0.95), 1e-8, fused=False)
    F.cross_entropy(model(torch.randint(0, 64, (1, 12))).flatten(0, 1), torch.randint(0, 64, (12,))).backward()
    opt.step()
    state = train_state(cfg, "fp32")
    params = {id(p): p for p in model.parameters()}.values()
    assert state.optimizer == sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert state.gradients == sum(p.grad.numel() * p.grad.element_size() for p in params)
    assert state.parameters == sum(p.numel() * p.element_size() for p in params)


def test_a_model_that_does_not_fit_gets_the_changes_that_would():
    """A 70B-shaped model in bfloat16 on two 40 GB A100s: its weights alone exceed them; the plan says
    so and names int4 and more devices, each of which really fits when planned again."""
    big = ModelConfig(vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, intermediate_size=28672, max_seq_len=8192)
    src, work = read_model_stub(big), Workload(context=4096, batch=8, micro_batch=1, dtype="bfloat16", weights="bfloat16", precision="bf16")
    plan = make_plan(src, parse_gpus("2xA100-40G"), work)
    assert not plan["serve"]["fits"] and plan["serve"]["headroom"] < 0
    advice = " | ".join(plan["serve"]["advice"])
    assert "int4" in advice and "xA100-40G" in advice
    more = int(advice.split("use ")[1].split("x")[0])
    assert make_plan(src, parse_gpus(f"{more}xA100-40G"), work)["serve"]["fits"]
    assert not make_plan(src, parse_gpus(f"{more - 1}xA100-40G"), work)["serve"]["fits"]
    tp = make_plan(src, parse_gpus("8xH100-80G"), work)["serve"]
    assert tp["fits"] and (tp["tensor_parallel"], tp["replicas"]) == (2, 4)  # the smallest TP that fits: one H100 does not hold it
    assert not make_plan(src, parse_gpus("1xH100-80G"), work)["serve"]["fits"]


def read_model_stub(cfg: ModelConfig):
    from r1kit.plan.source import ModelSource

    return ModelSource(cfg, None, "in code")


def test_cli_plan_json_end_to_end(tmp_path, capsys):
    cfg = config(**SHAPES["local+hybrid"])
    R1kitForCausalLM(cfg).save_pretrained(tmp_path / "m")
    out = tmp_path / "plan.json"
    rc = main(["plan", "--model", str(tmp_path / "m"), "--gpus", "2xA100-80G", "--context", "96", "--batch", "4", "--dtype", "bfloat16",
               "--quant", "int4", "--group-size", "32", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "serve     fits" in printed
    plan = json.loads(out.read_text())
    assert read_model(tmp_path / "m").config == cfg
    assert plan["weights"]["int4"] == weight_bytes(cfg, "int4", float_dtype="bfloat16", group_size=32)
    assert plan["kv_cache"]["bytes"] == kv_cache(cfg, 96, 4, "bfloat16").bytes
    assert plan["serve"]["per_rank"]["weights"] == plan["weights"]["int4"] and plan["serve"]["replicas"] == 2
    assert plan["devices"]["memory"] == CATALOG["a100-80g"].memory


def test_cli_plan_bad_gpus_names_the_choices(capsys):
    rc = main(["plan", "--model", "configs/tiny-cpu.yaml", "--gpus", "2xA100"])
    err = capsys.readouterr().err
    assert rc == 2 and "A100-40G or A100-80G" in err and "H200" in err and "cpu" in err


def test_cpu_is_this_machines_memory(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683664 kB\nMemFree:        1 kB\n")
    devices = parse_gpus("cpu", meminfo)
    assert (devices.count, devices.device.memory, devices.label) == (1, 24683664 * 1024, "cpu")


NAMES = st.sampled_from([d.name for d in CATALOG.values()])


@settings(max_examples=100, deadline=None)
@given(count=st.integers(1, 512), name=NAMES, sep=st.sampled_from(["x", "X", "×", "*", " x "]), upper=st.booleans())
def test_gpus_grammar_reads_every_count_and_device(count, name, sep, upper):
    text = f"{count}{sep}{name.upper() if upper else name.lower()}"
    devices = parse_gpus(text)
    assert (devices.count, devices.device) == (count, CATALOG[name.lower()])
    assert parse_gpus(devices.label) == devices


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=20))
def test_gpus_grammar_rejects_everything_else_by_name(text):
    try:
        parse_gpus(text)
    except ConfigError as exc:
        assert exc.param == "--gpus" and "--gpus=" in str(exc)
