"""The optimizer base: state, the two calling conventions, checkpoints of the state.

A subclass declares its hyperparameters (``_hyper``), which state buffers it keeps
(``_state_names``) and how one fused step runs (``_apply``, a call into
``fastopt.functional``). Everything else — state creation, the dict API, the flat API,
``state_dict`` — lives here once.
"""
import numpy as np

from . import backends
from ._arrays import array_module, device_arrays_step, device_arrays_update, to_numpy
from .flat import FlatBuffer

__all__ = ["Optimizer"]


class Optimizer:
    """Base class. Numeric hyperparameters are plain attributes: change them between steps
    (for schedules) and the next step uses them, without recompiling anything."""

    #: numeric hyperparameters (changeable between steps) and structural flags (fixed)
    _hyper = ()
    _flags = ()

    def __init__(self, backend="auto"):
        if backend != "auto" and not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if backend != "auto":
            backends.get_backend(backend)  # unknown or unavailable: raise now, not at step 1
        self.backend = backend
        self.step_count = 0
        self.state = {}          # name -> {state name -> array view}
        self._layout = None      # ("dict", ((name, shape, dtype), ...)) or ("flat", buf.layout)
        self._flat_state = None  # per FlatBuffer group: {state name -> flat array}
        self._pending = None     # state loaded before the first step

    # -- what a subclass provides ------------------------------------------------------------
    def _state_names(self):
        return ()

    def _state_fill(self, name):
        return 0.0

    def _apply(self, param, grad, states, step, backend):
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------------
    @property
    def hyperparams(self):
        """The current hyperparameters and flags, as plain Python values."""
        out = {h: getattr(self, h) for h in self._hyper + self._flags}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}

    @device_arrays_update
    def update(self, params, grads):
        """Update the arrays of ``params`` (dict name -> array) in place from ``grads``.

        State is created on the first call; later calls must pass the same names, shapes and
        dtypes. Returns True (the step was applied).
        """
        layout = self._check_dict(params, grads)
        if self._layout is None:
            self._bind(layout, {n: [p] for n, p in params.items()})
        self.step_count += 1
        for name, p in params.items():
            g = grads[name]
            xp = array_module(p)
            g = xp.ascontiguousarray(g).reshape(-1)
            self._run(p.reshape(-1), g, {s: a.reshape(-1) for s, a in self.state[name].items()})
        return True

    @device_arrays_step
    def step(self, buf):
        """One fused step over a ``FlatBuffer``: one kernel call per dtype. Returns True."""
        if not isinstance(buf, FlatBuffer):
            raise TypeError(f"step() expects a fastopt.FlatBuffer, got {type(buf).__name__}; "
                            "use update(params, grads) for dicts of arrays")
        layout = ("flat", buf.layout)
        if self._layout is None:
            self._bind_flat(buf)
        elif self._layout != layout:
            raise ValueError("this FlatBuffer's layout differs from the one this optimizer was "
                             "first stepped with (names, shapes, dtypes or offsets changed)")
        self.step_count += 1
        for group, flat in zip(buf.groups, self._flat_state):
            self._run(group.data, group.grad, flat)
        return True

    def state_dict(self):
        """Plain data: optimizer kind, step count, hyperparameters and per-parameter state
        (``{name: {state name: numpy array}}``, host copies shaped like the parameters)."""
        state = {n: {s: to_numpy(a) for s, a in st.items()} for n, st in self.state.items()}
        if self._pending is not None and not state:
            state = {n: {s: a.copy() for s, a in st.items()} for n, st in self._pending.items()}
        return {"optimizer": type(self).__name__, "step": self.step_count,
                "hyperparams": self.hyperparams, "state": state}

    def load_state_dict(self, sd):
        """Restore ``state_dict()`` output, so that a resumed run continues bit-identically."""
        if not isinstance(sd, dict) or not {"optimizer", "step", "hyperparams", "state"} <= set(sd):
            raise ValueError("not a fastopt state_dict: expected keys optimizer, step, "
                             "hyperparams, state")
        if sd["optimizer"] != type(self).__name__:
            raise ValueError(f"state_dict is for {sd['optimizer']}, not {type(self).__name__}")
        hp = sd["hyperparams"]
        for f in self._flags:
            if f in hp and hp[f] != getattr(self, f):
                raise ValueError(f"state_dict has {f}={hp[f]!r} but this optimizer has "
                                 f"{f}={getattr(self, f)!r}")
        state = sd["state"]
        want = set(self._state_names())
        for name, st in state.items():
            if set(st) != want:
                raise KeyError(f"state of parameter {name!r} has buffers {sorted(st)}, "
                               f"expected {sorted(want)}")
        if self.state:
            if set(state) != set(self.state):
                raise KeyError(f"state_dict has parameters {sorted(state)}, this optimizer "
                               f"has {sorted(self.state)}")
            for name, st in state.items():
                for s, a in st.items():
                    cur = self.state[name][s]
                    a = np.asarray(a)
                    if a.shape != tuple(cur.shape) or a.dtype != cur.dtype:
                        raise ValueError(f"state {s!r} of parameter {name!r} is "
                                         f"{a.dtype}{list(a.shape)}, expected "
                                         f"{cur.dtype}{list(cur.shape)}")
            for name, st in state.items():
                for s, a in st.items():
                    cur = self.state[name][s]
                    cur[...] = array_module(cur).asarray(np.asarray(a))
        else:
            self._pending = {n: {s: np.array(a, copy=True) for s, a in st.items()}
                             for n, st in state.items()}
        for h in self._hyper:
            if h in hp:
                setattr(self, h, tuple(hp[h]) if isinstance(hp[h], list) else hp[h])
        self.step_count = int(sd["step"])

    # -- internals --------------------------------------------------------------------------
    def _run(self, param, grad, states):
        self._apply(param, grad, states, self.step_count, self.backend)

    def _check_dict(self, params, grads):
        if not isinstance(params, dict) or not isinstance(grads, dict):
            raise TypeError("update() expects two dicts name -> array (params, grads)")
        if set(params) != set(grads):
            missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
            raise KeyError(f"params and grads differ: grads lack {missing}, grads also have {extra}")
        for name, p in params.items():
            g = grads[name]
            if tuple(p.shape) != tuple(g.shape):
                raise ValueError(f"parameter {name!r}: grad shape {tuple(g.shape)} != param "
                                 f"shape {tuple(p.shape)}")
            if p.dtype != g.dtype:
                raise TypeError(f"parameter {name!r}: grad dtype {g.dtype} != param dtype "
                                f"{p.dtype}")
            if not p.flags.c_contiguous:
                raise ValueError(f"parameter {name!r} is not C-contiguous; it cannot be updated "
                                 "in place (pass a contiguous array or use a FlatBuffer)")
        layout = ("dict", tuple((n, tuple(p.shape), str(p.dtype)) for n, p in params.items()))
        if self._layout is not None and self._layout != layout:
            if self._layout[0] != "dict":
                raise ValueError("this optimizer steps a FlatBuffer; call step(buf), not update()")
            raise KeyError("parameters changed since the first step (names, shapes or dtypes); "
                           "create a new optimizer or load a matching state_dict")
        return layout

    def _new_state(self, name, like):
        xp = array_module(like)
        out = {}
        pending = (self._pending or {}).get(name)
        for s in self._state_names():
            if pending is not None:
                out[s] = xp.asarray(np.asarray(pending[s], dtype=like.dtype)).reshape(like.shape).copy()
            else:
                out[s] = xp.full(like.shape, self._state_fill(s), dtype=like.dtype)
        return out

    def _bind(self, layout, params):
        if self._pending is not None and set(self._pending) != {n for n in params}:
            raise KeyError(f"loaded state has parameters {sorted(self._pending)}, "
                           f"the step got {sorted(params)}")
        self.state = {n: self._new_state(n, ps[0]) for n, ps in params.items()}
        self._layout = layout
        self._pending = None

    def _bind_flat(self, buf):
        if self._pending is not None and set(self._pending) != set(buf.params):
            raise KeyError(f"loaded state has parameters {sorted(self._pending)}, "
                           f"the FlatBuffer has {sorted(buf.params)}")
        self._flat_state, self.state = [], {}
        for group in buf.groups:
            flat = {s: array_module(group.data).full(group.data.shape, self._state_fill(s),
                                                     dtype=group.dtype)
                    for s in self._state_names()}
            for name, (off, size, shape) in group.slots.items():
                views = {s: a[off:off + size].reshape(shape) for s, a in flat.items()}
                if self._pending is not None:
                    for s, v in views.items():
                        v[...] = array_module(v).asarray(np.asarray(self._pending[name][s]))
                self.state[name] = views
            self._flat_state.append(flat)
        self._layout = ("flat", buf.layout)
        self._pending = None

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"{type(self).__name__}({hp}, backend={self.backend!r})"
