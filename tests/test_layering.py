"""The library does not import its benchmark or its demo (ARCHITECTURE.md, "Layers").

An AST scan of every module under ``fastopt/`` (but ``bench/``, ``demo/`` and the command line
that runs them) and ``kernels/``: no ``import fastopt.bench`` / ``fastopt.demo``, absolute or
relative, at module level or inside a function. And ``fastopt.torch``'s modules import each other
at module level without a cycle, never the package face that re-exports them.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the packages outside the library, and the command line whose job is to run them
OUTSIDE = ("bench", "demo")
COMMAND_LINE = {("cli.py",), ("__main__.py",)}


def _library_modules():
    for base in ("fastopt", "kernels"):
        for path in sorted((ROOT / base).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if base == "fastopt" and (rel.parts[1] in OUTSIDE or rel.parts[1:] in COMMAND_LINE):
                continue
            yield rel


def _package_of(rel: Path) -> list[str]:
    """The dotted package a module's relative imports start from."""
    return list(rel.parts[:-1])  # a/b/c.py and a/b/__init__.py: package a.b


def _imported(rel: Path, tree: ast.AST):
    """Every module name an ``import`` or ``from ... import`` in ``tree`` names, made absolute."""
    pkg = _package_of(rel)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            yield mod
            for alias in node.names:  # ``from fastopt import bench``
                yield f"{mod}.{alias.name}"


def _outside(name: str) -> bool:
    return any(name == f"fastopt.{o}" or name.startswith(f"fastopt.{o}.") for o in OUTSIDE)


def test_scan_sees_the_library():
    mods = [str(m) for m in _library_modules()]
    assert "fastopt/base.py" in mods and "fastopt/torch/__init__.py" in mods
    assert "kernels/spec.py" in mods
    assert not any(m.startswith(("fastopt/bench/", "fastopt/demo/")) for m in mods)


@pytest.mark.parametrize(
    "src, rel, bad",
    [
        ("from ..bench.measure import _torch_name", "fastopt/torch/__init__.py", True),
        ("def f():\n    from .demo import main", "fastopt/base.py", True),
        ("import fastopt.bench", "kernels/spec.py", True),
        ("from fastopt import demo", "kernels/spec.py", True),
        ("from .._torch_names import torch_name", "fastopt/torch/__init__.py", False),
        ("from .benchmarks import x", "fastopt/base.py", False),
    ],
)
def test_scan_catches_imports(src, rel, bad):
    """The scan flags the import this test exists for (the adapter's old one) and no others."""
    names = list(_imported(Path(rel), ast.parse(src)))
    assert any(_outside(n) for n in names) is bad, names


def test_library_does_not_import_bench_or_demo():
    offenders = []
    for rel in _library_modules():
        tree = ast.parse((ROOT / rel).read_text(), str(rel))
        offenders += [f"{rel}: {n}" for n in _imported(rel, tree) if _outside(n)]
    assert not offenders, offenders


#: ``fastopt.torch``'s package face, which imports its modules (and they not it)
TORCH = ROOT / "fastopt" / "torch"


def _torch_imports(tree: ast.Module) -> set[str]:
    """The ``fastopt.torch`` modules that ``tree`` imports at module level (``from . import
    _x``, ``from ._x import y``); ``"__init__"`` for a name taken from the package face."""
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:  # ``from . import _device``; ``from . import FusedOptimizer``: the face
                out |= {
                    a.name if (TORCH / f"{a.name}.py").exists() else "__init__" for a in node.names
                }
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (module -> the modules it imports) as a path, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return [*path[path.index(d) :], d]
            if d not in state and (found := visit(d, [*path, d])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_cycle_finder():
    """The finder sees a cycle through three modules, and none in a chain."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("from . import _device, FusedOptimizer\nfrom ._plan import Planner")
    assert _torch_imports(tree) == {"_device", "__init__", "_plan"}


def test_torch_modules_import_no_cycle():
    """``fastopt.torch``'s modules (``_groups`` < ``_checks`` < ``_plan``, ``_launch`` < ``_run``
    < ``_optimizer`` < ``_classes``, beside ``_memory``, ``_steady``, ``_device``, ...) import
    each other at module level without a cycle, and none imports the package face, which
    imports them."""
    graph = {
        p.stem: _torch_imports(ast.parse(p.read_text(), str(p)))
        for p in sorted(TORCH.glob("*.py"))
        if p.stem != "__init__"
    }
    assert {"_groups", "_plan", "_run", "_optimizer", "_classes"} <= set(graph)
    assert not [m for m, deps in graph.items() if "__init__" in deps]
    assert _cycle(graph) is None, _cycle(graph)
