"""A per-layer picture of what recalibration changed (``bnfold recalibrate --plot FILE.png``).

Two panels, one bar group per BatchNorm in model order: the shift of the running mean in units
of the old standard deviation (max and mean over channels), and the ratio new / old of the
normaliser ``sqrt(var + eps)`` (min and max over channels, log scale). Layers that drifted
stand out at a glance. BatchNorms that saw no data or have no running statistics are marked.

matplotlib is an optional dependency (``pip install 'bnfold[plot]'``); it is imported only
here, and only when a plot is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bnfold.calibrate.recalibrate import CalibrationReport, LayerStatus
from bnfold.errors import UsageError
from bnfold.io.models import atomic_write, check_output_path

__all__ = ["plot_shifts"]


def plot_shifts(
    report: CalibrationReport, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Draw ``report``'s per-layer shifts into an image at ``path`` (format from its suffix,
    e.g. ``.png``/``.svg``/``.pdf``), written atomically. Returns the path.

    Raises ``UsageError`` when matplotlib is not installed or the suffix is not an image
    format matplotlib writes or ``path`` exists and ``overwrite`` is False (see
    ``bnfold.io.models.atomic_write``), ``SaveError`` when the file cannot be written.
    """
    plt = _pyplot()
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


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed: pip install 'bnfold[plot]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg", force=False)  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _draw(plt: Any, report: CalibrationReport) -> Any:
    layers = report.layers
    count = max(len(layers), 1)
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.28 * count + 2), 7.5), sharex=True, constrained_layout=True
    )
    positions = list(range(len(layers)))
    width = 0.4
    shift_max, shift_mean, ratio_low, ratio_high = [], [], [], []
    for layer in layers:
        done = layer.status is LayerStatus.RECALIBRATED
        shift_max.append(layer.mean_shift.max if done else 0.0)
        shift_mean.append(layer.mean_shift.mean if done else 0.0)
        ratio_low.append(layer.std_ratio.min if done else 1.0)
        ratio_high.append(layer.std_ratio.max if done else 1.0)
    top.bar([p - width / 2 for p in positions], shift_max, width, label="max over channels")
    top.bar([p + width / 2 for p in positions], shift_mean, width, label="mean over channels")
    top.set_ylabel("|mean shift| / old std")
    top.set_title(report.summary(), fontsize=8, wrap=True)
    top.legend(fontsize=8)
    for offset, values, label in [
        (-width / 2, ratio_low, "min over channels"),
        (width / 2, ratio_high, "max over channels"),
    ]:  # bars grow up or down from 1 (no change)
        heights = [value - 1.0 for value in values]
        bottom.bar([p + offset for p in positions], heights, width, bottom=1.0, label=label)
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_yscale("log")
    bottom.set_ylabel("new / old sqrt(var + eps)")
    bottom.legend(fontsize=8)
    for index, layer in enumerate(layers):
        if layer.status is not LayerStatus.RECALIBRATED:
            label = "no data" if layer.status is LayerStatus.NO_DATA else "no stats"
            top.annotate(label, (index, 0), rotation=90, fontsize=7, ha="center", va="bottom")
    bottom.set_xticks(positions)
    bottom.set_xticklabels([layer.name for layer in layers], rotation=90, fontsize=7)
    return figure
