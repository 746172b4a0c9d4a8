"""A plan as people read it: a few aligned sections of sizes in GiB, the layouts, and what to change."""

from __future__ import annotations

from typing import Any


def gib(n: int | float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def render(plan: dict[str, Any]) -> str:
    """The text ``r1kit plan`` prints for :func:`r1kit.plan.make_plan`'s mapping."""
    m, d, s = plan["model"], plan["devices"], plan["settings"]
    kv, tr = plan["kv_cache"], plan["training"]
    kinds = ", ".join(f"{n} {k}" for k, n in m["attention"].items())
    lines = [
        f"model     {m['source']}: {m['parameters'] / 1e9:.3f}B parameters, {m['layers']} layers ({kinds})"
        + (f", checkpoint {m['checkpoint_quantization']}" if m["checkpoint_quantization"] else ""),
        f"devices   {d['gpus']}: {d['device']}, {gib(d['memory'])} each, {gib(d['usable'])} usable ({d['utilization']:.0%})",
        f"workload  context {s['context']}, batch {s['batch']}, weights {s['weights']} ({s['dtype']} for the rest and the KV cache), "
        f"training micro-batch {s['micro_batch']} at {s['precision']}",
        "",
        "weights   " + "   ".join(f"{fmt} {gib(n)}" for fmt, n in plan["weights"].items()) + f"   (GPTQ group {s['group_size']})",
        f"KV cache  {gib(kv['bytes'])} for {s['batch']} x {s['context']} tokens ({gib(kv['per_sequence'])} a sequence; "
        f"{kv['blocks']} blocks of {kv['block_size']}" + (f" + {kv['window_blocks']} window blocks" if kv["window_blocks"] else "") + ")",
        *(f"            {kind}: {gib(n)}" for kind, n in kv["by_kind"].items()),
        f"training  activations (micro-batch {s['micro_batch']}): {gib(tr['activations']['without_checkpointing']['peak'])} at peak, "
        f"{gib(tr['activations']['with_checkpointing']['peak'])} with activation checkpointing",
        f"          float32 parameters {gib(tr['parameters'])}, gradients {gib(tr['gradients'])}, AdamW state {gib(tr['optimizer'])}"
        + (f", autocast copies {gib(tr['autocast_copies'])}" if tr["autocast_copies"] else ""),
        "",
        _serve(plan["serve"]),
        _train(plan["train"]),
    ]
    return "\n".join(lines)


def _serve(p: dict[str, Any]) -> str:
    r = p["per_rank"]
    head = "serve     fits" if p["fits"] else "serve     DOES NOT FIT"
    text = (f"{head}: tensor parallel {p['tensor_parallel']} x {p['replicas']} replica(s); each rank {gib(r['total'])} "
            f"(weights {gib(r['weights'])}, KV {gib(r['kv_cache'])}, workspace {gib(r['workspace'])}), headroom {gib(p['headroom'])}")
    return text + "".join(f"\n          would fit: {a}" for a in p["advice"])


def _train(p: dict[str, Any]) -> str:
    r = p["per_rank"]
    head = "train     fits" if p["fits"] else "train     DOES NOT FIT"
    ckpt = "on" if p["activation_checkpointing"] else "off"
    text = (f"{head}: FSDP {p['fsdp']} x tensor parallel {p['tensor_parallel']}, activation checkpointing {ckpt}; each rank "
            f"{gib(r['total'])} (parameters {gib(r['parameters'])}, gradients {gib(r['gradients'])}, AdamW {gib(r['optimizer'])}, "
            f"gathered layer {gib(r['fsdp_gathered_layer'])}, activations {gib(r['activations'])}), headroom {gib(p['headroom'])}")
    return text + "".join(f"\n          would fit: {a}" for a in p["advice"])
