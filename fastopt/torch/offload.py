"""``CPUOffload``: GPU parameters, their fp32 master copies and optimizer state in (pinned) host
memory, stepped by fastopt's Numba CPU kernels bucket by bucket, the transfers overlapped with
the CPU work (ZeRO-Offload's scheme).

    opt = fastopt.torch.CPUOffload(fastopt.torch.AdamW, model.parameters(), lr=1e-3,
                                   weight_decay=0.01, bucket_bytes=64 << 20)

The parameters stay on their device (any dtype fastopt steps: bfloat16 saves the most device
memory); for each one the host keeps an fp32 master copy, an fp32 gradient buffer and, through
one ``opt_cls`` optimizer per bucket over the masters, the optimizer's state (fp32, on the
host). The parameters are cut into buckets of about ``bucket_bytes`` of fp32 master. A step:

1. the side stream ``d2h`` waits for the current stream (the backward that wrote the gradients)
   and queues every bucket's gradient copies device -> host, recording one event per bucket;
2. for each bucket in order: the host waits for that bucket's event only, steps its masters and
   state on the CPU (one many-tensor Numba launch per bucket), and queues its masters' copies
   host -> device (rounded to the parameter's dtype on the device) on the side stream ``h2d``;
   so bucket i+1's gradients travel while bucket i is stepped, and bucket i's parameters
   travel while bucket i+1 is stepped;
3. the current stream waits for ``h2d``: the next forward sees the new parameters.

CPU parameters work too (the copies are then plain host copies, ``streams`` does nothing): the
tests run the whole logic so, and its order of operations against fake streams.

``param_groups`` are the device parameters' (schedulers edit them; each step hands their
hyperparameters to the bucket optimizers). ``state_dict()`` is torch's format: per parameter the
bucket optimizer's state of its master plus ``master_param`` (fp32); ``load_state_dict`` takes
it back (checked by the bucket optimizers before anything is written, masters copied to the
parameters). Sparse gradients, closures that need the parameters updated in between and
``torch.amp.GradScaler``'s fused path are not offered: GradScaler unscales the gradients itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ._compat import check_state_dict

__all__ = ["CPUOffload", "CudaStreams", "HostStreams"]


class HostStreams:
    """No streams: CPU parameters (or a test) run every copy inline."""

    def on(self, which: str) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def record(self, which: str) -> None:
        return None

    def synchronize(self, event: Any) -> None:
        pass

    def side_waits_for_current(self, which: str) -> None:
        pass

    def current_waits_for_side(self, which: str) -> None:
        pass


class CudaStreams:
    """The two side streams of a CUDA device (``d2h``, ``h2d``) and their events."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.streams = {"d2h": torch.cuda.Stream(device), "h2d": torch.cuda.Stream(device)}

    def on(self, which: str) -> Any:
        return torch.cuda.stream(self.streams[which])

    def record(self, which: str) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.streams[which])
        return event

    def synchronize(self, event: Any) -> None:
        event.synchronize()

    def side_waits_for_current(self, which: str) -> None:
        self.streams[which].wait_stream(torch.cuda.current_stream(self.device))

    def current_waits_for_side(self, which: str) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.streams[which])


def _buckets(params, bucket_bytes):
    """``params`` in order, cut into lists of about ``bucket_bytes`` of fp32 (one parameter
    larger than that is a bucket of its own)."""
    out: list[Any] = []
    cur: list[Any] = []
    size = 0
    for p in params:
        n = 4 * p.numel()
        if cur and size + n > bucket_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += n
    if cur:
        out.append(cur)
    return out


class CPUOffload(torch.optim.Optimizer):
    """``opt_cls`` (a ``fastopt.torch`` class) stepped on the host over fp32 master copies of
    ``params``, bucket by bucket, transfers overlapped (see the module docstring)."""

    def __init__(
        self,
        opt_cls: type[torch.optim.Optimizer],
        params: Any,
        *,
        bucket_bytes: int = 32 << 20,
        pin_memory: bool | None = None,
        **kwargs: Any,
    ) -> None:
        from ._optimizer import FusedOptimizer

        if not (isinstance(opt_cls, type) and issubclass(opt_cls, FusedOptimizer)):
            raise TypeError(f"opt_cls must be a fastopt.torch class, got {opt_cls!r}")
        if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
        for key in ("max_grad_norm", "capturable"):
            if kwargs.get(key):
                # the buckets step apart: a norm per bucket would not be the global one, and
                # the host step is no CUDA graph
                raise NotImplementedError(f"CPUOffload does not support {key}={kwargs[key]!r}")
        probe = opt_cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)  # checks kwargs
        super().__init__(params, dict(probe.defaults))
        self.opt_cls, self.kwargs, self.bucket_bytes = opt_cls, kwargs, bucket_bytes
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.pin_memory = bool(pin_memory)
        self._build()

    def _host(self, t):
        h = torch.empty(t.shape, dtype=torch.float32, device="cpu")
        return h.pin_memory() if self.pin_memory else h

    def _build(self):
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) != 1:
            raise ValueError(f"CPUOffload: parameters on {sorted(map(str, devices))}; one device")
        (device,) = devices
        self.streams = CudaStreams(device) if device.type == "cuda" else HostStreams()
        self.masters, self.host_grads = {}, {}
        self.group_of = group_of = {}  # keyed by tensor identity
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if p.is_complex() or not p.is_floating_point():
                    raise TypeError(f"CPUOffload: a parameter is {p.dtype}; expected a real float")
                m = self._host(p)
                m.copy_(p.detach())
                self.masters[p] = torch.nn.Parameter(m)
                self.host_grads[p] = self._host(p)
                group_of[p] = gi
        params = [p for g in self.param_groups for p in g["params"]]
        # (device params, the optimizer over their masters, its groups' index)
        self.buckets: list[tuple[Any, ...]] = []
        self.bucket_of: dict[Any, Any] = {}
        for bucket in _buckets(params, self.bucket_bytes):
            self.bucket_of.update((p, len(self.buckets)) for p in bucket)
            index = sorted({group_of[p] for p in bucket})
            groups = [
                {
                    **self._hyper(self.param_groups[gi]),
                    "params": [self.masters[p] for p in bucket if group_of[p] == gi],
                }
                for gi in index
            ]
            self.buckets.append((bucket, self.opt_cls(groups, **self.kwargs), index))

    @staticmethod
    def _hyper(group):
        return {k: v for k, v in group.items() if k not in ("params", "param_names")}

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for bucket, opt, index in self.buckets:  # schedulers edit the outer groups
            for inner, gi in zip(opt.param_groups, index):
                inner.update(self._hyper(self.param_groups[gi]))
            for p in bucket:
                g = p.grad
                if g is not None and (g.is_sparse or g.shape != p.shape):
                    raise ValueError(
                        f"CPUOffload: a gradient is {g.layout} {list(g.shape)}, its parameter "
                        f"{list(p.shape)}; expected a dense gradient shaped like it"
                    )
        s = self.streams
        s.side_waits_for_current("d2h")
        events = []
        for bucket, _, _ in self.buckets:  # every gradient copy queued at once
            with s.on("d2h"):
                for p in bucket:
                    if p.grad is not None:
                        self.host_grads[p].copy_(p.grad, non_blocking=True)
            events.append(s.record("d2h"))
        for (bucket, opt, _), event in zip(self.buckets, events):
            s.synchronize(event)  # this bucket's gradients are on the host
            for p in bucket:
                self.masters[p].grad = None if p.grad is None else self.host_grads[p]
            opt.step()
            with s.on("h2d"):
                for p in bucket:
                    if p.grad is not None:
                        p.copy_(self.masters[p], non_blocking=True)
        s.current_waits_for_side("h2d")
        return loss

    # -- state ---------------------------------------------------------------------------------
    def _inner_state(self, p):
        opt = self.buckets[self.bucket_of[p]][1]
        return opt.state.get(self.masters[p], {})

    def state_dict(self) -> dict[str, Any]:
        """torch's format: per parameter index the bucket optimizer's state of its master and
        ``master_param`` (the fp32 master, on the host)."""
        state, groups, i = {}, [], 0
        for g in self.param_groups:
            packed = self._hyper(g)
            packed["params"] = list(range(i, i + len(g["params"])))
            for p in g["params"]:
                st = dict(self._inner_state(p))
                st["master_param"] = self.masters[p].detach()
                state[i] = st
                i += 1
            groups.append(packed)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take ``state_dict`` (``state_dict()``'s format): the bucket optimizers load (and
        check) their parts first, then the masters are copied and stored to the parameters."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)
        ):
            raise ValueError("loaded state dict does not match the optimizer's param groups")
        index: dict[Any, Any] = {}
        for s, g in zip(saved, self.param_groups):
            index.update(zip(g["params"], s["params"]))
        masters = {}
        for p, k in index.items():
            m = state_dict["state"].get(k, {}).get("master_param")
            if m is None or m.shape != p.shape:
                raise ValueError(f"state of parameter {k} has no master_param shaped like it")
            masters[p] = m
        loads = []
        for bucket, opt, gidx in self.buckets:
            inner_groups, inner_state, j = [], {}, 0
            for gi in gidx:
                members = [p for p in bucket if self.group_of[p] == gi]
                ids = list(range(j, j + len(members)))
                inner_groups.append({**self._hyper(saved[gi]), "params": ids})
                for p, jj in zip(members, ids):
                    st = {
                        n: v
                        for n, v in state_dict["state"].get(index[p], {}).items()
                        if n != "master_param"
                    }
                    if st:
                        inner_state[jj] = st
                j += len(members)
            loads.append((opt, {"state": inner_state, "param_groups": inner_groups}))
        for opt, sd in loads:  # every part checked before any is written
            check_state_dict(opt, sd)
        for opt, sd in loads:
            opt.load_state_dict(sd)
        for gi, s in enumerate(saved):
            self.param_groups[gi].update(self._hyper(s))
        with torch.no_grad():
            for p, m in masters.items():
                self.masters[p].copy_(m)
                p.copy_(self.masters[p])
