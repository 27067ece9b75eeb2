"""Plots people would rather look at than read: accuracy vs length, NIAH depth x length.

Every figure is a bare :class:`matplotlib.figure.Figure` drawn by its own Agg canvas. Nothing
here calls ``matplotlib.use`` or touches ``pyplot``: the backend is process-wide state that
belongs to whoever embeds hybridkit (a notebook, a GUI, a test), and pyplot keeps every figure it
creates alive in a global registry until closed. Writing PNG files needs neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hybridkit.fsutil import atomic_write


def _figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas (no display, no pyplot, no global backend)."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Lay the figure out and write it (the format follows the file's extension).

    Written through a temporary file and a rename: study shards running side by side rewrite the
    same plot, and a reader must never see half a PNG."""
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt))
    return path


def x_scale(xs: Sequence[float]) -> str:
    """``log`` (base 2: lengths and counts grow by doublings) unless a value is 0 or below,
    which has no place on a log axis (0, 0.1, 0.2 of a weight-decay sweep drew as one corner):
    then ``linear``."""
    return "log" if xs and min(xs) > 0 else "linear"


def plot_lengthgen(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    train_length: int | None = None,
    metric: str = "ex_match",
    title: str | None = None,
    errors: Mapping[str, Sequence[float]] | None = None,
    bands: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    xlabel: str = "evaluation length",
) -> Path:
    """One line per arm: ``metric`` vs evaluation length on a log2 axis (linear when a value is
    0 or below, as a swept weight decay can be), train length marked.

    ``errors`` (optional, per arm, one value per point, as a fraction like the curve) draws
    symmetric error bars -- the studies pass the binomial standard error of the test set.
    ``bands`` (optional, per arm, ``(low, high)`` per point) shades a range -- the studies pass
    the min-max over seeds. Both are wanted: the first says how much a finite test set can move
    a number, the second how much the training run itself does. ``xlabel`` lets other sweeps
    (number of key-value pairs, ...) reuse the same figure.
    """
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    markers = "osD^vP*X"
    for i, (name, points) in enumerate(curves.items()):
        xs = [x for x, _ in points]
        ys = [100 * y for _, y in points]
        # Distinct markers and dash patterns keep arms that overlap (e.g. all at 0) visible.
        yerr = None
        if errors is not None and name in errors:
            yerr = [100 * e for e in errors[name]]
        line = ax.errorbar(
            xs,
            ys,
            yerr=yerr,
            marker=markers[i % len(markers)],
            linestyle=["-", "--", ":", "-."][i % 4],
            markersize=6 - (i % 3),
            capsize=3 if yerr is not None else 0,
            elinewidth=1,
            label=name,
        )
        if bands is not None and name in bands:
            lo = [100 * a for a, _ in bands[name]]
            hi = [100 * b for _, b in bands[name]]
            ax.fill_between(xs, lo, hi, color=line.lines[0].get_color(), alpha=0.15, linewidth=0)
    # Label the measured points with their values (256, not 2^8): that is what readers look up.
    ticks = sorted({x for points in curves.values() for x, _ in points})
    if x_scale(ticks) == "log":
        ax.set_xscale("log", base=2)
    if 0 < len(ticks) <= 12:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    if train_length:
        ax.axvline(train_length, color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            "train length",
            (train_length, 2),
            rotation=90,
            color="grey",
            fontsize=8,
            xytext=(3, 0),
            textcoords="offset points",
        )
    ax.set_ylim(-3, 103)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_depth_heatmap(
    lengths: Sequence[int],
    depth_rows: Sequence[Sequence[float | None]],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """NIAH exact match per (needle depth bin, length); empty bins are blank."""
    import numpy as np

    grid = np.array([[np.nan if v is None else 100 * v for v in row] for row in depth_rows]).T
    fig = _figure(1.2 + 0.8 * len(lengths), 4.0)
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    bins = grid.shape[0]
    ax.set_yticks(range(bins), [f"{i / bins:.1f}" for i in range(bins)])
    ax.set_xlabel("length")
    ax.set_ylabel("needle depth (bin start)")
    fig.colorbar(im, ax=ax, label="ex_match (%)")
    if title:
        ax.set_title(title)
    return _save(fig, path)
