"""Where fastopt's compiled CPU kernels live on disk: a per-user cache, never the package.

Numba caches a ``cache=True`` function next to its source file when that directory is writable,
which for an installed fastopt is ``site-packages/fastopt/...``. Files written there belong to no
installed package: uninstalling or reinstalling fastopt leaves them behind, and a directory that
keeps only them turns into a namespace package that shadows an editable install. So fastopt's
own functions are cached under ``$XDG_CACHE_HOME/fastopt/numba`` (``~/.cache/fastopt/numba``)
instead, unless ``NUMBA_CACHE_DIR`` is set, which always wins. Only the functions decorated by
``njit_cached`` are affected; numba's setting for everything else is restored at once.
"""

import contextlib
import os

__all__ = ["cache_dir", "njit_cached"]


def cache_dir():
    """The directory fastopt's kernels are cached in, or None when ``NUMBA_CACHE_DIR`` rules."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastopt", "numba")


@contextlib.contextmanager
def _cache_in(path):
    from numba.core import config

    if path is None:
        yield
        return
    old = config.CACHE_DIR
    config.CACHE_DIR = path  # read once, when a cached function picks its cache locator
    try:
        yield
    finally:
        config.CACHE_DIR = old


def njit_cached(fn=None, **options):
    """``numba.njit(cache=True, **options)``, cached in ``cache_dir()``; usable as
    ``@njit_cached`` or ``njit_cached(**options)(fn)``."""
    import numba

    def decorate(f):
        with _cache_in(cache_dir()):
            return numba.njit(cache=True, **options)(f)

    return decorate if fn is None else decorate(fn)
