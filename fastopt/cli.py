"""``fastopt`` command line: ``fastopt bench`` (the main job) and ``fastopt demo``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

USAGE = """usage: fastopt {bench,demo} [options]

  bench   measure every optimizer on every backend here (fastopt bench --help)
  demo    draw the optimizers' paths and training curves (fastopt demo --help)
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        from .bench import main as run
    elif cmd == "demo":
        from .demo import main as run
    else:
        print(f"fastopt: unknown command {cmd!r}\n{USAGE}", end="", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
