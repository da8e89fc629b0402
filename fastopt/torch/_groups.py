"""The param groups of a ``fastopt.torch`` optimizer: their hyperparameters, the precision
keywords, and where each group steps.

``ParamGroups`` is the base of ``FusedOptimizer`` (``_optimizer``): the class attributes every
generated class sets (``_classes._make``: the fastopt class, whether torch keeps a step count)
and the per-instance precision settings (``_check_precision``), a group's rule hyperparameters
(``_rule_hp``, checked at construction and by ``add_param_group``; ``_group_hp`` for a step),
the state's storage dtype (``_state_kind``) and stochastic rounding (``_sr``, ``_key_step``),
and the backend a device's tensors are stepped by (``_backend_module``), with whether it
computes the group's step counts and scalars on the device (``_device_scalars``)."""

import math
from typing import Any

import numpy as np
import torch

from .. import _capture, precision
from ..backends import get_backend
from ..kernels import RULES, storage
from ._compat import hp_value

#: torch dtypes the kernels run on, and their storage kinds (``kernels.storage``)
_KINDS = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
#: the torch dtype of a storage kind
_TORCH = {v: k for k, v in _KINDS.items()}
#: (rule, its bool hyperparameters) -> can the device compute its scalars (``_device_scalars``)
_DEVICE_RULES: dict[Any, bool] = {}
#: how errors name the remainder form of master weights (``_master``)
_REM = "master_weights='remainder'"


class ParamGroups(torch.optim.Optimizer):
    """The param groups, hyperparameters, precision settings and backends of a
    ``FusedOptimizer`` (the module docstring)."""

    #: the fastopt class (set on each generated class, ``_make``)
    _fastopt: Any = None
    #: torch keeps a step count for the rule (no fresh slot), set by ``_make``
    _keeps_step: bool = True

    #: the precision settings (``_check_precision``; set per instance by the generated
    #: constructors, these defaults serve optimizers pickled before they existed)
    master_weights: bool | str = False
    state_dtype: str | None = None
    stochastic_rounding: bool = False
    seed: int = 0
    #: the ``backend=`` keyword (``FusedOptimizer.__init__``)
    backend: str

    # -- hyperparameters -------------------------------------------------------------------------
    @classmethod
    def _rule_hp(cls, group):
        """The rule's hyperparameters of a param group (tensor lr as a float; the class's
        pinned values; torch's ``decoupled_weight_decay`` when the group carries it)."""
        fo = cls._fastopt
        spec = RULES[fo._rule]
        hp = {}
        for h in spec.hyper_names:
            if h in fo._pinned:
                hp[h] = fo._pinned[h]
            elif h in group:
                hp[h] = hp_value(h, group[h])  # tensor lr, betas, ... as floats
        return spec.validate(hp)

    def _check_group(self, group, what):
        try:
            hp = type(self)._rule_hp(group)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{type(self).__name__}: {what}: {exc}") from None
        if group.get("capturable"):
            _check_capturable(type(self), hp, what)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = dict(self.defaults, **{k: v for k, v in param_group.items() if k != "params"})
        self._check_group(merged, "a param group")
        if self.master_weights == "remainder":  # float16 params refused before any is added
            ps = param_group.get("params")
            if ps is not None and not isinstance(ps, (torch.Tensor, set)):
                ps = param_group["params"] = list(ps)  # a generator is read once
            for p in [ps] if isinstance(ps, torch.Tensor) else ps or ():
                if isinstance(p, torch.Tensor) and p.dtype is torch.float16:
                    precision.check_remainder_param("float16", f"{type(self).__name__}: {_REM}")
        super().add_param_group(param_group)

    def _group_hp(self, index, group):
        """``_rule_hp`` of a param group; the learning rate of a group whose scalars live on
        the device (``_device_scalars``), held in a device tensor, is read once (its first
        step) and never again: the step copies it into the device scalars on the device
        (``_device.DeviceLaunch``)."""
        lr = group.get("lr")
        if self._device_tensor(lr) and self._device_scalars(group, lr.device):
            seen = self.__dict__.setdefault("_lr_seen", {})
            key = (index, id(lr))
            if key not in seen:
                seen.clear() if len(seen) > 64 else None
                seen[key] = float(lr)
            return type(self)._rule_hp(dict(group, lr=seen[key]))
        return type(self)._rule_hp(group)

    # -- state -----------------------------------------------------------------------------------
    def _state_kind(self, param_dtype, master, label=None):
        """The storage dtype name of the state buffers of a parameter of ``param_dtype``
        (``precision.resolve_state_kind``: ``state_dtype``, else the parameter's dtype, float32
        beside a master copy); TypeError (naming ``label``) for bfloat16 state of float64
        parameters."""
        from ..precision import resolve_state_kind

        try:
            return resolve_state_kind(self.state_dtype, _KINDS[param_dtype], master)
        except TypeError as exc:
            raise TypeError(f"{label or type(self).__name__}: {exc}") from None

    def _sr(self, param_dtype, master):
        """Does a launch of ``param_dtype`` parameters round their stores stochastically?"""
        return self.stochastic_rounding and param_dtype is torch.bfloat16 and not master

    def _key_step(self, index, t=None):
        """The step that stochastic rounding's key hashes (``storage.step_key(seed, step)``):
        the parameters' step count ``t`` where torch keeps one; else (SGD) the steps this
        optimizer object took for param group ``index`` plus one (a count torch's state has no
        place for: it restarts with a new object), so every step draws new random bits.
        None for a cached launch of a rule with step counts (its own count)."""
        if type(self)._keeps_step:
            return t
        return self.__dict__.get("_key_steps", {}).get(index, 0) + 1

    # -- backends: where a group steps -------------------------------------------------------------
    def _device_scalars_only(self):
        """Does every parameter with a gradient sit in a group whose scalars are computed on
        its device (``_device_scalars``)? Then the step reads ``grad_scale`` and ``found_inf``
        in its kernels."""
        seen = False
        for group in self.param_groups:
            devices = {p.device for p in group["params"] if p.grad is not None}
            if any(not self._device_scalars(group, d) for d in devices):
                return False
            seen = seen or bool(devices)
        return seen

    def _device_scalars(self, group, device):
        """Does ``group`` step on ``device`` with its step counts and scalars on the device?
        On a GPU backend that computes scalars there (``_on_device``): a ``capturable=True``
        group, and any group whose rule and flags the device can compute (as torch's fused
        optimizers keep their step counts on the device); RAdam and Adan through their device
        variant (``Rule.device_flags``, ``device_scalars.trace(..., select=True)``); not ASGD."""
        if not self._on_device(device):
            return False
        if group.get("capturable"):
            return True
        cls = type(self)
        fo = cls._fastopt
        spec = RULES[fo._rule]
        flags = tuple(
            bool(fo._pinned[h.name] if h.name in fo._pinned else group.get(h.name, h.default))
            for h in spec.hyper
            if h.domain == "bool"
        )
        key = (spec.name, flags)
        ok = _DEVICE_RULES.get(key)
        if ok is None:
            from ..kernels import device_scalars

            hp = spec.validate(
                dict(spec.defaults, **{h.name: f for h, f in zip(_bools(spec), flags)})
            )
            ok = _DEVICE_RULES[key] = device_scalars.capturable(spec.name, hp, select=True)
        return ok

    def _device_tensor(self, x):
        """A tensor on a device whose step reads it in its kernels (``_on_device``)."""
        return isinstance(x, torch.Tensor) and self._on_device(x.device)

    def _on_device(self, device):
        """Does ``device``'s backend launch tables and compute scalars on the device?"""
        be = self._backend_module(device)
        return hasattr(be, "launch_table") and _capture.supports(be)

    def _backend_module(self, device):
        """The backend module that steps tensors on ``device``."""
        return get_backend(self._backend_for(device))

    def _table_backend(self, device):
        """The backend module of ``device`` when it launches multi-tensor tables, else None."""
        be = self._backend_module(device)
        return be if hasattr(be, "launch_table") else None

    def _backend_for(self, device):
        if self.backend != "auto":
            return self.backend
        return "cupy" if device.type == "cuda" else "numba"


def _check_precision(who, master_weights, state_dtype, stochastic_rounding, seed):
    """``(master_weights, state_dtype, stochastic_rounding, seed)`` checked as the core's
    optimizers check them (``base.Optimizer._set_precision``, ``precision.check_state_dtype``):
    ``master_weights`` False, True or "remainder" (``_master``); ``state_dtype`` one the core
    accepts: a storage dtype of the kernels
    (``kernels.storage.KINDS``: the state tensors are plain torch tensors of it) or a quantized
    format (``_quantized``: codes and block scales)."""
    from .. import precision

    try:
        master_weights = precision.check_master_weights(master_weights)
    except TypeError as exc:
        raise TypeError(f"{who}: {exc}") from None
    if not isinstance(stochastic_rounding, (bool, np.bool_)):
        raise TypeError(
            f"{who}: invalid stochastic_rounding={stochastic_rounding!r}; expected True or False"
        )
    try:
        sd = precision.check_state_dtype(state_dtype)
    except ValueError as exc:
        raise ValueError(f"{who}: {exc}") from None
    if sd is not None and sd not in storage.KINDS and sd not in precision.QUANTIZED:
        raise NotImplementedError(f"{who}: state_dtype={sd!r} is not kept by fastopt.torch")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{who}: invalid seed={seed!r}; expected an integer in [0, 2**32)")
    if not 0 <= int(seed) < 1 << 32:
        raise ValueError(f"{who}: invalid seed={seed!r}; expected an integer in [0, 2**32)")
    if master_weights and stochastic_rounding:
        raise ValueError(
            f"{who}: stochastic_rounding=True rounds bfloat16 params that have no master copy; "
            f"with master_weights={master_weights!r} each param is stored from its fp32 master: "
            "choose one"
        )
    return master_weights, sd, bool(stochastic_rounding), int(seed)


def _check_max_norm(max_grad_norm, who):
    """``max_grad_norm`` as a float (None: no clipping): finite and > 0."""
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(f"{who}: max_grad_norm={max_grad_norm!r}; expected a number or None")
    v = float(max_grad_norm)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{who}: max_grad_norm={v}; expected a finite number > 0")
    return v


def _bools(spec):
    """The rule's bool hyperparameters."""
    return [h for h in spec.hyper if h.domain == "bool"]


def _check_capturable(cls, hp, what):
    """A ``capturable=True`` group needs a rule whose host scalars the device computes
    (``kernels.device_scalars``: not one whose variant depends on the step or host state)."""
    from ..kernels import device_scalars

    spec = RULES[cls._fastopt._rule]
    try:
        device_scalars.trace(spec.name, hp, select=True)
    except device_scalars.NotCapturable as exc:
        raise NotImplementedError(f"{cls.__name__}(capturable=True): {what}: {exc}") from None
