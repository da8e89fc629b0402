"""``fastopt bench`` and the measurement code behind it (also used by the benchmark suite in
the repository's ``bench/`` folder and by ``scripts/gpu_run.sh``).

- ``measure``: the cases (every optimizer, derived from the registry), byte counts, timers,
  grouped measurement, machine facts;
- ``groups``: the runners of one group (fastopt's backends, their ceilings, torch peers) and
  the records they produce;
- ``ceilings_cpu``, ``ceilings_numba_cuda``, ``gpu``: the same-traffic and copy kernels and the
  GPU timing;
- ``torch_peers``: ``torch.optim`` on the same data, when torch is installed;
- ``torch_rows``: ``fastopt.torch`` over a model's parameter list beside torch on the same list
  and fastopt's flat step, graph-replayed, clipped and low-bit steps, host syncs with
  GradScaler (the GPU run's rows, guarded by what the code here can run);
- ``host``: the host path of a step alone (the null backend);
- ``cli``: the command line.
"""

__all__ = ["main"]


def main(argv=None):
    """``fastopt bench``: see ``fastopt.bench.cli``."""
    from .cli import main as run

    return run(argv)
