"""``fastopt demo``: the chapter's valley and a small network trained with every optimizer.

- ``problems``: the valley, the network, and the settings of each optimizer on them;
- ``plot``: the figures (matplotlib, an optional extra);
- ``cli``: the command line.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``fastopt demo``: see ``fastopt.demo.cli``."""
    from .cli import main as run

    return run(argv)
