"""The only caller of ``torch.onnx.export``: the dynamo exporter, or the TorchScript one."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from bnfold.errors import ExportError, first_line
from bnfold.io.program_export import quiet_torch

EXPORTERS = ("auto", "dynamo", "torchscript")

#: torch loggers that narrate the export on stderr; quieted to errors while bnfold exports
#: (failures are reported through ExportError and the result's warnings instead).
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental")


@dataclass(frozen=True)
class ExportCall:
    """What to export: the module (in eval mode), its positional example tensors, the names of
    its inputs and outputs, the opset (None: the exporter's default) and whether dim 0 of every
    input and output is dynamic."""

    module: nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    opset: int | None
    dynamic_batch: bool


def run_exporter(call: ExportCall, exporter: str) -> tuple[Any, str, list[str]]:
    """Returns (ModelProto, exporter used, warnings). ``exporter`` is one of ``EXPORTERS``:
    "auto" tries dynamo, then TorchScript with a warning that says why."""
    if exporter == "torchscript":
        return _export_torchscript(call)
    try:
        return _export_dynamo(call)
    except ExportError as exc:
        if exporter == "dynamo":
            raise
        dynamo_error = str(exc)
    try:
        proto, used, notes = _export_torchscript(call)
    except ExportError as exc:
        raise ExportError(f"{dynamo_error}; the TorchScript exporter also failed: {exc}") from exc
    note = (
        f"the dynamo exporter failed ({dynamo_error}); the file was written by the deprecated "
        "TorchScript exporter instead"
    )
    return proto, used, [note, *notes]


def _export_dynamo(call: ExportCall) -> tuple[Any, str, list[str]]:
    dynamic_shapes = tuple({0: Dim.AUTO} for _ in call.args) if call.dynamic_batch else None
    with _exporting("dynamo exporter") as notes:
        program = torch.onnx.export(
            call.module,
            call.args,
            dynamo=True,
            verbose=False,
            input_names=call.input_names,
            output_names=call.output_names,
            opset_version=call.opset,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
        )
        proto = program.model_proto
    return proto, "dynamo", notes


def _export_torchscript(call: ExportCall) -> tuple[Any, str, list[str]]:
    import onnx

    axes = None
    if call.dynamic_batch:
        axes = {name: {0: "batch"} for name in [*call.input_names, *call.output_names]}
    with (
        tempfile.TemporaryDirectory(prefix="bnfold-ts-") as tmp,
        _exporting("TorchScript exporter") as notes,
    ):
        file = Path(tmp) / "model.onnx"
        torch.onnx.export(
            call.module,
            call.args,
            str(file),
            dynamo=False,
            input_names=call.input_names,
            output_names=call.output_names,
            opset_version=call.opset,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
        proto = onnx.load(str(file))
    return proto, "torchscript", notes


@contextlib.contextmanager
def _exporting(what: str) -> Iterator[list[str]]:
    """Keep the exporter's prints, log lines and deprecation noise off the console; collect
    warnings that matter (e.g. TracerWarnings about traced control flow) as notes. A failure
    is raised as ``ExportError`` naming ``what`` and the root cause."""
    sink = io.StringIO()
    with (
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
        quiet_torch(_NOISY_LOGGERS, level=logging.ERROR) as notes,
    ):
        try:
            yield notes
        except Exception as exc:
            raise ExportError(f"{what}: {root_cause(exc)}") from exc


def root_cause(exc: BaseException) -> str:
    """The innermost ``__cause__`` of ``exc``, as ``Type: first message line``."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return first_line(exc)
