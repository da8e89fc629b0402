"""The worker processes of ``tests/test_torch_distributed.py``: real gloo process groups on the
CPU (localhost), two ranks, each scenario run with ``fastopt.torch`` and with ``torch.optim`` in
the same processes on the same data, compared there (``assert``: a failure fails the spawn).

Phase 1 (``phase_train``): DDP; ``ZeroRedundancyOptimizer(optimizer_class=...)`` with
``consolidate_state_dict``; FSDP2 (``fully_shard``) trained, its model and optimizer state saved
with ``torch.distributed.checkpoint`` (DCP, via ``get_state_dict``), then trained on: the
uninterrupted result is saved beside. Phase 2 (``phase_resume``, new processes): the same model
built and sharded again, DCP loaded (``set_state_dict``), trained on: equal to the uninterrupted
run bit for bit. Each rank writes what it measured to ``<dir>/<phase>-<rank>.json``.
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
