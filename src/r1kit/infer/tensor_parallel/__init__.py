"""Tensor-parallel inference: one model over several processes (one per GPU with NCCL, or CPU
processes with gloo). ``LLM(..., tensor_parallel_size=N)`` and ``r1kit serve --tensor-parallel-size N``
reach it through :class:`~r1kit.infer.engine.EngineConfig`.

* :mod:`.sharding`: each rank's slice of the weights (Megatron's column/row/vocabulary split);
* :mod:`.layers`: the collectives added to a shard by module swaps;
* :mod:`.channel`: rank 0's one broadcast per step of the step's metadata;
* :mod:`.workers`: the worker processes and rank 0's handle on them;
* :mod:`.runner`: rank 0's ModelRunner-shaped runner.
"""

from r1kit.infer.tensor_parallel.workers import EngineDeadError, TensorParallelWorkers, launch

__all__ = ["EngineDeadError", "TensorParallelWorkers", "launch"]
