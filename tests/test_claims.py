"""`r1kit claims`: each experiment end to end at a tiny scale, the report built only from the metric
files, failures shown as failures, resume, and the structured pruning behind the §1.2 claim."""

import argparse
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from r1kit.claims import attention, gptq, hardware, intent, pruning, results, sparsity, training
from r1kit.claims.report import claim_rows, write_report
from r1kit.claims.runner import ClaimsConfig, run_claims
from r1kit.claims.scale import scale_for
from r1kit.cli import claims as cli_claims
from r1kit.data.records import write_json
from r1kit.data.shards import FORMAT, INDEX, ShardWriter
from r1kit.errors import CheckpointError, ConfigError
from r1kit.model.transformer import R1kitForCausalLM

os.environ["R1KIT_NO_PROGRESS"] = "1"
CPU = torch.device("cpu")
QUIET = lambda message: None  # noqa: E731
# the smallest scale: experiments run end to end in seconds (the budget's tiny tier, shortened further)
MICRO = dataclasses.replace(scale_for(0.1, cuda=False), seq_len=32, speed_lengths=(64,), eval_blocks=2, eval_len=32, micro_batch_size=2,
                            gptq_nsamples=2, gptq_seqlen=32)  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A learnable corpus: each document counts upward modulo 60 from a random start."""
    out = tmp_path_factory.mktemp("data") / "shards"
    out.mkdir()
    rng = np.random.default_rng(0)
    writers = {s: ShardWriter(out, s, 4000, np.uint16) for s in ("train", "val")}
    for d in range(60):
        start, length = rng.integers(0, 60), rng.integers(100, 300)
        writers["val" if d % 6 == 0 else "train"].add(f"doc{d}", np.concatenate(([0], (start + np.arange(length)) % 60 + 2, [1])))
    write_json(out / INDEX, {"format": FORMAT, "dtype": "uint16", "vocab_size": 64, "bos_id": 0, "eos_id": 1,
                             "splits": {s: w.close() for s, w in writers.items()}})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def measured(shards, tmp_path_factory):
    """The attention and sparsity experiments run once at the micro scale, their metric files written."""
    out = tmp_path_factory.mktemp("claims")
    for module in (attention, sparsity):
        result = module.run(out, MICRO, shards, CPU, QUIET)
        results.write_metrics(out, module.NAME, "ok", 1.0, dataclasses.asdict(MICRO), {"result": result})
    return out


def test_attention_compares_equal_models_on_equal_tokens(measured):
    result = results.read_metrics(measured, "attention")["result"]
    variants = result["variants"]
    assert set(variants) == {"global", "hybrid", "local+hybrid", "hybrid compressed"}
    counts = [v["parameters"] for v in variants.values()]
    assert max(counts) - min(counts) <= 0.01 * max(counts), counts
    assert variants["global"]["intermediate_size"] > variants["hybrid"]["intermediate_size"]  # the gate's parameters, given to the FFN
    assert {run["tokens"] for v in variants.values() for run in v["runs"]} == {result["steps"] * MICRO.seq_len * MICRO.micro_batch_size}
    for v in variants.values():
        run = v["runs"][0]
        assert 1 < run["ppl"] < 1e4 and 0 <= run["accuracy"] <= 1 and len(run["by_position"]) == 4
    assert set(result["speed"]["64"]) == set(variants) and all(t["prefill"] > 0 and t["decode"] > 0 for t in result["speed"]["64"].values())


def test_sparsity_prunes_to_the_target_and_measures_against_dense(measured):
    result = results.read_metrics(measured, "sparsity")["result"]
    models = result["models"]
    assert set(models) == {"dense", "topk 0.3", "topk 0.6", "topk 0.8", "topk controller", "pruned by selection", "pruned by magnitude"}
    for how in ("selection", "magnitude"):
        row = models[f"pruned by {how}"]
        assert row["non_embedding_parameters"] <= 0.6 * result["dense_non_embedding_parameters"]
        assert row["steps"] == result["recovery_steps"] and 0 <= row["accuracy"] <= 1
    assert models["dense"]["accuracy_ratio"] == 1.0 and models["dense"]["sparsity"] == 0.0
    assert [models[f"topk {s}"]["sparsity"] for s in ("0.3", "0.6", "0.8")] == pytest.approx([0.3, 0.6, 0.8])
    assert 0.3 <= models["topk controller"]["sparsity"] <= 0.6  # moved by the controller from its lower bound toward the target


def test_the_report_shows_what_the_metric_files_say(measured, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(measured / "metrics", out / "metrics")
    parser = argparse.ArgumentParser()
    cli_claims.add_arguments(parser)
    assert cli_claims.run(parser.parse_args(["--out", str(out), "--report-only"])) == 0  # the verb: the report from the files alone
    assert {"attention_by_position.png", "attention_speed.png", "sparsity_quality.png"} <= {p.name for p in out.glob("*.png")}
    md = (out / "claims.md").read_text()
    assert md.count("\n| ") >= 11 and "| 3.3 |" in md and "not run yet" in md and "attention_by_position.png" in md

    # change one figure in one metric file: the report follows it
    file = results.metrics_path(out, "attention")
    record = json.loads(file.read_text())
    before = {c.key: v for c, v in claim_rows(out)}["dha_perplexity"]
    record["result"]["variants"]["hybrid"]["ppl"]["mean"] = record["result"]["variants"]["global"]["ppl"]["mean"] / 2
    file.write_text(json.dumps(record))
    write_report(out)
    after = {c.key: v for c, v in claim_rows(out)}["dha_perplexity"]
    assert after.measured.startswith("50.0% lower") and after.measured != before.measured
    assert "50.0% lower" in (out / "claims.md").read_text() and "50.0% lower" in (out / "claims.html").read_text()

    # a metric file that lacks a figure is reported as such, never filled in
    del record["result"]["variants"]["hybrid"]
    file.write_text(json.dumps(record))
    row = {c.key: v for c, v in claim_rows(out)}["dha_perplexity"]
    assert row.verdict == results.FAILED and row.measured == "—"


def test_a_failed_experiment_shows_its_failure_and_resume_skips_finished_ones(measured, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(measured / "metrics", out / "metrics")
    config = ClaimsConfig(out=str(out), budget_minutes=0.1, only=("attention", "sparsity", "gptq", "intent"),
                          support_metrics=str(tmp_path / "absent.json"), gptq_model=str(tmp_path / "no-such-model"), device="cpu")  # fmt: skip
    statuses = run_claims(config, log=print)
    assert statuses == {"attention": "skipped", "sparsity": "skipped", "gptq": "failed", "intent": "ok"}
    assert "attention: done earlier, skipped" in capsys.readouterr().out
    record = results.read_metrics(out, "gptq")
    assert record["status"] == "failed" and "no-such-model" in record["error"]
    rows = {c.key: v for c, v in claim_rows(out)}
    assert rows["gptq_4bit"].verdict == results.FAILED and rows["gptq_4bit"].measured == "—" and "no-such-model" in rows["gptq_4bit"].why
    assert rows["intent_accuracy"].verdict == results.CANNOT_MEASURE
    md = (out / "claims.md").read_text()
    assert "experiment failed" in md and "no-such-model" in md

    # the failed experiment runs again on the next call; the finished ones stay skipped
    again = run_claims(dataclasses.replace(config, only=("attention", "gptq")), log=QUIET)
    assert again == {"attention": "skipped", "gptq": "failed"}
    # another budget cannot resume this work folder
    with pytest.raises(ConfigError, match="budget"):
        run_claims(dataclasses.replace(config, budget_minutes=60.0), log=QUIET)


def test_pruning_keeps_the_chosen_neurons_exactly(tiny_config):
    config = tiny_config(ffn="topk", topk_sparsity=0.6, intermediate_size=64)
    model = R1kitForCausalLM(config).eval()
    blocks = np.random.default_rng(0).integers(0, config.vocab_size, (3, 17))
    counts = pruning.selection_counts(model, blocks, batch_size=2)
    k = model.topk_layers()[0][1].k
    for layer_counts in counts.values():  # each of the 3×16 tokens selects k neurons (ties may add a few)
        assert 3 * 16 * k <= layer_counts.sum() <= 3 * 16 * k * 1.05
    assert not any(isinstance(layer.mlp, pruning.CountingTopKFFN) for layer in model.model.layers)

    width = pruning.width_for(config, 0.4)
    dense_blocks = pruning.non_embedding_parameters(dataclasses.replace(config, ffn="dense"))
    pruned = pruning.prune(model, counts, width)
    assert pruning.non_embedding_parameters(pruned.config) <= 0.6 * dense_blocks
    assert pruning.non_embedding_parameters(dataclasses.replace(config, intermediate_size=width + 1, ffn="dense")) > 0.6 * dense_blocks
    # reference: the same model made dense, with the dropped neurons' output weights zeroed
    reference = R1kitForCausalLM(dataclasses.replace(config, ffn="dense")).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            dropped = torch.ones(config.intermediate_size, dtype=torch.bool)
            dropped[counts[i].topk(width).indices] = False
            layer.mlp.down_proj.weight[:, dropped] = 0
        tokens = torch.from_numpy(blocks[:, :-1])
        torch.testing.assert_close(pruned(tokens), reference(tokens), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="Top-K"):
        pruning.selection_counts(R1kitForCausalLM(tiny_config()), blocks)


@pytest.fixture(scope="module")
def small_real_model(smollm2_dir, tmp_path_factory):
    """The real SmolLM2 cut to its first two layers (its own tokenizer and weights): GPTQ on all 30 takes minutes on CPU."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("smollm2-2layers")
    raw = json.loads((smollm2_dir / "config.json").read_text())
    raw["num_hidden_layers"] = 2
    for key in ("attention", "ffn"):
        raw["r1kit"][key] = raw["r1kit"][key][:2]
    (out / "config.json").write_text(json.dumps(raw))
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        keep = [k for k in f.keys() if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2]
        save_file({k: f.get_tensor(k) for k in keep}, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(smollm2_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def test_gptq_experiment_on_the_real_model(small_real_model, tmp_path):
    result = gptq.run(tmp_path, MICRO, CPU, QUIET, model=str(small_real_model))
    models = result["models"]
    assert set(models) == {"float32", "gptq", "rtn"} and result["calibration"] == [2, 32]
    for name in ("gptq", "rtn"):
        row = models[name]
        # 4-bit codes + a float16 scale and packed zero per 128 inputs: just above 4/32 of float32
        assert 0.125 < row["linears_vs_float32"] < 0.135
        assert row["size_vs_float32"] < 0.5 and 0.5 < row["accuracy_ratio"] < 1.5
    assert models["float32"]["accuracy"] > 0 and all(np.isfinite(models[n]["ppl"]) for n in models)
    verdict = gptq.verdicts(result)["gptq_4bit"]
    assert verdict.verdict in (results.HOLDS, results.DOES_NOT_HOLD) and "GPTQ:" in verdict.measured


def test_intent_reads_the_app_benchmark_by_its_contract(tmp_path):
    missing = intent.run(tmp_path / "absent.json", QUIET)
    assert missing["state"] in ("not built", "not run")
    assert {v.verdict for v in intent.verdicts(missing).values()} == {results.CANNOT_MEASURE}
    file = tmp_path / "metrics.json"
    file.write_text(json.dumps({"intent_accuracy": 0.99, "examples": 300, "latency_ms": {"p50": 120.0, "p95": 240.0}, "domain": "finance"}))
    measured = intent.verdicts(intent.run(file, QUIET))
    assert measured["intent_accuracy"].verdict == results.HOLDS and measured["intent_accuracy"].measured == "99.0%"
    assert measured["reply_latency"].verdict == results.DOES_NOT_HOLD and "p95 240 ms" in measured["reply_latency"].measured
    file.write_text(json.dumps({"accuracy": 0.99}))
    with pytest.raises(CheckpointError, match="intent_accuracy"):
        intent.run(file, QUIET)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the throughput is measured instead")
def test_hardware_says_why_it_cannot_be_measured_without_a_gpu():
    result = hardware.run(MICRO, QUIET)
    verdicts = hardware.verdicts(result)
    assert len(verdicts) == 4 and all(v.verdict == results.CANNOT_MEASURE and "no CUDA" in v.why for v in verdicts.values())


def test_the_budget_picks_the_scale():
    tiers = [scale_for(m, cuda=False) for m in (1, 10, 60, 240)]
    assert [s.tier for s in tiers] == ["tiny", "small", "default", "large"]
    assert [s.hidden_size for s in tiers] == sorted(s.hidden_size for s in tiers)
    assert scale_for(60, cuda=False).speed_lengths[-1] == 16384 and scale_for(60, cuda=False).seeds >= 2
    assert scale_for(10, cuda=True).tier == "large"  # a GPU scales every experiment up
    assert scale_for(60, cuda=False).train_seconds("attention", 8) < 60 * 60 * 0.45 / 8
    with pytest.raises(ConfigError, match="budget-minutes"):
        scale_for(0, cuda=False)
    with pytest.raises(ConfigError, match="unknown experiment"):
        ClaimsConfig(only=("speed",))


def test_a_resumed_experiment_keeps_its_step_plan(tiny_config, tmp_path):
    plan = tmp_path / "plan.json"
    first = training.plan_steps([tiny_config()], MICRO, 0.5, CPU, plan)
    assert json.loads(plan.read_text())["steps"] == first >= 4
    plan.write_text(json.dumps({"steps": first + 3}))  # what an interrupted run had planned
    assert training.plan_steps([tiny_config()], MICRO, 1e6, CPU, plan) == first + 3
