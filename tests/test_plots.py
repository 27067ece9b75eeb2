"""Plots are written as PNG files without touching matplotlib's process-wide state."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from hybridkit.eval.plots import plot_depth_heatmap, plot_lengthgen

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    curves = {"a": [(32, 0.9), (64, 0.5)], "b": [(32, 1.0), (64, 0.0)]}
    out = plot_lengthgen(curves, tmp_path / "len.png", train_length=32, title="t")
    assert out.read_bytes().startswith(PNG_MAGIC)
    # error bars (binomial standard errors) and seed-range bands, another x axis; small files
    errors = {"a": [0.02, 0.03], "b": [0.0, 0.0]}
    bands = {"a": [(0.85, 0.95), (0.4, 0.6)], "b": [(1.0, 1.0), (0.0, 0.0)]}
    out = plot_lengthgen(curves, tmp_path / "err.png", errors=errors, bands=bands, xlabel="pairs")
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size < 200_000
    assert not list(tmp_path.glob(".*.tmp")), "the atomic write left its temporary file"
    # a swept value of 0 (weight decay) gets a linear axis, where every point has a place
    from hybridkit.eval.plots import x_scale

    assert x_scale([16, 32, 64]) == "log" and x_scale([0.0, 0.1, 0.2]) == "linear"
    sweep = {"a": [(0.0, 0.5), (0.1, 0.6), (0.2, 0.7)]}
    fig_path = plot_lengthgen(sweep, tmp_path / "wd.png", xlabel="weight decay")
    assert fig_path.read_bytes().startswith(PNG_MAGIC)
    heat = plot_depth_heatmap([32, 64], [[1.0, None], [0.5, 0.25]], tmp_path / "heat.png")
    assert heat.read_bytes().startswith(PNG_MAGIC)


def test_importing_and_plotting_leave_the_backend_and_pyplot_alone(tmp_path):
    # A fresh interpreter: the first import is the one that used to switch the backend.
    code = textwrap.dedent(
        f"""
        import sys
        import matplotlib
        matplotlib.use("svg")
        import hybridkit.eval.plots as plots
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        plots.plot_lengthgen({{"a": [(8, 0.5), (16, 0.25)]}}, {str(tmp_path / "p.png")!r})
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)


def test_niah_depths_fall_into_their_own_bins():
    """Depths arrive as float32: 0.7 is 0.69999999 and fell into bin 6 with 0.6 (bin 7 empty);
    each of the eleven depths 0, 0.1, ..., 1.0 now lands in its own bin (1.0 in the last)."""
    import torch

    from hybridkit.eval.lengthgen import depth_bins

    depths = torch.linspace(0, 1, 11, dtype=torch.float64).float()
    assert depth_bins(depths).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]
