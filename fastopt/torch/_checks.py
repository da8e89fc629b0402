"""The checks of one parameter of a ``fastopt.torch`` step, before anything is written
(``_plan.Planner._plan_group``; the memory itself: ``_memory``): its tensor and gradient
(``_check_param``), the keys its state must hold (``_check_keys``), its step count
(``_step_of``) and host state (``_host_state``); and the step's loss scale (``_inv_scale``)."""

import math

import torch

from ..kernels.spec import host_precision, host_round
from ._groups import _KINDS
from ._memory import check_backed, check_written, plain_type


def _inv_scale(grad_scale, who):
    """1/grad_scale, or None without a loss scale. A scale of zero (GradScaler's scale
    underflowed), negative or non-finite is refused before anything is written: torch's fused
    Adam divides by it and steps every parameter to inf/NaN."""
    if grad_scale is None:
        return None
    v = float(grad_scale)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(
            f"{who}: grad_scale is {v}; expected a finite loss scale > 0 (a GradScaler whose "
            "scale underflowed to 0?); nothing was stepped"
        )
    return 1.0 / v


def _check_param(p, g, label, entries):
    """Refuse a parameter or gradient a kernel cannot step in place (``_memory``), adding both
    to the overlap ``entries``; returns the gradient to read: ``g`` itself, or a contiguous
    copy of a strided, expanded or lazily negated one (read once, never written back, as torch
    reads it)."""
    span = check_written(p, label)
    if p.dtype not in _KINDS:
        raise TypeError(
            f"{label} is {p.dtype}; fastopt.torch steps "
            f"{', '.join(str(d) for d in _KINDS)} parameters"
        )
    glabel = (label, ".grad")
    if not plain_type(g):
        check_backed(g, glabel)  # names the subclass
    if g.layout is not torch.strided:
        raise RuntimeError(f"{label}: fastopt.torch does not support sparse gradients")
    if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
        raise ValueError(
            f"{label}: its gradient is {g.dtype}{list(g.shape)} on {g.device}, the parameter "
            f"{p.dtype}{list(p.shape)} on {p.device}; expected them alike"
        )
    entries.append((label, p, True, span))
    entries.append((glabel, g, False, check_backed(g, glabel, read_only=True)))
    if not g.is_meta and (g.is_neg() or not g.is_contiguous()):
        g = g.resolve_neg().contiguous()
    return g


def _check_keys(state, need, label):
    """A parameter's existing state holds what its step reads (``need``: the step count where
    torch keeps one, every state buffer of the variant that is not made on step 1, the host
    state). torch.optim raises KeyError for these too (at load for ``step``, in its step for a
    buffer); recreating them would step from the wrong count or from zeros."""
    for n in need:
        if n not in state:
            missing = [x for x in need if x not in state]
            raise KeyError(
                f"{label}: its state has no {', '.join(map(repr, missing))} (keys "
                f"{sorted(state)}); a state dict edited or from another optimizer? (torch.optim "
                "raises KeyError too)"
            )


def _step_of(s, label, entries):
    """A parameter's step count as an int: a 0-d real tensor holding a whole number >= 0 (a
    fractional, negative, inf or NaN count is refused: torch.optim would step on with it, here
    each step's host scalars and the launches' grouping are keyed on whole counts). Added to
    the overlap ``entries`` unless None (a count made just now)."""
    if entries is not None:
        if not isinstance(s, torch.Tensor) or not plain_type(s):
            raise TypeError(
                f"{label}: state 'step' is {s!r}; expected a 0-d tensor (load_state_dict "
                "converts a number, as torch.optim does)"
            )
        dt = s.dtype
        if s.numel() != 1 or dt.is_complex or dt is torch.bool or s.is_meta:
            raise ValueError(
                f"{label}: state 'step' is {s.dtype}{list(s.shape)} on {s.device}; expected a "
                "0-d real tensor"
            )
        lbl = (label, "state 'step'")
        entries.append((lbl, s, True, check_written(s, lbl)))
    v = float(s)
    if not (math.isfinite(v) and v >= 0 and v == int(v)):
        raise ValueError(
            f"{label}: state 'step' is {v}; expected a whole number >= 0 (torch.optim steps on "
            "with a non-finite or fractional count; fastopt.torch refuses it, nothing stepped)"
        )
    return int(v)


def _host_state(state, spec, label, entries, what):
    """A parameter's host state (NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``): 0-d real
    tensors holding finite values, each added to the overlap ``entries`` unless None (host state
    made just now). Returns ``(values, wide)``: the values in ``spec.host_names`` order, rounded
    to the host state's dtype, and whether that is float64 (torch's load policy widens 0-d
    state to a float64 parameter's dtype, and torch then advances it in float64)."""
    ts = [state[n] for n in spec.host_names]
    if entries is not None:
        for name, t in zip(spec.host_names, ts):
            if not isinstance(t, torch.Tensor) or not plain_type(t):
                raise TypeError(
                    f"{label}: state {name!r} is {t!r}; expected a 0-d tensor (load_state_dict "
                    "converts a number, as torch.optim does)"
                )
            if t.numel() != 1 or not t.dtype.is_floating_point or t.is_meta:
                raise ValueError(
                    f"{label}: state {name!r} is {t.dtype}{list(t.shape)} on {t.device}; "
                    "expected a 0-d floating-point tensor"
                )
            lbl = (label, what[name])
            entries.append((lbl, t, True, check_written(t, lbl)))
    wide = any(t.dtype is torch.float64 for t in ts)
    values = []
    with host_precision(wide):
        for name, t in zip(spec.host_names, ts):
            v = float(t)
            if not math.isfinite(v):
                raise ValueError(
                    f"{label}: state {name!r} is {v}; expected a finite number (torch.optim would "
                    "step on with it; nothing stepped)"
                )
            values.append(host_round(v))
    return tuple(values), wide
