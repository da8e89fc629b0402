"""The optimizer classes, generated from the rule specs (``kernels/<name>.py``).

Every rule of ``kernels.RULES`` gives one class, ``fastopt.<Rule.class_name>``
(``optimizer_class``): its constructor takes the rule's hyperparameters under their names, with
their defaults and type annotations (positional in the spec's order, then keyword-only after
``*`` the ones the spec marks so, as torch's ``maximize``), then ``backend`` and ``nonfinite``
(``base.Optimizer`` adds the mixed-precision keywords); its docstring is the rule module's, with
the defaults. Each class holds hyperparameters and state; the math runs in
``fastopt.functional`` (host scalars) and ``kernels/`` (the per-element rule). ``t`` counts
steps from 1. With ``maximize=True`` the gradient is negated first.

What cannot be derived from a spec is written here: the classes that pin some of a rule's
hyperparameters or change its defaults (``DERIVED``: Momentum, Nesterov, AdamW) and the aliases
(``ALIASES``: Adagrad, RMSprop). ``CLASSES`` lists every class by its own name (aliases left out),
in the order of ``kernels.MODULES``, each derived class after its rule's.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from collections.abc import Mapping
from typing import Any, Protocol

from .base import Optimizer
from .kernels import RULES
from .kernels.spec import check_value

_P = inspect.Parameter
#: the core's own keywords, after the hyperparameters
_OWN = (
    _P("backend", _P.KEYWORD_ONLY, default="auto", annotation=str),
    _P("nonfinite", _P.KEYWORD_ONLY, default=None, annotation=str | None),
)

#: per rule: the classes derived from its class (each subclasses it), with what sets them apart:
#: ``pinned`` hyperparameters (not in the signature), other ``defaults``, narrower ``domains``
#: (checked at construction) and their docstring (the defaults are appended)
DERIVED: dict[str, tuple[dict[str, Any], ...]] = {
    "sgd": (
        dict(
            name="Momentum",
            pinned={"nesterov": False},
            defaults={"lr": 0.01, "momentum": 0.9},
            domains={"momentum": "positive"},
            doc="""SGD with heavy-ball momentum (textbook: ``v = μv − ηg; p += v``), as PyTorch.

                b = μ·b + g;  p = p − lr·b      (b = g on the first step)

            Same trajectory as the textbook form at constant lr (``torch.optim.SGD`` with
            ``momentum > 0``).""",
        ),
        dict(
            name="Nesterov",
            pinned={"nesterov": True, "dampening": 0.0},
            defaults={"lr": 0.01, "momentum": 0.9},
            domains={"momentum": "positive"},
            doc="""Nesterov accelerated gradient, in PyTorch's form.

                b = μ·b + g;  p = p − lr·(g + μ·b)      (b = g on the first step)

            ``torch.optim.SGD`` with ``nesterov=True``.""",
        ),
    ),
    "adam": (
        dict(
            name="AdamW",
            pinned={"decoupled_weight_decay": True},
            defaults={"weight_decay": 1e-2},
            doc="""AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay.

                p = p · (1 − lr·wd)      then Adam without the L2 term

            ``torch.optim.AdamW``: the decay is scaled by lr.""",
        ),
    ),
}


class OptimizerClass(Protocol):
    """A class of ``CLASSES`` as a type checker sees it: generated from the spec, its
    keywords (the rule's hyperparameters, ``backend``, ...) are checked when it is called, and
    it returns an ``Optimizer``."""

    __name__: str

    def __call__(self, *args: Any, **kwargs: Any) -> Optimizer: ...


#: other names of some classes (torch.optim's spelling)
ALIASES = {"Adagrad": "AdaGrad", "RMSprop": "RMSProp"}


def _signature(
    spec: Any, pinned: Mapping[str, Any], defaults: Mapping[str, Any]
) -> inspect.Signature:
    """The constructor's signature: the rule's hyperparameters less ``pinned``, ``defaults``
    overriding the spec's, keyword-only ones after ``*``, then ``backend`` and ``nonfinite``."""
    hyper = [h for h in spec.hyper if h.name not in pinned]
    params = [_P("self", _P.POSITIONAL_OR_KEYWORD)]
    for kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY):
        params += [
            _P(h.name, kind, default=defaults.get(h.name, h.default), annotation=h.annotation)
            for h in hyper
            if h.keyword_only is (kind is _P.KEYWORD_ONLY)
        ]
    return inspect.Signature(params + list(_OWN), return_annotation=None)


def _docstring(text: str, sig: inspect.Signature) -> str:
    """``text`` (dedented) and a last paragraph naming the constructor's defaults."""
    values = [
        f"{p.name}={p.default!r}"
        for p in sig.parameters.values()
        if p.name != "self" and p not in _OWN
    ]
    defaults = textwrap.fill("Defaults: " + ", ".join(values) + ".", width=96)
    return inspect.cleandoc(text) + "\n\n" + defaults + "\n"


def optimizer_class(
    rule: str,
    name: str | None = None,
    *,
    base: type[Optimizer] = Optimizer,
    pinned: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    domains: Mapping[str, str] | None = None,
    doc: str | None = None,
) -> type[Optimizer]:
    """The class of ``rule`` (a name in ``kernels.RULES``), generated from its spec: called
    ``name`` (default: the spec's ``class_name``), subclassing ``base``, with the rule's
    hyperparameters ``pinned`` (a dict of values: not in the signature), other ``defaults``,
    narrower ``domains`` (a dict of ``kernels.spec.DOMAINS`` keys, checked at construction)
    and the docstring ``doc`` (default: the rule module's)."""
    spec = RULES[rule]
    name = name or spec.class_name
    pinned, defaults, domains = dict(pinned or {}), dict(defaults or {}), dict(domains or {})
    sig = _signature(spec, pinned, defaults)
    hyper = [h.name for h in spec.hyper if h.name not in pinned]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}(): {exc}") from None
        bound.apply_defaults()
        a = bound.arguments
        for h, domain in domains.items():
            check_value(h, a[h], domain)
        self._init({h: a[h] for h in hyper})
        Optimizer.__init__(self, a["backend"], nonfinite=a["nonfinite"])

    __init__.__signature__ = sig  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{name}.__init__"
    text = doc if doc is not None else sys.modules[spec.make_rule.__module__].__doc__ or ""
    namespace = {
        "__init__": __init__,
        "__doc__": _docstring(text, sig),
        "__module__": __name__,
        "_rule": rule,
        "_pinned": pinned,
    }
    return type(name, (base,), namespace)


def _classes() -> dict[str, type[Optimizer]]:
    out: dict[str, type[Optimizer]] = {}
    for rule, spec in RULES.items():
        if spec.class_name is None:
            continue
        cls = out[spec.class_name] = optimizer_class(rule)
        for derived in DERIVED.get(rule, ()):
            out[derived["name"]] = optimizer_class(rule, base=cls, **derived)
    return out


#: class name -> class: every rule's, each followed by the classes derived from it
CLASSES = _classes()
globals().update(CLASSES)
globals().update({alias: CLASSES[name] for alias, name in ALIASES.items()})

__all__ = ["ALIASES", "CLASSES", "DERIVED", "optimizer_class", *CLASSES, *ALIASES]
