"""The README's examples run, and CI runs the README's two commands verbatim."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


#: a block that imports torch (or fastopt's torch adapter): it runs where torch is installed
_TORCH = re.compile(r"^\s*(import|from)\s+(fastopt\.)?torch\b", re.M)


def _examples(with_torch):
    blocks = [b for b in _blocks("python") if "import fastopt" in b or "fastopt." in b]
    return [b for b in blocks if bool(_TORCH.search(b)) == with_torch]


def test_ci_runs_the_readme_test_command():
    commands = [b.strip() for b in _blocks("bash")]
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.replace("python3", "python") in ci.replace("python3", "python")


def test_ci_runs_the_readme_main_job_command():
    commands = [b.strip() for b in _blocks("bash")]
    main_cmd = next(c for c in commands if "fastopt bench" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert main_cmd.replace("python3", "python") in ci.replace("python3", "python")


def test_readme_python_examples_run():
    """The examples that need no torch, in order (they build on each other)."""
    blocks = _examples(with_torch=False)
    assert blocks
    ns = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)


def test_readme_torch_examples_run():
    """The fastopt.torch examples, each on its own (a newcomer copies one whole)."""
    pytest.importorskip("torch")
    blocks = _examples(with_torch=True)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_lists_every_optimizer():
    # the table at the top names every class of the registry (and nothing the registry lacks)
    from fastopt.optimizers import CLASSES

    table = README.split("| optimizer | in one line |")[1].split("\n\n")[0]
    listed = re.findall(r"^\| `(\w+)`", table, flags=re.M)
    assert sorted(listed) == sorted(CLASSES)
