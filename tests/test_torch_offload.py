"""``fastopt.torch.CPUOffload`` (``fastopt/torch/offload.py``): fp32 masters and state on the
host, stepped bucket by bucket by the CPU kernels, transfers on side streams.

Without a GPU, CPU tensors stand in for the device parameters: the offloaded run equals
``master_weights=True`` on the same bfloat16 parameters bit for bit (params and state) across
several buckets, two param groups and a scheduler, and float32 equals ``torch.optim``; state
dicts round-trip mid-run into another bucketing; a refused state dict changes nothing; and the
order of the pipeline's operations is checked against fake streams (every gradient copy queued
before the first wait, each bucket stepped after its own event only, its parameter copies queued
before the next bucket is stepped). With quantized state (``state_dtype="int8"``) the host
state is codes and block scales per master, bit for bit the same optimizer's step over float32
parameters holding the masters' values. The real CUDA path is marked ``gpu``.
"""

import copy

import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as fot  # noqa: E402
from fastopt.torch.offload import CPUOffload  # noqa: E402


def _net(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 4),
    ).to(dtype)  # fmt: skip


def _groups(net):
    return [
        {"params": [p for m in (net[0], net[2]) for p in m.parameters()]},
        {"params": list(net[4].parameters()), "lr": 5e-3},
    ]


def _train(net, opt, t0, steps, sched=None):
    for t in range(t0, t0 + steps):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(6, 8, generator=g).to(net[0].weight.dtype)
        opt.zero_grad()
        net(x).float().pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def _equal_state(sa, sb):
    assert sa["state"].keys() == sb["state"].keys()
    for k in sb["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for n, v in sb["state"][k].items():
            assert sa["state"][k][n].dtype == v.dtype, (k, n)
            assert torch.equal(sa["state"][k][n], v), (k, n)


def test_offload_equals_master_weights_bit_for_bit_over_buckets_groups_and_a_scheduler():
    net, ref = _net(torch.bfloat16), _net(torch.bfloat16)
    off = CPUOffload(fot.AdamW, _groups(net), lr=1e-2, weight_decay=0.1, bucket_bytes=1200)
    assert len(off.buckets) >= 3  # the bucketing is exercised
    opt = fot.AdamW(_groups(ref), lr=1e-2, weight_decay=0.1, master_weights=True)
    s1 = torch.optim.lr_scheduler.StepLR(off, step_size=3, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    _train(net, off, 0, 8, s1)
    _train(ref, opt, 0, 8, s2)
    for a, b in zip(net.parameters(), ref.parameters()):
        assert a.dtype is torch.bfloat16 and torch.equal(a, b)
    _equal_state(off.state_dict(), opt.state_dict())


def test_float32_offload_equals_torch_optim():
    net, ref = _net(torch.float32), _net(torch.float32)
    off = CPUOffload(fot.Adam, net.parameters(), lr=1e-2, amsgrad=True, bucket_bytes=1000)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2, amsgrad=True, foreach=False)
    _train(net, off, 0, 6)
    _train(ref, opt, 0, 6)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_state_dict_round_trip_into_another_bucketing_and_refusals_change_nothing():
    net, ref = _net(torch.bfloat16), _net(torch.bfloat16)
    a = CPUOffload(fot.NAdam, _groups(net), lr=1e-2, bucket_bytes=1200)
    r = CPUOffload(fot.NAdam, _groups(ref), lr=1e-2, bucket_bytes=1200)
    _train(net, a, 0, 4)
    _train(ref, r, 0, 8)
    sd = copy.deepcopy(a.state_dict())
    b = CPUOffload(fot.NAdam, _groups(net), lr=1e-2, bucket_bytes=100_000)  # one bucket
    before = copy.deepcopy(b.state_dict())
    bad = copy.deepcopy(sd)
    bad["state"][3]["exp_avg"] = torch.zeros(5)
    with pytest.raises(ValueError):
        b.load_state_dict(bad)
    _equal_state(b.state_dict(), before)
    b.load_state_dict(sd)
    _train(net, b, 4, 4)
    for x, y in zip(net.parameters(), ref.parameters()):
        assert torch.equal(x, y)
    _equal_state(b.state_dict(), r.state_dict())


def test_quantized_state_offloaded_equals_the_step_on_the_masters():
    """``state_dtype="int8"``: the host state of the offloaded masters is quantized (codes and
    block scales per master, blocks from each one's first element); over bucketed bfloat16
    parameters it equals the same optimizer stepping float32 parameters that hold the masters'
    values, params (rounded to bfloat16) and state bit for bit; its state dict round-trips
    mid-run into another bucketing and steps on alike."""
    from support.matrix import RULE_FULL

    import fastopt

    # the settings (so the compiled loop) of tests/test_torch_quant.py's default case
    cls = fastopt.optimizers.CLASSES["Adam"]
    own = set(cls._hyper + cls._flags)
    kw = {k: v for k, v in RULE_FULL[cls._rule].items() if k in own and k not in cls._pinned}
    kw["state_dtype"] = "int8"
    net, ref = _net(torch.bfloat16), _net(torch.float32)
    with torch.no_grad():
        for a, b in zip(net.parameters(), ref.parameters()):
            b.copy_(a)  # the masters' values: exact
    off = CPUOffload(fot.Adam, net.parameters(), bucket_bytes=1200, **kw)
    assert len(off.buckets) >= 3
    opt = fot.Adam(ref.parameters(), **kw)

    def step(t):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(6, 8, generator=g)
        off.zero_grad()
        net(x.to(torch.bfloat16)).float().pow(2).mean().backward()
        for p, q in zip(net.parameters(), ref.parameters()):
            q.grad = p.grad.float()  # the offloaded step's host gradients: exact
        off.step()
        opt.step()

    for t in range(4):
        step(t)
    sd_off, sd_ref = off.state_dict(), opt.state_dict()
    for i, (a, b) in enumerate(zip(net.parameters(), ref.parameters())):
        assert torch.equal(a, b.to(torch.bfloat16))
        st = sd_off["state"][i]
        assert torch.equal(st.pop("master_param"), b.detach())
        assert st.keys() == sd_ref["state"][i].keys() and "exp_avg.codes" in st
        for n, v in sd_ref["state"][i].items():
            assert st[n].dtype is v.dtype and torch.equal(st[n], v), (i, n)
    again = CPUOffload(fot.Adam, net.parameters(), bucket_bytes=100_000, **kw)
    again.load_state_dict(copy.deepcopy(off.state_dict()))
    _equal_state(again.state_dict(), off.state_dict())
    off, twin = again, off
    for t in range(4, 6):
        step(t)
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a, b.to(torch.bfloat16))
    assert twin is not off


class FakeStreams:
    """Streams that log what the pipeline asks of them; each bucket's step is logged too."""

    def __init__(self, log):
        self.log, self.events = log, 0

    def on(self, which):
        log = self.log

        class _On:
            def __enter__(self):
                log.append(("on", which))

            def __exit__(self, *exc):
                log.append(("off", which))

        return _On()

    def record(self, which):
        self.events += 1
        self.log.append(("record", which, self.events))
        return self.events

    def synchronize(self, event):
        self.log.append(("sync", event))

    def side_waits_for_current(self, which):
        self.log.append(("wait-current", which))

    def current_waits_for_side(self, which):
        self.log.append(("current-waits", which))


def test_the_pipeline_overlaps_copies_with_the_cpu_steps_of_other_buckets():
    net = _net(torch.float32)
    off = CPUOffload(fot.Adam, net.parameters(), lr=1e-2, bucket_bytes=600)
    n = len(off.buckets)
    assert n >= 3
    log = []
    off.streams = FakeStreams(log)
    for i, (_, opt, _) in enumerate(off.buckets):
        step = opt.step

        def logged(*a, _i=i, _step=step, **k):
            log.append(("step", _i))
            return _step(*a, **k)

        opt.step = logged
    _train(net, off, 0, 1)
    assert log[0] == ("wait-current", "d2h") and log[-1] == ("current-waits", "h2d")
    records = [e for e in log if e[0] == "record"]
    assert [e[1] for e in records] == ["d2h"] * n
    first_sync = log.index(("sync", records[0][2]))
    assert all(log.index(e) < first_sync for e in records)  # every D2H queued up front
    for i in range(n):
        sync = log.index(("sync", records[i][2]))  # bucket i waits for its own event
        step = log.index(("step", i))
        h2d = [j for j, e in enumerate(log) if e == ("on", "h2d")][i]
        assert sync < step < h2d
        if i + 1 < n:  # its H2D is queued before the next bucket's CPU step
            assert h2d < log.index(("step", i + 1))


def test_refuses_what_it_cannot_offload():
    net = _net(torch.float32)
    with pytest.raises(TypeError, match="fastopt.torch class"):
        CPUOffload(torch.optim.Adam, net.parameters())
    with pytest.raises(ValueError, match="bucket_bytes"):
        CPUOffload(fot.Adam, net.parameters(), bucket_bytes=0)
    with pytest.raises(ValueError):
        CPUOffload(fot.Adam, net.parameters(), lr=-1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offload_equals_master_weights_on_the_host():
    """bfloat16 parameters on the GPU, masters and state pinned on the host: the same bits as
    ``master_weights=True`` on a host copy of the model."""
    net, ref = _net(torch.bfloat16).cuda(), _net(torch.bfloat16)
    off = CPUOffload(fot.AdamW, net.parameters(), lr=1e-2, bucket_bytes=1200)
    assert off.pin_memory and all(m.is_pinned() for m in off.masters.values())
    opt = fot.AdamW(ref.parameters(), lr=1e-2, master_weights=True)
    for t in range(5):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(6, 8, generator=g).to(torch.bfloat16).cuda()
        off.zero_grad()
        net(x).float().pow(2).mean().backward()
        for p, q in zip(net.parameters(), ref.parameters()):  # the host run: the same grads
            q.grad = p.grad.cpu()
        off.step()
        opt.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a.cpu(), b)
