"""``fastopt.torch`` against ``torch.optim`` 2.13 in training loops (CPU; skipped without torch).

Every class of the registry that torch has (derived by name) trains the same small MLP as its
torch counterpart for 40+ steps with a StepLR schedule, two param groups and a layer frozen
mid-run; params, every state tensor and step counts agree. State dicts load both ways mid-run
and training continues identically; GradScaler with an injected inf skips the same step;
PyTorch's own optimizer-test ideas (right direction, no-op without grads, deterministic state
dicts, Rosenbrock) hold.
"""

import copy
import itertools

import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as fot  # noqa: E402
from fastopt.bench.measure import _torch_name  # noqa: E402
from fastopt.optimizers import CLASSES  # noqa: E402

#: (class name, torch class, main options) for every registered optimizer torch has; the
#: options are the class's probes switched on (the variants torch exposes), one at a time
PAIRS = []
for _name, _cls in CLASSES.items():
    _tname = _torch_name(_cls)
    if _tname is None:
        continue
    _options = [{}]
    for _h, (_off, _on) in _cls.probes().items():
        if _h in ("weight_decay", "maximize", "momentum", "amsgrad", "centered", "nesterov"):
            _options.append({_h: _on})
    for _opt in _options:
        try:  # combinations the class refuses (Nesterov without momentum) are no pair
            _cls(**_opt)
        except ValueError:
            continue
        PAIRS.append((_name, _tname, _opt))


def _ids(pairs):
    return [f"{n}" + "".join(f"-{k}" for k in o) for n, _, o in pairs]


LR = {"SGD": 0.05, "Momentum": 0.05, "Nesterov": 0.05, "AdaGrad": 0.05, "RMSProp": 0.01}


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 12),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 3),
    ).to(dtype)


def _torch_kwargs(name, options, torch_side=False):
    """The fastopt class's defaults plus ``options`` (and, for torch, the values the class
    pins: Momentum is torch's SGD with nesterov=False)."""
    import inspect

    cls = CLASSES[name]
    sig = inspect.signature(cls.__init__).parameters
    kw = {k: v.default for k, v in sig.items() if k in cls._hyper + cls._flags}
    if torch_side:
        kw.update(cls._pinned)
    kw.update(options)
    kw["lr"] = LR.get(name, 0.01)
    return kw


def _make(which, name, tname, options, model):
    kw = _torch_kwargs(name, options, torch_side=which == "torch")
    head, body = (
        list(model[4].parameters()),
        [p for m in (model[0], model[2]) for p in m.parameters()],
    )
    groups = [{"params": body}, {"params": head, "lr": kw["lr"] / 2}]
    if which == "fastopt":
        return getattr(fot, name)(groups, **kw)
    import inspect

    accepted = inspect.signature(getattr(torch.optim, tname).__init__).parameters
    kw = {k: v for k, v in kw.items() if k in accepted}
    return getattr(torch.optim, tname)(groups, **kw, foreach=False)


def _train(which, name, tname, options, steps=42, freeze_at=20, unfreeze_at=30, dtype=None):
    dtype = dtype or torch.float64
    model = _model(dtype=dtype)
    opt = _make(which, name, tname, options, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(64, 6, generator=g, dtype=dtype),
        torch.randn(64, 3, generator=g, dtype=dtype),
    )
    for t in range(steps):
        frozen = freeze_at <= t < unfreeze_at
        for p in model[2].parameters():
            p.requires_grad_(not frozen)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt


def _state_close(sa, sb, rtol, atol):
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys(), k
        for s, a in sa["state"][k].items():
            b = sb["state"][k][s]
            if a is None or b is None:
                assert a is b, (k, s)
                continue
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"state {k}/{s}")
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        assert set(ga) == set(gb), set(ga) ^ set(gb)
        for key in ga:  # torch's implementation selectors (foreach=False here) aside
            if key not in ("params", "foreach", "fused", "capturable", "differentiable"):
                assert ga[key] == gb[key], key


@pytest.mark.parametrize("name,tname,options", PAIRS, ids=_ids(PAIRS))
def test_training_matches_torch(name, tname, options):
    ma, oa = _train("fastopt", name, tname, options)
    mb, ob = _train("torch", name, tname, options)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-11)
    _state_close(oa.state_dict(), ob.state_dict(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "name,tname,options",
    PAIRS[:: max(1, len(PAIRS) // 8)],
    ids=_ids(PAIRS[:: max(1, len(PAIRS) // 8)]),
)
def test_float32_training_matches_torch(name, tname, options):
    ma, _ = _train("fastopt", name, tname, options, steps=12, dtype=torch.float32)
    mb, _ = _train("torch", name, tname, options, steps=12, dtype=torch.float32)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(pa, pb, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("direction", ["fastopt->torch", "torch->fastopt"])
@pytest.mark.parametrize(
    "name,tname,options",
    [p for p in PAIRS if p[2] == {}],
    ids=_ids([p for p in PAIRS if p[2] == {}]),
)
def test_state_dict_round_trip_mid_run(name, tname, options, direction):
    """Train 15 steps with one library, move the optimizer's state dict into the other, train
    15 more: the result equals 30 steps in the second library."""
    first, second = direction.split("->")
    model = _model()
    g = torch.Generator().manual_seed(2)
    x, y = (
        torch.randn(64, 6, generator=g, dtype=torch.float64),
        torch.randn(64, 3, generator=g, dtype=torch.float64),
    )

    def run(opt, model, steps):
        for _ in range(steps):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    ref_model = copy.deepcopy(model)
    ref = _make(second, name, tname, options, ref_model)
    run(ref, ref_model, 30)
    opt1 = _make(first, name, tname, options, model)
    run(opt1, model, 15)
    sd = copy.deepcopy(opt1.state_dict())
    opt2 = _make(second, name, tname, options, model)
    opt2.load_state_dict(sd)
    run(opt2, model, 15)
    for pa, pb in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-11)


def test_gradscaler_injected_inf_skips_like_torch():
    """GradScaler on the CPU drives fastopt through torch's fused-optimizer protocol: a step
    with an inf gradient is skipped (params, state, step counts), the scale backs off the same,
    and the other steps equal torch.optim's with unscaled gradients."""
    results = []
    for which in ("fastopt", "torch"):
        model = _model(dtype=torch.float32)
        opt = (fot.Adam if which == "fastopt" else torch.optim.Adam)(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        g = torch.Generator().manual_seed(3)
        x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
        scales = []
        for t in range(8):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            scaler.scale(loss).backward()
            if t == 3:
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        results.append((model, opt, scales))
    (ma, oa, sa), (mb, ob, sb) = results
    assert sa == sb and sa[3] < sa[2]  # the inf step backed the scale off, alike
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(pa, pb, rtol=2e-5, atol=2e-6)
    assert [int(s["step"]) for s in oa.state.values()] == [7] * len(oa.state)
    _state_close(oa.state_dict(), ob.state_dict(), rtol=2e-5, atol=2e-6)


# -- PyTorch's own optimizer-test ideas --------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in CLASSES if _torch_name(CLASSES[n])])
def test_step_is_noop_when_params_have_no_grad(name):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = getattr(fot, name)(model.parameters())
    for _ in range(3):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state


@pytest.mark.parametrize("name", [n for n in CLASSES if _torch_name(CLASSES[n])])
def test_steps_go_downhill(name):
    """A few steps on a convex quadratic lower the loss (the update has the right sign), and
    maximize=True raises it."""
    for maximize in (False, True):
        w = torch.nn.Parameter(torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64))
        opt = getattr(fot, name)([w], lr=0.01, maximize=maximize)
        start = (w**2).sum().item()
        for _ in range(5):
            opt.zero_grad()
            (w**2).sum().backward()
            opt.step()
        end = (w**2).sum().item()
        assert (end < start) != maximize, (name, maximize, start, end)


@pytest.mark.parametrize(
    "name,tname,options",
    [p for p in PAIRS if p[2] == {}],
    ids=_ids([p for p in PAIRS if p[2] == {}]),
)
def test_rosenbrock_trajectory_matches_torch(name, tname, options):
    paths = []
    for which in ("fastopt", "torch"):
        xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
        kw = _torch_kwargs(name, options, torch_side=which == "torch")
        kw["lr"] = 1e-3
        if which == "torch":
            import inspect

            accepted = inspect.signature(getattr(torch.optim, tname).__init__).parameters
            opt = getattr(torch.optim, tname)(
                [xy], **{k: v for k, v in kw.items() if k in accepted}, foreach=False
            )
        else:
            opt = getattr(fot, name)([xy], **kw)
        path = []
        for _ in range(50):
            opt.zero_grad()
            ((1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2).backward()
            opt.step()
            path.append(xy.detach().clone())
        paths.append(torch.stack(path))
    torch.testing.assert_close(paths[0], paths[1], rtol=1e-9, atol=1e-12)


def test_state_dict_is_deterministic():
    sds = []
    for _ in range(2):
        _, opt = _train("fastopt", "Adam", "Adam", {}, steps=5)
        sds.append(opt.state_dict())
    _state_close(sds[0], sds[1], rtol=0, atol=0)


# -- parameters as they come -------------------------------------------------------------------
def test_parameters_tensor_lr_zero_grad_and_to():
    """nn.Parameter straight from the model, a tensor lr, zero_grad(set_to_none=True) every
    step, a param group added later, .to(float64) mid-run: all as torch.optim."""
    results = []
    for which in ("fastopt", "torch"):
        torch.manual_seed(4)
        a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        kw = dict(lr=torch.tensor(0.01))
        opt = (
            fot.Adam(a.parameters(), **kw)
            if which == "fastopt"
            else torch.optim.Adam(a.parameters(), **kw, foreach=False)
        )
        x = torch.randn(8, 4)
        for t in range(6):
            if t == 2:
                opt.add_param_group({"params": b.parameters(), "lr": 0.02})
            opt.zero_grad(set_to_none=True)
            out = b(a(x)) if t >= 2 else a(x)
            out.square().mean().backward()
            opt.step()
        results.append(
            [p.detach().clone() for p in itertools.chain(a.parameters(), b.parameters())]
        )
    for pa, pb in zip(*results):
        torch.testing.assert_close(pa, pb, rtol=2e-5, atol=2e-6)


def test_non_contiguous_parameter_is_stepped_in_place():
    base = torch.randn(6, 8, dtype=torch.float64)
    results = []
    for which in ("fastopt", "torch"):
        w = torch.nn.Parameter(base.clone().t())  # a transposed view: not contiguous
        assert not w.is_contiguous()
        opt = (
            fot.Adam([w], lr=0.01)
            if which == "fastopt"
            else torch.optim.Adam([w], lr=0.01, foreach=False)
        )
        for _ in range(3):
            w.grad = torch.arange(48, dtype=torch.float64).reshape(8, 6) / 10
            opt.step()
        results.append(w.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)


def test_refusals_change_nothing():
    """A state buffer that does not fit its parameter (a state dict from another model, a
    rebound entry) is refused before any parameter of any group is written."""
    model = _model(dtype=torch.float32)
    opt = fot.Adam(model.parameters(), lr=0.01)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    snap = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    last = list(model.parameters())[-1]
    opt.state[last]["exp_avg"] = torch.zeros(7)  # too short for its parameter: refused
    with pytest.raises(ValueError, match="exp_avg"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()
    for k, st in snap["state"].items():
        for s, a in st.items():
            if not (k == len(params) - 1 and s == "exp_avg"):
                assert torch.equal(after["state"][k][s], a), (k, s)
    with pytest.raises((TypeError, ValueError)):
        fot.Adam(model.parameters(), lr=-1.0)
    with pytest.raises(NotImplementedError):
        fot.Adam(model.parameters(), differentiable=True)
    with pytest.raises(NotImplementedError, match="capturable"):
        fot.RAdam(model.parameters(), capturable=True)  # its variant depends on the step
    with pytest.raises(ValueError, match="unknown backend"):
        fot.Adam(model.parameters(), backend="nope")


# -- 16-bit parameters -------------------------------------------------------------------------
def test_bf16_params_with_master_equal_the_bf16_rounding_of_an_fp32_torch_run():
    """bfloat16 parameters with ``master_weights=True``: an fp32 copy and fp32 state, stepped
    in one pass, the parameter stored from it: after 20 steps the bf16 parameter equals the
    bf16 rounding of an fp32 torch.optim.AdamW run on the same (bf16) gradients."""
    torch.manual_seed(0)
    w0 = torch.randn(4096).to(torch.bfloat16)
    runs = {}
    for which in ("fastopt", "torch"):
        if which == "fastopt":
            p = torch.nn.Parameter(w0.clone())
            opt = fot.AdamW([p], lr=1e-2, master_weights=True)
        else:
            p = torch.nn.Parameter(w0.float())
            opt = torch.optim.AdamW([p], lr=1e-2, foreach=False)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            p.grad = torch.randn(4096, generator=g).to(torch.bfloat16).to(p.dtype)
            opt.step()
        runs[which] = (p.detach(), opt)
    (pf, of), (pt, _) = runs["fastopt"], runs["torch"]
    assert pf.dtype == torch.bfloat16
    assert int((pf != pt.to(torch.bfloat16)).sum()) <= 2
    state = of.state[next(iter(of.state))]
    assert state["master_param"].dtype == torch.float32
    assert state["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(state["master_param"], pt, rtol=1e-6, atol=1e-7)


def test_gradscaler_fp16_model_with_master_on_the_cpu():
    """An fp16 model with an fp32 master under GradScaler("cpu"): the fp16 gradients are
    unscaled inside the pass (``p.grad`` keeps GradScaler's scale), the step with an inf is
    skipped entirely, and the master follows an fp32 torch.optim.Adam fed the unscaled grads."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).to(torch.float16)
    opt = fot.Adam(model.parameters(), lr=1e-2, master_weights=True)
    refs = [torch.nn.Parameter(p.detach().float().clone()) for p in model.parameters()]
    ref = torch.optim.Adam(refs, lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
    for t in range(6):
        opt.zero_grad()
        out = model(x.to(torch.float16)).float()
        scaler.scale(((out - y) ** 2).mean()).backward()
        if t == 3:
            model.weight.grad[0, 0] = float("inf")
        scale = scaler.get_scale()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if t == 3:  # skipped: nothing moved, the step count stayed
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert all(int(s["step"]) == 3 for s in opt.state.values())
            continue
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
        for r, gr in zip(refs, grads):
            r.grad = gr.float() * (1.0 / scale)
        ref.step()
    for p, r in zip(model.parameters(), refs):
        torch.testing.assert_close(opt.state[p]["master_param"], r.detach(), rtol=2e-6, atol=1e-7)
        assert torch.equal(p.detach(), r.detach().to(torch.float16))


def test_step_counts_advance_together_and_one_by_one():
    # float32 CPU step tensors (torch's format) advance through their addresses in one call;
    # steps a loaded state dict left in float64 advance one by one; the counts equal torch's
    torch.manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a, b = fot.Adam(ours, lr=1e-2), torch.optim.Adam(theirs, lr=1e-2)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert a.state[p]["step"].dtype == torch.float32
        assert torch.equal(a.state[p]["step"], b.state[q]["step"])
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # float32 rounding apart
    for p in ours:
        a.state[p]["step"] = a.state[p]["step"].to(torch.float64)
    a.step()
    assert all(a.state[p]["step"].item() == 4.0 for p in ours)


def test_steady_steps_see_every_change_torch_would():
    # After a checked step, a group's later steps reuse its cached launch after re-checks only
    # (fastopt/torch/_steady.py). Every change below must be seen: the trajectory stays torch's.
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (7,), (2, 5)]]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a, b = fot.Adam(ps, lr=1e-2), torch.optim.Adam(qs, lr=1e-2)

    def step(skip=None):
        for i, (p, q) in enumerate(zip(ps, qs)):
            g = None if i == skip else torch.randn_like(p)
            p.grad, q.grad = g, None if g is None else g.clone()
        a.step()
        b.step()
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        for p, q in zip(ps, qs):
            for key, value in b.state[q].items():
                torch.testing.assert_close(a.state[p][key], value, rtol=1e-5, atol=1e-6)

    def steps_to(value):  # every step count set in place, on both sides
        for opt in (a, b):
            for st in opt.state.values():
                st["step"].fill_(value)

    step()
    step()
    cached = a._steady[0]
    for opt in (a, b):  # a new lr, the same variant: the cached launch, with the new lr
        opt.param_groups[0]["lr"] = 5e-3
    step()
    assert a._steady[0] is cached and cached.t == 3
    changes = {
        "weight decay on (another variant)": lambda: [
            opt.param_groups[0].__setitem__("weight_decay", 0.1) for opt in (a, b)
        ],
        "a state tensor replaced": lambda: a.state[ps[0]].__setitem__(
            "exp_avg", a.state[ps[0]]["exp_avg"].clone()
        ),
        "every step count edited in place": lambda: steps_to(10.0),
        "a parameter's storage replaced": lambda: setattr(ps[0], "data", ps[0].data.clone()),
        "torch's state loaded": lambda: a.load_state_dict(copy.deepcopy(b.state_dict())),
    }
    for what, change in changes.items():
        change()
        step()  # the change is seen: a full step, which caches the group anew
        assert a._steady[0] is not cached, what
        cached = a._steady[0]
    a.state[ps[2]]["step"].fill_(30.0)  # one step count apart: two launches, nothing cached
    b.state[qs[2]]["step"].fill_(30.0)
    step()
    assert 0 not in a._steady
    steps_to(40.0)
    step()
    step(skip=1)  # a parameter without a gradient keeps its state and step count
    assert 0 not in a._steady
    steps_to(50.0)
    step()
    assert 0 in a._steady
    # a state tensor shrunk in place after steady steps: refused before anything is written
    before = [p.detach().clone() for p in ps]
    a.state[ps[1]]["exp_avg_sq"].resize_(1)
    for p in ps:
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        a.step()
    assert all(torch.equal(p.detach(), x) for p, x in zip(ps, before))


def _bits(x):
    """The storage bits of a tensor or array (NaN-proof equality)."""
    import numpy as np

    if isinstance(x, torch.Tensor):
        x = x.detach().contiguous()
        return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]).numpy()
    x = np.asarray(x)
    return x.view({2: np.int16, 4: np.int32, 8: np.int64}[x.dtype.itemsize])


@pytest.mark.parametrize(
    "dtype,master",
    [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)],
    ids=["bf16", "f16", "bf16-master"],
)
def test_16_bit_models_step_in_one_launch_like_the_dict_api(dtype, master):
    """A 16-bit model's step is one launch over every tensor (odd lengths, a tensor split over
    chunks): params, every state tensor and the master copy equal, bit for
    bit, fastopt's dict API stepping each tensor on its own."""
    import fastopt

    sizes = (1, 7, 4097, 16385)  # the last over two chunks
    g = torch.Generator().manual_seed(3)
    w0 = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = fot.Adam(params, lr=1e-2, weight_decay=0.1, master_weights=master)
    ref_p = {str(i): w.clone() for i, w in enumerate(w0)}
    ref = fastopt.Adam(lr=1e-2, weight_decay=0.1, master_weights=master, backend="numba")
    for _ in range(3):
        grads = [torch.randn(n, generator=g).to(dtype) for n in sizes]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        ref.update(ref_p, {str(i): gr for i, gr in enumerate(grads)})
    for i, p in enumerate(params):
        assert (_bits(p) == _bits(ref_p[str(i)])).all(), f"param {i}"
        mine, theirs = opt.state[p], ref.state[str(i)]
        names = ["exp_avg", "exp_avg_sq"] + (["master_param"] if master else [])
        for s in names:
            assert mine[s].dtype == (torch.float32 if master else dtype)
            assert (_bits(mine[s]) == _bits(theirs[s])).all(), f"{s} of param {i}"


def test_16_bit_params_with_and_without_a_master_copy_in_one_group():
    """A state dict from a run without master copies, loaded into ``master_weights=True``:
    the parameters it covers keep their 16-bit state and no master, a parameter it does not
    cover gets a master and fp32 state; one step steps each as its own kind (two launches,
    never one launch over mixed storage)."""
    torch.manual_seed(4)
    w0 = [torch.randn(n).to(torch.bfloat16) for n in (300, 301)]
    g = [torch.randn(n).to(torch.bfloat16) for n in (300, 301)]

    def model():
        return [torch.nn.Parameter(w.clone()) for w in w0]

    a = model()
    first = fot.Adam(a, lr=1e-2)
    a[0].grad = g[0].clone()  # the second parameter has no grad: no state
    first.step()
    b = model()
    b[0].data.copy_(a[0].detach())
    opt = fot.Adam(b, lr=1e-2, master_weights=True)
    sd = copy.deepcopy(first.state_dict())  # a deep copy: torch's load would share tensors
    # step counts of 0 (as a state dict saved before any step would hold): the loaded
    # parameter's step is the fresh one's, so both fall in one step's launches
    sd["state"][0]["step"].zero_()
    first.state[a[0]]["step"].zero_()
    opt.load_state_dict(sd)
    for p, gr in zip(b, g):
        p.grad = gr.clone()
    opt.step()
    assert (
        "master_param" not in opt.state[b[0]] and opt.state[b[0]]["exp_avg"].dtype == torch.bfloat16
    )
    assert opt.state[b[1]]["master_param"].dtype == torch.float32
    # each as its own optimizer would step it
    first.param_groups[0]["params"][0].grad = g[0].clone()
    first.step()
    alone = torch.nn.Parameter(w0[1].clone())
    solo = fot.Adam([alone], lr=1e-2, master_weights=True)
    alone.grad = g[1].clone()
    solo.step()
    assert (_bits(b[0]) == _bits(a[0])).all()
    assert (_bits(b[1]) == _bits(alone)).all()
    for s in ("exp_avg", "exp_avg_sq"):
        assert (_bits(opt.state[b[0]][s]) == _bits(first.state[a[0]][s])).all()
        assert (_bits(opt.state[b[1]][s]) == _bits(solo.state[alone][s])).all()


def test_steady_16_bit_steps_with_a_master_and_a_loss_scale():
    """A bfloat16 group with fp32 master copies reuses its cached launch (16-bit storage, the
    master column) after re-checks; a step with a loss scale follows only one with a loss scale
    (each with its own scale's value), a replaced master copy is seen, a removed one refused.
    Every step equals, bit for bit, fastopt's dict API on the same tensors."""
    import fastopt

    torch.manual_seed(5)
    sizes = (5, 300, 16385)
    w0 = [torch.randn(n).to(torch.bfloat16) for n in sizes]
    ps = [torch.nn.Parameter(w.clone()) for w in w0]
    a = fot.Adam(ps, lr=1e-2, master_weights=True)
    ref_p = {str(i): w.clone() for i, w in enumerate(w0)}
    ref = fastopt.Adam(lr=1e-2, master_weights=True, backend="numba")

    def step(scale=None):
        grads = [torch.randn(n).to(torch.bfloat16) for n in sizes]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        if scale is not None:  # what GradScaler hands an optimizer that unscales itself
            a.grad_scale, a.found_inf = torch.tensor(scale), torch.tensor(0.0)
        a.step()
        if scale is not None:
            del a.grad_scale, a.found_inf
        ref.update(ref_p, {str(i): g for i, g in enumerate(grads)}, grad_scale=scale)
        for i, p in enumerate(ps):
            assert (_bits(p) == _bits(ref_p[str(i)])).all(), f"param {i}"
            for s in ("exp_avg", "exp_avg_sq", "master_param"):
                assert (_bits(a.state[p][s]) == _bits(ref.state[str(i)][s])).all(), s

    step()
    step()
    cached = a._steady[0]
    assert cached.io is not None and cached.io.master
    step()
    assert a._steady[0] is cached
    for scale, same in ((4.0, False), (8.0, True), (None, False), (None, True)):
        step(scale)
        assert (a._steady[0] is cached) == same, (scale, same)
        cached = a._steady[0]
    # a master copy replaced (a new tensor, the same values): seen, the launch rebuilt
    st = a.state[ps[1]]
    st["master_param"] = st["master_param"].clone()
    step()
    assert a._steady[0] is not cached
    # a master copy removed: the fp32 state no longer fits a bf16 parameter without one
    before = [p.detach().clone() for p in ps]
    del a.state[ps[2]]["master_param"]
    for p in ps:
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="expected torch.bfloat16"):
        a.step()
    assert all(torch.equal(p.detach(), x) for p, x in zip(ps, before))
    # and the other way: a master copy added to a group cached without one is refused too
    qs = [torch.nn.Parameter(w.clone()) for w in w0]
    b = fot.Adam(qs, lr=1e-2)
    for _ in range(3):
        for q in qs:
            q.grad = torch.randn_like(q)
        b.step()
    assert b._steady[0].io is not None and not b._steady[0].io.master
    b.state[qs[0]]["master_param"] = qs[0].detach().float()
    with pytest.raises(ValueError, match="expected torch.float32"):
        b.step()


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_steady_steps_carry_the_host_state(name):
    """Host state (NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``) rides the cached launch:
    read from the state each step, advanced after it. ASGD's averaging switching on at ``t0``
    (another variant), a host-state tensor edited in place, one replaced: every step stays
    torch.optim's, params and every state tensor."""
    torch.manual_seed(6)
    kw = {"t0": 3.0} if name == "ASGD" else {}
    host = {"NAdam": ["mu_product"], "ASGD": ["eta", "mu"]}[name]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (7,), (2, 5)]]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = getattr(fot, name)(ps, lr=1e-2, **kw)
    b = getattr(torch.optim, name)(qs, lr=1e-2, foreach=False, **kw)

    def step():
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        a.step()
        b.step()
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
            assert a.state[p].keys() == b.state[q].keys()
            for key, value in b.state[q].items():
                torch.testing.assert_close(a.state[p][key], value, rtol=1e-5, atol=1e-6)

    for _ in range(3):
        step()
    cached = a._steady[0]
    for _ in range(3):  # ASGD averages from step 4 on: a new variant, then steady again
        step()
    assert a._steady[0] is not cached if name == "ASGD" else a._steady[0] is cached
    cached = a._steady[0]
    step()
    assert a._steady[0] is cached
    for opt in (a, b):  # edited in place: read back, the same launch
        for st in opt.state.values():
            st[host[0]].mul_(0.5)
    step()
    assert a._steady[0] is cached
    for opt in (a, b):  # replaced: seen, the launch rebuilt
        for st in opt.state.values():
            st[host[-1]] = st[host[-1]].clone()
    step()
    assert a._steady[0] is not cached
