"""The demo's two figures (matplotlib is imported by the caller, never at ``import fastopt``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import optimizers
from .problems import VALLEY_START, Spec, TrainResult, valley

__all__ = ["fmt_lr", "plot_textbook_valley", "plot_training", "plot_valley", "smooth"]

#: one colour per optimizer, the same in both figures: a qualitative palette (matplotlib's tab10,
#: then tab20's lighter shades)
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
)


def colors(n: int) -> list[str]:
    """``n`` distinct colors: ``PALETTE`` in order, then (for a registry that outgrows it)
    hues a golden angle apart, skipping any color already given."""
    import colorsys

    out = list(PALETTE[:n])
    i = 0
    while len(out) < n:
        r, g, b = colorsys.hsv_to_rgb((0.1 + i * 0.381966) % 1.0, 0.75, 0.8 - 0.15 * (i % 2))
        color = f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"
        if color not in out:
            out.append(color)
        i += 1
    return out


#: the window of the valley figure: the paths stay well inside it
XLIM, YLIM = (-8, 8), (-3, 3)

#: how the other hyperparameters are written in the panel titles
_NAMES = {"momentum": "momentum", "alpha": "α", "weight_decay": "wd", "betas": "β"}


def _extras(kwargs: Mapping[str, Any]) -> str:
    parts = [
        f"{_NAMES.get(k, k)} {v if not isinstance(v, tuple) else '/'.join(map(str, v))}"
        for k, v in kwargs.items()
        if k != "lr"
    ]
    return ", " + ", ".join(parts) if parts else ""


def _num(v: float, digits: int = 2) -> str:
    """``v`` rounded, without the "-0.00" of a tiny negative."""
    out = f"{v:.{digits}f}"
    return out[1:] if float(out) == 0 and out.startswith("-") else out


def fmt_lr(lr: float) -> str:
    """0.95 -> '0.95', 0.001 -> '1e-3': short and exact for the values the demo uses."""
    if lr >= 0.01:
        return f"{lr:g}"
    mant, exp = f"{lr:.0e}".split("e")
    return f"{mant}e{int(exp)}"


def smooth(y: Sequence[float] | npt.NDArray[Any], window: int) -> npt.NDArray[np.float64]:
    """Trailing moving average (the first points average what exists so far)."""
    c = np.cumsum(np.insert(np.asarray(y, dtype=np.float64), 0, 0.0))
    n = np.arange(1, len(y) + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


def plot_valley(
    plt: Any,
    paths: Mapping[str, npt.NDArray[np.float64]],
    specs: Sequence[Spec],
    path: str,
    *,
    backend: str = "",
    dpi: int = 120,
) -> Any:
    """One panel per optimizer: its path over the contours of f(x, y) = x²/20 + y²."""
    xs, ys = np.linspace(*XLIM, 400), np.linspace(*YLIM, 160)
    X, Y = np.meshgrid(xs, ys)
    Z = valley(X, Y)
    levels = np.geomspace(0.02, Z.max(), 14)
    ncol = 4
    nrow = -(-len(specs) // ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(4.6 * ncol, 2.25 * nrow + 1.0), sharex=True, sharey=True, squeeze=False
    )
    steps = len(next(iter(paths.values()))) - 1
    for ax, spec, color in zip(axes.flat, specs, colors(len(specs))):
        pts = paths[spec.name]
        ax.contourf(X, Y, Z, levels=levels, cmap="Blues_r", alpha=0.55)
        ax.contour(X, Y, Z, levels=levels, colors="0.45", linewidths=0.5)
        ax.plot(pts[:, 0], pts[:, 1], "-o", color=color, ms=3, lw=1.4, label="path")
        ax.plot(*VALLEY_START, "s", color="black", ms=6, label="start (−7, 2)")
        ax.plot(0, 0, "*", color="gold", mec="black", ms=12, zorder=1.5, label="minimum (0, 0)")
        end = pts[-1]
        ax.set_title(
            f"{spec.name}: lr {fmt_lr(spec.valley['lr'])}"
            f"{f' ({spec.source})' if spec.source in ('chapter', 'searched') else ''}"
            f"{_extras(spec.valley)}\n"
            f"end ({_num(end[0])}, {_num(end[1])}), distance {np.hypot(*end):.3g}",
            fontsize=10,
        )
        ax.set_xlim(*XLIM)
        ax.set_ylim(*YLIM)
        ax.set_xticks(np.arange(XLIM[0], XLIM[1] + 1, 2))
        ax.set_aspect("equal")
    for ax in axes.flat[len(specs) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("x")
    for ax in axes[:, 0]:
        ax.set_ylabel("y")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(
        f"f(x, y) = x²/20 + y²: {steps} steps from (−7, 2), analytic gradients, "
        f"updates by fastopt" + (f" (backend {backend})" if backend else ""),
        fontsize=13,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=dpi)
    return fig


def plot_textbook_valley(
    plt: Any,
    paths: Mapping[str, npt.NDArray[np.float64]],
    lrs: Mapping[str, float],
    path: str,
    *,
    backend: str = "",
    dpi: int = 120,
) -> Any:
    """The chapter's figure: each optimizer's path (red) over the contour lines of the valley,
    on the chapter's window x, y in [−10, 10], one panel each."""
    xs, ys = np.arange(-10, 10, 0.01), np.arange(-5, 5, 0.01)
    X, Y = np.meshgrid(xs, ys)
    Z = valley(X, Y)
    Z[Z > 7] = 0  # as the chapter draws it: only the inner ellipses
    ncol = 3
    nrow = -(-len(paths) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 4.0 * nrow), squeeze=False)
    steps = len(next(iter(paths.values()))) - 1
    for ax, (name, pts) in zip(axes.flat, paths.items()):
        ax.plot(pts[:, 0], pts[:, 1], "o-", color="red", ms=3.5, lw=1.2)
        ax.contour(X, Y, Z)
        ax.plot(0, 0, "+", color="black", ms=10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        end = pts[-1]
        ax.set_title(
            f"{name} (lr {fmt_lr(lrs[name])})\nend ({_num(end[0])}, {_num(end[1])})", fontsize=11
        )
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    for ax in axes.flat[len(paths) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"fastopt.textbook: {steps} steps on f(x, y) = x²/20 + y² from (−7, 2), "
        "the chapter's formulas on fused kernels" + (f" (backend {backend})" if backend else ""),
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return fig


def plot_training(
    plt: Any,
    results: Mapping[str, TrainResult],
    specs: Sequence[Spec],
    path: str,
    *,
    title: str,
    window: int = 20,
    dpi: int = 120,
) -> Any:
    """Training loss per iteration (moving average) of every optimizer, in one axes."""
    fig, ax = plt.subplots(figsize=(10, 6))
    # an optimizer that runs an earlier one's rule (Nesterov, AdamW) can lie on top of it: dash
    rules, shared = set(), set()
    for spec in specs:
        rule = getattr(optimizers, spec.name)._rule
        if rule in rules:
            shared.add(spec.name)
        rules.add(rule)
    for spec, color in zip(specs, colors(len(specs))):
        r = results[spec.name]
        it = np.arange(1, len(r.losses) + 1)
        ax.plot(it, r.losses, color=color, lw=0.5, alpha=0.18)
        # Nesterov and AdamW can run on top of Momentum and Adam: dash them so both show
        ax.plot(
            it,
            smooth(r.losses, window),
            color=color,
            lw=1.8,
            ls="--" if spec.name in shared else "-",
            label=f"{spec.name} (lr {fmt_lr(spec.mlp['lr'])}{_extras(spec.mlp)}): "
            f"test acc {100 * r.test_accuracy:.1f}%",
        )
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"training loss (mini-batch; bold: mean of last {window})")
    ax.set_xlim(1, max(len(r.losses) for r in results.values()))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return fig
