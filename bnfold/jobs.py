"""What a run of the pipeline is asked to do, how it is followed, and what it reports.

A ``Job`` is a command's request as plain data: MODEL (``ModelRequest``), DATA to recalibrate
on (``DataRequest``), what to verify on (``VerifyRequest``) and which stages to run and files to
write. ``Hooks`` are how a caller follows the stages (a spinner, a progress bar). A ``Report``
holds each stage's record, for ``bnfold.report`` to render.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnfold.calibrate.data import IMAGENET_MEAN, IMAGENET_STD
from bnfold.calibrate.report import CalibrationReport
from bnfold.export import ExportResult
from bnfold.io.models import SavedModel
from bnfold.records import FoldResult, Plan
from bnfold.verification.records import VerificationReport

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ModelRequest:
    """MODEL as given, and how to build its example inputs (``shapes``: (dims, dtype or None)
    per positional input; default the program's own example inputs, else ``--data``'s)."""

    spec: str
    arch: str | None = None
    trust_pickle: bool = False
    shapes: tuple[tuple[tuple[int, ...], str | None], ...] = ()
    dtype: str | None = None


@dataclass(frozen=True)
class DataRequest:
    """DATA to recalibrate on, and how to batch it (``bnfold.load_data``'s options)."""

    spec: str
    batches: int | None = None  # at most this many batches (per rank)
    batch_size: int = 32
    seed: int = 0
    image_size: int = 224
    resize: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


@dataclass(frozen=True)
class VerifyRequest:
    """What to verify on: the first ``batches`` batches of ``data`` (a DATA spec, or batches
    in memory), else the example inputs; plus seeded random batches of other sizes."""

    data: str | list[Any] | None = None
    batches: int = 4
    batch_size: int = 8
    seed: int = 0
    random_batch_sizes: tuple[int, ...] = (1, 3)
    providers: tuple[str, ...] | None = None  # None: CPU, and CUDA where it is usable


@dataclass(frozen=True)
class Job:
    """What one run asks for; every stage but loading is optional."""

    command: str  # names the run in its report
    model: ModelRequest | None = None  # None for a model in memory (``process``)
    data: DataRequest | None = None  # recalibrate on it first
    find: bool = True  # read the dataflow and find the pairs...
    fold: bool = True  # ...and fold them
    merge_branches: bool = True  # merge aligned parallel branches into one conv each
    save: bool = False  # write the model to ``output`` (None: a name beside MODEL)
    output: Path | None = None
    also_pt2: bool = False  # and a .pt2 beside a pickled-module output
    onnx: Path | None = None  # export the (folded) model here
    opset: int | None = None
    dynamic_batch: bool = True
    verify: VerifyRequest | None = None  # compare the results with the original
    verify_label: str = "folded"  # the folded model's name among the candidates
    candidates: tuple[tuple[str, Any], ...] = ()  # more to verify: ONNX paths, ModelRequests
    model_role: str = "MODEL"  # the option that names MODEL, in messages
    device: torch.device | None = None  # move the loaded model here
    reports: tuple[tuple[str, str | None], ...] = ()  # (option, path) of each report file
    reads: tuple[tuple[str, Any], ...] = ()  # (option, path) of other files the command reads
    dry_run: bool = False  # check and name the model and ONNX outputs, write neither
    force: bool = False  # replace existing outputs


@dataclass(frozen=True)
class Report:
    """What one run did, for ``bnfold.report`` to render: each stage's record (None: the stage
    did not run) and what the run was given (``model``: ``LoadedModel.to_dict()``; ``inputs``:
    ``[{"shape", "dtype"}]``; ``data``: what DATA held; ``onnx``: the file ``verify_onnx``
    checked)."""

    calibration: CalibrationReport | None = None
    plan: Plan | None = None
    result: FoldResult | None = None
    bn_kernels_before: int | None = None
    bn_kernels_after: int | None = None
    outputs: tuple[SavedModel, ...] = ()
    export: ExportResult | None = None
    verification: VerificationReport | None = None
    command: str = ""
    versions: dict[str, str] | None = None
    model: dict[str, Any] | None = None
    inputs: tuple[dict[str, Any], ...] = ()
    inputs_from: str = ""
    data: dict[str, Any] | None = None
    onnx: str | None = None
    dry_run: bool = False
    notes: tuple[str, ...] = ()

    @property
    def written(self) -> tuple[str, ...]:
        """The files the run wrote, complete."""
        return tuple(o.path for o in self.outputs) + ((self.export.path,) if self.export else ())


@dataclass(frozen=True)
class Hooks:
    """How a caller follows a run: ``stage(name)`` wraps each stage (the CLI shows a spinner
    and names the stage in an unexpected error); ``recalibrating(total_samples)`` wraps the
    recalibration and gives its per-batch ``progress(index, items)`` callback, or None."""

    stage: Callable[[str], AbstractContextManager[object]] = lambda name: nullcontext()
    recalibrating: Callable[[int | None], AbstractContextManager[ProgressFn | None]] = (
        lambda total: nullcontext()
    )


NO_HOOKS = Hooks()
