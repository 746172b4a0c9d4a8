"""The code assistant (SPEC §5.2): completion at a cursor across twelve languages (fill-in-the-middle where
the model has it) and pytest generation that keeps only tests that pass in :mod:`r1kit.sandbox`.

``languages`` (recognition and stop rules), ``prompt`` (the prompt within the context window),
``complete`` (candidates ranked by mean log-probability), ``testgen`` (tests judged by running them),
``bench_data`` (the completion benchmark from code on this machine)."""
