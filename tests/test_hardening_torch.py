"""``fastopt.torch`` under hostile or careless use (the torch door's findings of the second
hardening round), on the numba CPU backend.

Each finding is either stepped exactly as ``torch.optim`` steps it (parameters and every state
tensor compared), or refused with a clear ``TypeError``/``ValueError``/``KeyError``/
``RuntimeError`` with nothing changed: parameters, gradients, state (keys, values, types) and
step counts compared bit for bit before and after. The checks live in
``fastopt/torch/_memory.py`` (storage, type, overlap), ``FusedOptimizer._plan_group`` (the full
path) and ``fastopt/torch/_steady.py`` (the cached path); where a case is reached through both,
both are tested. Where torch.optim does something else, the test says what and why.
"""

import copy
import math

import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as fot  # noqa: E402

N = 300  # elements per parameter: more bytes than the 64 a shrunk storage keeps


def _bits(t):
    """A tensor's bits as an integer tensor (NaN-proof equality)."""
    t = t.detach()
    t = (t.to_dense() if t.layout is not torch.strided else t).contiguous()
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _snap(opt, params, skip=()):
    """Every parameter, gradient and state value of ``opt`` (cloned), less the tensors in
    ``skip`` (a tensor whose storage was shrunk cannot be read safely)."""

    def keep(t):
        return t.detach().clone() if isinstance(t, torch.Tensor) else copy.deepcopy(t)

    skip = {id(t) for t in skip}
    return (
        [None if id(p) in skip else keep(p) for p in params],
        [None if p.grad is None or id(p.grad) in skip else keep(p.grad) for p in params],
        {
            i: {k: (type(v), None if id(v) in skip else keep(v)) for k, v in opt.state[p].items()}
            for i, p in enumerate(params)
            if p in opt.state
        },
    )


def _unchanged(opt, params, snap):
    ps, gs, st = snap
    for i, p in enumerate(params):
        if ps[i] is not None:
            assert _same(p, ps[i]), f"parameter {i} changed"
        if gs[i] is not None:
            assert _same(p.grad, gs[i]), f"gradient {i} changed"
    assert {i for i, p in enumerate(params) if p in opt.state} == set(st), "state entries changed"
    for i, entry in st.items():
        now = opt.state[params[i]]
        assert set(now) == set(entry), f"state keys of parameter {i} changed"
        for k, (typ, v) in entry.items():
            assert type(now[k]) is typ, f"state {k} of parameter {i} changed type"
            if isinstance(v, torch.Tensor):
                assert _same(now[k], v), f"state {k} of parameter {i} changed"
            elif v is not None:
                assert now[k] == v, f"state {k} of parameter {i} changed"


def _pair(name, shapes, seed=0, dtype=torch.float32, backend="auto", **kw):
    """fastopt.torch's and torch.optim's ``name`` over equal parameters."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = getattr(fot, name)(ps, backend=backend, **kw)
    b = getattr(torch.optim, name)(qs, foreach=False, **kw)
    return ps, qs, a, b


def _grads(ps, qs, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    for p, q in zip(ps, qs):
        x = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.grad, q.grad = x, x.clone()


def _assert_like_torch(a, b, ps, qs, rtol=1e-5, atol=1e-6):
    """Parameters and every state tensor of ``a`` (fastopt) equal ``b``'s (torch.optim)."""
    for i, (p, q) in enumerate(zip(ps, qs)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol, msg=f"param {i}")
        assert set(a.state[p]) == set(b.state[q]), i
        for k, v in b.state[q].items():
            torch.testing.assert_close(
                a.state[p][k], v, rtol=rtol, atol=atol, check_dtype=False, msg=f"{k} of {i}"
            )


# -- 1. memory behind every tensor -----------------------------------------------------------
@pytest.mark.parametrize("path", ["steady", "full"])
@pytest.mark.parametrize("which", ["param", "exp_avg", "grad", "step"])
def test_storage_shrunk_after_two_steps_is_refused(which, path):
    """Two steps, then ``untyped_storage().resize_(64)`` (FSDP-style freeing) on a parameter,
    its ``exp_avg``, its gradient or its step count: the kernel would write (or read) past the
    storage. Refused before anything is written, on the cached path and on the full one (a state
    dict loaded, the same tensors). torch.optim would read and write the freed bytes too: it
    trusts the storage as much as the old code did."""
    ps, qs, a, _ = _pair("Adam", [(N,), (7, 5), (N,)], lr=1e-2)
    for s in range(2):
        _grads(ps, qs, s)
        a.step()
    assert 0 in a._steady
    _grads(ps, qs, 2)
    target = {
        "param": ps[2],
        "exp_avg": a.state[ps[2]]["exp_avg"],
        "grad": ps[2].grad,
        "step": a.state[ps[2]]["step"],
    }[which]
    snap = _snap(a, ps, skip=[target])
    target.untyped_storage().resize_(2 if which == "step" else 64)
    with pytest.raises(ValueError, match="storage"):
        if path == "full":
            # the same tensors, no cached launch; a shrunk step count is refused by the load
            # already (its value is read there), anything else by the step
            a.load_state_dict(a.state_dict())
        a.step()
    _unchanged(a, ps, snap)


def test_storage_shrunk_is_refused_by_the_per_tensor_launch_too():
    """The per-tensor launch (GPU backends; here the numpy backend on CPU tensors) makes the
    same checks: a shrunk gradient is refused before the first tensor is stepped."""
    ps, qs, a, _ = _pair("Adam", [(N,), (N,)], lr=1e-2, backend="numpy")
    _grads(ps, qs, 0)
    a.step()
    _grads(ps, qs, 1)
    snap = _snap(a, ps, skip=[ps[1].grad])
    ps[1].grad.untyped_storage().resize_(64)
    with pytest.raises(ValueError, match="storage"):
        a.step()
    _unchanged(a, ps, snap)


@pytest.mark.parametrize("name", ["Adam", "NAdam", "SGD"])
def test_meta_parameters_are_refused_naming_the_parameter(name):
    """A meta tensor has no memory: its address (0) in the table was a SIGSEGV. torch.optim
    steps meta parameters (state made on the meta device, step counts advanced, nothing
    computed); fastopt.torch refuses them with a TypeError naming the parameter, nothing
    written, as ``tests/test_torch_contract.py`` holds for the whole door: its kernels write
    memory, and a model still on the meta device is one to materialise (``to_empty()``) first,
    whose state would otherwise be made for tensors that are about to be replaced."""
    kw = {"momentum": 0.9} if name == "SGD" else {}
    meta = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    meta.grad = torch.empty_like(meta)
    theirs = getattr(torch.optim, name)([meta], lr=1e-2, **kw)
    theirs.step()  # torch.optim steps it
    ps, qs, a, _ = _pair(name, [(5,), (6,)], lr=1e-2, **kw)
    _grads(ps, qs, 0)
    a.step()
    _grads(ps, qs, 1)
    snap = _snap(a, ps)
    a.param_groups[0]["params"].append(meta)
    with pytest.raises(TypeError, match="parameter 2 of param group 0 is a meta tensor"):
        a.step()
    a.param_groups[0]["params"].pop()
    _unchanged(a, ps, snap)
    assert meta not in a.state


class _Wrapped(torch.Tensor):
    """A wrapper subclass (as DTensor, a fake or a functional tensor are): its data lives in an
    inner tensor, not at its own address (``data_ptr()`` is 0)."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            return x.inner if isinstance(x, _Wrapped) else x

        def wrap(x):
            return _Wrapped(x) if isinstance(x, torch.Tensor) else x

        tree_map = torch.utils._pytree.tree_map
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(wrap, out)


class _Sub(torch.Tensor):
    """A plain Python subclass."""


@pytest.mark.parametrize("which", ["wrapper_param", "subclass_param", "wrapper_grad"])
def test_tensor_subclasses_are_refused_naming_the_parameter(which):
    """A tensor subclass (a fake or functional tensor, any ``__torch_dispatch__`` wrapper) may
    keep its data anywhere: refused with a TypeError that names the parameter and the type,
    nothing written (the first parameter, valid, is not stepped either). torch.optim steps them
    through their own dispatch; fastopt.torch writes memory at an address (a DTensor is stepped
    through its local shard, ``fastopt/torch/_dtensor.py``, tests/test_torch_contract.py)."""
    ps, qs, a, _ = _pair("Adam", [(5,), (6,)], lr=1e-2)
    _grads(ps, qs, 0)
    a.step()
    _grads(ps, qs, 1)
    snap = _snap(a, ps)
    if which == "wrapper_param":
        bad = torch.nn.Parameter(_Wrapped(torch.randn(4)))
        bad.grad = torch.randn(4)
    elif which == "subclass_param":
        bad = torch.nn.Parameter(torch.randn(4).as_subclass(_Sub))
        bad.grad = torch.randn(4)
    else:
        bad = torch.nn.Parameter(torch.randn(4))
        bad.grad = _Wrapped(torch.randn(4))
    a.param_groups[0]["params"].append(bad)
    with pytest.raises(TypeError, match=r"parameter 2 of param group 0.*_(Wrapped|Sub)"):
        a.step()
    a.param_groups[0]["params"].pop()
    _unchanged(a, ps, snap)


def test_sparse_and_opaque_tensors_are_refused():
    """A sparse gradient, a sparse or MKL-DNN state tensor: no addressable storage. Refused
    (RuntimeError for a sparse gradient, as torch.optim's Adam raises; TypeError for state),
    nothing written."""
    ps, qs, a, _ = _pair("Adam", [(5,), (6,)], lr=1e-2)
    _grads(ps, qs, 0)
    a.step()
    _grads(ps, qs, 1)
    snap = _snap(a, ps)
    good = ps[1].grad
    ps[1].grad = good.to_sparse()
    with pytest.raises(RuntimeError, match="parameter 1 of param group 0.*sparse"):
        a.step()
    ps[1].grad = good
    _unchanged(a, ps, snap)
    st = a.state[ps[1]]
    dense = st["exp_avg"]
    for bad in (dense.to_sparse(), dense.to_mkldnn()):
        st["exp_avg"] = bad
        with pytest.raises(TypeError, match="parameter 1 of param group 0: state 'exp_avg'"):
            a.step()
        st["exp_avg"] = dense
        _unchanged(a, ps, snap)


# -- 2. every fallible computation before the first write --------------------------------------
@pytest.mark.parametrize("name", ["Adam", "NAdam", "ASGD"])
def test_numbers_in_a_loaded_state_dict_are_converted_as_torch_converts_them(name):
    """An older state dict with ``step`` (and NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``)
    as Python numbers: ``load_state_dict`` converts them to float32 0-d tensors, as torch.optim's
    classes do, and training continues exactly as torch.optim's from the same state dict."""
    ps, qs, a, b = _pair(name, [(4, 3), (9,)], lr=1e-2)
    for s in range(3):
        _grads(ps, qs, s)
        a.step()
        b.step()
    sd = copy.deepcopy(b.state_dict())
    for st in sd["state"].values():
        for k in ("step", "mu_product", "eta", "mu"):
            if k in st:
                st[k] = int(st[k]) if k == "step" else float(st[k])
    a.load_state_dict(copy.deepcopy(sd))
    b.load_state_dict(sd)
    for p in ps:
        assert a.state[p]["step"].dtype == torch.float32
    for s in range(3, 6):
        _grads(ps, qs, s)
        a.step()
        b.step()
    _assert_like_torch(a, b, ps, qs)


def test_a_number_step_that_float32_cannot_hold_is_refused_at_load():
    """``step = 10**400`` in a state dict: refused at load (ValueError; torch.optim raises
    OverflowError there too), the optimizer unchanged."""
    ps, qs, a, _ = _pair("Adam", [(5,)], lr=1e-2)
    _grads(ps, qs, 0)
    a.step()
    sd = copy.deepcopy(a.state_dict())
    sd["state"][0]["step"] = 10**400
    snap = _snap(a, ps)
    before = a.state
    with pytest.raises(ValueError, match="step"):
        a.load_state_dict(sd)
    assert a.state is before
    _unchanged(a, ps, snap)


def test_a_number_step_set_directly_is_refused_before_writes():
    """A Python number put straight into ``state[p]["step"]`` (not through load_state_dict):
    refused (TypeError; torch.optim's Adam raises RuntimeError for it), nothing written: the
    first parameter, valid, is not stepped either."""
    ps, qs, a, _ = _pair("Adam", [(5,), (6,)], lr=1e-2)
    _grads(ps, qs, 0)
    a.step()
    a.state[ps[1]]["step"] = 1
    _grads(ps, qs, 1)
    snap = _snap(a, ps)
    with pytest.raises(TypeError, match="parameter 1 of param group 0: state 'step'"):
        a.step()
    _unchanged(a, ps, snap)


@pytest.mark.parametrize(
    "backend,dtype,strided",
    [
        ("numba", torch.float32, False),
        ("numpy", torch.float32, False),
        ("numba", torch.bfloat16, False),
        ("numba", torch.bfloat16, True),
    ],
    ids=["numba", "numpy", "numba-bf16", "numba-bf16-strided-param"],
)
def test_expanded_and_strided_gradients_are_read_through_a_copy(backend, dtype, strided):
    """An expanded (stride-0) gradient and a transposed one are read through contiguous
    copies and never written (the old code wrote the copies back after the launch, and an
    expanded gradient cannot be written, so it failed halfway). The result is torch.optim's, on
    the many-tensor launch (numba) and the per-tensor one (numpy, as the GPU backends launch);
    in bfloat16 through the storage-plan kernels, and with a transposed parameter through their
    per-tensor launch (as on a GPU), against torch in float32 (one rounding apart)."""
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(N, generator=g), torch.randn(6, 4, generator=g), torch.randn(5, generator=g)]
    if strided:
        ws[1] = torch.randn(4, 6, generator=g).t()
    ps = [torch.nn.Parameter(w.to(dtype)) for w in ws]
    assert ps[1].is_contiguous() != strided
    qs = [torch.nn.Parameter(p.detach().float()) for p in ps]
    a = fot.Adam(ps, lr=1e-2, backend=backend)
    b = torch.optim.Adam(qs, lr=1e-2, foreach=False)
    for s in range(3):
        gs = [
            torch.full((1,), 0.5 + s).to(dtype).expand(N),
            torch.randn(4, 6, generator=g).to(dtype).t(),
            torch.randn(5, generator=g).to(dtype),
        ]
        kept = [x.clone() for x in gs]
        for p, q, x in zip(ps, qs, gs):
            p.grad, q.grad = x, x.float()
        a.step()
        b.step()
        for p, x, k in zip(ps, gs, kept):
            assert p.grad is x and _same(x, k)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype is torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach().float(), q.detach(), **tol)


@pytest.mark.parametrize("how", ["expanded", "sparse", "inference"])
def test_loaded_state_that_cannot_be_written_in_place_is_refused(how):
    """A loaded ``exp_avg`` that is expanded (torch.optim fails in its in-place update, after
    earlier parameters were stepped), sparse, or an inference tensor (torch refuses in-place
    updates of it): refused before the first parameter is written."""
    ps, qs, a, _ = _pair("Adam", [(5,), (6,)], lr=1e-2)
    _grads(ps, qs, 0)
    a.step()
    st = a.state[ps[1]]
    if how == "expanded":
        st["exp_avg"] = torch.zeros(1).expand(6)
    elif how == "sparse":
        st["exp_avg"] = st["exp_avg"].to_sparse()
    else:
        with torch.inference_mode():
            st["exp_avg"] = st["exp_avg"].clone()
    _grads(ps, qs, 1)
    snap = _snap(a, ps)
    with pytest.raises((TypeError, ValueError, RuntimeError), match="parameter 1.*'exp_avg'"):
        a.step()
    _unchanged(a, ps, snap)


def test_asgd_host_state_that_overflows_is_refused_before_writes():
    """ASGD(lambd=1e6, alpha=100): ``eta = lr / (1 + lambd·lr·t)^alpha`` overflows a float
    after the first step. torch.optim writes the parameters and its step counts, then raises
    OverflowError. Here the host state after the step is computed before the launch: a
    ValueError, nothing changed. With lambd=5e4 it overflows at step 3, after two steps that
    cached the launch: refused on the cached path as on the full one."""
    kw = dict(lr=1e-2, lambd=5e4, alpha=100.0)
    ps, qs, a, b = _pair("ASGD", [(5,), (6,)], **kw)
    for s in range(2):
        _grads(ps, qs, s)
        a.step()
        b.step()
    _assert_like_torch(a, b, ps, qs)
    assert 0 in a._steady
    _grads(ps, qs, 2)
    with pytest.raises(OverflowError):  # torch.optim: one step count advanced, then raised
        b.step()
    assert b.state[qs[0]]["step"] == 3 and b.state[qs[1]]["step"] == 2
    for path in ("steady", "full"):
        snap = _snap(a, ps)
        if path == "full":
            a.load_state_dict(a.state_dict())
        with pytest.raises(ValueError, match="host scalars of step 3"):
            a.step()
        _unchanged(a, ps, snap)
    ps2, qs2, c, d = _pair("ASGD", [(5,)], lr=1e-2, lambd=1e6, alpha=100.0)
    _grads(ps2, qs2, 0)
    snap = _snap(c, ps2)
    q0 = qs2[0].detach().clone()
    with pytest.raises(OverflowError):  # torch.optim: the parameter written, then raised
        d.step()
    assert not torch.equal(qs2[0].detach(), q0)
    with pytest.raises(ValueError, match="OverflowError"):
        c.step()
    _unchanged(c, ps2, snap)
    assert not c.state  # no state stored by a refused first step


@pytest.mark.parametrize("value", [math.inf, math.nan, 2.5, -1.0])
def test_a_loaded_step_that_is_not_a_whole_count_is_refused(value):
    """A loaded step of inf, NaN, 2.5 or -1: torch.optim steps on (with inf: bias corrections of
    1; NaN: every parameter NaN; 2.5: a step of 3.5). fastopt.torch keys each step's host
    scalars and the grouping of its launches on whole counts and never truncates one: a clear
    ValueError naming the parameter, nothing changed (cached or full path alike: the step counts
    are read back every step)."""
    ps, qs, a, _ = _pair("Adam", [(5,), (6,)], lr=1e-2)
    for s in range(2):
        _grads(ps, qs, s)
        a.step()
    assert 0 in a._steady
    for p in ps:
        a.state[p]["step"].fill_(value)
    _grads(ps, qs, 2)
    snap = _snap(a, ps)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0: state 'step'"):
        a.step()
    _unchanged(a, ps, snap)


@pytest.mark.parametrize("scale", [0.0, -2.0, math.inf, math.nan])
def test_a_zero_or_non_finite_loss_scale_is_refused(scale):
    """``grad_scale=tensor(0.)`` (a GradScaler whose scale underflowed): the old code raised
    ZeroDivisionError; torch's fused Adam divides by it and steps every parameter to NaN. Here a
    scale that is not finite and > 0 is refused before anything is written (ValueError)."""
    ps, qs, a, _ = _pair("Adam", [(5,), (6,)], lr=1e-2)
    _grads(ps, qs, 0)
    a.step()
    _grads(ps, qs, 1)
    snap = _snap(a, ps)
    a.grad_scale, a.found_inf = torch.tensor(scale), torch.tensor(0.0)
    with pytest.raises(ValueError, match="grad_scale"):
        a.step()
    _unchanged(a, ps, snap)


# -- 3. silent wrong results -----------------------------------------------------------------
def _alias(case, ps, a):
    if case == "a parameter twice in a group":
        a.param_groups[0]["params"].append(ps[0])
    elif case == "a parameter in two groups":
        a.param_groups.append({**a.param_groups[0], "params": [ps[1]]})
    elif case == "a gradient that is another parameter":
        ps[0].grad = ps[1].detach()
    elif case == "a gradient that is its own parameter":
        ps[1].grad = ps[1].detach()
    elif case == "a gradient overlapping another's state":
        ps[0].grad = a.state[ps[1]]["exp_avg_sq"][:5]
    elif case == "exp_avg that is the parameter":
        a.state[ps[1]]["exp_avg"] = ps[1].detach()
    elif case == "two parameters sharing a step count":
        a.state[ps[1]]["step"] = a.state[ps[0]]["step"]
    else:
        raise AssertionError(case)


OVERLAPS = [
    "a parameter twice in a group",
    "a parameter in two groups",
    "a gradient that is another parameter",
    "a gradient that is its own parameter",
    "a gradient overlapping another's state",
    "exp_avg that is the parameter",
    "two parameters sharing a step count",
]


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("case", OVERLAPS, ids=lambda c: c.replace(" ", "_").replace("'", ""))
def test_overlapping_tensors_are_refused(case, backend):
    """Tensors a step writes that share memory with another tensor of the step race in the
    parallel loop (up to 41.6 off torch before): refused as the dict door refuses them
    (ValueError naming both), nothing written. torch.optim steps them one after the other,
    an order-dependent result. Reached after two cached steps: the gradient cases through the
    cached path's vectorised check, the others through the full path's sweep."""
    ps, qs, a, _ = _pair("Adam", [(5,), (5,)], lr=1e-2, backend=backend)
    for s in range(2):
        _grads(ps, qs, s)
        a.step()
    _grads(ps, qs, 2)
    _alias(case, ps, a)
    snap = _snap(a, ps)
    with pytest.raises(ValueError, match="share memory"):
        a.step()
    _unchanged(a, ps, snap)


def test_reads_may_overlap_reads_and_interleaved_views_are_not_overlap():
    """Three parameters sharing one gradient tensor (reads only), two of them interleaved
    views of one buffer (their byte ranges overlap, their bytes do not: the overlap check
    confirms a candidate exactly): stepped, equal to torch.optim."""
    base = torch.randn(6, 8)
    ps = [
        torch.nn.Parameter(base[:, ::2]),
        torch.nn.Parameter(base[:, 1::2]),
        torch.nn.Parameter(torch.randn(6, 4)),
    ]
    assert ps[0].data_ptr() < ps[1].data_ptr() < ps[0].data_ptr() + 8 * 6 * 4
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a, b = fot.Adam(ps, lr=1e-2), torch.optim.Adam(qs, lr=1e-2, foreach=False)
    for _ in range(3):
        g = torch.randn(6, 4)
        for p, q in zip(ps, qs):
            p.grad, q.grad = g, g.clone()  # one gradient tensor for every parameter
        a.step()
        b.step()
    _assert_like_torch(a, b, ps, qs)


def test_asgd_with_a_parameter_that_skipped_a_step_keeps_its_own_host_state():
    """ASGD under an lr schedule, two parameters each without a gradient for one step, at
    different lrs: they reach the same step count with different ``eta``. Each steps with its
    own (launches are grouped by host state too), as torch.optim steps them (before, the first
    parameter's host state was used for all: 0.218 off torch). A host state edited in place for
    one parameter while the group's launch is cached is seen the same way (the cached path reads
    every parameter's back)."""
    ps, qs, a, b = _pair("ASGD", [(4, 3), (7,), (5,)], lr=5e-2, lambd=1e-2, t0=2.0)
    sa = torch.optim.lr_scheduler.StepLR(a, step_size=2, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(b, step_size=2, gamma=0.5)
    for s in range(8):
        _grads(ps, qs, s)
        skip = {1: 1, 4: 0}.get(s)
        if skip is not None:
            ps[skip].grad = qs[skip].grad = None
        a.step()
        b.step()
        sa.step()
        sb.step()
        _assert_like_torch(a, b, ps, qs)
        if s == 4:
            st0, st1 = a.state[ps[0]], a.state[ps[1]]
            assert st0["step"] == st1["step"] and st0["eta"] != st1["eta"]
    ps, qs, a, b = _pair("ASGD", [(4, 3), (7,)], lr=5e-2, lambd=1e-2)
    for s in range(5):
        if s == 3:
            assert 0 in a._steady
            for opt, p in ((a, ps[1]), (b, qs[1])):
                opt.state[p]["eta"].mul_(0.5)
        _grads(ps, qs, s)
        a.step()
        b.step()
        _assert_like_torch(a, b, ps, qs)


@pytest.mark.parametrize("steps_before", [0, 3])
def test_version_counters_are_bumped_like_torch(steps_before):
    """A graph built on the weights, a step, then backward: torch.optim's in-place update bumps
    the weights' version counters, so autograd raises; fastopt.torch bumps them too (the first,
    checked step and the cached steps alike), and the state tensors' and step counts'."""
    for cls in (fot.Adam, torch.optim.Adam):
        w = torch.nn.Parameter(torch.randn(8))
        opt = cls([w], lr=1e-2)
        for _ in range(steps_before):
            w.grad = torch.randn(8)
            opt.step()
        y = (w * w).sum()
        w.grad = torch.randn(8)
        before = {k: v._version for k, v in opt.state[w].items()}
        v0 = w._version
        opt.step()
        assert w._version > v0, cls
        assert all(opt.state[w][k]._version > v for k, v in before.items()), cls
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


@pytest.mark.parametrize("key", ["step", "exp_avg", "exp_avg_sq"])
def test_a_state_without_its_step_or_a_buffer_is_refused(key):
    """A state dict with ``step`` or a state buffer deleted. torch.optim raises KeyError: at load
    for ``step`` (its ``__setstate__`` reads it), in its step for a buffer. fastopt.torch raises
    KeyError at the same places, nothing changed (before, it stepped from step 2 forever, or
    recreated the buffer as zeros); a key deleted from the live state is refused at the step."""
    ps, qs, a, b = _pair("Adam", [(5,), (6,)], lr=1e-2)
    _grads(ps, qs, 0)
    a.step()
    b.step()
    sd = copy.deepcopy(b.state_dict())
    del sd["state"][1][key]
    _grads(ps, qs, 1)
    snap = _snap(a, ps)
    if key == "step":
        for opt in (a, b):
            with pytest.raises(KeyError, match="step"):
                opt.load_state_dict(copy.deepcopy(sd))
        _unchanged(a, ps, snap)
        del a.state[ps[1]]["step"]
        snap = _snap(a, ps)
    else:
        for opt in (a, b):
            opt.load_state_dict(copy.deepcopy(sd))
        with pytest.raises(KeyError, match=key):
            b.step()
        snap = _snap(a, ps)
    with pytest.raises(KeyError, match=f"parameter 1 of param group 0: its state has no '{key}'"):
        a.step()
    _unchanged(a, ps, snap)


@pytest.mark.parametrize("write", ["whole", "one_element"])
def test_master_weights_see_the_parameter_written_between_steps(write):
    """``master_weights=True`` and a bfloat16 weight written between steps (``w.fill_(3.0)``,
    ``w[0] = 3.0``): the write is seen (the weight's version counter is no longer the one
    recorded after the step) and wins: the master copy takes the written value where the weight
    no longer equals the master rounded, and keeps its own bits elsewhere. So the run follows an
    fp32 torch.optim run given the same write (the master within float32 rounding, the weight
    its bfloat16 rounding); before, the write was silently undone by the next store."""
    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(N, generator=g).to(torch.bfloat16)
    w = torch.nn.Parameter(w0.clone())
    q = torch.nn.Parameter(w0.float())
    a = fot.AdamW([w], lr=1e-2, master_weights=True)
    b = torch.optim.AdamW([q], lr=1e-2, foreach=False)
    for s in range(6):
        gr = torch.randn(N, generator=g).to(torch.bfloat16)
        w.grad, q.grad = gr, gr.float()
        if s == 3:  # after two cached steps
            with torch.no_grad():
                if write == "whole":  # else one element
                    w.fill_(3.0)
                    q.fill_(3.0)
                else:
                    w[0] = 3.0
                    q[0] = 3.0
        a.step()
        b.step()
        m = a.state[w]["master_param"]
        torch.testing.assert_close(m, q.detach(), rtol=1e-6, atol=1e-7)
        assert int((w.detach() != q.detach().to(torch.bfloat16)).sum()) <= 2
