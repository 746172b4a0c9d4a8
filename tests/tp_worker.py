"""Run under torchrun (gloo), one launch for several checks (process start-up dominates):

* ``tp_worker.py CASE...`` (2 processes): for each ``attention:ffn:gate`` case, one training step of a
  tensor-parallel model against the same step on an unsharded copy in the same process. Prints one
  JSON line: each case's largest differences.
* ``tp_worker.py --train ARGS...`` (any number of processes): each ARGS is the command line of one
  ``r1kit train`` run (one string), run one after the other in the same process group; exits with
  the first failing run's status.
"""

import copy
import json
import os
import shlex
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from r1kit.config import ModelConfig
from r1kit.model import R1kitForCausalLM
from r1kit.train.parallel import apply_tp


def step_differences(attention: str, ffn: str, gate: str) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
                      attention=attention, ffn=ffn, hybrid_gate=gate, local_window=4, topk_sparsity=0.5)  # fmt: skip
    reference = R1kitForCausalLM(cfg).train()
    sharded = copy.deepcopy(reference)
    apply_tp(sharded, init_device_mesh("cpu", (dist.get_world_size(),)))
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (reference, sharded):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
    worst = 0.0
    for (name, p), q in zip(reference.named_parameters(), sharded.parameters()):
        grad = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
        worst = max(worst, (grad - p.grad).abs().max().item())
    return {"loss_diff": abs(losses[0] - losses[1]), "grad_diff": worst}


def compare_steps(*cases: str) -> int:
    dist.init_process_group("gloo")
    diffs = {case: step_differences(*case.split(":")) for case in cases}
    if dist.get_rank() == 0:
        print(json.dumps(diffs), flush=True)
    return 0


def train(*command_lines: str) -> int:
    from r1kit.cli import main as cli

    for line in command_lines:
        status = cli(["train", *shlex.split(line)])  # the trainer joins the process group torchrun described
        if status:
            return status
    return 0


def main(*args: str) -> None:
    status = train(*args[1:]) if args[:1] == ("--train",) else compare_steps(*args)
    if dist.is_initialized():  # a run refused before it joined the group never initialized it
        dist.barrier()
    # Interpreter teardown with live gloo/DTensor threads intermittently aborts on torch 2.13 ("terminate
    # called without an active exception"), after the work is done: leave without running it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main(*sys.argv[1:])
