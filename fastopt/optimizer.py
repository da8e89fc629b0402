"""The optimizer base: state, the two calling conventions, checkpoints of the state.

A subclass declares its hyperparameters (``_hyper``), its structural flags (``_flags``), how
they are validated (``_check_hyper``), which state buffers it keeps (``_state_names``) and how
one fused step runs (``_apply``, a call into ``fastopt.functional``). Everything else — input
validation, the non-finite policy, state creation, the dict API, the flat API, ``state_dict`` —
lives here once.

Every public call validates all of its inputs before it writes anything: a refused call leaves
every parameter, every state buffer and the step counter exactly as they were.
"""
import numpy as np

from . import backends
from ._arrays import array_module, device_arrays_step, device_arrays_update, to_numpy
from ._validate import (SUPPORTED_DTYPES, NonFiniteGradientError, all_finite, check_array,
                        check_names, check_no_overlap, check_writable, describe, dtype_of,
                        is_array, where)
from .flat import FlatBuffer

__all__ = ["Optimizer", "NONFINITE_POLICIES"]

#: what ``nonfinite=`` accepts: None (PyTorch: NaN/inf flow through), "raise", "skip"
NONFINITE_POLICIES = (None, "raise", "skip")

class Optimizer:
    """Base class. Numeric hyperparameters are plain attributes: change them between steps
    (for schedules) and the next step uses them, without recompiling anything (they are
    validated again at every step, before anything changes).

    ``nonfinite`` chooses what a step does with a gradient that holds NaN or ±inf:
    ``None`` (default, PyTorch's behaviour) lets them flow through the update elementwise;
    ``"raise"`` raises ``NonFiniteGradientError`` (a ``FloatingPointError`` and a
    ``ValueError``) naming the first offending parameter; ``"skip"`` leaves parameters, state
    and the step counter untouched and makes ``update``/``step`` return False. Either check is
    one reduction per gradient array (per dtype group for a ``FlatBuffer``) before anything
    is written.
    """

    #: numeric hyperparameters (changeable between steps) and structural flags (fixed)
    _hyper = ()
    _flags = ()

    def __init__(self, backend="auto", nonfinite=None):
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if backend != "auto":
            backends.get_backend(backend)  # unknown or unavailable: raise now, not at step 1
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"invalid nonfinite={nonfinite!r}; expected one of "
                             f"{list(NONFINITE_POLICIES)}")
        self.backend = backend
        self.nonfinite = nonfinite
        self.step_count = 0
        self.state = {}          # name -> {state name -> array view}
        self._layout = None      # ("dict", ((name, shape, dtype), ...)) or ("flat", buf.layout)
        self._flat_state = None  # per FlatBuffer group: {state name -> flat array}
        self._pending = None     # state loaded before the first step

    # -- what a subclass provides ------------------------------------------------------------
    def _check_hyper(self, hp):
        """Validate ``hp`` (every name of ``_hyper + _flags``); return it normalised."""
        return hp

    def _state_names(self):
        return ()

    def _state_fill(self, name):
        return 0.0

    def _apply(self, param, grad, states, step, backend):
        raise NotImplementedError

    def _init(self, hp):
        """Validate the constructor's hyperparameters and set them as attributes."""
        for k, v in self._check_hyper(dict(hp)).items():
            setattr(self, k, v)

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
        dtypes. Every input is validated before anything is written. Returns True when the step
        was applied, False when ``nonfinite="skip"`` skipped it.
        """
        pairs = self._validate_dict(params, grads)
        if not self._finite((n, g) for n, _, g in pairs):
            return False
        if self._layout is None:
            self._bind(("dict", tuple((n, tuple(p.shape), str(dtype_of(p)))
                                      for n, p, _ in pairs)), {n: [p] for n, p, _ in pairs})
        self.step_count += 1
        for name, p, g in pairs:
            xp = array_module(p)
            g = xp.ascontiguousarray(g).reshape(-1)
            self._run(p.reshape(-1), g, {s: a.reshape(-1) for s, a in self.state[name].items()})
        return True

    @device_arrays_step
    def step(self, buf):
        """One fused step over a ``FlatBuffer``: one kernel call per dtype.

        Returns True when the step was applied, False when ``nonfinite="skip"`` skipped it.
        """
        self._validate_flat(buf)
        if not self._finite_flat(buf):
            return False
        if self._layout is None:
            self._bind_flat(buf)
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
        """Restore ``state_dict()`` output, so that a resumed run continues bit-identically.

        Everything is checked first — optimizer kind, flags, hyperparameter values, step,
        parameter names, state buffer names, shapes and dtypes (against the parameters this
        optimizer already steps, if any) — and only then is anything written: a refused
        state dict changes nothing.
        """
        self._commit_state_dict(*self._check_state_dict(sd))

    # -- validation ---------------------------------------------------------------------------
    def _backend_for(self, arrays, what):
        """The backend module that will run, after checking it can reach ``arrays``."""
        spaces = {}
        for label, a in arrays:
            spaces.setdefault(where(a), label)
        if len(spaces) > 1:
            raise ValueError(f"{spaces['host']} is a host array but {spaces['device']} is a "
                             f"device array; {what} must all live on one device")
        first = arrays[0][1] if arrays else None
        be = backends.resolve(self.backend, first)
        device = getattr(be, "DEVICE", "cpu")
        if arrays and (device == "cpu") != (where(first) == "host"):
            raise ValueError(f"backend {be.NAME!r} runs on the {device} but {arrays[0][0]} is "
                             f"{describe(first)}; pass arrays where the backend runs or use "
                             "backend='auto'")
        return be

    def _check_against(self, name, shape, dtype):
        """Shape/dtype of parameter ``name`` against the bound layout or the loaded state."""
        if self._layout is not None:
            ref = self._bound_shapes()[name]
            if (shape, dtype) != ref:
                raise ValueError(f"parameter {name!r} is {dtype}{list(shape)} but this "
                                 f"optimizer was first stepped with {ref[1]}{list(ref[0])}; "
                                 "create a new optimizer or load a matching state_dict")
        elif self._pending is not None:
            for s, a in self._pending[name].items():
                if a.shape != shape or a.dtype != dtype:
                    raise ValueError(f"loaded state {s!r} of parameter {name!r} is "
                                     f"{a.dtype}{list(a.shape)}, but the parameter is "
                                     f"{dtype}{list(shape)}")

    def _bound_shapes(self):
        kind, layout = self._layout
        if kind == "dict":
            return {n: (shape, dt) for n, shape, dt in layout}
        return {n: (tuple(shape), dt) for dt, n, _, _, shape in layout}

    def _validate_dict(self, params, grads):
        if not isinstance(params, dict) or not isinstance(grads, dict):
            raise TypeError("update() expects two dicts name -> array (params, grads), got "
                            f"{type(params).__name__} and {type(grads).__name__}")
        check_names(grads, params, "the names of grads", "the names of params")
        if self._layout is not None:
            if self._layout[0] != "dict":
                raise ValueError("this optimizer steps a FlatBuffer; call step(buf), not "
                                 "update()")
            check_names(params, self.state, "parameter names",
                        "those of the first step (create a new optimizer for other parameters)")
        elif self._pending is not None:
            check_names(params, self._pending, "parameter names", "those of the loaded state")
        self._check_hyper(self.hyperparams)  # schedules may have changed them since the last step
        arrays = []
        for name, p in params.items():
            for role, a in (("param", p), ("grad", grads[name])):
                if not is_array(a):
                    raise TypeError(f"{role} of parameter {name!r} is a {type(a).__name__}; "
                                    "expected a NumPy array or a device array")
                arrays.append((f"{role} of parameter {name!r}", a))
        be = self._backend_for(arrays, "params and grads")
        supported = tuple(getattr(be, "DTYPES", SUPPORTED_DTYPES))
        pairs, entries = [], []
        for name, p in params.items():
            g = grads[name]
            pd, gd = check_array(name, "param", p, supported), check_array(name, "grad", g,
                                                                            supported)
            shape = tuple(p.shape)
            if pd != gd:
                raise TypeError(f"parameter {name!r} is {describe(p)} but its grad is "
                                f"{describe(g)}; expected the same dtype (cast the gradient "
                                "explicitly: a silent cast would hide a precision loss)")
            if tuple(g.shape) != shape:
                raise ValueError(f"parameter {name!r} is {describe(p)} but its grad is "
                                 f"{describe(g)}; expected the grad shaped like the param")
            check_writable(name, "param", p)
            self._check_against(name, shape, str(pd))
            pairs.append((name, p, g))
            entries += [(f"parameter {name!r}", p, True), (f"grad of parameter {name!r}", g,
                                                           False)]
            for s, a in self.state.get(name, {}).items():
                entries.append((f"state {s!r} of parameter {name!r}", a, True))
        check_no_overlap(entries)
        return pairs

    def _validate_flat(self, buf):
        if not isinstance(buf, FlatBuffer):
            raise TypeError(f"step() expects a fastopt.FlatBuffer, got {type(buf).__name__}; "
                            "use update(params, grads) for dicts of arrays")
        arrays_now = tuple((id(g.data), id(g.grad)) for g in buf.groups)
        checked = getattr(self, "_checked_flat", None)
        if checked is not None and checked[0] is buf and checked[1] == arrays_now:
            # the same buffer with the same arrays already passed the structural checks below
            # (a FlatBuffer's layout is fixed at construction); only hyperparameters can change
            self._check_hyper(self.hyperparams)
            return
        layout = buf.layout
        if self._layout is not None:
            if self._layout[0] != "flat":
                raise ValueError("this optimizer steps dicts of arrays; call update(params, "
                                 "grads), not step(buf)")
            if self._layout[1] != layout:
                check_names(buf.params, self.state, "the FlatBuffer's parameter names",
                            "those of the first step")
                old = {n: (dt, off, size, tuple(shape))
                       for dt, n, off, size, shape in self._layout[1]}
                for dt, n, off, size, shape in layout:
                    if old[n] != (dt, off, size, tuple(shape)):
                        o = old[n]
                        raise ValueError(f"parameter {n!r} is {dt}{list(shape)} at offset "
                                         f"{off} but this optimizer was first stepped with "
                                         f"{o[0]}{list(o[3])} at offset {o[1]}; create a new "
                                         "optimizer or load a matching state_dict")
                raise ValueError("this FlatBuffer's layout differs from the first step's")
        elif self._pending is not None:
            check_names(buf.params, self._pending, "the FlatBuffer's parameter names",
                        "those of the loaded state")
            for dt, n, _, _, shape in layout:
                self._check_against(n, tuple(shape), dt)
        self._check_hyper(self.hyperparams)
        arrays = []
        for i, g in enumerate(buf.groups):
            arrays += [(f"FlatBuffer group {i} data", g.data), (f"FlatBuffer group {i} grad",
                                                                g.grad)]
        be = self._backend_for(arrays, "the FlatBuffer's groups")
        supported = tuple(getattr(be, "DTYPES", SUPPORTED_DTYPES))
        entries = []
        for i, group in enumerate(buf.groups):
            label = f"FlatBuffer {np.dtype(group.dtype)} group"
            n = max((off + size for off, size, _ in group.slots.values()), default=0)
            for role, a in (("data", group.data), ("grad", group.grad)):
                check_array(label, role, a, supported)
                if dtype_of(a) != np.dtype(group.dtype) or a.ndim != 1 or a.shape[0] < n:
                    raise ValueError(f"{role} of the {label} is {describe(a)}; expected a 1-D "
                                     f"{np.dtype(group.dtype)} array of at least {n} elements")
            if group.grad.shape != group.data.shape:
                raise ValueError(f"grad of the {label} is {describe(group.grad)}, data is "
                                 f"{describe(group.data)}; expected equal shapes")
            check_writable(label, "data", group.data)
            entries += [(f"data of the {label}", group.data, True),
                        (f"grad of the {label}", group.grad, False)]
            if self._flat_state is not None:
                for s, a in self._flat_state[i].items():
                    entries.append((f"state {s!r} of the {label}", a, True))
        check_no_overlap(entries)
        if self._flat_state is not None:
            self._checked_flat = (buf, arrays_now)

    def _finite(self, named_grads):
        """Apply the non-finite policy: True to go on, False to skip, or raise."""
        if self.nonfinite is None:
            return True
        for name, g in named_grads:
            if not all_finite(g):
                return self._nonfinite_found(name, g)
        return True

    def _finite_flat(self, buf):
        if self.nonfinite is None:
            return True
        for group in buf.groups:
            if not all_finite(group.grad):  # one reduction over the whole dtype group
                bad = next((n for n, (off, size, _) in group.slots.items()
                            if not all_finite(group.grad[off:off + size])),
                           "(padding between parameters)")
                return self._nonfinite_found(bad, buf.grads.get(bad, group.grad))
        return True

    def _nonfinite_found(self, name, g):
        if self.nonfinite == "skip":
            return False
        h = to_numpy(g)
        raise NonFiniteGradientError(
            f"gradient of parameter {name!r} ({describe(g)}) holds {int(np.isnan(h).sum())} "
            f"NaN and {int(np.isinf(h).sum())} inf values; nonfinite='raise' refused the step "
            "(nothing was changed)")

    def _check_state_dict(self, sd):
        keys = {"optimizer", "step", "hyperparams", "state"}
        if not isinstance(sd, dict) or set(sd) != keys:
            got = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"not a fastopt state_dict: got {got}, expected a dict with "
                             f"keys {sorted(keys)}")
        kind = type(self).__name__
        if sd["optimizer"] != kind:
            raise ValueError(f"state_dict is for optimizer {sd['optimizer']!r}, this is {kind}")
        step = sd["step"]
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) \
                or step < 0:
            raise ValueError(f"state_dict step is {step!r}; expected an integer >= 0")
        hp = sd["hyperparams"]
        if not isinstance(hp, dict):
            raise ValueError(f"state_dict hyperparams is a {type(hp).__name__}; expected a dict")
        check_names(hp, self._hyper + self._flags, "state_dict hyperparameters",
                    f"those of {kind}")
        hp = {k: tuple(v) if isinstance(v, list) else v for k, v in hp.items()}
        for f in self._flags:
            if hp[f] != getattr(self, f):
                raise ValueError(f"state_dict has {f}={hp[f]!r} but this optimizer has "
                                 f"{f}={getattr(self, f)!r}; flags decide the state buffers "
                                 "and the math, so they must match")
        hp = self._check_hyper(hp)
        state = sd["state"]
        if not isinstance(state, dict):
            raise ValueError(f"state_dict state is a {type(state).__name__}; expected a dict")
        want = self._state_names()
        host = {}
        for name, st in state.items():
            if not isinstance(st, dict):
                raise ValueError(f"state of parameter {name!r} is a {type(st).__name__}; "
                                 "expected a dict state name -> array")
            check_names(st, want, f"state buffers of parameter {name!r}", f"those {kind} keeps")
            host[name] = {}
            for s in want:
                a = st[s]
                check_array(name, f"state {s!r}", a, SUPPORTED_DTYPES)
                host[name][s] = np.array(to_numpy(a), copy=True)
        if self._layout is not None:
            check_names(state, self.state, "state_dict parameter names",
                        "those this optimizer steps")
            for name, st in host.items():
                for s, a in st.items():
                    cur = self.state[name][s]
                    if a.shape != tuple(cur.shape) or a.dtype != dtype_of(cur):
                        raise ValueError(f"state {s!r} of parameter {name!r} is "
                                         f"{a.dtype}{list(a.shape)}, expected "
                                         f"{dtype_of(cur)}{list(cur.shape)}")
        else:
            for name, st in host.items():
                kinds = {(a.shape, a.dtype) for a in st.values()}
                if len(kinds) > 1:
                    raise ValueError(f"state buffers of parameter {name!r} differ in shape or "
                                     f"dtype: {sorted((s, a.dtype.name, a.shape) for s, a in st.items())}")
        return hp, int(step), host

    def _commit_state_dict(self, hp, step, host):
        if self._layout is not None:
            for name, st in host.items():
                for s, a in st.items():
                    cur = self.state[name][s]
                    cur[...] = array_module(cur).asarray(a)
        else:
            self._pending = host if host else None
        for h in self._hyper:
            setattr(self, h, hp[h])
        self.step_count = step

    # -- internals --------------------------------------------------------------------------
    def _run(self, param, grad, states):
        self._apply(param, grad, states, self.step_count, self.backend)

    def _new_state(self, name, like):
        xp = array_module(like)
        out = {}
        pending = (self._pending or {}).get(name)
        for s in self._state_names():
            if pending is not None:
                out[s] = xp.asarray(pending[s]).reshape(like.shape).copy()
            else:
                out[s] = xp.full(like.shape, self._state_fill(s), dtype=dtype_of(like))
        return out

    def _bind(self, layout, params):
        # validated already: the pending state's names, shapes and dtypes match ``params``
        self.state = {n: self._new_state(n, ps[0]) for n, ps in params.items()}
        self._layout = layout
        self._pending = None

    def _bind_flat(self, buf):
        flat_state, state = [], {}
        for group in buf.groups:
            flat = {s: array_module(group.data).full(group.data.shape, self._state_fill(s),
                                                     dtype=group.dtype)
                    for s in self._state_names()}
            for name, (off, size, shape) in group.slots.items():
                views = {s: a[off:off + size].reshape(shape) for s, a in flat.items()}
                if self._pending is not None:
                    for s, v in views.items():
                        v[...] = array_module(v).asarray(self._pending[name][s])
                state[name] = views
            flat_state.append(flat)
        self._flat_state, self.state = flat_state, state
        self._layout = ("flat", buf.layout)
        self._pending = None

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        extra = f", nonfinite={self.nonfinite!r}" if self.nonfinite is not None else ""
        return f"{type(self).__name__}({hp}, backend={self.backend!r}{extra})"
