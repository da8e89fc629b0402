"""PyTorch's own optimizer database (``torch.testing._internal.common_optimizers.optim_db``)
against ``fastopt.torch`` (CPU; skipped without torch or its test helpers).

Every ``OptimizerInfo`` of a class ``fastopt.torch`` has, every configuration torch runs on the
CPU (``_get_optim_inputs_including_global_cliquey_kwargs``: each sample of its
``optim_inputs_func`` with ``foreach`` off, on, ``fused`` where torch has it on the CPU, and
``differentiable``), in float32 and float64: 20 steps on random gradients
(``numpy.random.default_rng``) over a matrix and a vector, params and every state tensor compared
with torch's at every step, and after step 10 a state-dict round trip both ways (torch's state
dict loaded into a new fastopt optimizer, fastopt's into a new torch one; both go on from there).

``foreach`` and ``fused`` choose torch's implementation; fastopt has one, so one fastopt run is
compared with each of torch's implementations of a sample (all run in lockstep).

Configurations refused by design (``REFUSED``; the README's limits list them too):

| configuration | why |
|---|---|
| ``differentiable=True`` | the step is a fused kernel outside autograd: nothing to |
| | differentiate through (NotImplementedError at construction, naming torch.optim) |
"""

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch's test helpers import it

import fastopt.torch as fot  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.testing._internal.common_optimizers import (
        _get_optim_inputs_including_global_cliquey_kwargs as _all_inputs,
    )
    from torch.testing._internal.common_optimizers import optim_db

#: configuration flag -> (exception fastopt raises, why): refused by design
REFUSED = {
    "differentiable": (
        NotImplementedError,
        "the step is a fused kernel outside autograd: nothing to differentiate through",
    ),
}
#: torch's implementation selectors: fastopt runs its own kernel whatever they say
IMPLS = ("foreach", "fused", "differentiable")
INFOS = [info for info in optim_db if hasattr(fot, info.optim_cls.__name__)]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-9, atol=1e-11)}
SHAPES = ((5, 4), (4,))
STEPS, SWAP = 20, 10


def _samples(info, dtype):
    """``{base description: [kwargs of each of torch's implementations]}``."""
    out = {}
    for oi in _all_inputs("cpu", dtype, info):
        base = oi.desc.split(" & ")[0]
        out.setdefault(base, []).append(oi.kwargs)
    return out


def _compare(pf, of, pt, ot, tol, what):
    for i, (a, b) in enumerate(zip(pf, pt)):
        torch.testing.assert_close(a, b, **tol, msg=f"{what}: param {i}")
    sf, st = of.state_dict()["state"], ot.state_dict()["state"]
    assert sf.keys() == st.keys(), what
    for k in st:
        assert sf[k].keys() == st[k].keys(), (what, k, sf[k].keys(), st[k].keys())
        for s in st[k]:
            torch.testing.assert_close(sf[k][s], st[k][s], **tol, msg=f"{what}: state {k}/{s}")


def _run(info, dtype, kwargs_list):
    """One fastopt run of a sample against each of torch's implementations of it."""
    cls, tcls = getattr(fot, info.optim_cls.__name__), info.optim_cls
    fkw = {k: v for k, v in kwargs_list[0].items() if k not in IMPLS}
    rng = np.random.default_rng(0)
    init = [torch.tensor(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    pf = [torch.nn.Parameter(x.clone()) for x in init]
    of = cls(pf, **copy.deepcopy(fkw))
    runs = []  # (kwargs, params, optimizer) of each torch implementation
    for kw in kwargs_list:
        pt = [torch.nn.Parameter(x.clone()) for x in init]
        runs.append((kw, pt, tcls(pt, **copy.deepcopy(kw))))
    tol = TOL[dtype]
    for t in range(1, STEPS + 1):
        grads = [torch.tensor(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
        for p, g in zip(pf, grads):
            p.grad = g.clone()
        of.step()
        for kw, pt, ot in runs:
            for p, g in zip(pt, grads):
                p.grad = g.clone()
            ot.step()
            _compare(pf, of, pt, ot, tol, f"{kw} step {t}")
        if t == SWAP:  # each side goes on from the other's state dict
            sd_f = copy.deepcopy(of.state_dict())
            of = cls(pf, **copy.deepcopy(fkw))
            of.load_state_dict(copy.deepcopy(runs[0][2].state_dict()))
            runs = [(kw, pt, tcls(pt, **copy.deepcopy(kw))) for kw, pt, _ in runs]
            for _, _, ot in runs:
                ot.load_state_dict(copy.deepcopy(sd_f))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("info", INFOS, ids=[i.optim_cls.__name__ for i in INFOS])
def test_optim_db_configuration_matches_torch(info, dtype):
    cls = getattr(fot, info.optim_cls.__name__)
    ran = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on foreach/fused defaults
        for desc, kwargs_list in _samples(info, dtype).items():
            runnable = []
            for kw in kwargs_list:
                refused = [f for f in REFUSED if kw.get(f)]
                if refused:  # refused by design: at construction, before anything exists
                    p = torch.nn.Parameter(torch.ones(2, dtype=dtype))
                    with pytest.raises(REFUSED[refused[0]][0], match=refused[0]):
                        cls([p], **copy.deepcopy(kw))
                else:
                    runnable.append(kw)
            assert runnable, desc
            _run(info, dtype, runnable)
            ran += 1
    assert ran == len(info.optim_inputs_func("cpu", dtype))
