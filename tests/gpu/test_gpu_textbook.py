"""``fastopt.textbook`` on device arrays (CuPy's): the numba-cuda kernels of the chapter's
statements against the same classes on the host.

The host run (numba) is held to the chapter's code bit for bit by ``tests/test_textbook.py``
(and the device kernels to the host run under Numba's CUDA simulator); here the GPU run must
follow it (float64; the CUDA compiler may contract a multiply and an add into one fused
multiply-add, so the two agree to rounding, not bit for bit), update the CuPy arrays in place (a
strided view included) and keep its state on the GPU. ``backend="auto"`` picks numba-cuda for
device arrays.
"""

import numpy as np
import pytest
from gpu_common import _AVAIL, needs_gpu, to_device, to_host

from fastopt import textbook
from fastopt.demo.problems import textbook_valley_path

pytestmark = needs_gpu
#: the textbook's device path: numba-cuda, chosen by name or by "auto" for device arrays
DEVICE_BACKENDS = [
    pytest.param(
        b,
        id=b,
        marks=pytest.mark.skipif(
            "numba-cuda" not in _AVAIL, reason="backend 'numba-cuda' is not available here"
        ),
    )
    for b in ("numba-cuda", "auto")
]

NAMES = ("SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam")
STATE = {
    "SGD": (),
    "Momentum": ("v",),
    "Nesterov": ("v",),
    "AdaGrad": ("h",),
    "RMSprop": ("h",),
    "Adam": ("m", "v"),
}


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_device_arrays_follow_the_host_run(name, backend):
    import cupy

    rng = np.random.default_rng(5)
    host = {
        "W": rng.normal(0, 1, (50, 20)),
        "b": rng.normal(0, 1, 20),
        "s": rng.normal(0, 1, (8, 6)),
    }
    grads = [{k: rng.normal(0, 1, v.shape) for k, v in host.items()} for _ in range(20)]
    s0 = host["s"].copy()
    base = to_device(s0.repeat(2, axis=1))  # "s" on the GPU is a strided view of base
    dev = {"W": to_device(host["W"]), "b": to_device(host["b"]), "s": base[:, ::2]}
    dev["s"][...] = to_device(host["s"])
    arrays = dict(dev)
    opt_h = getattr(textbook, name)(lr=0.05, backend="numba")
    opt_d = getattr(textbook, name)(lr=0.05, backend=backend)
    for g in grads:
        opt_h.update(host, g)
        opt_d.update(dev, {k: to_device(v) for k, v in g.items()})
    for k, want in host.items():
        assert dev[k] is arrays[k]
        np.testing.assert_allclose(to_host(dev[k]), want, rtol=1e-12, atol=1e-13)
    for attr in STATE[name]:
        assert all(isinstance(a, cupy.ndarray) for a in getattr(opt_d, attr).values())
    np.testing.assert_array_equal(to_host(base[:, 1::2]), s0)  # outside the view: untouched


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_valley_on_device_arrays_follows_the_host(name, backend):
    import cupy

    got = textbook_valley_path(name, 30, backend, xp=cupy)
    want = textbook_valley_path(name, 30, "numba")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
