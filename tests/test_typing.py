"""Type checking: ``python -m mypy`` (configured by ``mypy.ini``) reports no error, and every
public function and method of the modules ``mypy.ini`` marks as typed has a complete signature
(every parameter but ``self``/``cls`` annotated, and the return type); in the modules it marks
fully typed, every function, private and nested ones too.

The typed modules are the ones ``mypy.ini``'s sections with ``disallow_incomplete_defs`` name,
the fully typed ones those with ``disallow_untyped_defs``: those sections are the one list, read
here."""

import ast
import configparser
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "mypy.ini"


def _fully_typed_modules(option="disallow_incomplete_defs"):
    """The module names of the ``[mypy-...]`` sections that set ``option``."""
    cfg = configparser.ConfigParser()
    cfg.read(CONFIG)
    out = []
    for section in cfg.sections():
        if section.startswith("mypy-") and cfg[section].getboolean(option, fallback=False):
            out += [m.strip() for m in section[len("mypy-") :].split(",") if m.strip()]
    return out


def _paths_of(module):
    """The source files of ``module`` (``kernels.x`` is checked as a package of its own);
    ``pkg.*``: every module below the package ``pkg``."""
    if module.endswith(".*"):
        return sorted(ROOT.joinpath(*module[:-2].split(".")).rglob("*.py"))
    base = ROOT.joinpath(*module.split("."))
    return [base / "__init__.py" if base.is_dir() else base.with_suffix(".py")]


def _is_public(name):
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def missing_annotations(source, every=False):
    """``[(qualified name, [what is missing])]`` for the public functions and methods of
    ``source`` (module level and in public classes, nested classes included; functions nested
    in functions are implementation) whose signatures are incomplete; with ``every``, for every
    function (private ones, and those nested in functions and private classes, too)."""
    out = []

    def check(fn, qual, method):
        a = fn.args
        args = [*a.posonlyargs, *a.args]
        static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
        if method and not static and args:
            args = args[1:]  # self / cls
        args += a.kwonlyargs
        missing = [x.arg for x in args if x.annotation is None]
        missing += [f"*{v.arg}" for v in (a.vararg,) if v is not None and v.annotation is None]
        missing += [f"**{v.arg}" for v in (a.kwarg,) if v is not None and v.annotation is None]
        # as mypy: an __init__ with an annotated parameter needs no return annotation
        total = len(args) + (a.vararg is not None) + (a.kwarg is not None)
        init_ok = fn.name == "__init__" and len(missing) < total
        if fn.returns is None and not init_ok:
            missing.append("return")
        if missing:
            out.append((qual, missing))

    def visit(body, prefix, method):
        for node in body:
            if isinstance(node, ast.ClassDef) and (every or _is_public(node.name)):
                visit(node.body, f"{prefix}{node.name}.", True)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if every or _is_public(node.name):
                    check(node, prefix + node.name, method)
                if every:
                    visit(node.body, f"{prefix}{node.name}.<locals>.", False)
            elif isinstance(node, ast.If):  # TYPE_CHECKING / optional-import branches
                visit(node.body, prefix, method)
                visit(node.orelse, prefix, method)

    visit(ast.parse(source).body, "", False)
    return out


def test_the_checker_finds_an_incomplete_signature():
    src = (
        "class A:\n"
        "    def ok(self, x: int) -> int: ...\n"
        "    def __init__(self, x: int): ...\n"
        "    def no_return(self, x: int): ...\n"
        "    def _private(self, x): ...\n"
        "    @staticmethod\n"
        "    def static(x) -> None: ...\n"
        "def f(a: int, *args, b, **kw: int) -> None: ...\n"
        "class _Hidden:\n"
        "    def g(self, x): ...\n"
    )
    assert missing_annotations(src) == [
        ("A.no_return", ["return"]),
        ("A.static", ["x"]),
        ("f", ["b", "*args"]),
    ]
    nested = "def f() -> None:\n    def g(x): ...\n"
    assert missing_annotations(src + nested, every=True) == [
        ("A.no_return", ["return"]),
        ("A._private", ["x", "return"]),
        ("A.static", ["x"]),
        ("f", ["b", "*args"]),
        ("_Hidden.g", ["x", "return"]),
        ("f.<locals>.g", ["x", "return"]),
    ]


def test_fully_typed_modules_have_complete_public_signatures():
    modules = _fully_typed_modules()
    assert "fastopt.textbook" in modules  # the list is read from mypy.ini, not lost
    incomplete = {}
    for module in modules:
        paths = _paths_of(module)
        assert paths, f"mypy.ini names {module}, which has no source file here"
        for path in paths:
            assert path.is_file(), f"mypy.ini names {module}, which has no source file here"
            found = missing_annotations(path.read_text())
            if found:
                incomplete[str(path.relative_to(ROOT))] = found
    assert not incomplete, f"incomplete signatures in fully typed modules: {incomplete}"


def test_fully_typed_modules_annotate_every_function():
    modules = _fully_typed_modules("disallow_untyped_defs")
    assert "kernels.spec" in modules and "fastopt.backends.protocol" in modules
    incomplete = {}
    for module in modules:
        for path in _paths_of(module):
            found = missing_annotations(path.read_text(), every=True)
            if found:
                incomplete[str(path.relative_to(ROOT))] = found
    assert not incomplete, f"unannotated functions in fully typed modules: {incomplete}"


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_mypy_reports_no_error():
    # torch's own types are part of the check (fastopt.torch subclasses its Optimizer)
    pytest.importorskip("torch")
    # the repository's mypy.ini (files, strictness); the cache makes a second run incremental
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(CONFIG)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout


def test_the_generated_classes_are_named_for_type_checkers():
    # fastopt/__init__.py binds CLASSES and ALIASES at run time (globals().update); its
    # `if TYPE_CHECKING:` block names the same classes for mypy
    from fastopt.optimizers import ALIASES, CLASSES

    tree = ast.parse((ROOT / "fastopt" / "__init__.py").read_text())
    block = next(
        n
        for n in tree.body
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"
    )
    declared = {n.target.id for n in block.body if isinstance(n, ast.AnnAssign)}
    assert declared == set(CLASSES) | set(ALIASES)
