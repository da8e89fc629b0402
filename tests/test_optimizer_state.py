"""One owner of an optimizer's state (``fastopt._state.OptimizerState``, ARCHITECTURE.md "The
state: one owner"): the step machinery (``fastopt._steps.Stepper``, an object of its own) reads
and changes it only through its methods and reads no private attribute of the optimizer, state
dicts round-trip through it, and older pickles (the state's parts as the optimizer's own
attributes) load into it."""

import ast
import pickle
from pathlib import Path

import ml_dtypes
import numpy as np

import fastopt
from fastopt._state import OptimizerState

ROOT = Path(__file__).resolve().parents[1]
#: the attributes the state's parts lived in before ``OptimizerState`` owned them
OLD = {"_state", "_layout", "_bound", "_pending", "_host", "_flat_state", "_pending_host"}


def _self_attrs(tree):
    """``(attribute chain)`` of every ``self.<a>`` and ``self.<a>.<b>`` read or written."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "self":
                yield (node.attr,)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            inner = node.value
            if isinstance(inner.value, ast.Name) and inner.value.id == "self":
                yield (inner.attr, node.attr)


def test_the_step_machinery_uses_only_the_state_objects_interface():
    for rel in ("fastopt/_steps.py", "fastopt/base.py"):
        attrs = set(_self_attrs(ast.parse((ROOT / rel).read_text())))
        private = sorted(a for a in attrs if len(a) == 2 and a[0] == "_st" and a[1][0] == "_")
        assert not private, f"{rel} reaches into OptimizerState: {private}"
    steps = {a[0] for a in _self_attrs(ast.parse((ROOT / "fastopt/_steps.py").read_text()))}
    assert not steps & OLD, sorted(steps & OLD)


def _foreign_private_reads(tree):
    """``(line, expression)`` of every read of a private attribute (``x._name``, not a dunder)
    of anything but ``self``, ``cls``, ``type(self)`` or a class of the same module."""
    own = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.attr[0] != "_" or node.attr[-2:] == "__":
            continue
        v = node.value
        if isinstance(v, ast.Name) and (v.id in ("self", "cls") or v.id in own):
            continue
        if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "type":
            continue
        yield node.lineno, ast.unparse(node)


def test_the_stepper_and_the_optimizer_read_no_private_attribute_of_each_other():
    # the step cache is its own object (fastopt._steps.Stepper), no mixin of the optimizer: it
    # talks to the optimizer through StepOwner (public settings) and StepHooks, to the state
    # through OptimizerState's methods
    from fastopt._steps import Stepper
    from fastopt.base import Optimizer

    assert Optimizer.__bases__ == (object,)
    assert not issubclass(Optimizer, Stepper)
    for rel in ("fastopt/_steps.py", "fastopt/base.py"):
        found = list(_foreign_private_reads(ast.parse((ROOT / rel).read_text())))
        assert not found, f"{rel} reads private attributes of other objects: {found}"
    # the check finds one
    src = "class A:\n    def f(self, o):\n        return o._x + self._y + A._z\n"
    assert [e for _, e in _foreign_private_reads(ast.parse(src))] == ["o._x"]


def test_a_pickled_optimizer_gets_a_fresh_stepper():
    rng = np.random.default_rng(8)
    p = {"x": rng.standard_normal(6)}
    opt = fastopt.Adam(lr=1e-2, backend="numpy")
    opt.update(p, {"x": rng.standard_normal(6)})
    assert opt._stepper.dict_cache is not None
    assert "_stepper" not in opt.__getstate__()  # the caches hold live arrays: not pickled
    new = pickle.loads(pickle.dumps(opt))
    assert new._stepper is not opt._stepper and new._stepper.dict_cache is None
    assert new._stepper.state is new._st
    d = opt.__getstate__()
    d["_dict_cache"] = d["_flat_cache"] = None  # pickled when the caches were the optimizer's
    older = object.__new__(fastopt.Adam)
    older.__setstate__(d)
    assert not {"_dict_cache", "_flat_cache"} & set(older.__dict__)
    assert older._stepper.state is older._st
    g = {"x": rng.standard_normal(6)}
    p_old, p_new = {"x": p["x"].copy()}, {"x": p["x"].copy()}
    opt.update(p_old, g)
    new.update(p_new, g)
    np.testing.assert_array_equal(p_old["x"], p_new["x"])
    for s, a in opt.state["x"].items():
        np.testing.assert_array_equal(new.state["x"][s], a, err_msg=s)
    assert new.step_count == opt.step_count == 2


def _data(rng, shapes):
    p = {
        "w": rng.standard_normal(shapes[0]).astype(ml_dtypes.bfloat16),
        "b": rng.standard_normal(shapes[1]).astype(np.float32),
    }
    grads = [
        {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in p.items()} for _ in range(4)
    ]
    return p, grads


def test_master_weights_over_mixed_dtypes_round_trips_its_state_dict():
    """bfloat16 params keep an fp32 master copy, float32 ones do not: the state dict holds
    both kinds, loads into a fresh optimizer before its first step, and the resumed run
    equals the uninterrupted one (params and every state buffer, bit for bit)."""
    rng = np.random.default_rng(21)
    p, grads = _data(rng, [(5, 3), (7,)])
    a = fastopt.Adam(lr=1e-2, weight_decay=0.1, master_weights=True, backend="numpy")
    pa = {k: v.copy() for k, v in p.items()}
    for g in grads[:2]:
        a.update(pa, g)
    sd = a.state_dict()
    assert set(sd["state"]["w"]) == {"exp_avg", "exp_avg_sq", "master_param"}
    assert set(sd["state"]["b"]) == {"exp_avg", "exp_avg_sq"}
    b = fastopt.Adam(lr=1e-2, weight_decay=0.1, master_weights=True, backend="numpy")
    b.load_state_dict(sd)
    pb = {k: v.copy() for k, v in pa.items()}
    for g in grads[2:]:
        a.update(pa, g)
        b.update(pb, g)
    for k in pa:
        np.testing.assert_array_equal(pb[k], pa[k])
        for s, arr in a.state[k].items():
            np.testing.assert_array_equal(b.state[k][s], arr, err_msg=f"{k}.{s}")
    assert b.step_count == a.step_count == 4


def test_an_older_pickle_loads_into_the_state_object():
    rng = np.random.default_rng(5)
    p = {"x": rng.standard_normal(6)}
    opt = fastopt.NAdam(lr=1e-2, backend="numpy")
    opt.update(p, {"x": rng.standard_normal(6)})
    d = opt.__getstate__()
    st = d.pop("_st")
    d.update(  # the attributes an optimizer pickled before the state had one owner
        _state=st.arrays,
        _layout=st.layout,
        _bound=st.shapes,
        _flat_state=st.flat,
        _pending=st.pending,
        _pending_host=st.pending_host,
        _host=st.host,
    )
    old = object.__new__(fastopt.NAdam)
    old.__setstate__(d)
    assert isinstance(old._st, OptimizerState) and not OLD & set(old.__dict__)
    new = pickle.loads(pickle.dumps(opt))
    g = {"x": rng.standard_normal(6)}
    p_old, p_new = {"x": p["x"].copy()}, {"x": p["x"].copy()}
    old.update(p_old, g)
    new.update(p_new, g)
    np.testing.assert_array_equal(p_old["x"], p_new["x"])
    assert old.host_state == new.host_state and old.host_state  # NAdam's mu_product advanced
