"""Fused GPU kernels (Triton) for training and inference, applied to a model from outside.

* :mod:`r1kit.fused.residual_norm`: a residual add and the RMSNorm or LayerNorm after it, one pass;
* :mod:`r1kit.fused.swiglu`: ``silu(gate)·up``, one pass forward and one backward;
* :mod:`r1kit.fused.linear_gelu`: a GELU FFN's up projection with the GELU as its epilogue (the
  guide's "LayerNorm + GELU" split where a matmul separates them: see that module);
* :mod:`r1kit.fused.reference`: the PyTorch formulas each kernel is held to;
* :mod:`r1kit.fused.layers` and :mod:`r1kit.fused.apply`: the layer variants and
  :func:`apply_fused_kernels`, which swaps them in after a self-check on the model's device.

The model package never imports this one. Importing it needs no ``triton``; the kernels' modules do.
"""

from r1kit.fused.apply import apply_fused_kernels

__all__ = ["apply_fused_kernels"]
