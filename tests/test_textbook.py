"""``fastopt.textbook``: the chapter's six classes, on the kernels, against the chapter's formulas.

``BOOK`` below is an independent NumPy implementation of the chapter's formulas (written here,
not imported): eps = 1e-7 outside the root, Momentum's velocity, Nesterov's look-ahead form,
Adam's ``lr_t``. The valley trajectories must match it within 1e-12 and a 3-layer network's
weights within 1e-9 after 150 mini-batch steps (float64), with the network's arrays updated in
place.
"""

import inspect
import itertools
import math

import numpy as np
import pytest

from fastopt import textbook
from fastopt.backends import numba_backend
from fastopt.textbook import SGD, AdaGrad, Adam, Momentum, RMSprop

NAMES = ("SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam")
VALLEY_TOL = 1e-12  # absolute, on coordinates of size <= 7
MLP_TOL = 1e-9  # absolute, on weights of size ~0.1–1


# -- the chapter's formulas, written out independently ------------------------------------------
class _Book:
    def __init__(self, **hp):
        self.__dict__.update(hp)
        self.state = None

    def update(self, params, grads):
        if self.state is None:
            self.state = {
                k: [np.zeros_like(p) for _ in range(self.n_state)] for k, p in params.items()
            }
        self.begin()
        for k in params:
            new = self.step(params[k], grads[k], self.state[k])
            if isinstance(params[k], np.ndarray):  # `params[k] -= ...`: arrays in place
                params[k][...] = new
            else:  # numbers: a new value in the dict
                params[k] = new

    def begin(self):
        pass


class BookSGD(_Book):
    n_state = 0

    def step(self, p, g, s):
        return p - self.lr * g


class BookMomentum(_Book):
    n_state = 1

    def step(self, p, g, s):
        s[0] = self.momentum * s[0] - self.lr * g
        return p + s[0]


class BookNesterov(_Book):
    n_state = 1

    def step(self, p, g, s):
        s[0] = s[0] * self.momentum
        s[0] = s[0] - self.lr * g
        p = p + self.momentum * self.momentum * s[0]
        return p - (1 + self.momentum) * self.lr * g


class BookAdaGrad(_Book):
    n_state = 1

    def step(self, p, g, s):
        s[0] = s[0] + g * g
        return p - self.lr * g / (np.sqrt(s[0]) + 1e-7)


class BookRMSprop(_Book):
    n_state = 1

    def step(self, p, g, s):
        s[0] = s[0] * self.decay_rate
        s[0] = s[0] + (1 - self.decay_rate) * g * g
        return p - self.lr * g / (np.sqrt(s[0]) + 1e-7)


class BookAdam(_Book):
    n_state = 2
    t = 0

    def begin(self):
        self.t += 1
        self.lr_t = self.lr * np.sqrt(1.0 - self.beta2**self.t) / (1.0 - self.beta1**self.t)

    def step(self, p, g, s):
        s[0] = s[0] + (1 - self.beta1) * (g - s[0])
        s[1] = s[1] + (1 - self.beta2) * (g**2 - s[1])
        return p - self.lr_t * s[0] / (np.sqrt(s[1]) + 1e-7)


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


def pair(name, **kw):
    """(fastopt.textbook instance, BOOK instance) with the same hyperparameters."""
    hp = dict(DEFAULTS[name], **kw)
    return getattr(textbook, name)(**kw), BOOK[name](**hp)


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


def valley_deviation(name, make_params):
    opt, book = pair(name, lr=VALLEY_LR[name])
    got = valley_run(opt, make_params())
    want = valley_run(book, {"x": -7.0, "y": 2.0})
    assert np.abs(want[-1] - want[0]).max() > 0.5, "the path did not move"
    return float(np.abs(got - want).max()), got


@pytest.mark.parametrize("name", NAMES)
def test_valley_with_python_floats_matches_the_chapter(name):
    dev, got = valley_deviation(name, lambda: {"x": -7.0, "y": 2.0})
    assert dev <= VALLEY_TOL, f"{name}: max deviation {dev:.3g}"
    # the history holds distinct values: floats are replaced in the dict, not mutated
    assert len({tuple(r) for r in got}) > 20


@pytest.mark.parametrize("name", NAMES)
def test_valley_with_arrays_matches_the_chapter_in_place(name):
    x0, y0 = np.array(-7.0), np.array([2.0])  # a 0-d array and a 1-element array
    dev, _ = valley_deviation(name, lambda: {"x": x0, "y": y0})
    assert dev <= VALLEY_TOL, f"{name}: max deviation {dev:.3g}"
    assert x0 != -7.0 and y0[0] != 2.0  # the caller's arrays were updated in place


def test_float_params_become_float64_values_in_the_dict():
    params = {"x": -7.0, "y": 2}
    Adam(lr=0.3).update(params, {"x": np.float64(-0.7), "y": 4})
    assert all(type(v) is np.float64 for v in params.values())
    p32 = {"x": np.float32(1.5)}
    SGD().update(p32, {"x": np.float32(1.0)})
    assert type(p32["x"]) is np.float32 and p32["x"] == np.float32(1.5) - np.float32(0.01)


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
        out[name] = train(opt), train(book)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_network_weights_match_the_chapter_after_150_steps(name, mlp_runs):
    (net, _arrays, losses), (bnet, _, blosses) = mlp_runs[name]
    dev = max(float(np.abs(net.params[k] - bnet.params[k]).max()) for k in net.params)
    assert dev <= MLP_TOL, f"{name}: max weight deviation {dev:.3g}"
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20]), f"{name} did not train"
    np.testing.assert_allclose(losses, blosses, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_network_arrays_are_updated_in_place(name, mlp_runs):
    (net, arrays, _), _ = mlp_runs[name]
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
    opt = cls()
    assert {k: getattr(opt, k) for k in DEFAULTS[name]} == DEFAULTS[name]
    # the chapter's keyword arguments, and positionally in the chapter's order
    kw = {k: v / 2 for k, v in DEFAULTS[name].items()}
    assert {k: getattr(cls(**kw), k) for k in kw} == kw
    assert {k: getattr(cls(*kw.values()), k) for k in kw} == kw


@pytest.mark.parametrize(
    "name, attrs",
    [
        ("SGD", ()),
        ("Momentum", ("v",)),
        ("Nesterov", ("v",)),
        ("AdaGrad", ("h",)),
        ("RMSprop", ("h",)),
        ("Adam", ("m", "v")),
    ],
)
def test_state_is_the_chapters(name, attrs):
    opt = getattr(textbook, name)()
    for a in attrs:
        assert getattr(opt, a) is None  # created lazily on the first update
    W = np.ones((3, 2))
    params = {"W": W, "x": 1.5}
    for _ in range(2):
        opt.update(params, {"W": np.full((3, 2), 0.5), "x": 0.25})
    for a in attrs:
        st = getattr(opt, a)
        assert set(st) == {"W", "x"}
        assert st["W"].shape == (3, 2) and st["W"].dtype == np.float64
        assert st["x"].shape == () and st["x"].dtype == np.float64
        assert np.abs(st["W"]).min() > 0
    if name == "Adam":
        assert opt.iter == 2  # one count per update, shared by every key


@pytest.mark.parametrize("name", NAMES)
def test_float32_arrays_stay_float32_and_follow_the_chapter(name):
    rng = np.random.default_rng(3)
    p = rng.normal(0, 1, 1000).astype(np.float32)
    g = [rng.normal(0, 1, 1000).astype(np.float32) for _ in range(5)]
    opt, book = pair(name)
    a, b = {"p": p}, {"p": p.astype(np.float64)}
    for gi in g:
        opt.update(a, {"p": gi})
        book.update(b, {"p": gi.astype(np.float64)})
    assert a["p"] is p and p.dtype == np.float32
    np.testing.assert_allclose(p, b["p"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_arrays_are_stepped_and_written_back(name):
    rng = np.random.default_rng(4)
    base = rng.normal(0, 1, (8, 10))
    view, fortran = base[:, ::2], np.asfortranarray(rng.normal(0, 1, (4, 5)))
    want = {"a": view.copy(), "f": fortran.copy()}
    opt, book = pair(name, lr=0.1)
    params = {"a": view, "f": fortran}
    for _ in range(3):
        grads = {"a": rng.normal(0, 1, (8, 5))[::-1], "f": rng.normal(0, 1, (5, 4)).T}
        opt.update(params, grads)
        book.update(want, grads)
    assert params["a"] is view and params["f"] is fortran
    np.testing.assert_allclose(view, want["a"], rtol=0, atol=1e-14)
    np.testing.assert_allclose(fortran, want["f"], rtol=0, atol=1e-14)
    np.testing.assert_array_equal(
        base[:, 1::2], np.random.default_rng(4).normal(0, 1, (8, 10))[:, 1::2]
    )  # the elements between the view's are untouched


def test_grads_broadcast_and_cast_like_the_chapters_expressions():
    p = np.zeros((2, 3))
    SGD(lr=1.0).update({"p": p}, {"p": np.array([1, 2, 3])})  # int grads, broadcast over rows
    np.testing.assert_array_equal(p, [[-1, -2, -3], [-1, -2, -3]])
    SGD(lr=1.0).update({"p": p}, {"p": 1})
    np.testing.assert_array_equal(p, [[-2, -3, -4], [-2, -3, -4]])


def test_nesterov_with_lr_zero_keeps_the_chapters_formula():
    # (1 + μ)·lr = 0 leaves no single set of scalars; the step takes two launches instead
    opt, book = pair("Nesterov", lr=0.1)
    a, b = {"p": np.array([1.0, -2.0])}, {"p": np.array([1.0, -2.0])}
    for lr in (0.1, 0.1, 0.0, 0.0):
        opt.lr = book.lr = lr
        g = {"p": 2 * a["p"]}
        opt.update(a, g)
        book.update(b, {"p": 2 * b["p"]})
    np.testing.assert_allclose(a["p"], b["p"], rtol=0, atol=1e-15)
    assert not np.array_equal(a["p"], b["p"] * 0)


@pytest.mark.parametrize(
    "name, rules",
    [
        ("SGD", ["sgd"]),
        ("Momentum", ["sgd"]),
        ("Nesterov", ["sgd"]),
        ("AdaGrad", ["adagrad"]),
        ("RMSprop", ["rmsprop"]),
        ("Adam", ["adam"]),
    ],
)
def test_each_update_is_one_fused_launch_per_parameter(name, rules, monkeypatch):
    calls = []
    real = numba_backend.launch

    def counting(rule, flags, param, grad, states, k):
        calls.append((rule, param.shape[0]))
        return real(rule, flags, param, grad, states, k)

    monkeypatch.setattr(numba_backend, "launch", counting)
    opt = getattr(textbook, name)(backend="numba")
    opt.update({"W": np.ones((4, 5)), "b": np.ones(5)}, {"W": np.ones((4, 5)), "b": np.ones(5)})
    assert calls == [(rules[0], 20), (rules[0], 5)]


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
    with pytest.raises(ValueError, match="unknown backend"):
        Adam(backend="nonsense")


def test_module_exports_and_import():
    assert set(textbook.__all__) >= set(NAMES)
    assert textbook.EPS == 1e-7
    assert repr(Adam()) == "Adam(lr=0.001, beta1=0.9, beta2=0.999)"
