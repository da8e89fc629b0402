"""``fastopt.textbook`` against the chapter's own code, bit for bit.

The ``Book*`` classes below transcribe the optimizer classes of "Deep Learning from Scratch"
(O'Reilly Japan), file ``common/optimizer.py`` of its repository, statement for statement and
in its order: constructors, the lazily created state (``np.zeros_like``), Adam's ``iter`` and
``lr_t``, and Nesterov as the file has it since its commit "Fix Nesterov update function" (the
parameter moves with the previous velocity, then the velocity is updated). Only the class names
differ (``Book`` in front).

fastopt's host kernels compile the same statements without fastmath, with the scalars NumPy's
promotion gives the chapter's expressions, so every comparison here is exact: ``np.array_equal``
on the parameters and on every state array (and Adam's ``iter``), on the chapter's valley
(Python floats and arrays), on random float64 and float32 arrays of several layouts over several
steps, under a changing learning rate, and on a 3-layer network over 150 mini-batch steps.
The device kernels (numba-cuda, the same statements) are held to the host run bit for bit under
Numba's CUDA simulator here; on a GPU the compiler may fuse a multiply and an add into one
rounding, so ``tests/gpu/test_gpu_textbook.py`` allows rounding there.
"""

# ruff: noqa: SIM118 (the chapter's loops, `for key in params.keys()`, as it writes them)

import inspect
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastopt import textbook
from fastopt.textbook import SGD, AdaGrad, Adam, Momentum, RMSprop

NAMES = ("SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam")


# -- the chapter's classes, transcribed ----------------------------------------------------------
class BookSGD:
    def __init__(self, lr=0.01):
        self.lr = lr

    def update(self, params, grads):
        for key in params.keys():
            params[key] -= self.lr * grads[key]


class BookMomentum:
    def __init__(self, lr=0.01, momentum=0.9):
        self.lr = lr
        self.momentum = momentum
        self.v = None

    def update(self, params, grads):
        if self.v is None:
            self.v = {}
            for key, val in params.items():
                self.v[key] = np.zeros_like(val)

        for key in params.keys():
            self.v[key] = self.momentum * self.v[key] - self.lr * grads[key]
            params[key] += self.v[key]


class BookNesterov:
    def __init__(self, lr=0.01, momentum=0.9):
        self.lr = lr
        self.momentum = momentum
        self.v = None

    def update(self, params, grads):
        if self.v is None:
            self.v = {}
            for key, val in params.items():
                self.v[key] = np.zeros_like(val)

        for key in params.keys():
            params[key] += self.momentum * self.momentum * self.v[key]
            params[key] -= (1 + self.momentum) * self.lr * grads[key]
            self.v[key] *= self.momentum
            self.v[key] -= self.lr * grads[key]


class BookAdaGrad:
    def __init__(self, lr=0.01):
        self.lr = lr
        self.h = None

    def update(self, params, grads):
        if self.h is None:
            self.h = {}
            for key, val in params.items():
                self.h[key] = np.zeros_like(val)

        for key in params.keys():
            self.h[key] += grads[key] * grads[key]
            params[key] -= self.lr * grads[key] / (np.sqrt(self.h[key]) + 1e-7)


class BookRMSprop:
    def __init__(self, lr=0.01, decay_rate=0.99):
        self.lr = lr
        self.decay_rate = decay_rate
        self.h = None

    def update(self, params, grads):
        if self.h is None:
            self.h = {}
            for key, val in params.items():
                self.h[key] = np.zeros_like(val)

        for key in params.keys():
            self.h[key] *= self.decay_rate
            self.h[key] += (1 - self.decay_rate) * grads[key] * grads[key]
            params[key] -= self.lr * grads[key] / (np.sqrt(self.h[key]) + 1e-7)


class BookAdam:
    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999):
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.iter = 0
        self.m = None
        self.v = None

    def update(self, params, grads):
        if self.m is None:
            self.m, self.v = {}, {}
            for key, val in params.items():
                self.m[key] = np.zeros_like(val)
                self.v[key] = np.zeros_like(val)

        self.iter += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2**self.iter) / (1.0 - self.beta1**self.iter)

        for key in params.keys():
            self.m[key] += (1 - self.beta1) * (grads[key] - self.m[key])
            self.v[key] += (1 - self.beta2) * (grads[key] ** 2 - self.v[key])

            params[key] -= lr_t * self.m[key] / (np.sqrt(self.v[key]) + 1e-7)


BOOK = {
    "SGD": BookSGD,
    "Momentum": BookMomentum,
    "Nesterov": BookNesterov,
    "AdaGrad": BookAdaGrad,
    "RMSprop": BookRMSprop,
    "Adam": BookAdam,
}
#: the chapter's constructor defaults, written out
DEFAULTS = {
    "SGD": {"lr": 0.01},
    "Momentum": {"lr": 0.01, "momentum": 0.9},
    "Nesterov": {"lr": 0.01, "momentum": 0.9},
    "AdaGrad": {"lr": 0.01},
    "RMSprop": {"lr": 0.01, "decay_rate": 0.99},
    "Adam": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999},
}
#: the state attributes of each class (dicts key -> array), as the chapter names them
STATE = {
    "SGD": (),
    "Momentum": ("v",),
    "Nesterov": ("v",),
    "AdaGrad": ("h",),
    "RMSprop": ("h",),
    "Adam": ("m", "v"),
}


def pair(name, **kw):
    """(fastopt.textbook instance, chapter instance) with the same hyperparameters."""
    return getattr(textbook, name)(**kw), BOOK[name](**kw)


def assert_same(name, opt, book, got, want):
    """Parameters, every state array and Adam's ``iter``: equal bit for bit (same dtypes)."""
    assert set(got) == set(want)
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.dtype == b.dtype and type(got[k]) is type(want[k]), k
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: param {k!r}", strict=True)
    for attr in STATE[name]:
        mine, chapter = getattr(opt, attr), getattr(book, attr)
        assert set(mine) == set(chapter)
        for k in chapter:
            np.testing.assert_array_equal(
                mine[k], chapter[k], err_msg=f"{name}: state {attr}[{k!r}]", strict=True
            )
    if name == "Adam":
        assert opt.iter == book.iter


# -- the valley: f(x, y) = x²/20 + y² from (−7, 2), the chapter's learning rates --------------
VALLEY_LR = {
    "SGD": 0.95,
    "Momentum": 0.1,
    "Nesterov": 0.1,
    "AdaGrad": 1.5,
    "RMSprop": 0.15,
    "Adam": 0.3,
}


def df(x, y):
    return x / 10.0, 2.0 * y


def point(params):
    return tuple(float(np.ravel(params[k])[0]) for k in ("x", "y"))


def valley_run(opt, params, steps=30):
    """The chapter's loop: record the point, take the gradient, update."""
    hist = []
    for _ in range(steps):
        hist.append(point(params))
        gx, gy = df(params["x"], params["y"])
        opt.update(params, {"x": gx, "y": gy})
    hist.append(point(params))
    return np.array(hist)


@pytest.mark.parametrize("name", NAMES)
def test_valley_with_python_floats_is_the_chapters_path(name):
    opt, book = pair(name, lr=VALLEY_LR[name])
    got, want = {"x": -7.0, "y": 2.0}, {"x": -7.0, "y": 2.0}
    path, book_path = valley_run(opt, got), valley_run(book, want)
    assert np.abs(book_path[-1] - book_path[0]).max() > 0.5, "the path did not move"
    np.testing.assert_array_equal(path, book_path)
    assert_same(name, opt, book, got, want)
    # the history holds distinct values: floats are replaced in the dict, not mutated
    assert len({tuple(r) for r in path}) > 20


@pytest.mark.parametrize("name", NAMES)
def test_valley_with_arrays_is_the_chapters_path_in_place(name):
    x0, y0 = np.array(-7.0), np.array([2.0])  # a 0-d array and a 1-element array
    opt, book = pair(name, lr=VALLEY_LR[name])
    want = {"x": np.array(-7.0), "y": np.array([2.0])}
    np.testing.assert_array_equal(valley_run(opt, {"x": x0, "y": y0}), valley_run(book, want))
    assert_same(name, opt, book, {"x": x0, "y": y0}, want)
    assert x0 != -7.0 and y0[0] != 2.0  # the caller's arrays were updated in place


def test_nesterov_moves_with_the_previous_velocity():
    # by hand, from v = 0: p1 = p0 − (1+μ)·lr·g (no velocity term yet), v1 = −lr·g;
    # then p2 = p1 + μ²·v1 − (1+μ)·lr·g, v2 = μ·v1 − lr·g (values exact in binary)
    opt = textbook.Nesterov(lr=0.25, momentum=0.5)
    p = {"w": np.array([1.0, -2.0])}
    opt.update(p, {"w": np.array([1.0, 2.0])})
    np.testing.assert_array_equal(p["w"], [1.0 - 0.375, -2.0 - 0.75])
    np.testing.assert_array_equal(opt.v["w"], [-0.25, -0.5])
    opt.update(p, {"w": np.array([2.0, -4.0])})
    np.testing.assert_array_equal(p["w"], [0.625 - 0.0625 - 0.75, -2.75 - 0.125 + 1.5])
    np.testing.assert_array_equal(opt.v["w"], [-0.125 - 0.5, -0.25 + 1.0])


# -- random arrays: both dtypes, every layout, several steps -------------------------------------
def _random_params(rng, dtype):
    """Contiguous, Fortran-ordered, strided (a view into a larger array), 0-d, a Python float."""
    base = rng.standard_normal((6, 10)).astype(dtype)
    return {
        "W": rng.standard_normal((20, 30)).astype(dtype),
        "b": rng.standard_normal(30).astype(dtype),
        "f": np.asfortranarray(rng.standard_normal((7, 5)).astype(dtype)),
        "s": base[:, ::2],
        "z": np.array(rng.standard_normal(), dtype=dtype),
        "x": float(rng.standard_normal()),
    }, base


def _grads(rng, params):
    return {
        k: float(rng.standard_normal())
        if isinstance(p, float)
        else rng.standard_normal(np.shape(p)).astype(p.dtype)
        for k, p in params.items()
    }


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", NAMES)
def test_random_arrays_equal_the_chapter_bit_for_bit(name, dtype):
    rng = np.random.default_rng(7)
    got, base = _random_params(rng, dtype)
    want = {k: v if isinstance(v, float) else v.copy() for k, v in got.items()}
    arrays = {k: v for k, v in got.items() if not isinstance(v, float)}
    outside = base[:, 1::2].copy()
    opt, book = pair(name, lr=0.05)
    for _ in range(6):
        g = _grads(rng, want)
        opt.update(got, g)
        book.update(want, g)
    assert_same(name, opt, book, got, want)
    assert all(got[k] is a and a.dtype == dtype for k, a in arrays.items())  # in place
    np.testing.assert_array_equal(base[:, 1::2], outside)  # between the view's elements


def test_the_parallel_loop_equals_the_chapter_bit_for_bit():
    # 2**15 elements and more run the prange loop: the same statements, the same bits
    from fastopt.backends.numba_backend import PARALLEL_MIN

    rng = np.random.default_rng(8)
    got = {"w": rng.standard_normal(PARALLEL_MIN + 3).astype(np.float32)}
    want = {"w": got["w"].copy()}
    opt, book = pair("Adam", lr=0.01)
    for _ in range(3):
        g = {"w": rng.standard_normal(got["w"].shape).astype(np.float32)}
        opt.update(got, g)
        book.update(want, g)
    assert_same("Adam", opt, book, got, want)


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_changed_between_updates_are_the_chapters(name):
    rng = np.random.default_rng(9)
    got = {"w": rng.standard_normal(50)}
    want = {"w": got["w"].copy()}
    opt, book = pair(name)
    for lr in (0.1, 0.0, 0.03, 1e-300, 0.2):  # a schedule, a frozen step, a tiny rate
        opt.lr = book.lr = lr
        g = {"w": rng.standard_normal(50)}
        opt.update(got, g)
        book.update(want, g)
    assert_same(name, opt, book, got, want)


# -- a 3-layer network, the way the chapter's MultiLayerNet holds its weights ----------------
class Affine:
    def __init__(self, W, b):
        self.W, self.b = W, b

    def forward(self, x):
        self.x = x
        return x @ self.W + self.b

    def backward(self, d):
        self.dW, self.db = self.x.T @ d, d.sum(axis=0)
        return d @ self.W.T


class Net:
    """Affine–ReLU–Affine–ReLU–Affine + softmax cross-entropy; ``params`` holds the layers'
    own arrays (so an optimizer that rebinds instead of updating in place breaks training)."""

    def __init__(self, sizes, seed):
        rng = np.random.default_rng(seed)
        self.params, self.layers = {}, []
        for i, (a, b) in enumerate(itertools.pairwise(sizes), 1):
            self.params[f"W{i}"] = rng.normal(0, math.sqrt(2.0 / a), (a, b))
            self.params[f"b{i}"] = np.zeros(b)
            self.layers.append(Affine(self.params[f"W{i}"], self.params[f"b{i}"]))

    def loss(self, x, t):
        """Softmax cross-entropy of a batch; keeps what ``grads`` needs."""
        self.masks = []
        for i, layer in enumerate(self.layers):
            x = layer.forward(x)
            if i < len(self.layers) - 1:
                self.masks.append(x > 0)
                x = np.where(self.masks[-1], x, 0.0)
        z = x - x.max(axis=1, keepdims=True)
        self.y = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        self.t = t
        return float(-np.mean(np.log(self.y[np.arange(len(t)), t] + 1e-7)))

    def grads(self):
        d = self.y.copy()
        d[np.arange(len(self.t)), self.t] -= 1
        d /= len(self.t)
        for i in reversed(range(len(self.layers))):
            d = self.layers[i].backward(d)
            if i > 0:
                d = d * self.masks[i - 1]
        return {
            k: v
            for i, layer in enumerate(self.layers, 1)
            for k, v in ((f"W{i}", layer.dW), (f"b{i}", layer.db))
        }


def dataset(n=600, dim=20, classes=10, seed=0):
    """Deterministic blobs: one Gaussian cluster per class (fast, no download)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (classes, dim))
    t = rng.integers(0, classes, n)
    return centres[t] + rng.normal(0, 0.8, (n, dim)), t


#: learning rates for the network: large enough that every class trains noticeably in 150 steps
MLP_LR = {
    "SGD": 0.1,
    "Momentum": 0.05,
    "Nesterov": 0.05,
    "AdaGrad": 0.05,
    "RMSprop": 0.005,
    "Adam": 0.005,
}


def train(opt, steps=150, batch=32):
    X, T = dataset()
    net = Net((20, 50, 50, 10), seed=1)
    arrays = dict(net.params)
    rng = np.random.default_rng(2)
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(X), batch, replace=False)
        losses.append(net.loss(X[idx], T[idx]))
        opt.update(net.params, net.grads())
    return net, arrays, losses


@pytest.fixture(scope="module")
def mlp_runs():
    out = {}
    for name in NAMES:
        opt, book = pair(name, lr=MLP_LR[name])
        out[name] = (opt, train(opt)), (book, train(book))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_network_weights_equal_the_chapters_after_150_steps(name, mlp_runs):
    (opt, (net, _arrays, losses)), (book, (bnet, _, blosses)) = mlp_runs[name]
    assert_same(name, opt, book, net.params, bnet.params)
    assert losses == blosses
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20]), f"{name} did not train"


@pytest.mark.parametrize("name", NAMES)
def test_network_arrays_are_updated_in_place(name, mlp_runs):
    (_, (net, arrays, _)), _ = mlp_runs[name]
    for i, layer in enumerate(net.layers, 1):
        assert net.params[f"W{i}"] is arrays[f"W{i}"] is layer.W
        assert net.params[f"b{i}"] is arrays[f"b{i}"] is layer.b
    assert np.abs(net.params["b1"]).max() > 0  # the biases started at zero and moved


# -- the chapter's interface --------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_signature_and_defaults_are_the_chapters(name):
    cls = getattr(textbook, name)
    sig = inspect.signature(cls)
    positional = [p.name for p in sig.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == list(DEFAULTS[name])
    assert {k: sig.parameters[k].default for k in positional} == DEFAULTS[name]
    assert list(inspect.signature(BOOK[name]).parameters) == positional  # the transcription's
    opt = cls()
    assert {k: getattr(opt, k) for k in DEFAULTS[name]} == DEFAULTS[name]
    # the chapter's keyword arguments, and positionally in the chapter's order
    kw = {k: v / 2 for k, v in DEFAULTS[name].items()}
    assert {k: getattr(cls(**kw), k) for k in kw} == kw
    assert {k: getattr(cls(*kw.values()), k) for k in kw} == kw


@pytest.mark.parametrize("name", NAMES)
def test_state_is_the_chapters(name):
    opt = getattr(textbook, name)()
    for a in STATE[name]:
        assert getattr(opt, a) is None  # created lazily on the first update
    W = np.ones((3, 2))
    params = {"W": W, "x": 1.5}
    for _ in range(2):
        opt.update(params, {"W": np.full((3, 2), 0.5), "x": 0.25})
    for a in STATE[name]:
        st = getattr(opt, a)
        assert set(st) == {"W", "x"}
        assert st["W"].shape == (3, 2) and st["W"].dtype == np.float64
        assert st["x"].shape == () and st["x"].dtype == np.float64
        assert np.abs(st["W"]).min() > 0
    if name == "Adam":
        assert opt.iter == 2  # one count per update, shared by every key


def test_float_params_become_numpy_scalars_in_the_dict():
    params = {"x": -7.0, "y": 2}
    Adam(lr=0.3).update(params, {"x": np.float64(-0.7), "y": 4})
    assert all(type(v) is np.float64 for v in params.values())
    p32 = {"x": np.float32(1.5)}
    SGD().update(p32, {"x": np.float32(1.0)})
    assert type(p32["x"]) is np.float32 and p32["x"] == np.float32(1.5) - np.float32(0.01)


def test_grads_broadcast_and_cast_like_the_chapters_expressions():
    p = np.zeros((2, 3))
    SGD(lr=1.0).update({"p": p}, {"p": np.array([1, 2, 3])})  # int grads, broadcast over rows
    np.testing.assert_array_equal(p, [[-1, -2, -3], [-1, -2, -3]])
    SGD(lr=1.0).update({"p": p}, {"p": 1})
    np.testing.assert_array_equal(p, [[-2, -3, -4], [-2, -3, -4]])


@pytest.mark.parametrize("name", NAMES)
def test_each_update_is_one_fused_pass_per_parameter(name, monkeypatch):
    calls = []
    real = textbook._run

    def counting(be, cls, param, grad, states, k):
        calls.append((cls.__name__, param.shape[0], len(states)))
        return real(be, cls, param, grad, states, k)

    monkeypatch.setattr(textbook, "_run", counting)
    opt = getattr(textbook, name)(backend="numba")
    opt.update({"W": np.ones((4, 5)), "b": np.ones(5)}, {"W": np.ones((4, 5)), "b": np.ones(5)})
    n = len(STATE[name])
    assert calls == [(name, 20, n), (name, 5, n)]


# -- refusals: clear errors, nothing written -----------------------------------------------------
@pytest.mark.parametrize(
    "bad, error, message",
    [
        (np.arange(3), TypeError, "integer"),
        (np.ones(3, np.complex128), TypeError, "complex"),
        (np.ones(3, np.float16), TypeError, "float32"),
        (True, TypeError, "real number"),
        ("1.0", TypeError, "str"),
        (np.ones(3), ValueError, "read-only"),
    ],
)
def test_bad_params_are_refused_before_anything_is_written(bad, error, message):
    if isinstance(bad, np.ndarray) and bad.dtype == np.float64:
        bad.flags.writeable = False
    good = np.ones(3)
    opt = Momentum()
    params = {"good": good, "bad": bad}
    with pytest.raises(error, match=message):
        opt.update(params, {"good": np.ones(3), "bad": np.ones(3)})
    np.testing.assert_array_equal(good, 1.0)
    assert opt.v is None and params["bad"] is bad


@pytest.mark.parametrize(
    "grads, error, message",
    [
        ({"p": np.ones(4)}, ValueError, "broadcast"),
        ({"p": None}, TypeError, "None"),
        ({"p": np.ones(3, np.complex64)}, TypeError, "complex64"),
        ({}, KeyError, "no entry"),
    ],
)
def test_bad_grads_are_refused(grads, error, message):
    p = np.ones(3)
    opt = Adam()
    with pytest.raises(error, match=message):
        opt.update({"p": p}, grads)
    np.testing.assert_array_equal(p, 1.0)
    assert opt.iter == 0 and opt.m is None


def test_changed_keys_and_shapes_are_refused():
    opt = AdaGrad()
    opt.update({"p": np.ones(3)}, {"p": np.ones(3)})
    with pytest.raises(KeyError, match="first update"):
        opt.update({"p": np.ones(3), "q": np.ones(2)}, {"p": np.ones(3), "q": np.ones(2)})
    with pytest.raises(ValueError, match=r"float64\[3\]"):
        opt.update({"p": np.ones(4)}, {"p": np.ones(4)})


def test_hyperparameters_and_backend_are_checked():
    with pytest.raises(TypeError, match="lr must be a real number"):
        SGD(lr="0.1")
    opt = RMSprop()
    opt.decay_rate = None
    with pytest.raises(TypeError, match="decay_rate"):
        opt.update({"p": np.ones(2)}, {"p": np.ones(2)})
    with pytest.raises(ValueError, match="torch.optim's formulas"):
        Adam(backend="numpy")
    with pytest.raises(ValueError, match="numba-cuda"):
        Adam(backend="cupy")  # device arrays run the same statements through numba-cuda
    with pytest.raises(ValueError, match="unknown backend"):
        Adam(backend="nonsense")


def test_module_exports_and_import():
    assert set(textbook.__all__) >= set(NAMES)
    assert textbook.EPS == 1e-7
    assert repr(Adam()) == "Adam(lr=0.001, beta1=0.9, beta2=0.999)"


# -- the device kernels, under Numba's CUDA simulator ------------------------------------------
_SIMULATED = """
import numpy as np
from fastopt import textbook

for dtype in (np.float64, np.float32):
    for name in {names!r}:
        rng = np.random.default_rng(11)
        p0 = rng.standard_normal(40).astype(dtype)
        dev, host = {{"p": p0.copy(), "x": 1.5}}, {{"p": p0.copy(), "x": 1.5}}
        a = getattr(textbook, name)(lr=0.05, backend="numba-cuda")
        b = getattr(textbook, name)(lr=0.05, backend="numba")
        for _ in range(2):
            g = {{"p": rng.standard_normal(40).astype(dtype), "x": 0.25}}
            a.update(dev, g)
            b.update(host, g)
        np.testing.assert_array_equal(dev["p"], host["p"], strict=True)
        assert dev["x"] == host["x"] and type(dev["x"]) is type(host["x"])
        for attr in {state!r}[name]:
            for k in ("p", "x"):
                np.testing.assert_array_equal(getattr(a, attr)[k], getattr(b, attr)[k])
print("ok", flush=True)
"""


@pytest.mark.gpu_proofs  # needs the cuda13 extra
def test_device_kernels_equal_the_host_under_the_simulator():
    import importlib.util

    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("no Numba CUDA simulator: pip install numba-cuda")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    code = _SIMULATED.format(names=NAMES, state=STATE)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
