"""The ``fastopt.torch`` classes: one ``FusedOptimizer`` subclass per fastopt optimizer class
(``fastopt.optimizers.CLASSES``), with ``torch.optim``'s signature and defaults (``_make``),
exported by the package as ``fastopt.torch.<name>`` (their ``__module__``)."""

import inspect

import torch

from .. import optimizers as _optimizers
from ..base import PRECISION_DEFAULTS
from ..kernels import RULES
from ._groups import _check_precision
from ._optimizer import FusedOptimizer

#: keyword arguments of torch.optim constructors that select torch's own implementation
_TORCH_IMPL = ("foreach", "fused", "capturable", "differentiable")


def _torch_defaults(cls):
    """The param-group keys torch's counterpart of ``cls`` keeps that fastopt's has not
    (``foreach``, ``fused``, ...), with torch's defaults: so state dicts load both ways."""
    from .._torch_names import torch_name as _torch_name

    name = _torch_name(cls)
    if name is None:
        return {}
    tcls = getattr(torch.optim, name)
    probe = tcls([torch.nn.Parameter(torch.zeros(1))])
    return dict(probe.defaults)


def _make(cls):
    """The torch.optim face of the fastopt class ``cls``: torch's signature, its defaults."""
    sig = inspect.signature(cls.__init__)
    # the core's own keywords (backend, non-finite policy, mixed precision) are not torch's
    skip = ("self", "backend", "nonfinite", *PRECISION_DEFAULTS)
    own = [p for name, p in sig.parameters.items() if name not in skip]
    torch_defaults = _torch_defaults(cls)
    extra = [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
        for k, v in torch_defaults.items()
        if k in _TORCH_IMPL and k not in {p.name for p in own}
    ]
    if not torch_defaults:
        # no torch.optim counterpart (Lion, AdaBelief, Adan, AdEMAMix): ``capturable`` as torch
        # spells it elsewhere, a param-group key, refused where the rule's scalars cannot be
        # computed on the device (``_check_capturable``)
        extra.append(inspect.Parameter("capturable", inspect.Parameter.KEYWORD_ONLY, default=False))
    params = (
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + own
        + extra
        + [
            inspect.Parameter("master_weights", inspect.Parameter.KEYWORD_ONLY, default=False),
            inspect.Parameter("state_dtype", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("stochastic_rounding", inspect.Parameter.KEYWORD_ONLY, default=False),
            inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0),
            inspect.Parameter("max_grad_norm", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto"),
        ]
    )
    new_sig = inspect.Signature(params)

    def __init__(self, *args, **kwargs):
        bound = new_sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self")
        params_, backend = a.pop("params"), a.pop("backend")
        # not a param-group key: the groups stay torch's, so state dicts load both ways
        prec = _check_precision(
            cls.__name__,
            a.pop("master_weights"),
            a.pop("state_dtype"),
            a.pop("stochastic_rounding"),
            a.pop("seed"),
        )
        self.master_weights, self.state_dtype, self.stochastic_rounding, self.seed = prec
        max_grad_norm = a.pop("max_grad_norm")
        defaults = {**torch_defaults, **dict(cls._pinned), **a}
        FusedOptimizer.__init__(self, params_, defaults, backend, max_grad_norm)

    __init__.__signature__ = new_sig  # type: ignore[attr-defined]
    doc = (cls.__doc__ or "").split("\n\n")
    return type(
        cls.__name__,
        (FusedOptimizer,),
        {
            "__init__": __init__,
            "__doc__": f"{doc[0]}\n\nfastopt's fused kernels behind torch.optim's interface "
            f"(see fastopt.torch).\n\n" + "\n\n".join(doc[1:]),
            "__module__": "fastopt.torch",  # the package exports it (pickles name it there)
            "_fastopt": cls,
            "_keeps_step": not any(s.fresh for s in RULES[cls._rule].slots),
        },
    )


#: the classes by name, as ``fastopt.optimizers.CLASSES``
CLASSES = {name: _make(cls) for name, cls in _optimizers.CLASSES.items()}
