"""The optimizer's state: creating it (bound to the first step's arrays), ``state_dict`` checks
and restores. A mixin of ``fastopt.base.Optimizer``.

State buffers are created at the first step, shaped and typed like their parameters (views
into flat per-group buffers for a ``FlatBuffer``), filled with the rule's initial values or
with a state loaded before the first step. ``load_state_dict`` checks everything first (kind,
flags, hyperparameters, step, names, shapes, dtypes) and only then writes.

A rule's host state (``Rule.host_state``: NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``) is
one set of float32 values per optimizer (``_host``), created with the state buffers and
advanced after every applied step. A state dict carries it as torch does: per parameter, under
torch's names, as 0-d float32 arrays (every parameter holds the same values; a loaded state
dict whose parameters disagree is refused).
"""

import numpy as np

from . import precision
from ._arrays import array_module, as_xp_array, to_numpy
from ._validate import (
    SUPPORTED_DTYPES,
    check_array,
    check_names,
    check_str_names,
    check_writable,
    describe,
    dtype_name,
    dtype_of,
    is_array,
    normalise_hyper,
)
from .flat import ReadOnlyViews

__all__ = ["StateMachinery"]


class StateMachinery:
    """State creation, binding and ``state_dict`` checks (see the module docstring)."""

    def _check_state_dict(self, sd):
        keys = {"optimizer", "step", "hyperparams", "state"}
        if not isinstance(sd, dict) or set(sd) != keys:
            got = sorted(sd, key=str) if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(
                f"not a fastopt state_dict: got {got}, expected a dict with keys {sorted(keys)}"
            )
        kind = type(self).__name__
        if sd["optimizer"] != kind:
            raise ValueError(f"state_dict is for optimizer {sd['optimizer']!r}, this is {kind}")
        step = sd["step"]
        if (
            isinstance(step, (bool, np.bool_))
            or not isinstance(step, (int, np.integer))
            or step < 0
        ):
            raise ValueError(f"state_dict step is {step!r}; expected an integer >= 0")
        hp = sd["hyperparams"]
        if not isinstance(hp, dict):
            raise TypeError(f"state_dict hyperparams is a {type(hp).__name__}; expected a dict")
        check_names(hp, self._hyper + self._flags, "state_dict hyperparameters", f"those of {kind}")
        hp = {k: normalise_hyper(v) for k, v in hp.items()}
        for f in self._flags:
            if hp[f] != getattr(self, f):
                raise ValueError(
                    f"state_dict has {f}={hp[f]!r} but this optimizer has "
                    f"{f}={getattr(self, f)!r}; flags decide the state buffers "
                    "and the math, so they must match"
                )
        hp = self._check_hyper(hp)
        state = sd["state"]
        if not isinstance(state, dict):
            raise TypeError(f"state_dict state is a {type(state).__name__}; expected a dict")
        check_str_names(state, "state_dict parameter names")
        hnames = self._spec.host_names
        host, hs, first = {}, None, None
        for name, st in state.items():
            if not isinstance(st, dict):
                raise TypeError(
                    f"state of parameter {name!r} is a {type(st).__name__}; "
                    "expected a dict state name -> array"
                )
            want = self._state_names()
            if self._bound is not None and name in self._bound:
                want = self._names_for(precision.kind(self._bound[name][1]))
            elif self.master_weights and precision.MASTER in st:
                want = want + (precision.MASTER,)  # a 16-bit param's: checked at binding
            check_names(
                st, want + hnames, f"state buffers of parameter {name!r}", f"those {kind} keeps"
            )
            host[name] = {}
            for s in want:
                a = st[s]
                if isinstance(a, np.ndarray):  # a subclass as a plain view; freed memory refused
                    a = as_xp_array(a, f"state {s!r} of parameter {name!r}")
                check_array(name, f"state {s!r}", a, SUPPORTED_DTYPES)
                host[name][s] = np.array(to_numpy(a), copy=True)
            if hnames:
                mine = self._spec.check_host_state(
                    {h: to_numpy(st[h]) if is_array(st[h]) else st[h] for h in hnames},
                    who=f"host state of parameter {name!r}",
                )
                if hs is None:
                    hs, first = mine, name
                elif mine != hs:
                    raise ValueError(
                        f"host state of parameter {name!r} is {mine} but that of parameter "
                        f"{first!r} is {hs}; {kind} steps every parameter with one host state"
                    )
        if self._layout is not None:
            check_names(
                state, self._state, "state_dict parameter names", "those this optimizer steps"
            )
            for name, st in host.items():
                cur_st = self._state[name]
                # this parameter's own names (a 16-bit one keeps a master copy, an fp32 one not)
                mine = self._names_for(precision.kind(self._bound[name][1]))
                check_names(
                    cur_st, mine, f"state buffers of parameter {name!r}", f"those {kind} keeps"
                )
                for s, a in st.items():
                    cur = cur_st[s]
                    if not is_array(cur) or a.shape != tuple(cur.shape) or a.dtype != dtype_of(cur):
                        raise ValueError(
                            f"state {s!r} of parameter {name!r} is "
                            f"{dtype_name(a.dtype)}{list(a.shape)}, expected "
                            f"{describe(cur)}"
                        )
                    check_writable(name, f"state {s!r}", cur)
        else:
            for name, st in host.items():
                kinds = {(a.shape, a.dtype) for s, a in st.items() if s != precision.MASTER}
                kinds |= {(a.shape, None) for s, a in st.items() if s == precision.MASTER}
                if (
                    len({shape for shape, _ in kinds}) > 1
                    or len({d for _, d in kinds} - {None}) > 1
                ):
                    got = sorted((s, a.dtype.name, a.shape) for s, a in st.items())
                    raise ValueError(
                        f"state buffers of parameter {name!r} differ in shape or dtype: {got}"
                    )
        return hp, int(step), host, hs

    def _commit_state_dict(self, hp, step, host, hs):
        if self._layout is not None:
            for name, st in host.items():
                for s, a in st.items():
                    cur = self._state[name][s]
                    cur[...] = array_module(cur).asarray(a)
            self._host = hs if hs is not None else self._host
            ds = self.__dict__.get("_dev")
            if ds is not None and hs:  # a capturable optimizer's host state lives on the device
                ds.set_host_state(hs)
        else:
            self._pending = host if host else None
            self._pending_host = hs
        for h in self._hyper:
            setattr(self, h, hp[h])
        self._hyper_ok = True  # validated by _check_state_dict
        self.step_count = step

    def _new_state(self, name, like):
        xp = array_module(like)
        out = {}
        pending = (self._pending or {}).get(name)
        pk = precision.kind(dtype_of(like))
        sdt = precision.storage_dtype(self._state_kind(pk))
        for s in self._names_for(pk):
            if pending is not None:
                out[s] = xp.asarray(pending[s]).reshape(like.shape).copy()
            elif s == precision.MASTER:
                out[s] = like.astype(np.float32)  # the fp32 copy: exact
            else:
                out[s] = xp.full(like.shape, self._state_fill(s), dtype=sdt)
        return out

    def _bind_host(self):
        """The host state, created with the state buffers: the loaded one, else the rule's
        initial values from the hyperparameters of this (first) step."""
        hs = self._pending_host
        if hs is None:
            hs = self._spec.initial_host_state(self._rule_hp(self.hyperparams))
        self._host, self._pending_host = dict(hs), None

    def _bind(self, layout, params):
        # validated already: the pending state's names, shapes and dtypes match ``params``
        self._bind_host()
        self._state = {n: self._new_state(n, p) for n, p in params.items()}
        self._bound = {n: (shape, np.dtype(dt)) for n, shape, dt in layout[1]}
        self._layout = layout
        self._pending = None

    def _bind_flat(self, buf):
        self._bind_host()
        flat_state, state = [], {}
        for group in buf.groups:
            xp = array_module(group.data)
            pk = precision.kind(group.dtype)
            sdt = precision.storage_dtype(self._state_kind(pk))
            flat = {
                s: group.data.astype(np.float32)
                if s == precision.MASTER
                else xp.full(group.data.shape, self._state_fill(s), dtype=sdt)
                for s in self._names_for(pk)
            }
            for name, (off, size, shape) in group.slots.items():
                views = {s: a[off : off + size].reshape(shape) for s, a in flat.items()}
                if self._pending is not None:
                    for s, v in views.items():
                        v[...] = array_module(v).asarray(self._pending[name][s])
                state[name] = ReadOnlyViews(
                    views, f"opt.state[{name!r}] (views into the optimizer's flat state)"
                )
            flat_state.append(flat)
        self._flat_state = flat_state
        self._state = ReadOnlyViews(state, "opt.state of an optimizer stepping a FlatBuffer")
        self._layout = ("flat", buf.layout)
        self._bound = {n: (tuple(shape), np.dtype(dt)) for dt, n, _, _, shape in buf.layout}
        self._pending = None
