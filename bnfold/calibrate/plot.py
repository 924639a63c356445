"""A per-layer picture of what recalibration changed (``bnfold recalibrate --plot FILE.png``):
bars of each BatchNorm's mean shift and normaliser ratio. matplotlib (``bnfold[plot]``) is
imported only here, and only when a plot is asked for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bnfold.calibrate.report import CalibrationReport, LayerStatus
from bnfold.errors import UsageError
from bnfold.io.models import atomic_write, check_output_path

WIDTH = 0.4  # of each bar; a pair per layer


def plot_shifts(
    report: CalibrationReport, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Draw ``report``'s per-layer shifts into an image at ``path`` (format from its suffix,
    e.g. ``.png``/``.svg``/``.pdf``), written atomically; returns the path. Raises
    ``UsageError`` without matplotlib, for a suffix matplotlib cannot write or an existing
    ``path`` without ``overwrite``; ``SaveError`` when the file cannot be written."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed: pip install 'bnfold[plot]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg", force=False)  # no display needed
    import matplotlib.pyplot as plt

    out = Path(path)
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise UsageError(
            f"{out}: cannot draw a '{suffix or 'no extension'}' file; use one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    check_output_path(out, overwrite=overwrite)
    figure = _draw(plt, report)
    try:
        atomic_write(
            out, lambda tmp: figure.savefig(tmp, format=suffix, dpi=120), overwrite=overwrite
        )
    finally:
        plt.close(figure)
    return out


def _draw(plt: Any, report: CalibrationReport) -> Any:
    layers = report.layers
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.28 * len(layers) + 2), 7.5), sharex=True, constrained_layout=True
    )
    left = [index - WIDTH / 2 for index in range(len(layers))]
    right = [index + WIDTH / 2 for index in range(len(layers))]
    shifts = [layer.mean_shift for layer in layers]
    ratios = [layer.std_ratio for layer in layers]
    top.bar(left, [s.max if s else 0.0 for s in shifts], WIDTH, label="max over channels")
    top.bar(right, [s.mean if s else 0.0 for s in shifts], WIDTH, label="mean over channels")
    top.set_ylabel("|mean shift| / old std")
    top.set_title(report.summary(), fontsize=8, wrap=True)
    low, high = ([getattr(r, end) - 1.0 if r else 0.0 for r in ratios] for end in ("min", "max"))
    bottom.bar(left, low, WIDTH, bottom=1.0, label="min over channels")  # up or down from 1
    bottom.bar(right, high, WIDTH, bottom=1.0, label="max over channels")
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_yscale("log")
    bottom.set_ylabel("new / old sqrt(var + eps)")
    for axes in (top, bottom):
        axes.legend(fontsize=8)
    for index, layer in enumerate(layers):
        if layer.status is not LayerStatus.RECALIBRATED:
            label = "no data" if layer.status is LayerStatus.NO_DATA else "no stats"
            top.annotate(label, (index, 0), rotation=90, fontsize=7, ha="center", va="bottom")
    bottom.set_xticks(range(len(layers)))
    bottom.set_xticklabels([layer.name for layer in layers], rotation=90, fontsize=7)
    return figure
