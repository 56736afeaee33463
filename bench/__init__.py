"""Benchmarks of the TTRV engine (not imported by the app; extra deps in requirements-bench.txt).

- `python -m bench.speed`: this engine vs TRL's GRPOTrainer on the same adaptation
  (seconds per step, their ratio, peak memory) on the bundled model and a larger config.
- `python -m bench.trl_compare`: the two compute the same loss and gradients for the same
  rollouts (the TRL side of `tests/test_speed_equivalence.py`).
- `python -m bench.scaling`: what each engine optimisation buys (on/off) and how a round
  scales with the number of images, N and model size.

Results and methods: docs/performance.md. Built models and JSON results go to bench/out/.
"""
