"""Test support shared by every test module (CPU, GPU and the simulator's child process).

- ``tolerances``: the one tolerance table and the comparison helper;
- ``oracle``: the float64 oracle runner (``fastopt.reference`` stepped directly), everything it
  needs derived from the rule specs and the optimizer registry, and an independent table of
  torch.optim's defaults;
- ``matrix``: the one optimizer matrix every test parametrizes over (every class of
  ``fastopt.optimizers.CLASSES`` × the product of its probes, less the combinations it refuses),
  the per-rule test settings, and the selections derived from it (one fullest configuration per
  class, a cover of every compiled variant, ...);
- ``parity``: seeded inputs and cached oracle results of the parity matrix, shared by the CPU,
  GPU and simulator parity tests.

``tests/conftest.py`` puts ``tests/`` on ``sys.path``: ``from support.matrix import MATRIX``.
A new optimizer (rule module, CUDA C body, oracle function, class) shows up in every test that
reads these modules without a test edit.
"""
