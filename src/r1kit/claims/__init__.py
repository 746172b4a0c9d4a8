"""`r1kit claims`: every figure the guide states, measured by r1kit at the scale the machine allows.

One module per experiment (``attention``, ``sparsity``, ``gptq``, ``intent``, ``hardware``) writes
its own metric file; ``report`` turns those files, and nothing else, into ``claims.md`` and
``claims.html``; ``runner`` runs the experiments within a time budget and resumes an interrupted
run. This package sits above the stages it drives (data, train, quant, checkpoints, infer) and
below ``cli``; it must never copy a stage's logic, only call it.
"""
