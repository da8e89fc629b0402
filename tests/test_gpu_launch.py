"""The GPU backends' launch logic on the CPU: occupancy, grid, streams, foreign producers.

No GPU is needed: ``numba.cuda`` and PyTorch are replaced by small fakes that record what the
numba-cuda backend asks of them, and array producers are fakes with a non-NumPy ``dtype``
object, ``requires_grad`` (whose interface refuses, as PyTorch's does) and an interface stream.
"""

import contextlib
import sys
import types
import warnings

import numpy as np
import pytest

from fastopt.backends import _launch


@pytest.mark.parametrize(
    "regs,blocks",
    [(16, 8), (32, 8), (37, 6), (46, 5), (51, 4), (64, 4), (65, 3), (128, 2), (255, 1)],
)
def test_blocks_per_sm_follows_the_register_file(regs, blocks):
    # 65536 registers per SM, allocated per warp in units of 256, at most 2048 threads per SM
    assert _launch.blocks_per_sm(regs, 256) == blocks


def test_blocks_per_sm_other_block_sizes_and_bad_input():
    assert _launch.blocks_per_sm(32, 128) == 16
    assert _launch.blocks_per_sm(32, 1024) == 2
    assert _launch.blocks_per_sm(32, 32) == 32  # the block-count limit binds
    for bad in (0, 256):
        with pytest.raises(ValueError, match="regs_per_thread"):
            _launch.blocks_per_sm(bad)
    with pytest.raises(ValueError, match="multiple of 32"):
        _launch.blocks_per_sm(32, 100)


def test_grid_is_one_wave_at_most():
    assert _launch.grid_size(1 << 28, 132, 5) == 660
    assert _launch.grid_size(1000, 132, 5) == 4  # the work needs 4 blocks of 256
    assert _launch.grid_size(0, 132, 5) == 1


class FakeTensor:
    """A CUDA tensor as PyTorch exports it: dtype is not a NumPy dtype, the interface has no
    stream and refuses while the tensor requires grad; ``detach`` gives the plain view."""

    __module__ = "torch"

    def __init__(self, host, requires_grad=False, device_index=0):
        self.host, self.requires_grad = host, requires_grad
        self.dtype = object()
        self.shape = host.shape
        self.device = types.SimpleNamespace(type="cuda", index=device_index)

    @property
    def __cuda_array_interface__(self):
        if self.requires_grad:
            raise RuntimeError(
                "Can't get __cuda_array_interface__ on Variable that requires "
                "grad. Use var.detach().__cuda_array_interface__ instead."
            )
        return {
            "shape": self.shape,
            "typestr": self.host.dtype.str,
            "data": (self.host.ctypes.data, False),
            "version": 2,
        }

    def detach(self):
        return FakeTensor(self.host, False, self.device.index)


class CAIArray:
    """A third-party device array exporting interface v3 with a stream."""

    def __init__(self, host, stream):
        self.host, self.stream = host, stream
        self.shape, self.dtype = host.shape, host.dtype

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.shape,
            "typestr": self.host.dtype.str,
            "data": (self.host.ctypes.data, False),
            "version": 3,
            "stream": self.stream,
        }


@pytest.fixture
def fake_torch(monkeypatch):
    streams = {0: 0x7000, 1: 0x7001}
    cuda = types.SimpleNamespace(
        current_stream=lambda device: types.SimpleNamespace(cuda_stream=streams[device.index])
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    return streams


def test_producer_stream_of_each_producer(fake_torch):
    h = np.ones(4, np.float32)
    assert _launch.producer_stream(FakeTensor(h)) == 0x7000
    assert _launch.producer_stream(FakeTensor(h, device_index=1)) == 0x7001
    assert _launch.producer_stream(CAIArray(h, 0x5150)) == 0x5150
    assert _launch.producer_stream(CAIArray(h, 2)) == 2  # the per-thread default stream
    assert _launch.producer_stream(CAIArray(h, None)) is None
    assert _launch.producer_stream(CAIArray(h, True)) is None  # not a handle
    assert _launch.producer_stream(h) is None


def test_producer_stream_of_cupy_arrays_is_their_devices(monkeypatch):
    current = {"dev": 0}
    stream_of = {0: 0x100, 1: 0x101}

    class Device:
        def __init__(self, i):
            self.id = i

        def __enter__(self):
            self.prev, current["dev"] = current["dev"], self.id

        def __exit__(self, *exc):
            current["dev"] = self.prev

    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(
            get_current_stream=lambda: types.SimpleNamespace(ptr=stream_of[current["dev"]])
        )
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    Arr = type("ndarray", (), {"__module__": "cupy._core.core"})
    a = Arr()
    a.device = Device(1)
    assert _launch.producer_stream(a) == 0x101  # device 0 is current, the array is on 1
    assert current["dev"] == 0


def test_plain_view_detaches_only_what_requires_grad():
    h = np.ones(3, np.float32)
    t = FakeTensor(h, requires_grad=True)
    v = _launch.plain_view(t)
    assert v is not t and not v.requires_grad and v.host is h
    plain = FakeTensor(h)
    assert _launch.plain_view(plain) is plain and _launch.plain_view(h) is h


# -- the numba-cuda backend's launch, against a fake numba.cuda ---------------------------------


class FakeCuda:
    """Records devices, streams and launch configurations; 'compiles' kernels using 46 registers
    (Adam's count on sm_90), i.e. 5 resident blocks of 256 threads per SM."""

    REGS = 46

    def __init__(self, sms=(132, 114)):
        self.current = 0
        self.sms = sms
        self.launches = []
        self.external = []
        self.configured = []
        from fastopt.backends.numba_cuda_backend import _performance_warnings

        self.warning = _performance_warnings()[0]

    def get_current_device(self):
        return types.SimpleNamespace(
            id=self.current, MULTIPROCESSOR_COUNT=self.sms[self.current], compute_capability=(9, 0)
        )

    @property
    def gpus(self):
        fake = self

        class Gpus:
            def __getitem__(self, i):
                @contextlib.contextmanager
                def ctx():
                    prev, fake.current = fake.current, i
                    try:
                        yield
                    finally:
                        fake.current = prev

                return ctx()

        return Gpus()

    def is_cuda_array(self, a):
        return hasattr(a, "__cuda_array_interface__")

    def from_cuda_array_interface(self, cai, owner=None, sync=True):
        assert sync is False and owner is None
        return np.frombuffer(
            (
                np.ctypeslib.as_array(
                    (np.ctypeslib.ctypes.c_char * (int(np.prod(cai["shape"])) * 4)).from_address(
                        cai["data"][0]
                    )
                )
            ),
            dtype=cai["typestr"],
        )

    def default_stream(self):
        return ("stream", 0)

    def external_stream(self, ptr):
        self.external.append(ptr)
        return ("stream", ptr)

    def kernel(self):
        fake = self

        class Kernel:
            specialized = False

            def specialize(self, *args):
                k = Kernel()
                k.specialized = True
                return k

            def get_regs_per_thread(self):
                return fake.REGS

            def __getitem__(self, config):
                fake.configured.append(config)
                if config[0] < 128:  # as numba-cuda warns of a grid under 128 blocks
                    msg = f"Grid size {config[0]} will likely result in GPU under-utilization"
                    warnings.warn(fake.warning(msg), stacklevel=2)

                def run(*args):
                    fake.launches.append((fake.current, config, args))

                return run

        return Kernel()


@pytest.fixture
def ncb(monkeypatch):
    from fastopt.backends import numba_cuda_backend as mod

    fake = FakeCuda()
    monkeypatch.setattr(mod, "cuda", fake)
    monkeypatch.setattr(mod, "SIMULATOR", False)
    monkeypatch.setattr(mod, "kernel", lambda rule, flags, writes: fake.kernel())
    for cache in ("_grid", "_sm_count", "_streams", "_views", "_configs"):
        monkeypatch.setattr(mod, cache, {})
    return mod, fake


def test_numba_cuda_launch_on_torch_tensors(ncb, fake_torch):
    mod, fake = ncb
    n = 1 << 20
    p = FakeTensor(np.ones(n, np.float32), requires_grad=True)  # an nn.Parameter
    g = FakeTensor(np.full(n, 0.5, np.float32))
    mod.launch(
        "sgd",
        dict(maximize=False, decay=False, momentum=False, nesterov=False),
        p,
        g,
        (None,),
        (0.0, 0.0, 1.0, 0.0, 0.1),
    )
    (dev, (blocks, threads, stream), args) = fake.launches[0]
    assert dev == 0 and threads == 256
    assert blocks == 132 * 5  # one wave at 46 registers, not 8 blocks per SM
    assert stream == ("stream", 0x7000)  # torch's current stream, not the default one
    assert all(np.asarray(a).dtype == np.float32 for a in args[:3])
    assert args[-1] == tuple(np.float32(x) for x in (0.0, 0.0, 1.0, 0.0, 0.1))
    assert type(args[-1][0]) is np.float32  # float32 scalars for a float32 kernel


def test_numba_cuda_launches_where_the_arrays_live(ncb, fake_torch):
    mod, fake = ncb
    n = 1000
    p = FakeTensor(np.ones(n, np.float32), device_index=1)
    g = FakeTensor(np.ones(n, np.float32), device_index=1)
    assert fake.current == 0
    mod.launch(
        "sgd",
        dict(maximize=False, decay=False, momentum=False, nesterov=False),
        p,
        g,
        (None,),
        (0.0, 0.0, 1.0, 0.0, 0.1),
    )
    (dev, (blocks, _, stream), _) = fake.launches[0]
    assert dev == 1 and fake.current == 0  # launched on device 1, current device restored
    assert stream == ("stream", 0x7001)  # device 1's torch stream
    assert blocks == 4  # 1000 elements need 4 blocks of 256
    # the grid of a big launch on device 1 uses device 1's SM count (114), not device 0's
    big = 1 << 24
    mod.launch(
        "sgd",
        dict(maximize=False, decay=False, momentum=False, nesterov=False),
        FakeTensor(np.ones(big, np.float32), device_index=1),
        FakeTensor(np.ones(big, np.float32), device_index=1),
        (None,),
        (0.0, 0.0, 1.0, 0.0, 0.1),
    )
    assert fake.launches[1][1][0] == 114 * 5


def test_numba_cuda_interface_streams(ncb):
    mod, fake = ncb
    flags = dict(maximize=False, decay=False, momentum=False, nesterov=False)
    k = (0.0, 0.0, 1.0, 0.0, 0.1)
    for stream, want in (
        (0xBEEF, ("stream", 0xBEEF)),
        (1, ("stream", 0)),
        (2, ("stream", 0)),
        (None, ("stream", 0)),
    ):
        h = np.ones(8, np.float32)
        mod.launch(
            "sgd", flags, CAIArray(h, stream), CAIArray(np.ones(8, np.float32), None), (None,), k
        )
        assert fake.launches[-1][1][2] == want, stream
    assert fake.external == [0xBEEF]  # wrapped once, cached


def test_numba_cuda_refuses_host_arrays_with_a_clear_message(ncb):
    mod, _ = ncb
    with pytest.raises(TypeError, match="host ndarray"):
        mod.launch(
            "sgd",
            dict(maximize=False, decay=False, momentum=False, nesterov=False),
            np.ones(4, np.float32),
            np.ones(4, np.float32),
            (None,),
            (0.0, 0.0, 1.0, 0.0, 0.1),
        )


# -- the CuPy backend's fixed launch: the argument block cuLaunchKernel reads --------------------


@pytest.mark.gpu_proofs  # needs the cuda13 extra
@pytest.mark.parametrize("dtype,ctype", [(np.float32, "c_float"), (np.float64, "c_double")])
def test_cupy_fixed_launch_argument_block(monkeypatch, dtype, ctype):
    """Every kernel argument is read back through the pointer the fixed launch hands the driver: the
    buffers' device pointers, each host scalar cast once to the buffer dtype, then n; a second
    call with new scalars launches the same buffers with the new values."""
    import ctypes

    cb = pytest.importorskip("fastopt.backends.cupy_backend")
    if cb.cupy is None:
        pytest.skip("CuPy is not installed")
    seen = []
    ok = object()

    def cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        slots = (ctypes.c_uint64 * 14).from_address(params)
        arrays = [ctypes.c_uint64.from_address(slots[i]).value for i in range(4)]
        scalars = [getattr(ctypes, ctype).from_address(slots[4 + i]).value for i in range(9)]
        n = ctypes.c_int64.from_address(slots[13]).value
        seen.append((f, (gx, gy, gz), (bx, by, bz), shmem, stream, arrays, scalars, n, extra))
        return (ok,)

    driver = types.SimpleNamespace(
        cuLaunchKernel=cuLaunchKernel, CUresult=types.SimpleNamespace(CUDA_SUCCESS=ok)
    )
    fake_cupy = types.SimpleNamespace(
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 0))
    )
    monkeypatch.setattr(cb, "_driver", driver)
    monkeypatch.setattr(cb, "cupy", fake_cupy)
    ptrs = [0x7F0000001000, 0x7F0000002000, 0x7F0000003000, 0x7F0000004000]
    n = (1 << 28) + 3
    fixed = cb.FixedLaunch("fn", 660, ptrs, 9, dtype, n, "stream", 0)
    k1 = (0.0, 0.99999, 0.9, 0.1, 0.999, 1e-3, 0.01, 31.6227766, 1e-8)
    fixed(k1)
    k2 = tuple(x * 1.5 for x in k1)
    fixed(k2)
    for call, k in zip(seen, (k1, k2)):
        f, grid, block, shmem, stream, arrays, scalars, got_n, extra = call
        assert (f, grid, block, shmem, stream, extra) == (
            "fn",
            (660, 1, 1),
            (256, 1, 1),
            0,
            "stream",
            0,
        )
        assert arrays == ptrs and got_n == n
        assert scalars == [float(dtype(x)) for x in k]  # one rounding, to the buffer dtype


@pytest.mark.gpu_proofs  # needs the cuda13 extra
def test_cupy_fixed_launch_refuses_a_failed_launch(monkeypatch):
    cb = pytest.importorskip("fastopt.backends.cupy_backend")
    if cb.cupy is None:
        pytest.skip("CuPy is not installed")
    driver = types.SimpleNamespace(
        cuLaunchKernel=lambda *a: ("CUDA_ERROR_INVALID_VALUE",),
        CUresult=types.SimpleNamespace(CUDA_SUCCESS="ok"),
    )
    monkeypatch.setattr(cb, "_driver", driver)
    monkeypatch.setattr(
        cb,
        "cupy",
        types.SimpleNamespace(
            cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 0))
        ),
    )
    fixed = cb.FixedLaunch("fn", 1, [1, 2], 5, np.float32, 10, "s", 0)
    with pytest.raises(RuntimeError, match="cuLaunchKernel failed"):
        fixed((0.0,) * 5)


def test_numba_cuda_small_grids_do_not_warn_and_configurations_are_reused(ncb, fake_torch):
    # a 1000-element param gets a 4-block grid on purpose: numba-cuda's low-occupancy warning
    # is not the user's concern; the launch configuration is built once and reused
    mod, fake = ncb
    flags = dict(maximize=False, decay=False, momentum=False, nesterov=False)
    p = FakeTensor(np.ones(1000, np.float32))
    g = FakeTensor(np.ones(1000, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            mod.launch("sgd", flags, p, g, (None,), (0.0, 0.0, 1.0, 0.0, 0.1))
    assert len(fake.launches) == 3 and len(fake.configured) == 1
    with pytest.warns(fake.warning):  # the user's own small launches still warn
        fake.kernel()[4, 256]
