"""The README's examples run, and CI runs the README's test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = [b.strip() for b in _blocks("bash")]
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.replace("python3", "python") in ci.replace("python3", "python")


def test_readme_python_examples_run():
    blocks = [b for b in _blocks("python") if "import fastopt" in b or "fastopt." in b]
    assert blocks
    ns = {}
    for block in blocks:  # examples build on each other, in order
        exec(compile(block, "README.md", "exec"), ns)


def test_readme_lists_every_optimizer():
    # the table at the top names every class of the registry (and nothing the registry lacks)
    from fastopt.optimizers import CLASSES

    table = README.split("| optimizer | in one line |")[1].split("\n\n")[0]
    listed = re.findall(r"^\| `(\w+)`", table, flags=re.M)
    assert sorted(listed) == sorted(CLASSES)
