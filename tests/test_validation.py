"""Bad input gets a clear error and changes nothing.

Each failing call is made against an optimizer that has already stepped (so state exists), with
the bad entry placed *last* among several good ones, and afterwards every parameter byte, every
state byte and the step counter are compared with a snapshot taken before the call.
"""

import numpy as np
import pytest
from fastopt.kernels import RULES
from support.matrix import FULL, config_id
from support.oracle import spec_of

import fastopt
from fastopt import functional as F
from fastopt.optimizers import CLASSES

CPU = [b for b in ("numpy", "numba") if b in fastopt.available_backends()]
KINDS = list(CLASSES.values())


def _params(rng, n=4, dtype=np.float64):
    shapes = [(3,), (2, 5), (7,), (4, 1, 2)][:n]
    return {f"w{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)}


def _grads(rng, params):
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}


def _snapshot(opt, arrays):
    return (
        {n: a.copy() for n, a in arrays.items()},
        {n: {s: a.copy() for s, a in st.items()} for n, st in opt.state.items()},
        opt.step_count,
        dict(opt.hyperparams),
    )


def _assert_unchanged(opt, arrays, snap):
    p0, s0, step0, hp0 = snap
    assert set(arrays) == set(p0)
    for n, a in arrays.items():
        assert np.array_equal(a, p0[n]), f"parameter {n!r} changed by a refused call"
    assert set(opt.state) == set(s0)
    for n, st in opt.state.items():
        for s, a in st.items():
            assert np.array_equal(a, s0[n][s]), f"state {s!r} of {n!r} changed"
    assert opt.step_count == step0
    assert opt.hyperparams == hp0


@pytest.fixture
def stepped(request):
    """An Adam (amsgrad: three state buffers) stepped twice on four float64 params."""
    backend = getattr(request, "param", "numba")
    rng = np.random.default_rng(11)
    params = _params(rng)
    opt = fastopt.Adam(lr=1e-2, amsgrad=True, backend=backend)
    for _ in range(2):
        assert opt.update(params, _grads(rng, params)) is True
    return opt, params, _grads(rng, params), rng


def _bad_last(params, grads, name, value, where="grads"):
    """Copies of params/grads with entry ``name`` replaced by ``value`` and moved last."""
    p, g = dict(params), dict(grads)
    target = g if where == "grads" else p
    target[name] = value
    order = [k for k in params if k != name] + [name]
    return {k: p[k] for k in order}, {k: g[k] for k in order}


BAD_GRADS = {
    "shape": (lambda g: g.reshape(-1)[:-1].copy(), ValueError, "shape"),
    "list": (lambda g: g.tolist(), TypeError, "list"),
    "scalar": (lambda g: 1.0, TypeError, "float"),
    "integer": (lambda g: np.ones(g.shape, np.int64), TypeError, "integer"),
    "complex": (lambda g: np.ones(g.shape, np.complex128), TypeError, "complex"),
    # float64 params take float64 or float32 grads (fastopt.precision), never float16 ones
    "float16": (lambda g: g.astype(np.float16), TypeError, "float16"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRADS))
def test_bad_grad_last_changes_nothing(stepped, case):
    opt, params, grads, _ = stepped
    make, exc, word = BAD_GRADS[case]
    last = list(params)[-1]
    p, g = _bad_last(params, grads, last, make(grads[last]))
    snap = _snapshot(opt, params)
    with pytest.raises(exc) as info:
        opt.update(p, g)
    assert repr(last) in str(info.value) and word in str(info.value)
    _assert_unchanged(opt, params, snap)


def test_bad_param_dtype_kinds():
    rng = np.random.default_rng(1)
    for dtype, word in ((np.int32, "integer"), (np.complex64, "complex")):
        params = {"a": rng.standard_normal(3), "b": np.ones(4, dtype)}
        grads = {"a": rng.standard_normal(3), "b": np.ones(4, dtype)}
        a0 = params["a"].copy()
        with pytest.raises(TypeError, match=f"'b'.*{word}"):
            fastopt.SGD(lr=0.1).update(params, grads)
        assert np.array_equal(params["a"], a0)


def test_names_missing_extra_changed(stepped):
    opt, params, grads, rng = stepped
    snap = _snapshot(opt, params)
    first = next(iter(params))
    # grads lack a name
    g = dict(grads)
    del g[first]
    with pytest.raises(KeyError, match=first):
        opt.update(params, g)
    # an extra parameter after the first step
    p2, g2 = dict(params), dict(grads)
    p2["new"], g2["new"] = rng.standard_normal(3), rng.standard_normal(3)
    with pytest.raises(KeyError, match="new"):
        opt.update(p2, g2)
    # a parameter dropped after the first step
    p3 = {k: v for k, v in params.items() if k != first}
    g3 = {k: v for k, v in grads.items() if k != first}
    with pytest.raises(KeyError, match=first):
        opt.update(p3, g3)
    # a renamed parameter
    p4 = {("renamed" if k == first else k): v for k, v in params.items()}
    g4 = {("renamed" if k == first else k): v for k, v in grads.items()}
    with pytest.raises(KeyError, match="renamed"):
        opt.update(p4, g4)
    _assert_unchanged(opt, params, snap)


def test_shape_changed_after_first_step_last(stepped):
    opt, params, grads, rng = stepped
    last = list(params)[-1]
    bigger = rng.standard_normal(params[last].size + 1)
    p, g = _bad_last(params, grads, last, bigger, where="params")
    g[last] = rng.standard_normal(bigger.shape)
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=repr(last)):
        opt.update(p, g)
    _assert_unchanged(opt, params, snap)


def test_dtype_changed_after_first_step(stepped):
    opt, params, grads, _ = stepped
    last = list(params)[-1]
    p, g = _bad_last(params, grads, last, params[last].astype(np.float32), where="params")
    g[last] = grads[last].astype(np.float32)
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=f"{last!r}.*float32.*float64"):
        opt.update(p, g)
    _assert_unchanged(opt, params, snap)


def test_grad_aliasing_its_param(stepped):
    opt, params, grads, _ = stepped
    last = list(params)[-1]
    g = dict(grads)
    g[last] = params[last]
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match="share memory"):
        opt.update(params, g)
    _assert_unchanged(opt, params, snap)


def test_grad_overlapping_another_param(stepped):
    opt, params, grads, _ = stepped
    names = list(params)
    g = dict(grads)
    # a gradient that is a (strided, partial) view of another parameter's memory
    g[names[-1]] = params[names[1]].reshape(-1)[: params[names[-1]].size]
    g[names[-1]] = g[names[-1]].reshape(params[names[-1]].shape)
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=f"{names[1]!r}.*share memory|share memory"):
        opt.update(params, g)
    _assert_unchanged(opt, params, snap)


def test_grad_aliasing_optimizer_state(stepped):
    opt, params, grads, _ = stepped
    last = list(params)[-1]
    g = dict(grads)
    g[last] = opt.state[last]["exp_avg"]
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.update(params, g)
    _assert_unchanged(opt, params, snap)


def test_params_overlapping_each_other():
    rng = np.random.default_rng(2)
    base = rng.standard_normal(10)
    params = {"a": base[:6], "b": base[4:]}
    grads = {"a": rng.standard_normal(6), "b": rng.standard_normal(6)}
    b0 = base.copy()
    with pytest.raises(ValueError, match="share memory"):
        fastopt.SGD(lr=0.1).update(params, grads)
    assert np.array_equal(base, b0)


def test_grads_may_share_memory_with_each_other():
    # two grads viewing the same memory are read-only inputs: allowed, and the step is right
    rng = np.random.default_rng(3)
    g = rng.standard_normal(4)
    params = {"a": rng.standard_normal(4), "b": rng.standard_normal(4)}
    expect = {k: v - 0.5 * g for k, v in params.items()}
    assert fastopt.SGD(lr=0.5, backend="numpy").update(params, {"a": g, "b": g}) is True
    for k, p in params.items():
        np.testing.assert_allclose(p, expect[k], rtol=1e-15)


def test_non_contiguous_param_refused(stepped):
    rng = np.random.default_rng(4)
    params = {"a": rng.standard_normal(3), "b": rng.standard_normal((4, 6))[:, ::2]}
    grads = {"a": rng.standard_normal(3), "b": rng.standard_normal((4, 3))}
    a0 = params["a"].copy()
    with pytest.raises(ValueError, match="'b'.*not C-contiguous"):
        fastopt.Adam().update(params, grads)
    assert np.array_equal(params["a"], a0)


def test_non_contiguous_grad_is_fine():
    rng = np.random.default_rng(5)
    p1, p2 = {"a": rng.standard_normal(5)}, None
    p2 = {"a": p1["a"].copy()}
    g = rng.standard_normal(10)
    fastopt.Adam(backend="numba").update(p1, {"a": g[::2]})
    fastopt.Adam(backend="numba").update(p2, {"a": g[::2].copy()})
    assert np.array_equal(p1["a"], p2["a"])


def test_read_only_param_last_refused(stepped):
    opt, params, grads, _ = stepped
    last = list(params)[-1]
    params[last].flags.writeable = False
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=f"{last!r}.*read-only"):
        opt.update(params, grads)
    _assert_unchanged(opt, params, snap)


class _FakeDeviceArray:
    """Claims to be a device array (it is not one): enough to test the host/device check."""

    def __init__(self, host):
        self._host = host
        self.shape, self.dtype = host.shape, host.dtype
        self.__cuda_array_interface__ = {
            "shape": host.shape,
            "typestr": host.dtype.str,
            "data": (host.ctypes.data, False),
            "strides": None,
            "version": 3,
        }


def test_host_device_mix_refused(monkeypatch):
    import fastopt._arrays as arrays_mod

    # keep the device-array normaliser from importing CuPy: the fake object stays as it is
    monkeypatch.setattr(arrays_mod, "as_xp_array", lambda a, label=None: a)
    rng = np.random.default_rng(6)
    params = {"a": rng.standard_normal(3), "b": rng.standard_normal(3)}
    grads = {"a": rng.standard_normal(3), "b": _FakeDeviceArray(rng.standard_normal(3))}
    a0 = params["a"].copy()
    with pytest.raises(ValueError, match="host array.*device array|one device"):
        fastopt.SGD(lr=0.1, backend="numba").update(params, grads)
    assert np.array_equal(params["a"], a0)


@pytest.mark.parametrize(
    "make, exc, word",
    [
        (lambda: fastopt.SGD(lr=-0.1), ValueError, "lr"),
        (lambda: fastopt.SGD(lr=float("nan")), ValueError, "NaN"),
        (lambda: fastopt.SGD(lr=float("inf")), ValueError, "lr"),
        (lambda: fastopt.SGD(lr="0.1"), TypeError, "lr"),
        (lambda: fastopt.SGD(momentum=-0.9), ValueError, "momentum"),
        (lambda: fastopt.SGD(weight_decay=-1e-4), ValueError, "weight_decay"),
        (lambda: fastopt.SGD(dampening=-0.1), ValueError, "dampening"),
        (lambda: fastopt.SGD(momentum=0.9, dampening=0.1, nesterov=True), ValueError, "nesterov"),
        (lambda: fastopt.SGD(momentum=0.0, nesterov=True), ValueError, "nesterov"),
        (lambda: fastopt.Momentum(momentum=0.0), ValueError, "momentum"),
        (lambda: fastopt.Nesterov(momentum=-1.0), ValueError, "momentum"),
        (lambda: fastopt.AdaGrad(lr_decay=-0.1), ValueError, "lr_decay"),
        (lambda: fastopt.AdaGrad(eps=-1e-10), ValueError, "eps"),
        (lambda: fastopt.AdaGrad(initial_accumulator_value=-1.0), ValueError, "initial_accum"),
        (lambda: fastopt.RMSProp(alpha=1.0), ValueError, "alpha"),
        (lambda: fastopt.RMSProp(alpha=-0.1), ValueError, "alpha"),
        (lambda: fastopt.RMSProp(momentum=-0.5), ValueError, "momentum"),
        (lambda: fastopt.Adam(betas=(0.9, 1.0)), ValueError, "beta2"),
        (lambda: fastopt.Adam(betas=(-0.1, 0.999)), ValueError, "beta1"),
        (lambda: fastopt.Adam(betas=(float("nan"), 0.999)), ValueError, "beta1"),
        (lambda: fastopt.Adam(betas=0.9), ValueError, "betas"),
        (lambda: fastopt.Adam(eps=-1e-8), ValueError, "eps"),
        (lambda: fastopt.AdamW(weight_decay=-0.01), ValueError, "weight_decay"),
        (lambda: fastopt.Adam(amsgrad="yes"), TypeError, "amsgrad"),
        (lambda: fastopt.Lion(betas=(0.9, 1.5)), ValueError, "beta2"),
        (lambda: fastopt.Lion(lr=-1e-4), ValueError, "lr"),
        (lambda: fastopt.Adam(backend="tpu"), ValueError, "unknown backend"),
        (lambda: fastopt.Adam(backend=3), TypeError, "backend"),
        (lambda: fastopt.Adam(nonfinite="ignore"), ValueError, "nonfinite"),
    ],
)
def test_invalid_hyperparameters(make, exc, word):
    with pytest.raises(exc, match=word):
        make()


#: per spec domain: values outside it, and the error each gets
OUTSIDE = {
    "nonneg": [(-0.5, ValueError), (float("nan"), ValueError), ("0.1", TypeError)],
    "positive": [(0.0, ValueError), (float("inf"), ValueError)],
    "unit": [(1.0, ValueError), (-0.1, ValueError)],
    "closed_unit": [(1.5, ValueError), (-0.1, ValueError)],
    "real": [(float("inf"), ValueError), (float("nan"), ValueError), (None, TypeError)],
    "betas": [((0.9, 1.0), ValueError), ((-0.1, 0.9), ValueError), (0.9, ValueError)],
    "etas": [((1.5, 1.2), ValueError), ((0.5, 0.9), ValueError), ((0.0, 1.2), ValueError)],
    "range": [((2.0, 1.0), ValueError), ((-1.0, 1.0), ValueError), ((0.1,), ValueError)],
    "bool": [("yes", TypeError), (1, TypeError)],
}


def _outside_cases():
    out = []
    for name, cls in CLASSES.items():
        spec = spec_of(name)
        for h in cls._hyper + cls._flags:
            for value, exc in OUTSIDE[spec.hyper_spec(h).domain]:
                out.append(pytest.param(cls, h, value, exc, id=f"{name}.{h}={value!r}"))
    return out


@pytest.mark.parametrize("cls, hyper, value, exc", _outside_cases())
def test_every_hyperparameter_refuses_values_outside_its_domain(cls, hyper, value, exc):
    """Each hyperparameter of each class, at the constructor and when set between steps: a
    value outside its spec domain is refused by name, and a refused step changes nothing."""
    with pytest.raises(exc, match=hyper):
        cls(**{hyper: value}, backend="numpy")
    if hyper not in cls._hyper:  # a fixed flag: assigning it is refused outright (test_hardening)
        return
    opt = cls(backend="numpy")
    params = {"w": np.linspace(-1.0, 1.0, 5)}
    opt.update(params, {"w": np.ones(5)})
    snap = _snapshot(opt, params)
    try:
        setattr(opt, hyper, value)
    except (TypeError, ValueError) as e:  # refused when assigned
        assert hyper in str(e)
    else:
        with pytest.raises(exc, match=hyper):  # or before the next step writes anything
            opt.update(params, {"w": np.ones(5)})
        setattr(opt, hyper, snap[3][hyper])
    _assert_unchanged(opt, params, snap)


def test_hyperparameter_changed_to_invalid_between_steps(stepped):
    opt, params, grads, _ = stepped
    snap = _snapshot(opt, params)
    opt.lr = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.update(params, grads)
    opt.lr = snap[3]["lr"]
    _assert_unchanged(opt, params, snap)


def test_momentum_switched_off_refused():
    rng = np.random.default_rng(7)
    params = _params(rng)
    opt = fastopt.SGD(lr=0.1, momentum=0.9)
    opt.update(params, _grads(rng, params))
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match="momentum"):  # refused when assigned, not later
        opt.momentum = 0.0
    assert opt.momentum == 0.9
    _assert_unchanged(opt, params, snap)
    opt.momentum = 0.5  # non-zero to non-zero is a schedule, not a structural change
    assert opt.update(params, _grads(rng, params)) is True


# --- FlatBuffer -------------------------------------------------------------------------------


def _multi_flat(rng):
    params = {
        "a": rng.standard_normal(5),
        "b": rng.standard_normal((3, 2)).astype(np.float32),
        "c": rng.standard_normal(9),
        "d": rng.standard_normal(4).astype(np.float32),
    }
    return fastopt.FlatBuffer(params)


def _flat_snapshot(opt, buf):
    return (
        [g.data.copy() for g in buf.groups],
        [{s: a.copy() for s, a in f.items()} for f in (opt._flat_state or [])],
        opt.step_count,
    )


def _flat_unchanged(opt, buf, snap):
    data, flat, step = snap
    for g, d in zip(buf.groups, data):
        assert np.array_equal(g.data, d)
    for f, f0 in zip(opt._flat_state or [], flat):
        for s in f:
            assert np.array_equal(f[s], f0[s])
    assert opt.step_count == step


@pytest.mark.parametrize("backend", CPU)
def test_flat_multi_dtype_bad_last_group(backend):
    rng = np.random.default_rng(8)
    buf = _multi_flat(rng)
    opt = fastopt.RMSProp(centered=True, momentum=0.5, backend=backend)
    for g in buf.groups:
        g.grad[...] = rng.standard_normal(g.grad.shape)
    assert opt.step(buf) is True
    snap = _flat_snapshot(opt, buf)
    # the last group's grad replaced by one of the wrong dtype
    good = buf.groups[-1].grad
    buf.groups[-1].grad = good.astype(np.float64)
    with pytest.raises(ValueError, match="float32"):
        opt.step(buf)
    _flat_unchanged(opt, buf, snap)
    # the last group's grad aliasing its data
    buf.groups[-1].grad = buf.groups[-1].data
    with pytest.raises(ValueError, match="share memory"):
        opt.step(buf)
    _flat_unchanged(opt, buf, snap)
    buf.groups[-1].grad = good
    assert opt.step(buf) is True and opt.step_count == snap[2] + 1


def test_flat_layout_changed_refused():
    rng = np.random.default_rng(9)
    buf = _multi_flat(rng)
    opt = fastopt.Adam()
    opt.step(buf)
    other = fastopt.FlatBuffer({"a": rng.standard_normal(5), "b": rng.standard_normal(6)})
    snap = _flat_snapshot(opt, buf)
    with pytest.raises(KeyError, match="'c'"):
        opt.step(other)
    bigger = fastopt.FlatBuffer(
        {k: (np.zeros(8) if k == "d" else v) for k, v in buf.params.items()}
    )
    with pytest.raises(ValueError, match="'d'"):
        opt.step(bigger)
    with pytest.raises(ValueError, match="FlatBuffer"):
        opt.update(buf.params, buf.grads)
    with pytest.raises(TypeError, match="FlatBuffer"):
        opt.step(buf.params)
    _flat_unchanged(opt, buf, snap)


# --- load_state_dict --------------------------------------------------------------------------


def _state_bytes(opt):
    return {n: {s: a.copy() for s, a in st.items()} for n, st in opt.state.items()}


@pytest.mark.parametrize(
    "mutate, exc, word",
    [
        (lambda sd: sd.update(optimizer="AdamW"), ValueError, "AdamW"),
        (lambda sd: sd["hyperparams"].update(amsgrad=False), ValueError, "amsgrad"),
        (lambda sd: sd["hyperparams"].update(lr=-1.0), ValueError, "lr"),
        (lambda sd: sd["hyperparams"].pop("eps"), KeyError, "eps"),
        (lambda sd: sd.update(step=-3), ValueError, "step"),
        (lambda sd: sd.pop("state"), ValueError, "state"),
        (lambda sd: sd["state"].pop("w3"), KeyError, "w3"),
        (lambda sd: sd["state"].update(extra=sd["state"]["w0"]), KeyError, "extra"),
        (lambda sd: sd["state"]["w3"].pop("max_exp_avg_sq"), KeyError, "max_exp_avg_sq"),
        (lambda sd: sd["state"]["w3"].update(exp_avg=np.zeros(5)), ValueError, "exp_avg"),
        (
            lambda sd: sd["state"]["w3"].update(
                exp_avg_sq=sd["state"]["w3"]["exp_avg_sq"].astype(np.float32)
            ),
            ValueError,
            "float32",
        ),
        (lambda sd: sd["state"]["w3"].update(exp_avg=[1.0] * 8), TypeError, "exp_avg"),
    ],
)
def test_load_state_dict_refused_changes_nothing(stepped, mutate, exc, word):
    opt, params, _, _ = stepped
    sd = opt.state_dict()
    sd["hyperparams"] = dict(sd["hyperparams"], lr=0.5)  # a value that would change if applied
    sd["state"] = {n: {s: a * 2 + 1 for s, a in st.items()} for n, st in sd["state"].items()}
    sd["step"] = 99
    mutate(sd)
    snap = _snapshot(opt, params)
    with pytest.raises(exc, match=word):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, params, snap)


def test_load_state_dict_from_another_model_into_fresh_optimizer():
    rng = np.random.default_rng(10)
    a = _params(rng)
    src = fastopt.Adam()
    src.update(a, _grads(rng, a))
    sd = src.state_dict()
    other = {k: rng.standard_normal(v.size + 1) for k, v in a.items()}
    opt = fastopt.Adam()
    opt.load_state_dict(sd)  # fresh: accepted as pending, checked against the first step
    o0 = {k: v.copy() for k, v in other.items()}
    with pytest.raises(ValueError, match="loaded state"):
        opt.update(other, _grads(rng, other))
    assert all(np.array_equal(other[k], o0[k]) for k in other) and opt.step_count == 1
    renamed = {k + "_": v for k, v in a.items()}
    with pytest.raises(KeyError, match="loaded state"):
        opt.update(renamed, _grads(rng, renamed))


HOST = [c for c in FULL if spec_of(c[0]).host_names]


@pytest.mark.parametrize("cfg", HOST, ids=[config_id(c) for c in HOST])
def test_load_state_dict_refuses_bad_host_state(cfg):
    """The host state (NAdam's mu_product, ASGD's eta and mu) in a state dict: 0-d float
    arrays, one value for every parameter; anything else is refused, changing nothing."""
    name, kw = cfg
    hnames = spec_of(name).host_names
    rng = np.random.default_rng(13)
    params = _params(rng)
    opt = getattr(fastopt, name)(**kw, backend="numpy")
    for _ in range(2):
        opt.update(params, _grads(rng, params))
    good = opt.state_dict()
    h, first, last = hnames[0], "w0", "w3"
    assert all(good["state"][n][h].shape == () for n in good["state"])
    assert good["state"][first][h].dtype == np.float32
    bad = {
        "missing": lambda sd: sd["state"][last].pop(h),
        "differs": lambda sd: sd["state"][last].update({h: np.array(0.125, np.float32)}),
        "shape": lambda sd: sd["state"][last].update({h: np.full(1, sd["state"][last][h])}),
        "nan": lambda sd: sd["state"][last].update({h: np.array(np.nan, np.float32)}),
        "int": lambda sd: sd["state"][last].update({h: np.array(1, np.int64)}),
    }
    host0 = opt.host_state
    for what, mutate in bad.items():
        sd = opt.state_dict()
        sd["step"] = 99
        mutate(sd)
        snap = _snapshot(opt, params)
        with pytest.raises((KeyError, TypeError, ValueError), match=h):
            opt.load_state_dict(sd)
        _assert_unchanged(opt, params, snap)
        assert opt.host_state == host0, what
    # a good one restores it, before and after the first step
    for target in (getattr(fastopt, name)(**kw, backend="numpy"), opt):
        target.load_state_dict(good)
        assert target.host_state == host0


def test_load_state_dict_kind_refused_for_every_optimizer():
    rng = np.random.default_rng(12)
    for i, cls in enumerate(KINDS):
        other = KINDS[(i + 1) % len(KINDS)]
        params = _params(rng)
        src = cls()
        src.update(params, _grads(rng, params))
        dst = other()
        with pytest.raises(ValueError):
            dst.load_state_dict(src.state_dict())
        assert dst.step_count == 0 and dst.state == {} and dst._pending is None


HOST_RULES = [r for r, spec in RULES.items() if spec.host_names]


@pytest.mark.parametrize("rule", HOST_RULES)
def test_functional_host_state_refused_before_anything_is_written(rule):
    """``host_state=`` of a functional entry point: a dict of every host-state name to a
    finite real or a writeable 0-d float array; anything else is refused by name, changing
    nothing (the arrays and the dict); a good one is advanced in place."""
    spec, fn = RULES[rule], getattr(F, rule)
    rng = np.random.default_rng(3)
    hp = dict(spec.defaults, lr=0.05)
    p, g = rng.standard_normal(9), rng.standard_normal(9)
    states = [np.full(9, spec.initial(s, hp)) for s in spec.state]
    good = spec.initial_host_state(hp)
    first = spec.host_names[0]
    ro = np.array(good[first], np.float32)
    ro.flags.writeable = False
    bad = [
        ({k: v for k, v in good.items() if k != first}, TypeError),
        (dict(good, extra=1.0), TypeError),
        (dict(good, **{first: float("nan")}), ValueError),
        (dict(good, **{first: np.ones(2, np.float32)}), ValueError),
        (dict(good, **{first: ro}), ValueError),
        (tuple(good.values()), TypeError),
    ]
    before = [a.copy() for a in (p, *states)]
    for hs, exc in bad:
        kept = dict(hs) if isinstance(hs, dict) else hs
        with pytest.raises(exc, match="host_state"):
            fn(p, g, *states, step=2, host_state=hs, **hp)
        assert all(np.array_equal(a, b) for a, b in zip((p, *states), before))
        assert (hs == kept) if isinstance(hs, tuple) else all(hs[k] is kept[k] for k in hs)
    hs = {k: np.array(v, np.float32) for k, v in good.items()}
    fn(p, g, *states, step=1, host_state=hs, **hp)
    assert {k: float(v) for k, v in hs.items()} == spec.advance_host_state(hp, 1, good)
    with pytest.raises(TypeError, match="host_state"):  # a rule without any: no such keyword
        F.adam(p, g, *(np.zeros(9) for _ in range(2)), step=1, host_state={})
