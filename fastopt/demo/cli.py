"""``fastopt demo``: see how every optimizer moves, and train a small network with each.

    fastopt demo --out DIR [--backend B] [--steps N] [--valley-steps N] [--quick] [--show]
    fastopt demo --textbook --out DIR [--backend B] [--valley-steps N] [--show]

writes ``DIR/valley_paths.png`` (the first 30 steps of each optimizer on
f(x, y) = x²/20 + y² from (−7, 2), one panel each) and ``DIR/training_curves.png`` (an MLP
64-100-10 trained on scikit-learn's bundled digits with each optimizer, all weights in one
``FlatBuffer``), and prints a summary table. Every update runs through fastopt's kernels.
Needs the ``demo`` extra (matplotlib, scikit-learn), imported only when the demo runs.

``--textbook`` draws the chapter's figure instead, ``DIR/textbook_valley.png``: the chapter's
valley script (params as Python floats) with the classes of ``fastopt.textbook`` (the chapter's
formulas on the same kernels), and prints where each path ends; it needs matplotlib only.
"""

import argparse
import importlib
import os
import sys

import numpy as np

from .. import backends
from .problems import TEXTBOOK_VALLEY, specs, textbook_valley_path, train_mlp, valley_path

__all__ = ["DEMO_DEPS", "load_data", "main"]

#: import name -> distribution name, for the message when one is missing
DEMO_DEPS = {"matplotlib": "matplotlib", "sklearn": "scikit-learn"}


def _missing_deps(textbook=False):
    missing = []
    for mod, dist in DEMO_DEPS.items():
        if textbook and mod != "matplotlib":
            continue
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(dist)
    return missing


def load_data(seed=0, test_size=0.2):
    """scikit-learn's bundled 8×8 digits (no download): pixels scaled to [0, 1], a stratified
    train/test split. Returns ``(X_train, y_train, X_test, y_test)`` as NumPy arrays."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = digits.data.astype(np.float64) / 16.0
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, digits.target, test_size=test_size, random_state=seed, stratify=digits.target
    )
    return X_tr, y_tr, X_te, y_te


def _parser():
    p = argparse.ArgumentParser(
        prog="fastopt demo",
        description="Draw the optimizers' paths on a valley and their training curves on "
        "the digits data set; print a summary table.",
    )
    p.add_argument("--out", required=True, help="folder for the PNG figures (created)")
    p.add_argument(
        "--backend",
        default="auto",
        help="fastopt backend: auto (default), numpy, numba, numba-cuda, cupy; "
        "the MLP runs on the GPU with CuPy when the backend is a GPU one, or "
        "auto and CuPy is usable",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training iterations of the MLP (default 2000; 100 with --quick)",
    )
    p.add_argument(
        "--valley-steps",
        type=int,
        default=30,
        help="steps on the valley (default 30, as in the chapter)",
    )
    p.add_argument("--batch", type=int, default=128, help="mini-batch size (default 128)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fast, rough run (100 iterations, lower-resolution figures)",
    )
    p.add_argument(
        "--show",
        action="store_true",
        help="also open the figures in a window (default: only write PNGs)",
    )
    p.add_argument(
        "--textbook",
        action="store_true",
        help="draw the chapter's valley figure with fastopt.textbook (the chapter's "
        "own formulas) as DIR/textbook_valley.png, instead of the two figures",
    )
    return p


def _array_module(backend):
    """CuPy when the backend runs on the GPU (or is auto and CuPy is usable), else NumPy."""
    if backend in ("cupy", "numba-cuda") or (
        backend == "auto" and "cupy" in backends.available_backends()
    ):
        import cupy

        return cupy
    return np


class _Progress:
    """One status line on stderr (rewritten in place on a terminal)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def __call__(self, msg, done=False):
        if self.tty:
            self.stream.write("\r\033[K" + msg + ("\n" if done else ""))
        elif done:
            self.stream.write(msg + "\n")
        self.stream.flush()


def _table(rows, header):
    cells = [header] + [[str(c) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = [i > 0 for i in range(len(header))]
    line = lambda r: (
        "| "
        + " | ".join(c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(r, width, right))
        + " |"
    )
    sep = (
        "|"
        + "|".join("-" * (w + 1) + ":" if rj else "-" * (w + 2) for w, rj in zip(width, right))
        + "|"
    )
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _textbook(args, plt, xp, be_name, say):
    """``--textbook``: the chapter's valley figure with ``fastopt.textbook``."""
    from .plot import _num, fmt_lr, plot_textbook_valley

    paths = {}
    for i, name in enumerate(TEXTBOOK_VALLEY, 1):
        say(f"[textbook {i}/{len(TEXTBOOK_VALLEY)}] {name}")
        paths[name] = textbook_valley_path(name, args.valley_steps, args.backend, xp)
    lrs = {name: kw["lr"] for name, kw in TEXTBOOK_VALLEY.items()}
    png = os.path.join(args.out, "textbook_valley.png")
    plot_textbook_valley(plt, paths, lrs, png, backend=be_name, dpi=70 if args.quick else 120)
    say(f"wrote {png}", done=True)
    rows = [
        [
            name,
            fmt_lr(lrs[name]),
            f"({_num(p[-1][0], 3)}, {_num(p[-1][1], 3)})",
            f"{np.hypot(*p[-1]):.3g}",
        ]
        for name, p in paths.items()
    ]
    print(
        f"fastopt.textbook on the valley: {args.valley_steps} steps from (-7, 2), backend {be_name}"
    )
    print(_table(rows, ["optimizer", "lr", "end (x, y)", "distance to min"]))
    if args.show:
        plt.show()
    plt.close("all")
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    iters = args.steps if args.steps is not None else (100 if args.quick else 2000)
    if iters < 1 or args.valley_steps < 1 or args.batch < 1:
        print("fastopt demo: --steps, --valley-steps and --batch must be >= 1", file=sys.stderr)
        return 2
    if args.backend != "auto":
        try:
            backends.get_backend(args.backend)
        except (ValueError, RuntimeError) as exc:
            print(f"fastopt demo: {exc}", file=sys.stderr)
            return 2
    if args.textbook and args.backend in ("numpy", "cupy"):
        print(
            "fastopt demo: --textbook runs the chapter's statements compiled by Numba "
            "(numba on the host, numba-cuda on a GPU); backend 'numpy' is the torch.optim "
            "oracle and 'cupy' has no compiled textbook kernels (use auto, numba or numba-cuda)",
            file=sys.stderr,
        )
        return 2
    missing = _missing_deps(args.textbook)
    if missing:
        need = ["matplotlib"] if args.textbook else list(DEMO_DEPS.values())
        print(
            f"fastopt demo needs {' and '.join(need)}; missing: "
            f'{", ".join(missing)}.\nInstall the demo extra:  pip install "fastopt[demo]"',
            file=sys.stderr,
        )
        return 2

    import matplotlib

    if not args.show:
        matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    from .plot import _num, fmt_lr, plot_training, plot_valley

    xp = _array_module(args.backend)
    be_name = backends.resolve(args.backend, xp.zeros(1)).NAME
    os.makedirs(args.out, exist_ok=True)
    say = _Progress()
    device = "GPU (CuPy)" if xp is not np else "CPU (NumPy)"
    say(f"fastopt demo: backend {be_name}, arrays on the {device}", done=True)
    if args.textbook:
        return _textbook(args, plt, xp, be_name, say)

    paths = {}
    SPECS = specs()
    for i, spec in enumerate(SPECS, 1):
        say(f"[valley {i}/{len(SPECS)}] {spec.name}, lr={fmt_lr(spec.valley['lr'])}")
        paths[spec.name] = valley_path(spec, args.valley_steps, args.backend, xp)
    say(f"[valley] {len(SPECS)} paths of {args.valley_steps} steps", done=True)
    valley_png = os.path.join(args.out, "valley_paths.png")
    dpi = 70 if args.quick else 120
    plot_valley(plt, paths, SPECS, valley_png, backend=be_name, dpi=dpi)
    say(f"wrote {valley_png}", done=True)

    data = load_data()
    results = {}
    for i, spec in enumerate(SPECS, 1):
        tag = f"[mlp {i}/{len(SPECS)}] {spec.name}, lr={fmt_lr(spec.mlp['lr'])}"
        say(tag)
        results[spec.name] = train_mlp(
            spec,
            data,
            iters,
            args.batch,
            args.backend,
            xp,
            progress=lambda it, loss, tag=tag: say(f"{tag}: iter {it}/{iters}, loss {loss:.4f}"),
        )
        r = results[spec.name]
        say(
            f"{tag}: train loss {r.train_loss:.4f}, test accuracy "
            f"{100 * r.test_accuracy:.1f}%, {r.ms_per_step:.3f} ms/step",
            done=True,
        )
    say(f"[mlp] {len(SPECS)} runs of {iters} iterations", done=True)
    curves_png = os.path.join(args.out, "training_curves.png")
    title = (
        f"MLP 64-100-10 (ReLU, softmax cross-entropy) on scikit-learn's digits\n"
        f"{len(data[0])} train / {len(data[2])} test images, batch {args.batch}, "
        f"{iters} iterations, float32, one FlatBuffer, backend {be_name}"
    )
    plot_training(plt, results, SPECS, curves_png, title=title, dpi=dpi)
    say(f"wrote {curves_png}", done=True)

    rows = []
    for spec in SPECS:
        end, r = paths[spec.name][-1], results[spec.name]
        rows.append(
            [
                spec.name,
                fmt_lr(spec.valley["lr"]),
                f"({_num(end[0], 3)}, {_num(end[1], 3)})",
                f"{np.hypot(*end):.3g}",
                fmt_lr(spec.mlp["lr"]),
                f"{r.train_loss:.4f}",
                f"{100 * r.test_accuracy:.1f}%",
                f"{r.ms_per_step:.3f}",
                f"{r.ms_per_iter:.3f}",
            ]
        )
    print(
        f"valley: {args.valley_steps} steps from (-7, 2); MLP: {iters} iterations, "
        f"backend {be_name}; ms = median per iteration"
    )
    print(
        _table(
            rows,
            [
                "optimizer",
                "valley lr",
                "valley end (x, y)",
                "distance to min",
                "MLP lr",
                "final train loss",
                "test acc",
                "ms/step (update)",
                "ms/iter (fwd+bwd+step)",
            ],
        )
    )
    if args.show:
        plt.show()
    plt.close("all")
    return 0
