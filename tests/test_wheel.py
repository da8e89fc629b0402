"""The wheel ships kernels/ as fastopt.kernels, and a non-editable install imports and steps."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes build/ and *.egg-info into the tree it builds, and
    # pytest-xdist may run this fixture in two workers at once
    src = tmp_path_factory.mktemp("src") / "fastopt"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".*", "build", "dist", "*.egg-info", "__pycache__", "results", "figures"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
    )
    (whl,) = out.glob("fastopt-*.whl")
    return whl


def test_wheel_contains_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    rules = {p.name for p in (ROOT / "kernels").glob("*.py")}
    bodies = {p.name for p in (ROOT / "kernels").glob("*.cu")}
    assert rules, "no kernel rules in the source tree"
    for name in rules | bodies:
        assert f"fastopt/kernels/{name}" in names, f"{name} missing from {wheel.name}"


def test_wheel_contains_every_package(wheel):
    """Every package under fastopt/ ships: a subpackage left out of pyproject's list imports in
    an editable install and fails only after a real one."""
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(p.parent for p in (ROOT / "fastopt").rglob("__init__.py"))
    assert len(packages) > 1
    for pkg in packages:
        for src in pkg.glob("*.py"):
            rel = src.relative_to(ROOT).as_posix()
            assert rel in names, f"{rel} missing from {wheel.name}"


def test_installed_wheel_imports_and_steps(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    code = (
        "import numpy as np, fastopt, fastopt.kernels as k, fastopt.bench, fastopt.demo\n"
        f"assert fastopt.__file__.startswith({str(target)!r}), fastopt.__file__\n"
        f"assert k.__file__.startswith({str(target)!r}), k.__file__\n"
        "p = {'w': np.ones(1000, np.float32)}; g = {'w': np.full(1000, 0.5, np.float32)}\n"
        "ref = {'w': p['w'].copy()}\n"
        "fastopt.Adam(lr=0.1, backend='numba').update(p, g)\n"
        "fastopt.Adam(lr=0.1, backend='numpy').update(ref, g)\n"
        "assert not np.array_equal(p['w'], np.ones(1000, np.float32))\n"
        "np.testing.assert_allclose(p['w'], ref['w'], rtol=1e-6)\n"
        "print('ok', fastopt.available_backends())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target), NUMBA_CACHE_DIR=str(tmp_path / "nbcache"))
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")
