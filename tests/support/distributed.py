"""The worker processes of ``tests/test_torch_distributed.py``: real gloo process groups on the
CPU (localhost), two ranks, each scenario run with ``fastopt.torch`` and with ``torch.optim`` in
the same processes on the same data, compared there (``assert``: a failure fails the spawn).

Phase 1 (``phase_train``): DDP; ``ZeroRedundancyOptimizer(optimizer_class=...)`` with
``consolidate_state_dict``; FSDP2 (``fully_shard``) trained, its model and optimizer state saved
with ``torch.distributed.checkpoint`` (DCP, via ``get_state_dict``), then trained on: the
uninterrupted result is saved beside. Phase 2 (``phase_resume``, new processes): the same model
built and sharded again, DCP loaded (``set_state_dict``), trained on: equal to the uninterrupted
run bit for bit. ``phase_quant``: FSDP2 with quantized state against one process stepping
the full tensors with the sharded run's gradients, a state dict and a DCP round trip, a state
of another layout refused, ``full_precision_state_dict`` (see its docstring). Each rank writes
what it measured to ``<dir>/<phase>-<rank>.json``.
"""

import json
import os

import torch
import torch.distributed as dist

LR = 1e-2
STEPS = 4


def _init(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5), torch.nn.Tanh()
    )


def _batch(rank, t):
    g = torch.Generator().manual_seed(1000 * rank + t)
    return torch.randn(6, 8, generator=g), torch.randn(6, 5, generator=g)


def _train(model, opt, rank, t0, steps):
    for t in range(t0, t0 + steps):
        x, y = _batch(rank, t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _opt_classes(name):
    import fastopt.torch as fot

    return {"fastopt": getattr(fot, name), "torch": getattr(torch.optim, name)}


def _kw(which):
    return {} if which == "fastopt" else {"foreach": False}


def _maxdiff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for which, cls in _opt_classes("AdamW").items():
        model = DDP(_model())
        opt = cls(model.parameters(), lr=LR, **_kw(which))
        _train(model, opt, rank, 0, STEPS)
        out[which] = [p.detach().clone() for p in model.parameters()]
    return _maxdiff(out["fastopt"], out["torch"])


def _zero(rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    params, states = {}, {}
    for which, cls in _opt_classes("Adam").items():
        model = DDP(_model())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=LR, **_kw(which))
        _train(model, opt, rank, 0, STEPS)
        opt.consolidate_state_dict(to=0)
        params[which] = [p.detach().clone() for p in model.parameters()]
        if rank == 0:
            states[which] = opt.state_dict()
    diff = _maxdiff(params["fastopt"], params["torch"])
    if rank == 0:  # the consolidated state: every parameter's, torch's keys and shapes
        sf, st = states["fastopt"]["state"], states["torch"]["state"]
        assert sf.keys() == st.keys() and len(sf) == len(params["torch"])
        for k in st:
            assert sf[k].keys() == st[k].keys(), (k, sf[k].keys(), st[k].keys())
            for s in st[k]:
                assert sf[k][s].dtype == st[k][s].dtype, (k, s)
                diff = max(diff, float((sf[k][s] - st[k][s]).abs().max()))
    return diff


def _fsdp(name, which, opt_kw):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    fully_shard(model)
    opt = _opt_classes(name)[which](model.parameters(), lr=LR, **_kw(which), **opt_kw)
    return model, opt


def _full(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def phase_train(rank, world, port, folder, name, opt_kw):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _init(rank, world, port)
    measured = {"ddp": _ddp(rank), "zero": _zero(rank)}
    full = {}
    for which in ("fastopt", "torch"):
        model, opt = _fsdp(name, which, opt_kw)
        _train(model, opt, rank, 0, STEPS)
        p0 = next(model.parameters())
        state = opt.state[p0]
        assert type(state["exp_avg"]).__name__ == "DTensor", type(state["exp_avg"])
        assert state["exp_avg"].placements == p0.placements
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(folder, which))
        _train(model, opt, rank, STEPS, STEPS)
        full[which] = _full(model)
    measured["fsdp"] = _maxdiff(full["fastopt"], full["torch"])
    if rank == 0:
        torch.save(full, os.path.join(folder, "uninterrupted.pt"))
    with open(os.path.join(folder, f"train-{rank}.json"), "w") as f:
        json.dump(measured, f)
    dist.barrier()
    dist.destroy_process_group()


def phase_resume(rank, world, port, folder, name, opt_kw):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init(rank, world, port)
    ref = torch.load(os.path.join(folder, "uninterrupted.pt"), weights_only=True)
    measured = {}
    for which in ("fastopt", "torch"):
        model, opt = _fsdp(name, which, opt_kw)
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=os.path.join(folder, which))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        p0 = next(model.parameters())
        assert type(opt.state[p0]["exp_avg"]).__name__ == "DTensor"
        assert float(opt.state[p0]["step"]) == STEPS
        _train(model, opt, rank, STEPS, STEPS)
        got = _full(model)
        measured[which] = _maxdiff(got, ref[which])
        if which == "fastopt":  # bit for bit
            for a, b in zip(got, ref[which]):
                assert torch.equal(a, b), float((a - b).abs().max())
    with open(os.path.join(folder, f"resume-{rank}.json"), "w") as f:
        json.dump(measured, f)
    dist.barrier()
    dist.destroy_process_group()


def _quant_model():
    """Two bias-free layers whose every shard (``Shard(0)`` over two ranks) is a whole number
    of blocks of 256: the sharded blocks are then the full tensors' blocks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 16, bias=False), torch.nn.Tanh(), torch.nn.Linear(16, 32, bias=False)
    )


def _quant_fsdp(name, opt_kw):
    from torch.distributed.fsdp import fully_shard

    import fastopt.torch as fot

    model = _quant_model()
    for m in (model[0], model[2]):
        fully_shard(m)
    fully_shard(model)
    return model, getattr(fot, name)(model.parameters(), lr=LR, **opt_kw)


def _quant_step(model, opt, rank, t, ref=None):
    g = torch.Generator().manual_seed(1000 * rank + t)
    x, y = torch.randn(4, 64, generator=g), torch.randn(4, 32, generator=g)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    if ref is not None:  # the single-process step on the full tensors, the same gradients
        rmodel, ropt = ref
        for p, q in zip(model.parameters(), rmodel.parameters()):
            q.grad = p.grad.full_tensor()
        ropt.step()
    opt.step()


def _local_state(opt, model):
    """Every state tensor of every parameter: its local tensor, cloned."""
    out = []
    for p in model.parameters():
        st = opt.state[p]
        out.append({k: (v._local_tensor if hasattr(v, "_local_tensor") else v).clone()
                    for k, v in st.items()})  # fmt: skip
    return out


def _same_local(a, b):
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            assert x[k].dtype is y[k].dtype and torch.equal(x[k], y[k]), k


def phase_quant(rank, world, port, folder, name, opt_kw):
    """FSDP2 with quantized state (``state_dtype`` in ``opt_kw``): each step against the same
    optimizer stepping the full tensors in one process with the sharded run's gradients,
    params, codes and scales bit for bit (the blocks coincide: each shard holds whole blocks);
    a state dict round trip; a DCP save, new model and optimizer, load and continue, bit for
    bit; a state of another sharding (scales of another layout) refused, nothing changed;
    ``full_precision_state_dict`` loads into the float32 optimizer as the dequantized values."""
    import copy

    import torch.distributed.checkpoint as dcp
    from fastopt.kernels import RULES
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor, Replicate

    import fastopt.torch as fot
    from fastopt import _quantized as Q

    _init(rank, world, port)
    fmt = opt_kw["state_dtype"]
    model, opt = _quant_fsdp(name, opt_kw)
    ref = _quant_model()
    ropt = getattr(fot, name)(ref.parameters(), lr=LR, **opt_kw)
    spec = RULES[type(opt)._fastopt._rule]
    for t in range(STEPS):
        _quant_step(model, opt, rank, t, (ref, ropt))
        st0 = opt.state[next(model.parameters())]
        qslots = [s.name for s in spec.slots if Q.names_of(s.name)[0] in st0]
        assert qslots
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p.full_tensor(), q), t
            for s in qslots:
                codes, absmax = (opt.state[p][n] for n in Q.names_of(s))
                assert type(codes).__name__ == "DTensor" and codes.placements == p.placements
                assert torch.equal(codes.full_tensor(), ropt.state[q][f"{s}.codes"])
                # one row of scales per shard; each shard's blocks are the full tensor's
                assert tuple(absmax.shape) == (world, absmax._local_tensor.shape[-1])
                got = absmax.full_tensor().reshape(-1)
                assert torch.equal(got, ropt.state[q][f"{s}.absmax"]), (t, s)
    # a state dict round trip into a new model and optimizer: bit for bit, and steps alike
    sd = copy.deepcopy(opt.state_dict())
    model2, opt2 = _quant_fsdp(name, opt_kw)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    _same_local(_local_state(opt2, model2), _local_state(opt, model))
    # DCP: saved, trained on; new model and optimizer loaded, trained on: the same bits
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(folder, "quant"))
    for t in range(STEPS, STEPS + 2):
        _quant_step(model, opt, rank, t)
    model3, opt3 = _quant_fsdp(name, opt_kw)
    msd, osd = get_state_dict(model3, opt3)
    loaded = {"model": msd, "optim": osd}
    dcp.load(loaded, checkpoint_id=os.path.join(folder, "quant"))
    set_state_dict(model3, opt3, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    for t in range(STEPS, STEPS + 2):
        _quant_step(model3, opt3, rank, t)
    for a, b in zip(model3.parameters(), model.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor())
    _same_local(_local_state(opt3, model3), _local_state(opt, model))
    # the scales of another layout (one replicated row, as a world of one would keep them):
    # refused at load, nothing changed
    before = _local_state(opt, model)
    bad = copy.deepcopy(opt.state_dict())
    p0 = next(model.parameters())
    name0 = Q.names_of(qslots[0])[1]
    full = bad["state"][0][name0].full_tensor().reshape(1, -1)
    bad["state"][0][name0] = DTensor.from_local(full, p0.device_mesh, [Replicate()])
    try:
        opt.load_state_dict(bad)
    except ValueError as exc:
        assert "another sharding or world size" in str(exc), exc
    else:
        raise AssertionError("a state of another layout loaded")
    _same_local(_local_state(opt, model), before)
    # full precision: float32 DTensors like the parameters, the dequantized shards
    fp = fot.full_precision_state_dict(opt)
    model4, opt4 = _quant_fsdp(name, {})
    opt4.load_state_dict(fp)
    for i, p in enumerate(model4.parameters()):
        for s in qslots:
            x = opt4.state[p][s]
            assert type(x).__name__ == "DTensor" and x.dtype is torch.float32
            codes, absmax = (before[i][n] for n in Q.names_of(s))
            qm = spec.slot(s).quant_map
            want = Q.dequantize(codes.numpy(), absmax.reshape(-1).numpy(), fmt, qm)
            assert torch.equal(x._local_tensor, torch.from_numpy(want).reshape(codes.shape))
    _quant_step(model4, opt4, rank, 0)
    with open(os.path.join(folder, f"quant-{rank}.json"), "w") as f:
        json.dump({"ok": True}, f)
    dist.barrier()
    dist.destroy_process_group()
