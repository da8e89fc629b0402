"""torch's name for a fastopt optimizer class.

``fastopt.torch`` (and the benchmark, which compares with ``torch.optim``) ask which
``torch.optim`` class a fastopt class stands for: its own name or an ancestor's, matched
case-insensitively (``AdaGrad`` -> ``Adagrad``, ``Momentum`` -> ``SGD``), else ``None``
(``Lion``). Without torch installed the names come from ``TORCH_OPTIM``.
"""

import importlib.util

__all__ = ["TORCH_OPTIM", "torch_name"]

#: torch.optim's optimizer classes, for naming peers when torch is not installed
TORCH_OPTIM = (
    "ASGD",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "LBFGS",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "SGD",
    "SparseAdam",
)


def torch_name(cls: type) -> str | None:
    """The ``torch.optim`` class an optimizer class stands for: its own name or an ancestor's,
    matched case-insensitively (AdaGrad -> Adagrad, Momentum -> SGD), else None (Lion)."""
    if importlib.util.find_spec("torch") is None:
        names: list[str] | tuple[str, ...] = TORCH_OPTIM
    else:
        import torch.optim

        names = [n for n in dir(torch.optim) if n[:1].isupper()]
    lower = {n.lower(): n for n in names}
    for klass in cls.__mro__:
        if klass.__name__ == "Optimizer":  # fastopt's base: no optimizer of its own
            break
        if klass.__name__.lower() in lower:
            return lower[klass.__name__.lower()]
    return None
