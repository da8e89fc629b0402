"""An optimizer's state, owned by one object: ``OptimizerState``.

What an optimizer keeps between steps, apart from its hyperparameters:

- the state buffers, created at the first step (``bind_dict`` / ``bind_flat``) shaped and typed
  like their parameters (views into flat per-group buffers for a ``FlatBuffer``), filled with
  the rule's initial values or with a state loaded before the first step;
- the layout they were bound to (``layout``, ``shapes``), which every later step must match;
- a state loaded before the first step (``pending``, ``pending_host``), applied at binding;
- the rule's host state (``Rule.host_state``: NAdam's ``mu_product``, ASGD's ``eta`` and
  ``mu``): one set of float32 values per optimizer (``host``), created with the state buffers
  and advanced after every applied step (``advance_host``).

Which buffers a parameter keeps, and in which dtype, is the optimizer's storage policy
(``StateKinds``: the rule's slots, ``state_dtype``, ``master_weights``). The step machinery
(``fastopt._steps.Stepper``) and ``state_dict``/``load_state_dict`` (``fastopt.base``) read and
change the state only through this class's methods. A state dict carries the host state as torch
does: per parameter, under torch's names, as 0-d float32 arrays (every parameter holds the same
values; a loaded state dict whose parameters disagree is refused).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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
)
from .flat import FlatBuffer, ReadOnlyViews

__all__ = ["OptimizerState", "StateKinds"]


@dataclass(frozen=True)
class StateKinds:
    """Which state buffers a parameter keeps and how they are stored: the rule's slots (fixed at
    construction), plus an fp32 master copy of a 16-bit param with ``master_weights``, in the
    dtype ``state_dtype`` resolves to (``precision.resolve_state_kind``)."""

    slots: tuple[str, ...]
    state_dtype: str | None = None
    master_weights: bool = False
    stochastic_rounding: bool = False
    #: the slots the rule lets be quantized (``Slot.quantize``), with their maps
    quantizable: tuple[tuple[str, str], ...] = ()
    #: the master of a bfloat16 param kept as the param plus an int16 remainder
    #: (``master_weights="remainder"``)
    remainder: bool = False

    def master_name(self, param_kind: str) -> str | None:
        """The state buffer of a param's master: ``"master_param"`` (fp32),
        ``"master_remainder"`` (int16, a bfloat16 param's with ``remainder``), or None (no
        master: a 32/64-bit param, or no master weights). A float16 param with ``remainder``
        is refused (``ValueError``)."""
        if not self.master_weights or param_kind not in precision.storage.BITS16:
            return None
        if self.remainder:
            precision.check_remainder_param(param_kind)
            return precision.MASTER_REMAINDER
        return precision.MASTER

    def master_names(self, param_kind: str) -> tuple[str, ...]:
        """The master buffers a loaded state of a param may hold: its own form, and the other
        (a float32-master state into a remainder optimizer and back), converted at binding."""
        own = self.master_name(param_kind)
        if own is None:
            return ()
        if param_kind != "bfloat16":
            return (own,)
        return (own, precision.MASTER if self.remainder else precision.MASTER_REMAINDER)

    @property
    def quant(self) -> str | None:
        """The quantized format of the policy ("int8", "float8_e4m3", "int4"), or None."""
        return self.state_dtype if self.state_dtype in precision.QUANTIZED else None

    def quant_map(self, slot: str) -> str | None:
        """The map of ``slot`` when it is stored quantized, else None."""
        if self.quant is None:
            return None
        return dict(self.quantizable).get(slot)

    def expand(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """``names`` with each quantized slot as its two buffers (``s.codes``, ``s.absmax``)."""
        if self.quant is None:
            return names
        from ._quantized import names_of

        return tuple(
            n for s in names for n in (names_of(s) if self.quant_map(s) is not None else (s,))
        )

    def buffers_for(self, param_kind: str, shape: tuple[int, ...]) -> dict[str, Any]:
        """Every state buffer of a param of ``param_kind`` and ``shape``: name -> (shape,
        dtype). A quantized slot ``s`` is two buffers, ``s.codes`` (uint8, the param's shape;
        ``(ceil(n / 2),)`` for a packed format) and ``s.absmax`` (float32, one per block:
        ``kernels/quant.py``)."""
        from . import _quantized
        from .kernels import quant

        sk = precision.storage_dtype(self.state_kind(param_kind))
        out: dict[str, Any] = {}
        for s in self.names_for(param_kind, expand=False):
            if s == precision.MASTER:
                out[s] = (tuple(shape), np.dtype(np.float32))
            elif s == precision.MASTER_REMAINDER:
                out[s] = (tuple(shape), np.dtype(np.int16))
            elif self.quant_map(s) is not None:
                codes, absmax = _quantized.names_of(s)
                assert self.quant is not None
                out[codes] = (_quantized.codes_shape(self.quant, tuple(shape)), np.dtype(np.uint8))
                n = int(np.prod(shape)) if shape else 1
                out[absmax] = ((quant.nblocks(n, self.quant),), np.dtype(np.float32))
            else:
                out[s] = (tuple(shape), sk)
        return out

    def state_kind(self, param_kind: str) -> str:
        """The storage dtype of the state buffers of a param of ``param_kind``."""
        return precision.resolve_state_kind(self.state_dtype, param_kind, self.master_weights)

    def names_for(self, param_kind: str, expand: bool = True) -> tuple[str, ...]:
        """The state buffer names of a param of ``param_kind``: the rule's, and the master copy
        of a 16-bit param when ``master_weights``; a quantized slot as its two buffers
        (``s.codes``, ``s.absmax``) unless ``expand`` is false."""
        out = self.slots
        master = self.master_name(param_kind)
        if master is not None:
            out = out + (master,)
        if expand and self.quant is not None:
            from ._quantized import names_of

            out = tuple(
                n for s in out for n in (names_of(s) if self.quant_map(s) is not None else (s,))
            )
        return out

    def io_base(self, param_kind: str, grad_kind: str) -> precision.IO:
        """The storage format of a param's launches (without a step's loss-scale extras)."""
        return precision.io_of(
            param_kind,
            grad_kind,
            self.state_kind(param_kind),
            "remainder" if self.remainder and self.master_weights else self.master_weights,
            self.stochastic_rounding,
            quant=self.quant if any(self.quant_map(s) for s in self.slots) else None,
        )


def _MASTER_SPECS(shape: tuple[int, ...]) -> dict[str, Any]:
    """(shape, dtype) of either form of a master a loaded state may hold."""
    return {
        precision.MASTER: (tuple(shape), np.dtype(np.float32)),
        precision.MASTER_REMAINDER: (tuple(shape), np.dtype(np.int16)),
    }


def _loaded_names(st: Mapping[str, Any], kinds: StateKinds, pk: str) -> tuple[str, ...]:
    """The buffer names a loaded state of a ``pk`` param must hold: ``kinds``' own, with the
    master in the form the state holds it (converted at binding, ``_loaded_buffer``)."""
    want = kinds.names_for(pk)
    own = kinds.master_name(pk)
    if own is None:
        return want
    held = next((m for m in kinds.master_names(pk) if m in st), own)
    return tuple(held if n == own else n for n in want)


def _loaded_buffer(st: Mapping[str, Any], s: str, param: Any) -> Any:
    """State buffer ``s`` of a loaded (host) state ``st`` of ``param``: as loaded, or the
    master converted from the other form. A float32 master into a remainder: its split, the
    param written with the split's bfloat16 (which differs from the saved param only where the
    master sits on a tie of nearest-even rounding: one unit further from zero), so that the
    pair holds the loaded master bit for bit; a remainder into a float32 master: joined with
    the param."""
    if s in st:
        return st[s]
    xp = array_module(param)
    if s == precision.MASTER_REMAINDER:
        bits, rem = precision.split_master(st[precision.MASTER])
        param.view(xp.uint16)[...] = xp.asarray(bits.view(np.uint16).reshape(param.shape))
        return rem
    assert s == precision.MASTER, s
    bits = np.asarray(to_numpy(param.view(xp.uint16))).view(precision.bfloat16())
    return precision.join_master(bits, st[precision.MASTER_REMAINDER])


def _quantize_loaded(st: dict[str, Any], kinds: StateKinds, what: str) -> dict[str, Any]:
    """A loaded parameter state with each full-precision slot a quantized policy stores
    quantized (an fp32 state dict, torch's or a float32 optimizer's) as its codes and absmax,
    quantized as a step would store them; anything else as it is."""
    from . import _quantized

    out = dict(st)
    for s, qm in kinds.quantizable:
        codes, absmax = _quantized.names_of(s)
        if s in out and codes not in out and absmax not in out:
            a = out.pop(s)
            if not is_array(a) or dtype_of(a).kind != "f":
                raise TypeError(f"{what}: {s!r} is {describe(a)}; expected a float array")
            a = np.asarray(to_numpy(a), dtype=np.float32)
            assert kinds.quant is not None
            c, m = _quantized.quantize(a, kinds.quant, qm)
            out[codes], out[absmax] = c.reshape(_quantized.codes_shape(kinds.quant, a.shape)), m
    return out


def _check_quant_buffer(name: str, s: str, a: Any, st: Mapping[str, Any], fmt: str) -> None:
    """A loaded quantized slot's buffer: codes uint8 (one-dimensional for a packed format),
    absmax float32 with one scale per block of the codes."""
    from . import _quantized
    from .kernels import quant

    base, part = _quantized.split_name(s)
    if not is_array(a):
        raise TypeError(f"state {s!r} of parameter {name!r} is a {type(a).__name__}")
    packed = fmt in quant.PACKED
    if part == _quantized.CODES:
        ok = dtype_of(a) == np.uint8 and (not packed or len(a.shape) == 1)
        want = "uint8[ceil(n / 2)] codes (two per byte)" if packed else "uint8 codes"
    else:
        codes = st.get(_quantized.names_of(base)[0])
        n = int(np.prod(getattr(codes, "shape", (-1,)))) if is_array(codes) else -1
        n = 2 * n if packed else n  # ceil(2 ceil(n / 2) / 128) = ceil(n / 128)
        nb = quant.nblocks(n, fmt)
        ok = dtype_of(a) == np.float32 and tuple(a.shape) == (nb,)
        want = f"float32[{nb}] (one scale per block of {quant.BLOCKS[fmt]} codes)"
    if not ok:
        raise ValueError(f"state {s!r} of parameter {name!r} is {describe(a)}; expected {want}")


def _block_offsets(
    slots: Mapping[str, Any], fmt: str | None
) -> tuple[dict[str, tuple[int, int]], int]:
    """Per parameter of a ``FlatBuffer`` group (``name -> (offset, size, shape)``, in order):
    its range of blocks in the group's absmax buffers, and the group's number of blocks."""
    from .kernels import quant

    out, b = {}, 0
    for name, (_, size, _) in slots.items():
        out[name] = (b, b + quant.nblocks(size, fmt))
        b += quant.nblocks(size, fmt)
    return out, b


def packed_view(a: Any, off: int, size: int) -> Any:
    """The codes of a parameter at element ``off`` (even: ``FlatBuffer`` segments start on
    ``ALIGN``-byte boundaries of 2- or 4-byte elements) of ``size`` elements in a group's
    packed codes: bytes ``off / 2`` to ``off / 2 + ceil(size / 2)``, which no other parameter
    shares."""
    assert off % 2 == 0, f"a packed parameter's codes start at an odd element {off}"
    return a[off // 2 : off // 2 + -(-size // 2)]


def _fill_value(kinds: StateKinds, name: str, fill: Callable[[str], float]) -> Any:
    """The initial value of state buffer ``name``: a slot's value, a quantized slot's code of
    it and its absmax."""
    from . import _quantized

    base, part = _quantized.split_name(name)
    qm = kinds.quant_map(base) if part is not None else None
    if qm is None:
        return fill(name)
    assert kinds.quant is not None
    code, amax = _quantized.constant(fill(base), kinds.quant, qm)
    return code if part == _quantized.CODES else amax


class OptimizerState:
    """The state buffers, their layout, a pending loaded state and the host state of one
    optimizer (see the module docstring)."""

    def __init__(self) -> None:
        #: name -> {state name -> array} (views into ``flat`` for a FlatBuffer, read-only maps)
        self.arrays: Mapping[str, Any] = {}
        #: ("dict", ((name, shape, dtype), ...)) or ("flat", buf.layout); None before binding
        self.layout: tuple[str, Any] | None = None
        #: name -> (shape, dtype) of the first step; None before binding
        self.shapes: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] | None = None
        #: per FlatBuffer group: {state name -> flat array}
        self.flat: list | None = None
        #: state loaded before the first step (name -> {state name -> host array})
        self.pending: dict | None = None
        #: host state loaded before the first step
        self.pending_host: dict | None = None
        #: the rule's host state ({} without one), created with the state buffers
        self.host: dict | None = None

    # -- reading --------------------------------------------------------------------------------

    @property
    def bound(self) -> bool:
        """Has a first step created the state buffers?"""
        return self.layout is not None

    def host_now(self) -> dict[str, Any] | None:
        """The host state held on the host: the bound one, else a pending one (else None)."""
        return self.host if self.host is not None else self.pending_host

    def names_of(self, name: str, kinds: StateKinds) -> tuple[str, ...]:
        """The state buffer names of bound parameter ``name``."""
        assert self.shapes is not None, "names_of a bound state"
        return kinds.names_for(precision.known_kind(self.shapes[name][1]))

    def snapshot(self, host: Mapping[str, Any] | None) -> dict[str, Any]:
        """The ``state`` of a state dict: host copies of every buffer (a pending state's before
        the first step), and the host state ``host`` as 0-d float32 arrays in each."""
        state = {n: {s: to_numpy(a) for s, a in st.items()} for n, st in self.arrays.items()}
        if self.pending is not None and not state:
            state = {n: {s: a.copy() for s, a in st.items()} for n, st in self.pending.items()}
            host = self.pending_host
        for st in state.values():  # torch's form: 0-d float32 tensors in every parameter's state
            st.update({h: np.array(v, dtype=np.float32) for h, v in (host or {}).items()})
        return state

    # -- checks before a step -------------------------------------------------------------------

    def check_against(
        self, name: str, shape: tuple[int, ...], dtype: Any, kinds: StateKinds, who: str
    ) -> None:
        """Shape/dtype of parameter ``name`` against the bound layout or the loaded state
        (``who``: the optimizer's class name, for messages)."""
        if self.shapes is not None:
            ref = self.shapes[name]
            if (shape, dtype) != ref:
                raise ValueError(
                    f"parameter {name!r} is {dtype_name(dtype)}{list(shape)} but "
                    f"this optimizer was first stepped with "
                    f"{dtype_name(ref[1])}{list(ref[0])}; create a new optimizer "
                    "or load a matching state_dict"
                )
        elif self.pending is not None:
            pk = precision.known_kind(dtype)
            check_names(
                self.pending[name],
                _loaded_names(self.pending[name], kinds, pk),
                f"loaded state buffers of parameter {name!r}",
                f"those {who} keeps for a {pk} parameter",
            )
            specs = dict(_MASTER_SPECS(shape), **kinds.buffers_for(pk, shape))
            for s, a in self.pending[name].items():
                wshape, want = specs[s]
                if a.shape != wshape or a.dtype != want:
                    raise ValueError(
                        f"loaded state {s!r} of parameter {name!r} is "
                        f"{dtype_name(a.dtype)}{list(a.shape)}, but the parameter "
                        f"is {dtype_name(dtype)}{list(shape)}, its state "
                        f"{dtype_name(want)}{list(wshape)}"
                    )

    # -- binding (the first step) ---------------------------------------------------------------

    def _bind_host(self, initial_host: Callable[[], dict[str, Any]]) -> None:
        """The host state, created with the state buffers: the loaded one, else the rule's
        initial values (``initial_host()``)."""
        hs = self.pending_host
        if hs is None:
            hs = initial_host()
        self.host, self.pending_host = dict(hs), None

    def _new_buffers(
        self, name: str, like: Any, kinds: StateKinds, fill: Callable[[str], float]
    ) -> dict[str, Any]:
        xp = array_module(like)
        out = {}
        pending = (self.pending or {}).get(name)
        pk = precision.known_kind(dtype_of(like))
        for s, (shape, dt) in kinds.buffers_for(pk, tuple(like.shape)).items():
            if pending is not None:
                out[s] = xp.asarray(_loaded_buffer(pending, s, like)).reshape(shape).copy()
            elif s == precision.MASTER:
                out[s] = like.astype(np.float32)  # the fp32 copy: exact
            elif s == precision.MASTER_REMAINDER:
                out[s] = xp.zeros(shape, dtype=dt)  # the param is the master's high half: exact
            else:
                out[s] = xp.full(shape, _fill_value(kinds, s, fill), dtype=dt)
        return out

    def bind_dict(
        self,
        layout: tuple[str, Any],
        params: Mapping[str, Any],
        kinds: StateKinds,
        fill: Callable[[str], float],
        initial_host: Callable[[], dict[str, Any]],
    ) -> None:
        """Create the state of the dict API's first step over ``params`` (validated already:
        a pending state's names, shapes and dtypes match): ``fill(slot)`` gives a slot's
        initial value, ``initial_host()`` the rule's initial host state."""
        self._bind_host(initial_host)
        self.arrays = {n: self._new_buffers(n, p, kinds, fill) for n, p in params.items()}
        self.shapes = {n: (shape, np.dtype(dt)) for n, shape, dt in layout[1]}
        self.layout = layout
        self.pending = None

    def bind_flat(
        self,
        buf: FlatBuffer,
        kinds: StateKinds,
        fill: Callable[[str], float],
        initial_host: Callable[[], dict[str, Any]],
    ) -> None:
        """``bind_dict`` for a ``FlatBuffer``: one flat buffer per state per dtype group, and
        per parameter read-only maps of views into them."""
        self._bind_host(initial_host)
        flat_state, state = [], {}
        for group in buf.groups:
            xp = array_module(group.data)
            pk = precision.known_kind(group.dtype)
            specs = kinds.buffers_for(pk, tuple(group.data.shape))
            # a quantized slot's absmax: every parameter's blocks, one after the other
            from .kernels import quant

            bstart, nb = _block_offsets(group.slots, kinds.quant)
            packed = kinds.quant in quant.PACKED
            flat = {
                s: group.data.astype(np.float32)
                if s == precision.MASTER
                else xp.zeros(shape, dtype=dt)  # the param is the master's high half: exact
                if s == precision.MASTER_REMAINDER
                else xp.full(
                    (nb,) if s.endswith(".absmax") and kinds.quant else shape,
                    _fill_value(kinds, s, fill),
                    dtype=dt,
                )
                for s, (shape, dt) in specs.items()
            }
            for name, (off, size, shape) in group.slots.items():
                views = {
                    s: a[bstart[name][0] : bstart[name][1]]
                    if s.endswith(".absmax") and kinds.quant
                    else packed_view(a, off, size)
                    if packed and s.endswith(".codes")
                    else a[off : off + size].reshape(shape)
                    for s, a in flat.items()
                }
                if self.pending is not None:
                    p = group.data[off : off + size].reshape(shape)
                    for s, v in views.items():
                        v[...] = array_module(v).asarray(
                            _loaded_buffer(self.pending[name], s, p).reshape(v.shape)
                        )
                state[name] = ReadOnlyViews(
                    views, f"opt.state[{name!r}] (views into the optimizer's flat state)"
                )
            flat_state.append(flat)
        self.flat = flat_state
        self.arrays = ReadOnlyViews(state, "opt.state of an optimizer stepping a FlatBuffer")
        self.layout = ("flat", buf.layout)
        self.shapes = {n: (tuple(shape), np.dtype(dt)) for dt, n, _, _, shape in buf.layout}
        self.pending = None

    # -- after a step ---------------------------------------------------------------------------

    def advance_host(self, hs_after: dict[str, Any] | None) -> None:
        """After an applied step: the host state it computed (a rule without one keeps {})."""
        if self.host:
            self.host = hs_after

    # -- state dicts ----------------------------------------------------------------------------

    def check_loaded(
        self, state: Any, kinds: StateKinds, spec: Any, who: str
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Check the ``state`` of a state dict against this state (names, shapes, dtypes) and
        the rule ``spec``'s host state; returns ``(buffers, host state)`` as host copies, for
        ``load``. Writes nothing."""
        if not isinstance(state, dict):
            raise TypeError(f"state_dict state is a {type(state).__name__}; expected a dict")
        check_str_names(state, "state_dict parameter names")
        hnames = spec.host_names
        loaded: dict[str, Any] = {}
        hs, first = None, None
        for name, st in state.items():
            if not isinstance(st, dict):
                raise TypeError(
                    f"state of parameter {name!r} is a {type(st).__name__}; "
                    "expected a dict state name -> array"
                )
            if kinds.quant is not None:  # full-precision slots quantized on load
                st = _quantize_loaded(st, kinds, f"state of parameter {name!r}")
            if self.shapes is not None and name in self.shapes:
                want = self.names_of(name, kinds)
            elif kinds.master_weights and (
                precision.MASTER in st or precision.MASTER_REMAINDER in st
            ):  # a 16-bit param's master, in either form: checked and converted at binding
                held = precision.MASTER if precision.MASTER in st else precision.MASTER_REMAINDER
                want = kinds.slots + (held,)
            else:
                want = kinds.slots
            want = kinds.expand(want)
            check_names(
                st, want + hnames, f"state buffers of parameter {name!r}", f"those {who} keeps"
            )
            loaded[name] = {}
            for s in want:
                a = st[s]
                if isinstance(a, np.ndarray):  # a subclass as a plain view; freed memory refused
                    a = as_xp_array(a, f"state {s!r} of parameter {name!r}")
                if kinds.quant is not None and s.endswith((".codes", ".absmax")):
                    _check_quant_buffer(name, s, a, st, kinds.quant)
                elif s == precision.MASTER_REMAINDER:
                    if not is_array(a) or dtype_of(a) != np.int16:
                        raise ValueError(
                            f"state {s!r} of parameter {name!r} is {describe(a)}; expected an "
                            "int16 array (the low half of the fp32 master)"
                        )
                else:
                    check_array(name, f"state {s!r}", a, SUPPORTED_DTYPES)
                loaded[name][s] = np.array(to_numpy(a), copy=True)
            if hnames:
                mine = spec.check_host_state(
                    {h: to_numpy(st[h]) if is_array(st[h]) else st[h] for h in hnames},
                    who=f"host state of parameter {name!r}",
                )
                if hs is None:
                    hs, first = mine, name
                elif mine != hs:
                    raise ValueError(
                        f"host state of parameter {name!r} is {mine} but that of parameter "
                        f"{first!r} is {hs}; {who} steps every parameter with one host state"
                    )
        if self.bound:
            self._check_fits_bound(loaded, kinds, who)
        else:
            for name, st in loaded.items():
                st = {s: a for s, a in st.items() if not s.endswith(".absmax")}
                masters = (precision.MASTER, precision.MASTER_REMAINDER)
                kinds_of = {
                    (a.shape, a.dtype)
                    for s, a in st.items()
                    if s not in masters and not s.endswith(".codes")
                }
                packed = kinds.quant is not None and kinds.quant in precision.PACKED
                kinds_of |= {
                    (a.shape, None) for s, a in st.items() if s.endswith(".codes") and not packed
                }
                if packed and len({a.shape for s, a in st.items() if s.endswith(".codes")}) > 1:
                    shapes = sorted((s, a.shape) for s, a in st.items() if s.endswith(".codes"))
                    raise ValueError(f"codes of parameter {name!r} differ in shape: {shapes}")
                kinds_of |= {(a.shape, None) for s, a in st.items() if s in masters}
                if (
                    len({shape for shape, _ in kinds_of}) > 1
                    or len({d for _, d in kinds_of} - {None}) > 1
                ):
                    got = sorted((s, a.dtype.name, a.shape) for s, a in st.items())
                    raise ValueError(
                        f"state buffers of parameter {name!r} differ in shape or dtype: {got}"
                    )
        return loaded, hs

    def _check_fits_bound(self, loaded: dict[str, Any], kinds: StateKinds, who: str) -> None:
        check_names(loaded, self.arrays, "state_dict parameter names", "those this optimizer steps")
        for name, st in loaded.items():
            cur_st = self.arrays[name]
            # this parameter's own names (a 16-bit one keeps a master copy, an fp32 one not)
            check_names(
                cur_st,
                self.names_of(name, kinds),
                f"state buffers of parameter {name!r}",
                f"those {who} keeps",
            )
            for s, a in st.items():
                cur = cur_st[s]
                if not is_array(cur) or a.shape != tuple(cur.shape) or a.dtype != dtype_of(cur):
                    raise ValueError(
                        f"state {s!r} of parameter {name!r} is "
                        f"{dtype_name(a.dtype)}{list(a.shape)}, expected {describe(cur)}"
                    )
                check_writable(name, f"state {s!r}", cur)

    def load(self, loaded: dict[str, Any], hs: dict[str, Any] | None) -> None:
        """Apply what ``check_loaded`` returned: into the bound buffers, or kept pending for the
        first step."""
        if self.bound:
            for name, st in loaded.items():
                for s, a in st.items():
                    cur = self.arrays[name][s]
                    cur[...] = array_module(cur).asarray(a)
            self.host = hs if hs is not None else self.host
        else:
            self.pending = loaded if loaded else None
            self.pending_host = hs
