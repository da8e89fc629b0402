"""``fastopt.torch`` keeps ``torch.optim``'s contract around the step
(``fastopt/torch/_compat.py``): deepcopy and pickle keep fastopt's options, legacy state dicts
are upgraded as torch upgrades them and checked before anything is written, fp32 master state
survives torch.save/torch.load, tensor hyperparameters are taken where torch takes them, host
state loaded in float64 is advanced in float64, and ``torch.compile`` breaks the graph at
``step`` with a correct result.
"""

import copy
import inspect
import io
import pickle

import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as fot  # noqa: E402
from fastopt.bench.measure import _torch_name  # noqa: E402
from fastopt.optimizers import CLASSES  # noqa: E402

PAIRS = [(n, _torch_name(c)) for n, c in CLASSES.items() if _torch_name(c) == n]


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=dtype)),
        torch.nn.Parameter(torch.randn(3, generator=g, dtype=dtype)),
    ]


def _grads(params, t):
    g = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)


def _steps(opt, params, t0, n):
    for t in range(t0, t0 + n):
        _grads(params, t)
        opt.step()


def _snapshot(opt):
    """A deep copy of everything a load could change."""
    return copy.deepcopy((opt.state_dict(), opt.param_groups))


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_deepcopy_and_pickle_keep_fastopt_options_and_step_alike():
    params = _params(torch.bfloat16)
    opt = fot.AdamW(params, lr=1e-2, master_weights=True, backend="numba")
    _steps(opt, params, 0, 3)
    twins = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    _steps(opt, params, 3, 2)
    for twin in twins:
        assert (twin.backend, twin.master_weights) == ("numba", True)
        tparams = twin.param_groups[0]["params"]
        _steps(twin, tparams, 3, 2)
        for a, b in zip(tparams, params):
            assert torch.equal(a, b)
        assert _same(twin.state_dict(), opt.state_dict())
        assert twin.state[tparams[0]]["master_param"].dtype is torch.float32


def _legacy(sd, name):
    """``sd`` as an older torch saved it: the group keys added since gone, Python-number step
    counts and host state."""
    legacy = copy.deepcopy(sd)
    added = ("maximize", "foreach", "capturable", "differentiable", "fused")
    added += ("decoupled_weight_decay",)
    for g in legacy["param_groups"]:
        for k in added:
            g.pop(k, None)
    for st in legacy["state"].values():
        for k in ("step", "mu_product", "eta", "mu"):
            if k in st:
                st[k] = int(st[k]) if k == "step" else float(st[k])
    return legacy


@pytest.mark.parametrize("name", [n for n, _ in PAIRS])
def test_legacy_state_dicts_are_upgraded_as_torch_upgrades_them(name):
    pt, pf = _params(), _params()
    ot = getattr(torch.optim, name)(pt, foreach=False)
    of = getattr(fot, name)(pf)
    _steps(ot, pt, 0, 3)
    _steps(of, pf, 0, 3)
    legacy = _legacy(ot.state_dict(), name)
    ot2 = getattr(torch.optim, name)(pt, foreach=False)
    of2 = getattr(fot, name)(pf)
    ot2.load_state_dict(copy.deepcopy(legacy))
    of2.load_state_dict(copy.deepcopy(legacy))
    for gt, gf in zip(ot2.param_groups, of2.param_groups):
        assert gt.keys() == gf.keys()
        for k in gt:
            if k not in ("params", "foreach"):
                assert gt[k] == gf[k], k
    for p, q in zip(pt, pf):
        for k, v in ot2.state[p].items():
            w = of2.state[q][k]
            assert isinstance(w, torch.Tensor) and w.dtype == v.dtype, k
    _steps(ot2, pt, 3, 3)
    _steps(of2, pf, 3, 3)
    for p, q in zip(pt, pf):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)


def _bad_state_dicts(opt):
    sd = opt.state_dict()
    out = {}

    def edit(label, fn):
        bad = copy.deepcopy(sd)
        fn(bad)
        out[label] = bad

    edit("shape", lambda s: s["state"][0].__setitem__("exp_avg", torch.zeros(7)))
    edit("master shape", lambda s: s["state"][1].__setitem__("master_param", torch.zeros(2)))
    edit("step nan", lambda s: s["state"][1].__setitem__("step", torch.tensor(float("nan"))))
    edit("step negative", lambda s: s["state"][1].__setitem__("step", -3))
    edit("step text", lambda s: s["state"][1].__setitem__("step", "3"))
    edit("not a tensor", lambda s: s["state"][0].__setitem__("exp_avg_sq", [1.0]))
    edit("lr", lambda s: s["param_groups"][0].__setitem__("lr", -1.0))
    edit("betas", lambda s: s["param_groups"][0].__setitem__("betas", (1.5, 0.9)))
    edit("groups", lambda s: s["param_groups"].append(dict(s["param_groups"][0])))
    edit("group size", lambda s: s["param_groups"][0].__setitem__("params", [0]))
    return out


BAD = ("shape", "master shape", "step nan", "step negative", "step text", "not a tensor", "lr")
BAD += ("betas", "groups", "group size")


@pytest.mark.parametrize("label", BAD)
def test_a_refused_state_dict_changes_nothing(label):
    params = _params()
    opt = fot.Adam(params, lr=1e-2)
    _steps(opt, params, 0, 2)
    bad = _bad_state_dicts(opt)[label]
    before = _snapshot(opt)
    with pytest.raises((ValueError, TypeError)):
        opt.load_state_dict(bad)
    assert _same(_snapshot(opt), before)
    _steps(opt, params, 2, 1)  # and it still steps


@pytest.mark.parametrize("name", ["AdamW", "NAdam"])
def test_master_weights_resume_through_torch_save_bit_for_bit(name):
    """bf16 params with fp32 master state: torch.save -> torch.load(weights_only=True) ->
    load_state_dict keeps the master, the moments and the host state in float32, and the run
    goes on exactly as without the interruption (torch's load policy alone rounds them to
    bfloat16)."""
    pa, pb = _params(torch.bfloat16), _params(torch.bfloat16)
    oa = getattr(fot, name)(pa, lr=1e-2, master_weights=True)
    ob = getattr(fot, name)(pb, lr=1e-2, master_weights=True)
    _steps(oa, pa, 0, 4)
    _steps(ob, pb, 0, 4)
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    ob = getattr(fot, name)(pb, lr=1e-2, master_weights=True)
    ob.load_state_dict(torch.load(buf, weights_only=True))
    for p in pb:
        for k, v in ob.state[p].items():
            assert v.dtype is torch.float32, (k, v.dtype)
    _steps(oa, pa, 4, 4)
    _steps(ob, pb, 4, 4)
    assert _same(ob.state_dict(), oa.state_dict())
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def _tensor_kwargs(name):
    """Every real hyperparameter of ``name`` that torch takes as a tensor, as a 0-d float64
    tensor (pairs as pairs of them), with the class's defaults."""
    tcls = getattr(torch.optim, name)
    sig = inspect.signature(tcls.__init__).parameters
    out = {}
    for k, prm in sig.items():
        v = prm.default
        if k in ("params", "self") or isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            tv = torch.tensor(float(v or 0.1), dtype=torch.float64)
        elif isinstance(v, tuple) and all(isinstance(x, float) for x in v):
            tv = tuple(torch.tensor(x, dtype=torch.float64) for x in v)
        else:
            continue
        try:  # taken by torch?
            p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
            p.grad = torch.ones(2, dtype=torch.float64)
            tcls([p], foreach=False, **{k: tv}).step()
        except (TypeError, ValueError, RuntimeError):
            continue
        out[k] = tv
    return out


@pytest.mark.parametrize("name", [n for n, _ in PAIRS])
def test_tensor_hyperparameters_are_taken_where_torch_takes_them(name):
    kw = _tensor_kwargs(name)
    assert "lr" in kw
    pt, pf = _params(), _params()
    ot = getattr(torch.optim, name)(pt, foreach=False, **kw)
    of = getattr(fot, name)(pf, **kw)
    _steps(ot, pt, 0, 4)
    _steps(of, pf, 0, 4)
    for p, q in zip(pt, pf):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="1-element"):
        getattr(fot, name)(_params(), lr=torch.tensor([1e-3, 1e-3]))


def test_host_state_loaded_in_float64_is_advanced_in_float64():
    """torch's load casts NAdam's 0-d ``mu_product`` to a float64 parameter's dtype and then
    advances it in float64: fastopt takes a torch state dict and goes on bit for bit."""
    pt, pf = _params(), _params()
    ot = torch.optim.NAdam(pt, lr=1e-2, foreach=False)
    _steps(ot, pt, 0, 5)
    of = fot.NAdam(pf, lr=1e-2)
    with torch.no_grad():
        for p, q in zip(pt, pf):
            q.copy_(p)
    sd = copy.deepcopy(ot.state_dict())
    ot.load_state_dict(copy.deepcopy(sd))  # torch widens its own on load too
    of.load_state_dict(sd)
    assert of.state[pf[0]]["mu_product"].dtype is torch.float64
    _steps(ot, pt, 5, 6)
    _steps(of, pf, 5, 6)
    for p, q in zip(pt, pf):
        assert ot.state[p]["mu_product"].item() == of.state[q]["mu_product"].item()
        assert of.state[q]["mu_product"].dtype is torch.float64
        torch.testing.assert_close(q, p, rtol=1e-13, atol=1e-15)


def test_torch_compile_breaks_the_graph_at_step_with_the_eager_result():
    def run(compiled):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3, dtype=torch.float64)
        opt = fot.Adam(net.parameters(), lr=1e-2)
        x = torch.randn(5, 4, dtype=torch.float64)

        def train_step():
            opt.zero_grad()
            loss = net(x).pow(2).sum()
            loss.backward()
            opt.step()
            return loss

        f = torch.compile(train_step, backend="eager") if compiled else train_step
        for _ in range(3):
            f()
        return list(net.parameters()), opt

    (pc, oc), (pe, oe) = run(True), run(False)
    for a, b in zip(pc, pe):
        assert torch.equal(a, b)
    assert _same(oc.state_dict(), oe.state_dict())
    assert float(oc.state[pc[0]]["step"]) == 3


class _Marked(torch.Tensor):
    """A tensor subclass the kernels know nothing about."""


@pytest.mark.parametrize("what", ["subclass param", "subclass grad", "meta param"])
def test_tensor_subclasses_and_unaddressable_tensors_are_refused_before_anything_is_written(
    what,
):
    params = _params()
    opt = fot.Adam(params, lr=1e-2)
    _steps(opt, params, 0, 1)
    _grads(params, 1)
    if what == "subclass param":
        odd = torch.nn.Parameter(torch.randn(2, dtype=torch.float64).as_subclass(_Marked))
        odd.grad = torch.randn(2, dtype=torch.float64)
    elif what == "subclass grad":
        odd = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
        odd.grad = torch.randn(2, dtype=torch.float64).as_subclass(_Marked)
    else:
        odd = torch.nn.Parameter(torch.empty(2, dtype=torch.float64, device="meta"))
        odd.grad = torch.empty(2, dtype=torch.float64, device="meta")
    opt.add_param_group({"params": [odd]})
    before = [p.detach().clone() for p in params]
    state = [copy.deepcopy(dict(opt.state[p])) for p in params]
    with pytest.raises(TypeError):
        opt.step()
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    for p, st in zip(params, state):
        assert _same(dict(opt.state[p]), st)


def test_a_dtensor_parameter_is_stepped_through_its_shard_with_dtensor_state():
    """One process, a one-rank mesh (the two-process runs are in test_torch_distributed.py)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain = _params()
        sharded = [
            torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))
            for p in plain
        ]
        oa, ob = fot.NAdam(plain, lr=1e-2), fot.NAdam(sharded, lr=1e-2)
        for t in range(4):
            _grads(plain, t)
            for p, q in zip(plain, sharded):
                q.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
            oa.step()
            ob.step()
        for p, q in zip(plain, sharded):
            assert isinstance(q, DTensor) and torch.equal(q.full_tensor(), p)
            st = ob.state[q]
            assert isinstance(st["exp_avg"], DTensor) and st["exp_avg"].placements == q.placements
            assert torch.equal(st["exp_avg"].full_tensor(), oa.state[p]["exp_avg"])
            assert not isinstance(st["step"], DTensor) and float(st["step"]) == 4
        ob.state[sharded[0]]["exp_avg"] = oa.state[plain[0]]["exp_avg"].clone()  # unsharded
        before = sharded[0].full_tensor().clone()
        with pytest.raises(TypeError, match="DTensor"):
            ob.step()
        assert torch.equal(sharded[0].full_tensor(), before)
    finally:
        dist.destroy_process_group()
