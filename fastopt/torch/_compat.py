"""``torch.optim``'s contract around the step: pickling, legacy state dicts, the load policy of
state dtypes, tensor hyperparameters and ``torch.compile``.

``TorchContract`` is a mixin of ``FusedOptimizer`` (``fastopt/torch/_optimizer.py``):

- ``__getstate__``/``__setstate__``: torch keeps ``defaults``, ``state`` and ``param_groups``;
  fastopt's own options (``backend``, ``master_weights``) travel too, so ``copy.deepcopy`` and
  ``pickle`` give an optimizer that steps as the original. Caches of tensor addresses (the
  steady launches) never travel.
- Legacy state dicts are upgraded as the ``torch.optim`` counterpart's ``__setstate__``
  upgrades them: each group gains the keys torch fills in (``maximize``, ``foreach``,
  ``decoupled_weight_decay``, ...; the values found by running torch's own ``__setstate__``
  on a bare group, ``legacy_group_defaults``), with the class's pinned values on top; a step
  count or a host-state scalar saved as a Python number becomes a 0-d tensor of torch's scalar
  dtype.
- ``load_state_dict`` checks the state dict against the optimizer before anything is written
  (the group count and sizes, every group's hyperparameters, and per parameter: the state
  buffers' shapes, the step count and the host state), then lets torch load it. torch casts
  every floating state tensor to its parameter's dtype; beside an fp32 master copy
  (``master_weights=True``) that would round the master and the moments to 16 bits, so for a
  parameter whose saved state holds ``master_param`` the float32 master and host state keep
  float32; and every state buffer is converted from its saved value to the dtype the optimizer
  keeps it in (``state_dtype=``, else the parameter's dtype, float32 beside a master copy:
  ``state_keeps``), whatever dtype it was saved in, so a state dict of ``torch.optim`` loads
  into ``state_dtype="bfloat16"`` (rounded to nearest even once) and the reverse (widened
  exactly). Everything else follows torch's policy, which also widens 0-d host
  state to a float64 parameter's dtype (NAdam's ``mu_product``): the step then advances it in
  float64, as torch does (``FusedOptimizer._plan_group`` computes it under
  ``kernels.spec.host_precision``).
- ``hp_value``: tensor hyperparameters (``lr``, ``betas``, ``weight_decay``, ...) as the rule
  takes them, 1-element as torch requires.
"""

from __future__ import annotations

import copy
import functools
import math
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch

from ..kernels import RULES
from ..precision import MASTER, MASTER_REMAINDER
from . import _quantized

__all__ = [
    "TorchContract",
    "hp_value",
    "legacy_group_defaults",
]

#: instance attributes that are fastopt's options (not torch's): they travel with pickles
OPTIONS = (
    "backend",
    "master_weights",
    "max_grad_norm",
    "state_dtype",
    "stochastic_rounding",
    "seed",
)
#: their values in an optimizer pickled before they existed
OPTION_DEFAULTS = ("auto", False, None, None, False, 0)


def hp_value(name: str, value: Any) -> Any:
    """A hyperparameter as the rule takes it: a tensor (1-element, as torch requires) as its
    float, a pair holding tensors as a pair of floats; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {list(value.shape)}")
        if value.is_complex():
            raise TypeError(f"Tensor {name} must be real, got {value.dtype}")
        return value.item()
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(hp_value(f"{name}[{i}]", v) for i, v in enumerate(value))
    return value


def scalar_dtype() -> torch.dtype:
    """torch's dtype of step counts and host state (``optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@functools.cache
def legacy_group_defaults(cls: Any) -> dict[str, Any]:
    """The group keys ``cls``'s torch counterpart fills into a legacy state dict on load, with
    their values: found by running torch's own ``__setstate__`` over a bare group. The class's
    pinned values (Nesterov's ``nesterov=True``) stand over torch's. Empty without a
    counterpart (Lion)."""
    from .._torch_names import torch_name as _torch_name

    fo = cls._fastopt
    name = _torch_name(fo)
    out = {}
    if name is not None:
        tcls = getattr(torch.optim, name)
        probe = tcls([torch.nn.Parameter(torch.zeros(1))])
        probe.__setstate__({"state": {}, "param_groups": [{"params": []}]})
        out = {k: v for k, v in probe.param_groups[0].items() if k != "params"}
    out.update({k: v for k, v in fo._pinned.items() if k in out})
    return out


def upgrade(cls: Any, groups: list[dict[str, Any]], state: Any) -> None:
    """Upgrade ``groups`` and ``state`` (a state dict's, keyed like them) in place as torch's
    counterpart does: missing group keys filled in, Python-number step counts and host state
    as 0-d tensors of torch's scalar dtype."""
    for group in groups:
        for k, v in legacy_group_defaults(cls).items():
            group.setdefault(k, copy.copy(v))
    names = ("step", *RULES[cls._fastopt._rule].host_names)
    for st in state.values():
        if not isinstance(st, dict):
            continue
        for n in names:
            v = st.get(n)
            if v is not None and not isinstance(v, torch.Tensor):
                st[n] = torch.tensor(float(v), dtype=scalar_dtype())


def _number(v: object) -> float | None:
    """``v`` as a float if it is a real number or a 1-element real tensor, else None."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_complex() or v.dtype is torch.bool:
            return None
        if not v.is_meta and v.layout is torch.strided:
            # its one element must lie inside its storage before it is read (a storage freed
            # by resize_ would be read past its end)
            need = (v.storage_offset() + 1) * v.element_size()
            if v.untyped_storage().nbytes() < need:
                raise ValueError(
                    f"a 1-element {v.dtype} tensor in the state dict has a storage of "
                    f"{v.untyped_storage().nbytes()} bytes; its element needs {need} (a storage "
                    "freed or shrunk with resize_?)"
                )
        return float(v.detach().reshape(()).to("cpu", torch.float64).item())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:  # an int past float's range (step = 10**400)
        return math.inf


def check_state_dict(opt: Any, state_dict: dict[str, Any]) -> dict[Any, torch.Tensor]:
    """Refuse (ValueError/TypeError, nothing written) a state dict ``opt`` cannot step from: a
    group count or size unlike ``opt``'s, a group hyperparameter outside its domain, and per
    parameter a state buffer or master copy shaped unlike its parameter, a step count or host
    scalar that is not a finite real number, or missing (KeyError, as torch's counterpart
    raises at load). Returns the map saved id -> parameter."""
    cls: Any = type(opt)
    spec = RULES[cls._fastopt._rule]
    saved = state_dict.get("param_groups")
    state = state_dict.get("state")
    if not isinstance(saved, (list, tuple)) or not isinstance(state, dict):
        raise TypeError(
            f"{cls.__name__}.load_state_dict: expected a dict with 'state' (a dict) and "
            "'param_groups' (a list)"
        )
    if len(saved) != len(opt.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    for g, s in zip(opt.param_groups, saved):
        if not isinstance(s, dict) or len(s.get("params", ())) != len(g["params"]):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of "
                "optimizer's group"
            )
    defaults = legacy_group_defaults(cls)
    for i, s in enumerate(saved):
        merged = {**opt.defaults, **defaults, **{k: v for k, v in s.items() if k != "params"}}
        opt._check_group(merged, f"param group {i} of the loaded state dict")
    id_map = dict(
        zip(
            chain.from_iterable(s["params"] for s in saved),
            chain.from_iterable(g["params"] for g in opt.param_groups),
        )
    )
    buffers = (*spec.state, "master_param")
    scalars = ("step", *spec.host_names)
    required = (("step",) if cls._keeps_step else ()) + spec.host_names
    for key, st in state.items():
        p = id_map.get(key)
        if p is None:
            continue  # torch keeps state of unknown ids as it is
        if not isinstance(st, dict):
            raise TypeError(f"state of parameter {key!r} is a {type(st).__name__}; expected a dict")
        _quantized.check_loaded(opt, key, st, p)  # codes and block scales
        _check_remainder(opt, key, st, p)
        for name in buffers:
            buf = st.get(name)
            if buf is None:
                continue
            if not isinstance(buf, torch.Tensor) or not buf.is_floating_point():
                raise TypeError(
                    f"state {name!r} of parameter {key!r} is {_describe(buf)}; expected a "
                    "floating-point tensor"
                )
            if buf.shape != p.shape:
                raise ValueError(
                    f"state {name!r} of parameter {key!r} has shape {list(buf.shape)}; its "
                    f"parameter has {list(p.shape)} (a state dict of another model?)"
                )
        for name in scalars:
            if name not in st:
                if st and name in required:
                    # torch's counterpart reads it at load too (its __setstate__): KeyError
                    raise KeyError(
                        f"{cls.__name__}.load_state_dict: the state of parameter {key!r} has "
                        f"no {name!r} (keys {sorted(st)}); torch.optim raises KeyError for it "
                        "at load too"
                    )
                continue
            v = _number(st[name])
            if v is None or not math.isfinite(v) or (name == "step" and v < 0):
                raise ValueError(
                    f"state {name!r} of parameter {key!r} is {_describe(st[name])}; expected a "
                    f"finite real number{' >= 0' if name == 'step' else ''} (or a 1-element "
                    "tensor of one)"
                )
    return id_map


def _check_remainder(opt: Any, key: Any, st: dict[str, Any], p: torch.Tensor) -> None:
    """A saved ``master_remainder`` (``_master``) is an int16 tensor shaped like its
    parameter, which is bfloat16, and the only master of the state."""
    rem = st.get(MASTER_REMAINDER)
    if rem is None:
        return
    who = f"{type(opt).__name__}.load_state_dict"
    if not isinstance(rem, torch.Tensor) or rem.dtype is not torch.int16 or rem.shape != p.shape:
        raise ValueError(
            f"{who}: state {MASTER_REMAINDER!r} of parameter {key!r} is {_describe(rem)}; "
            f"expected int16{list(p.shape)} (the low half of its fp32 master)"
        )
    if p.dtype is not torch.bfloat16:
        raise ValueError(
            f"{who}: state {MASTER_REMAINDER!r} of parameter {key!r} is the low half of a "
            f"bfloat16 parameter's fp32 master; the parameter is {p.dtype}"
        )
    if MASTER in st:
        raise ValueError(
            f"{who}: the state of parameter {key!r} has both {MASTER!r} and "
            f"{MASTER_REMAINDER!r}; expected one form of its master"
        )


def _describe(v: object) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {list(v.shape)}"
    return repr(v) if isinstance(v, (int, float)) else f"a {type(v).__name__}"


def state_keeps(
    opt: Any, state_dict: dict[str, Any], id_map: dict[Any, torch.Tensor]
) -> dict[torch.Tensor, dict[str, torch.Tensor | None]]:
    """``{param: {key: tensor}}``: the saved tensors that must not take torch's load policy
    (a cast to the parameter's dtype), converted from the saved values themselves:

    - every state buffer, to the storage dtype ``opt`` keeps it in for that parameter
      (``FusedOptimizer._state_kind``: ``state_dtype=``, else the parameter's dtype, float32
      beside a master copy), whatever dtype it was saved in (a float32 moment of
      ``torch.optim`` loaded with ``state_dtype="bfloat16"`` is rounded to nearest even once);
    - with a saved master copy (a 16-bit parameter), the master in float32 and the host state
      that was saved in float32; a saved remainder (``master_remainder``) as its int16; a
      bfloat16 parameter of a ``master_weights="remainder"`` optimizer's state buffers in
      float32 whatever the state holds (it gets a remainder at its next step: ``_master``);
    - with quantized state (``_quantized.load_keeps``): each slot's codes and float32 block
      scales as saved, a full-precision slot quantized as a step would store it (its float key
      mapped to None: dropped)."""
    spec = RULES[type(opt)._fastopt._rule]
    bits16 = (torch.float16, torch.bfloat16)
    keep: dict[torch.Tensor, dict[str, torch.Tensor | None]] = {}
    for key, st in state_dict["state"].items():
        p = id_map.get(key)
        if p is None or not isinstance(st, dict) or not p.is_floating_point():
            continue
        # a master in the state (either form), or one a remainder optimizer will make
        master = p.dtype in bits16 and (
            MASTER in st
            or MASTER_REMAINDER in st
            or (opt.master_weights == "remainder" and p.dtype is torch.bfloat16)
        )
        try:
            want = _STORAGE[opt._state_kind(p.dtype, master)]
        except (KeyError, TypeError):
            continue  # a dtype fastopt does not step, bfloat16 state of float64: the step says
        # torch's cast is right only where both the saved and the kept dtype are the param's
        kept: dict[str, torch.Tensor | None] = {
            n: st[n].to(device=p.device, dtype=want)
            for n in spec.state
            if isinstance(st.get(n), torch.Tensor)
            and st[n].is_floating_point()
            and not (st[n].dtype is p.dtype and want is p.dtype)
        }
        kept.update(_quantized.load_keeps(opt, st, p))  # None: a key not kept
        if isinstance(st.get(MASTER_REMAINDER), torch.Tensor):  # int16, as saved
            kept[MASTER_REMAINDER] = st[MASTER_REMAINDER].to(device=p.device)
        if master:
            kept.update(
                {
                    n: st[n]
                    for n in ("master_param", *spec.host_names)
                    if isinstance(st.get(n), torch.Tensor) and st[n].dtype is torch.float32
                }
            )
        if kept:
            keep[p] = kept
    return keep


#: torch dtypes of the storage kinds
_STORAGE = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


if TYPE_CHECKING:  # the class it is mixed into
    _Optimizer = torch.optim.Optimizer
else:
    _Optimizer = object


class TorchContract(_Optimizer):
    """The mixin of ``FusedOptimizer`` that keeps ``torch.optim``'s contract around the step
    (see the module docstring)."""

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in OPTIONS:
            if name in self.__dict__:
                state[name] = self.__dict__[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        keep = self.__dict__.pop("_load_keep", None)
        super().__setstate__(state)
        self.__dict__.pop("_steady", None)  # cached addresses belong to the old tensors
        for name, default in zip(OPTIONS, OPTION_DEFAULTS):
            self.__dict__.setdefault(name, default)
        upgrade(type(self), self.param_groups, self.state)
        if keep:  # torch's load cast them to 16 bits: the saved float32 values instead
            for p, kept in keep.items():
                st = self.state.get(p)
                if st is None:
                    continue
                for n, v in kept.items():
                    if v is None:  # a full-precision slot kept quantized (``_quantized``)
                        st.pop(n, None)
                        continue
                    st[n] = v.to(device=p.device if v.dim() else v.device, copy=False)

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, after the checks of ``check_state_dict`` (on the state
        dict as the pre-hooks leave it), the state buffers converted to the dtypes this
        optimizer keeps them in and fp32 master state kept in float32 (``state_keeps``)."""

        def check(opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
            sd = dict(sd)
            sd["param_groups"] = [dict(g) for g in sd.get("param_groups", ())]
            id_map = check_state_dict(opt, sd)
            opt.__dict__["_load_keep"] = state_keeps(opt, sd, id_map)
            return sd

        handle = self.register_load_state_dict_pre_hook(check)  # last: after the user's
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
            self.__dict__.pop("_load_keep", None)
