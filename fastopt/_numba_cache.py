"""Where fastopt's compiled CPU kernels live on disk: a per-user cache, never the package.

Numba caches a ``cache=True`` function next to its source file when that directory is writable,
which for an installed fastopt is ``site-packages/fastopt/...``. Files written there belong to no
installed package: uninstalling or reinstalling fastopt leaves them behind, and a directory that
keeps only them turns into a namespace package that shadows an editable install. So fastopt's
own functions are cached under ``$XDG_CACHE_HOME/fastopt/numba`` (``~/.cache/fastopt/numba``)
instead, unless ``NUMBA_CACHE_DIR`` is set, which always wins. Only the functions decorated by
``njit_cached`` are affected; numba's setting for everything else is restored at once.

Numba keys a cached function by its own source file, not by the functions it calls: a loop
generated in ``backends/numba_backend.py`` that inlines ``kernels/storage.py``'s conversions or a
rule from ``kernels/<name>.py`` would be loaded stale after either changed (an upgrade, an edit).
So the cache lives in a subdirectory named by a digest of every source the compiled code is built
from (the ``kernels`` package, the backends and the library version): a change to any of them
starts a fresh cache, and the old one is never read again.
"""

import contextlib
import functools
import hashlib
import os
from pathlib import Path

__all__ = ["cache_dir", "njit_cached"]


@functools.cache
def source_digest():
    """A digest of the sources fastopt's compiled CPU code is generated from: the ``kernels``
    package (rules, storage conversions), the backends, the textbook's rules and the version."""
    from . import __version__, kernels

    here = Path(__file__).resolve().parent
    files = sorted(Path(kernels.__file__).resolve().parent.glob("*.py"))
    files += sorted((here / "backends").glob("*.py")) + [here / "textbook.py"]
    h = hashlib.sha256(__version__.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_dir():
    """The directory fastopt's kernels are cached in: under ``NUMBA_CACHE_DIR`` when set,
    else the per-user cache; in both, a subdirectory per ``source_digest()``."""
    base = os.environ.get("NUMBA_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "fastopt", "numba")
    return os.path.join(base, f"src-{source_digest()}")


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
