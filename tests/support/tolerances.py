"""The one tolerance table of the test suite, keyed by dtype, and the comparison helper.

A backend's result in dtype ``T`` is compared with the float64 oracle (``fastopt.reference``
run on float64 copies of the same inputs): ``|x - ref| <= atol + rtol * |ref|`` element-wise.

float32: a handful of float32 roundings per element and step (about 6e-8 each), over at most 7
steps, on values of order 1..30 (parameters, gradients, accumulated squares). ``atol`` covers
elements that cancel to near zero (a parameter crossing zero, a momentum buffer whose
contributions of opposite sign cancel), where a relative bound means nothing.

float64: the backends reorder a few operations against the oracle (``sqrt(v)*(1/sqrt(bc2))``
instead of ``sqrt(v)/sqrt(bc2)``, host-folded ``lr/bc1``), so results agree to a few ulps,
not bit for bit.
"""

import numpy as np

__all__ = ["TOL", "assert_close", "tol"]

TOL = {
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-13),
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6),
}


def tol(dtype):
    """rtol/atol for results computed in ``dtype``."""
    return TOL[np.dtype(dtype)]


def assert_close(actual, ref, dtype, what):
    """``actual`` (computed in ``dtype``) within the table's tolerance of ``ref``; NaN never
    passes. ``what`` names the compared buffer in the failure message."""
    actual = np.asarray(actual)
    ref = np.asarray(ref, dtype=np.float64)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != oracle shape {ref.shape}"
    bad = ~np.isfinite(actual)
    assert not bad.any(), f"{what}: {bad.sum()} non-finite values, e.g. {actual[bad][:5]}"
    np.testing.assert_allclose(actual.astype(np.float64), ref, err_msg=what, **tol(dtype))
