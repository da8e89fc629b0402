"""The backend protocol: how a planned step gets its runner from any backend.

Every backend module (``numpy_backend``, ``numba_backend``, ``numba_cuda_backend``,
``cupy_backend``) defines ``NAME``, ``DEVICE`` (``"cpu"`` or ``"cuda"``), ``available()``,
``why_unavailable()`` and

    step_runner(plan, dtype, writes, io) -> run(param, grad, states, master=None, salt=0)

``plan`` is a ``fastopt.functional.StepPlan`` (the rule, its variant ``flags``, the host
scalars ``k``, the hyperparameters, step and host state, and the loss-scale and stochastic
rounding extras: ``inv_scale``, ``scale``, ``key``, and for a capturable step ``device`` and
``found_inf``); ``dtype`` the param dtype, ``writes`` one bool per rule slot (is the slot
present), ``io`` the storage format (``kernels.storage.IO``; None: every array in ``dtype``).
``run`` takes flat arrays and trusts its caller: they passed ``check_param_arrays``.

A backend that only launches per call (``launch(rule, flags, param, grad, states, k, io=None,
master=None, extras=None)``: the GPU backends) gets its ``step_runner`` from
``launch_runner``; ``step_runner_of`` adapts a module written only to that launch form (a test
double, the benchmark's null backend).
"""

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Runner", "launch_runner", "step_runner_of"]

#: ``run(param, grad, states, master=None, salt=0)``
Runner = Callable[..., None]


def launch_runner(launch: Callable[..., Any], plan: Any, io: Any) -> Runner:
    """The runner of a backend whose ``launch`` does one step per call: the plan's scalars,
    and for a storage format ``io`` its extras (1/grad_scale, the device grad_scale, the step
    key, the salt; a capturable step's device scalars)."""
    rule, flags, k = plan.rule, plan.flags, plan.k
    if io is None:

        def run(
            param: Any, grad: Any, states: Sequence[Any], master: Any = None, salt: int = 0
        ) -> None:
            launch(rule, flags, param, grad, tuple(states), k)

        return run
    extras = {"inv_scale": plan.inv_scale, "key": plan.key, "scale": plan.scale}
    if plan.device is not None and io.kbuf:
        extras.update(plan.device.extras(io.compute, plan.found_inf))

    def run(  # type: ignore[no-redef]
        param: Any, grad: Any, states: Sequence[Any], master: Any = None, salt: int = 0
    ) -> None:
        launch(
            rule,
            flags,
            param,
            grad,
            tuple(states),
            k,
            io=io,
            master=master,
            extras=dict(extras, salt=salt),
        )

    return run


def step_runner_of(be: Any) -> Callable[..., Runner]:
    """``be.step_runner``; for a module that defines only ``launch`` (see above), the
    ``launch_runner`` over it."""
    own = getattr(be, "step_runner", None)
    if own is not None:
        return own
    launch = be.launch
    return lambda plan, dtype, writes, io: launch_runner(launch, plan, io)
