"""The compiled-kernel cache is keyed by the sources the kernels are generated from."""

import importlib.util
import shutil
from pathlib import Path

import fastopt
from fastopt import _numba_cache


def test_cache_dir_is_named_by_the_source_digest(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert _numba_cache.cache_dir() == str(tmp_path / f"src-{_numba_cache.source_digest()}")
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    d = Path(_numba_cache.cache_dir())
    assert d.parent == tmp_path / "xdg" / "fastopt" / "numba"
    assert d.name == f"src-{_numba_cache.source_digest()}"


def test_an_edit_to_a_kernel_source_changes_the_digest(monkeypatch, tmp_path):
    # a copy of the package whose kernels/storage.py differs by one byte: the digest must differ
    # (numba alone keys a generated loop by numba_backend.py and would load it stale)
    pkg = Path(fastopt.__file__).resolve().parent
    kernels = Path(fastopt.kernels.__file__).resolve().parent
    before = _numba_cache.source_digest()
    copy = tmp_path / "copy"
    shutil.copytree(kernels, copy / "kernels")
    shutil.copytree(pkg / "backends", copy / "fastopt" / "backends")
    shutil.copy(pkg / "textbook.py", copy / "fastopt" / "textbook.py")
    shutil.copy(pkg / "_numba_cache.py", copy / "fastopt" / "_numba_cache.py")
    src = copy / "fastopt" / "_numba_cache.py"
    spec = importlib.util.spec_from_file_location("_cache_copy", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class K:  # the copy's kernels package, as source_digest finds it
        __file__ = str(copy / "kernels" / "__init__.py")

    monkeypatch.setattr(fastopt, "kernels", K)
    mod.__package__ = "fastopt"
    monkeypatch.setattr(mod, "__file__", str(copy / "fastopt" / "_numba_cache.py"))
    same = mod.source_digest()
    assert same == before
    mod.source_digest.cache_clear()
    storage = copy / "kernels" / "storage.py"
    storage.write_bytes(storage.read_bytes() + b"\n")
    assert mod.source_digest() != before
