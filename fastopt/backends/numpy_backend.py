"""The NumPy oracle as a backend: ``fastopt.reference``, array at a time (also the fallback)."""

NAME = "numpy"
DEVICE = "cpu"


def available():
    return True


def why_unavailable():
    return ""


def launch(rule, flags, param, grad, states, k):  # pragma: no cover - dispatch goes to reference
    raise NotImplementedError("the numpy backend runs fastopt.reference, not per-element rules")
