"""``export_onnx``: a (folded) model to a checked ONNX file, and the record of what was written."""

from __future__ import annotations

import inspect
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.errors import ExportError, ModelInputError, UsageError
from bnfold.export.batch import DynamicBatchCheck, batch_size, example_args, prove_batch
from bnfold.export.exporter import EXPORTERS, ExportCall, run_exporter
from bnfold.export.files import (
    DEFAULT_EXTERNAL_DATA_THRESHOLD,
    check_target,
    publish_export,
    set_metadata,
    write,
)
from bnfold.export.graph import (
    BatchNormNode,
    batchnorm_nodes,
    check_graph,
    default_opset,
    refuse_training_batchnorm,
)
from bnfold.io.paths import staging
from bnfold.modes import inference
from bnfold.records import FoldResult, Record, format_bytes
from bnfold.runtime import flatten_outputs


@dataclass(frozen=True)
class ExportResult(Record):
    """What ``export_onnx`` wrote and what it checked."""

    path: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    exporter: str  # "dynamo" or "torchscript"
    warnings: tuple[str, ...]
    example_batch: int  # the batch size the model was exported with
    dynamic_batch: DynamicBatchCheck
    batchnorm_nodes: tuple[BatchNormNode, ...]
    node_count: int
    op_counts: dict[str, int]
    file_size: int  # bytes: the .onnx file plus its external data file
    external_data: str | None  # path of the external data file, when weights were moved out
    metadata: dict[str, str]

    def summary(self) -> str:
        """One line, e.g. ``wrote m.onnx (opset 20, dynamo, 52 nodes, 0 BatchNorm, 4.4 MB)``."""
        batch = "dynamic batch" if self.dynamic_batch.proven else "fixed batch"
        return (
            f"wrote {self.path} (opset {self.opset}, {self.exporter} exporter, "
            f"{self.node_count} nodes, {len(self.batchnorm_nodes)} BatchNormalization left, "
            f"{batch}, {format_bytes(self.file_size)})"
        )

    def format_text(self) -> str:
        """A few lines for a terminal: the summary, BN nodes left, checks and warnings."""
        lines = [
            self.summary(),
            f"  inputs: {', '.join(self.input_names)}; outputs: {', '.join(self.output_names)}",
            f"  batch: {self.dynamic_batch.detail}",
        ]
        if self.external_data:
            lines.append(f"  weights in external data file {self.external_data}")
        for bn in self.batchnorm_nodes:
            where = f" ({bn.module})" if bn.module else ""
            lines.append(f"  BatchNormalization {bn.node}{where}: {bn.reason}")
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


def export_onnx(
    model: nn.Module | FoldResult,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    metadata: FoldResult | Mapping[str, Any] | None = None,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    exporter: str = "auto",
    overwrite: bool = False,
) -> ExportResult:
    """Export ``model`` (or ``FoldResult.model``) in eval mode to a checked ONNX file at ``path``:
    the checks, the batch-dimension proof and the metadata are the README's "Export details".

    ``example_inputs``: a tensor or a tuple of positional tensors, batch on dim 0. ``exporter``:
    "auto" (dynamo, then TorchScript with a warning), "dynamo" or "torchscript". ``metadata``: the
    FoldResult whose folded/skipped counts are recorded (when ``model`` is not one), or a mapping
    of extra keys. float16 models are exported in float16; bfloat16 models are refused. The file
    (and its ``.data`` file) is written beside ``path`` and moved into place only after every
    check passed; ``overwrite`` allows replacing an existing file. Raises ExportError (nothing
    written) when the export or a check fails, SaveError when the file cannot be written,
    UsageError for bad arguments or an existing ``path`` without ``overwrite`` (also one that
    appeared during the export).
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    fold_result = model if isinstance(model, FoldResult) else None
    if isinstance(metadata, FoldResult):
        fold_result, metadata = metadata, None
    module = model.model if isinstance(model, FoldResult) else model
    if not isinstance(module, nn.Module):
        raise UsageError(f"export_onnx needs an nn.Module or a FoldResult, got {type(module)}")
    refuse_bfloat16(module)
    target = check_target(Path(path), overwrite)
    args = example_args(example_inputs, dynamic_batch)
    param = next(module.parameters(), None)  # the inputs go to the module's device
    args = args if param is None else tuple(arg.to(param.device) for arg in args)
    with inference(module):
        count = _count_outputs(module, args)
        names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
        call = ExportCall(
            module, args, _input_names(module, len(args)), names, opset, dynamic_batch
        )
        proto, used, notes = run_exporter(call, exporter)
    refuse_training_batchnorm(proto)
    props = set_metadata(proto, fold_result, metadata, used, dynamic_batch)
    with staging(target) as staged:
        data_name = write(proto, staged, target.name, external_data_threshold)
        check_graph(staged)
        proof = prove_batch(proto, staged, args, dynamic_batch)
        data_size = (staged.parent / data_name).stat().st_size if data_name else 0
        size = staged.stat().st_size + data_size
        publish_export(staged, target, data_name, overwrite)
    return ExportResult(
        path=str(target),
        opset=default_opset(proto),
        input_names=tuple(i.name for i in proto.graph.input),
        output_names=tuple(o.name for o in proto.graph.output),
        exporter=used,
        warnings=tuple(notes),
        example_batch=batch_size(args),
        dynamic_batch=proof,
        batchnorm_nodes=batchnorm_nodes(proto, fold_result),
        node_count=len(proto.graph.node),
        op_counts=dict(Counter(node.op_type for node in proto.graph.node).most_common()),
        file_size=size,
        external_data=str(target.parent / data_name) if data_name else None,
        metadata=props,
    )


def refuse_bfloat16(module: nn.Module) -> None:
    """The exporter writes a bfloat16 model's graph with mixed bfloat16/float32 types that fail
    onnx.checker (torch 2.13, opsets 18-22; below 22 ONNX's Conv has no bfloat16 at all): say so
    before exporting (and before a pipeline writes anything else)."""
    if any(t.dtype == torch.bfloat16 for t in (*module.parameters(), *module.buffers())):
        raise ExportError(
            "bfloat16 models are not exported to ONNX: torch's exporter writes their graph with "
            "mixed bfloat16/float32 types that onnx.checker rejects (and ONNX's Conv has no "
            "bfloat16 below opset 22). Export a float16 or float32 copy (model.half() or "
            "model.float()) instead. No ONNX file was written."
        )


def _count_outputs(module: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    try:
        outputs = module(*args)
    except Exception as exc:
        shapes = ", ".join(str(tuple(arg.shape)) for arg in args)
        raise ModelInputError(
            f"the model failed on the example inputs {shapes}: {type(exc).__name__}: {exc}"
        ) from exc
    count = len(flatten_outputs(outputs))
    if count == 0:
        raise ExportError("the model returns no tensor; there is nothing to export")
    return count


def _input_names(module: nn.Module, count: int) -> list[str]:
    """Names of the forward's positional parameters (e.g. ``x``), else ``input_<i>``."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in kinds][:count]
    if len(names) < count or len(set(names)) < count:
        return [f"input_{i}" for i in range(count)]
    return names
