"""Export a (folded) model to ONNX, check the graph, prove the batch dimension, write atomically.

This is the only module that calls ``torch.onnx.export``. The contract of ``export_onnx``:

- the model runs in eval mode (each module's training flag is restored afterwards);
- the dynamo exporter is tried first; if it fails, the TorchScript exporter is used and the
  result carries a warning saying so (``exporter="auto"``);
- a BatchNormalization in training mode is refused (``ExportError``), since ORT's CUDA provider
  rejects it and eval outputs would use batch statistics; BatchNormalization nodes that remain
  are listed with the reason;
- the graph passes ``onnx.checker`` with ``full_check=True`` (checker plus strict shape inference);
- with ``dynamic_batch=True`` (default) the model is exported with an example batch of at least 2
  (a batch-1 example is repeated), dim 0 of every input and output must be symbolic, and ONNX
  Runtime must run the file at batch sizes 1, 3 and the example's with outputs of that batch;
- the file records bnfold's and torch's versions and the fold counts in ``metadata_props``;
- weights go to an external data file ``<name>.data`` when they exceed
  ``external_data_threshold`` bytes (protobuf cannot hold a file over 2 GiB);
- the file (and its data file) is written under its own name in a private temporary directory
  next to ``path`` (``bnfold.io.paths.staging``) and moved into place only after every check
  passed: on any failure nothing is left. Without ``overwrite`` an existing ``path`` is refused
  and the move is exclusive (a file that appeared meanwhile is kept, ``UsageError``); with it
  the files are replaced with ``os.replace``.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import logging
import os
import stat
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.errors import BnfoldError, ExportError, ModelInputError, SaveError, UsageError
from bnfold.io.inputs import as_args
from bnfold.io.paths import publish, staging
from bnfold.modes import inference
from bnfold.records import FoldResult, Record, format_bytes
from bnfold.runtime import flatten_outputs, ort_runner
from bnfold.version import __version__

#: Above this many bytes of weights, they are written to an external data file. Protobuf caps a
#: serialised ONNX file at 2 GiB; 256 MiB of headroom is left for the graph itself.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 256 * 1024**2

#: Tensors smaller than this stay inside the .onnx file even when external data is used (shape
#: inference must read small constants such as axes and shapes).
EXTERNAL_TENSOR_MIN_BYTES = 1024

#: Batch sizes (besides the example's) at which ONNX Runtime must run a dynamic-batch export.
PROOF_BATCH_SIZES = (1, 3)

EXPORTERS = ("auto", "dynamo", "torchscript")

_FOLD_TARGETS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class BatchNormNode(Record):
    """A BatchNormalization node left in the exported graph, and why it was not folded."""

    node: str
    module: str | None  # the module path it came from, when the exporter recorded it
    reason: str


@dataclass(frozen=True)
class DynamicBatchCheck(Record):
    """The proof that the exported file accepts any batch size (or why there is none)."""

    requested: bool
    symbolic_inputs: tuple[str, ...]  # inputs whose dim 0 is symbolic in the file
    symbolic_outputs: tuple[str, ...]
    batch_sizes_run: tuple[int, ...]  # batch sizes ONNX Runtime ran with correct output batch
    proven: bool
    detail: str


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
        lines = [self.summary()]
        lines.append(
            f"  inputs: {', '.join(self.input_names)}; outputs: {', '.join(self.output_names)}"
        )
        lines.append(f"  batch: {self.dynamic_batch.detail}")
        if self.external_data:
            lines.append(f"  weights in external data file {self.external_data}")
        for bn in self.batchnorm_nodes:
            where = f" ({bn.module})" if bn.module else ""
            lines.append(f"  BatchNormalization {bn.node}{where}: {bn.reason}")
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


# ------------------------------------------------------------------------------ public entry


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
    """Export ``model`` (or ``FoldResult.model``) to ONNX at ``path``; see the module docstring.

    ``example_inputs`` is a tensor or a tuple of positional tensors, batch on dim 0.
    The file's ``metadata_props`` record bnfold's and torch's versions, and the folded/skipped
    counts of the FoldResult (``model`` itself, or ``metadata``); a mapping ``metadata`` adds
    its own keys. ``exporter`` is
    "auto" (dynamo, then TorchScript with a warning), "dynamo" or "torchscript".
    ``overwrite`` allows replacing an existing file at ``path`` (and its ``.data`` file).
    float16 models are exported in float16; bfloat16 models are refused (ExportError: the
    exported graph would fail onnx.checker).
    Raises ExportError (nothing written) when the export or a check fails, SaveError when the
    file cannot be written, UsageError for bad arguments or an existing ``path`` without
    ``overwrite`` (also one that appeared during the export).
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    fold_result = model if isinstance(model, FoldResult) else None
    if isinstance(metadata, FoldResult):
        fold_result, metadata = metadata, None
    module = model.model if isinstance(model, FoldResult) else model
    if not isinstance(module, nn.Module):
        raise UsageError(f"export_onnx needs an nn.Module or a FoldResult, got {type(module)}")
    _refuse_bfloat16(module)
    target = _check_target(Path(path), overwrite)
    args = _on_device(_example_args(example_inputs, dynamic_batch), module)
    with inference(module):
        output_count = _count_outputs(module, args)
        input_names = _input_names(module, len(args))
        output_names = _output_names(output_count)
        proto, used, notes = _run_exporter(
            module, args, input_names, output_names, opset, dynamic_batch, exporter
        )
    _refuse_training_batchnorm(proto)
    props = _metadata(fold_result, metadata, used, dynamic_batch)
    _set_metadata(proto, props)
    bn_nodes = batchnorm_nodes(proto, fold_result)
    external = _weight_bytes(proto) > external_data_threshold
    with staging(target) as staged:
        data_name = _write(proto, staged, target.name, external)
        _check_graph(staged)
        proof = _prove_batch(staged, args, dynamic_batch)
        size = staged.stat().st_size + (
            (staged.parent / data_name).stat().st_size if data_name else 0
        )
        _publish(staged, target, data_name, overwrite)
    return ExportResult(
        path=str(target),
        opset=_opset(proto),
        input_names=tuple(i.name for i in proto.graph.input),
        output_names=tuple(o.name for o in proto.graph.output),
        exporter=used,
        warnings=tuple(notes),
        example_batch=_batch_size(args),
        dynamic_batch=proof,
        batchnorm_nodes=bn_nodes,
        node_count=len(proto.graph.node),
        op_counts=dict(Counter(node.op_type for node in proto.graph.node).most_common()),
        file_size=size,
        external_data=str(target.parent / data_name) if data_name else None,
        metadata=props,
    )


# ------------------------------------------------------------------------------ inputs, names


def _example_args(example_inputs: Any, dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    args = as_args(example_inputs)
    if not args:
        raise UsageError("export needs at least one example input tensor")
    for index, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor):
            raise UsageError(
                f"example input {index} is a {type(arg).__name__}; export_onnx takes tensors "
                "(a tensor or a tuple of positional tensors)"
            )
        if dynamic_batch and arg.dim() == 0:
            raise UsageError(
                f"example input {index} is a scalar, so it has no batch dimension; pass "
                "dynamic_batch=False to export with fixed shapes"
            )
    if dynamic_batch:
        sizes = {arg.shape[0] for arg in args}
        if len(sizes) > 1:
            raise UsageError(
                f"example inputs have different sizes on dim 0 ({sorted(sizes)}); a dynamic "
                "batch needs one batch size shared by every input (or pass dynamic_batch=False)"
            )
        if sizes == {1}:  # a batch-1 example lets the exporter specialise the batch to 1
            args = tuple(torch.cat([arg, arg]) for arg in args)
    return tuple(args)


def _refuse_bfloat16(module: nn.Module) -> None:
    """The exporter writes a bfloat16 model's graph with mixed bfloat16/float32 types that fail
    onnx.checker (torch 2.13, opsets 18-22; below 22 ONNX's Conv has no bfloat16 at all): say so
    before exporting."""
    if any(t.dtype == torch.bfloat16 for t in (*module.parameters(), *module.buffers())):
        raise ExportError(
            "bfloat16 models are not exported to ONNX: torch's exporter writes their graph with "
            "mixed bfloat16/float32 types that onnx.checker rejects (and ONNX's Conv has no "
            "bfloat16 below opset 22). Export a float16 or float32 copy (model.half() or "
            "model.float()) instead. No ONNX file was written."
        )


def _on_device(args: tuple[torch.Tensor, ...], module: nn.Module) -> tuple[torch.Tensor, ...]:
    """The example inputs on the module's device (its first parameter's, else unchanged)."""
    param = next(module.parameters(), None)
    return args if param is None else tuple(arg.to(param.device) for arg in args)


def _batch_size(args: tuple[torch.Tensor, ...]) -> int:
    return int(args[0].shape[0]) if args[0].dim() else 1


def _with_batch(args: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """The example rows repeated or cut to ``batch`` rows."""
    rows = torch.arange(batch) % _batch_size(args)
    return tuple(arg[rows] for arg in args)


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


def _output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


# ---------------------------------------------------------------------------------- exporters


def _run_exporter(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    dynamic_batch: bool,
    exporter: str,
) -> tuple[Any, str, list[str]]:
    """Returns (ModelProto, exporter used, warnings)."""
    export_args = (module, args, input_names, output_names, opset, dynamic_batch)
    if exporter == "torchscript":
        proto, notes = _export_torchscript(*export_args)
        return proto, "torchscript", notes
    try:
        proto, notes = _export_dynamo(*export_args)
        return proto, "dynamo", notes
    except ExportError as exc:
        if exporter == "dynamo" or not _torchscript_available():
            raise
        dynamo_error = str(exc)
    try:
        proto, notes = _export_torchscript(*export_args)
    except ExportError as exc:
        raise ExportError(f"{dynamo_error}; the TorchScript exporter also failed: {exc}") from exc
    note = (
        f"the dynamo exporter failed ({dynamo_error}); the file was written by the deprecated "
        "TorchScript exporter instead"
    )
    return proto, "torchscript", [note, *notes]


def _export_dynamo(module, args, input_names, output_names, opset, dynamic_batch):
    from torch.export import Dim

    dynamic_shapes = tuple({0: Dim.AUTO} for _ in args) if dynamic_batch else None
    with _quiet() as notes:
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                verbose=False,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                optimize=True,
            )
            proto = program.model_proto
        except Exception as exc:
            raise ExportError(f"dynamo exporter: {_root_cause(exc)}") from exc
    return proto, notes


def _export_torchscript(module, args, input_names, output_names, opset, dynamic_batch):
    import onnx

    axes = None
    if dynamic_batch:
        axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with tempfile.TemporaryDirectory(prefix="bnfold-ts-") as tmp, _quiet() as notes:
        file = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(
                module,
                args,
                str(file),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
            proto = onnx.load(str(file))
        except Exception as exc:
            raise ExportError(f"TorchScript exporter: {_root_cause(exc)}") from exc
    return proto, notes


def _torchscript_available() -> bool:
    return "dynamo" in inspect.signature(torch.onnx.export).parameters


#: torch loggers that narrate the export on stderr; quieted to errors while bnfold exports
#: (failures are reported through ExportError and the result's warnings instead).
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental")


@contextlib.contextmanager
def _quiet() -> Iterator[list[str]]:
    """Keep the exporters' prints, log lines and deprecation noise off the console; collect
    warnings that matter (e.g. TracerWarnings about traced control flow) as notes."""
    notes: list[str] = []
    sink = io.StringIO()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        warnings.simplefilter("always")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield notes
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
            for item in caught:
                if issubclass(item.category, (DeprecationWarning, FutureWarning)):
                    continue
                text = str(item.message).strip().splitlines()[0] if str(item.message) else ""
                if text and f"{item.category.__name__}: {text}" not in notes:
                    notes.append(f"{item.category.__name__}: {text}")


def _root_cause(exc: BaseException) -> str:
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


# --------------------------------------------------------------------------- graph inspection


def training_batchnorms(proto: Any) -> list[str]:
    """Names of BatchNormalization nodes in training mode (``training_mode=1`` or the extra
    running-statistics outputs), in the main graph and in local functions."""
    nodes = list(proto.graph.node)
    for function in proto.functions:
        nodes.extend(function.node)
    found = []
    for node in nodes:
        if node.op_type != "BatchNormalization":
            continue
        training = any(a.name == "training_mode" and a.i == 1 for a in node.attribute)
        extra_outputs = sum(1 for out in node.output[1:] if out)
        if training or extra_outputs:
            found.append(node.name or node.output[0])
    return found


def _refuse_training_batchnorm(proto: Any) -> None:
    found = training_batchnorms(proto)
    if found:
        raise ExportError(
            f"the exported graph has {len(found)} BatchNormalization node(s) in training mode "
            f"({', '.join(found[:5])}); eval outputs would use batch statistics and ORT's CUDA "
            "provider rejects them. No ONNX file was written. Put the model in eval mode and "
            "call F.batch_norm with training=False."
        )


def batchnorm_nodes(proto: Any, fold_result: FoldResult | None = None) -> tuple[BatchNormNode, ...]:
    """Every BatchNormalization node in the main graph, with the module it came from and why it
    is still there (bnfold's skip reason when known, else what feeds it)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    consumers = Counter(name for node in proto.graph.node for name in node.input)
    skips = {skip.bn: skip for skip in fold_result.skipped} if fold_result is not None else {}
    left = []
    for node in proto.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        module = _module_path(node)
        skip = skips.get(module) if module else None
        if skip is not None:
            reason = f"not folded by bnfold: {skip.reason.label} ({skip.detail})"
        else:
            reason = _structural_reason(node, producers, consumers)
        left.append(BatchNormNode(node.name or node.output[0], module, reason))
    return tuple(left)


def _module_path(node: Any) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if len(scopes) >= 3 and scopes[-2] else None
    return None


def _structural_reason(node: Any, producers: dict, consumers: Counter) -> str:
    source = producers.get(node.input[0])
    if source is None:
        return "its input is a graph input: there is no layer before it to fold into"
    if source.op_type in _FOLD_TARGETS:
        users = consumers[node.input[0]]
        if users > 1:
            return (
                f"follows a {source.op_type} whose output has {users} consumers; folding "
                "would change the other paths"
            )
        return f"follows a {source.op_type} but was not folded (the model was not folded?)"
    return f"follows a {source.op_type} node: there is no Conv/Gemm before it to fold into"


def _opset(proto: Any) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the exported model declares no default-domain opset")


def _weight_bytes(proto: Any) -> int:
    return sum(tensor.ByteSize() for tensor in proto.graph.initializer)


def _symbolic_dim0(values: Any) -> tuple[list[str], list[str]]:
    """(names whose dim 0 is symbolic, descriptions of those that are not)."""
    symbolic, fixed = [], []
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param and not dims[0].HasField("dim_value"):
            symbolic.append(value.name)
        elif not dims:
            fixed.append(f"{value.name!r} has no batch dimension")
        else:
            fixed.append(f"{value.name!r} has dim 0 fixed to {dims[0].dim_value}")
    return symbolic, fixed


# ------------------------------------------------------------------------------- metadata


def _metadata(
    fold_result: FoldResult | None,
    extra: Mapping[str, Any] | None,
    exporter: str,
    dynamic_batch: bool,
) -> dict[str, str]:

    props = {
        "bnfold.version": __version__,
        "torch.version": torch.__version__,
        "bnfold.exporter": exporter,
        "bnfold.dynamic_batch": str(dynamic_batch).lower(),
    }
    if fold_result is not None:
        props["bnfold.folded"] = str(len(fold_result.folded))
        props["bnfold.skipped"] = str(len(fold_result.skipped))
    if extra is not None:
        props.update({str(key): str(value) for key, value in extra.items()})
    return props


def _set_metadata(proto: Any, props: dict[str, str]) -> None:
    existing = {prop.key: prop.value for prop in proto.metadata_props}
    existing.update(props)
    del proto.metadata_props[:]
    for key, value in existing.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


# ------------------------------------------------------------------------ writing and checks


def external_data_path(path: str | os.PathLike[str]) -> Path:
    """Where ``export_onnx(..., path)`` puts the weights when they go to an external file."""
    target = Path(path)
    return target.with_name(f"{target.name}.data")


def _check_target(target: Path, overwrite: bool) -> Path:
    if target.is_dir():
        raise SaveError(f"{target} is a directory; give a file name such as model.onnx")
    if not target.parent.is_dir():
        raise SaveError(f"cannot write {target}: directory {target.parent} does not exist")
    if os.path.lexists(target) and not overwrite:
        raise UsageError(f"{target} already exists; pass --force (overwrite=True) to replace it")
    return target


def _write(proto: Any, staged: Path, name: str, external: bool) -> str | None:
    """Serialise into the staging directory; returns the external data file name, if any."""
    import onnx

    data_name = external_data_path(name).name if external else None
    try:
        if external:
            onnx.save_model(
                proto,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=EXTERNAL_TENSOR_MIN_BYTES,
            )
        else:
            onnx.save_model(proto, str(staged))
    except (OSError, ValueError) as exc:
        raise SaveError(f"could not write the ONNX file for {name}: {exc}") from exc
    if data_name and not (staged.parent / data_name).exists():
        data_name = None  # every tensor was small enough to stay inline
    return data_name


def _check_graph(staged: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except Exception as exc:  # checker and shape-inference errors have several types
        raise ExportError(
            f"onnx.checker / shape inference rejected the exported graph: {_root_cause(exc)}"
        ) from exc


def _prove_batch(
    staged: Path, args: tuple[torch.Tensor, ...], dynamic_batch: bool
) -> DynamicBatchCheck:
    import onnx

    proto = onnx.load(str(staged), load_external_data=False)
    sym_in, fixed_in = _symbolic_dim0(proto.graph.input)
    sym_out, fixed_out = _symbolic_dim0(proto.graph.output)
    example = _batch_size(args)
    try:
        runner = ort_runner(staged)
    except BnfoldError as exc:
        raise ExportError(f"{exc}. No ONNX file was written.") from exc
    if not dynamic_batch:
        ran = _run_batches(runner, args, (example,), check_batch=False)
        return DynamicBatchCheck(
            False,
            tuple(sym_in),
            tuple(sym_out),
            ran,
            False,
            f"fixed to {example} (dynamic_batch=False)",
        )
    if fixed_in or fixed_out:
        raise ExportError(
            "the export specialised the batch dimension: "
            + "; ".join(fixed_in + fixed_out)
            + ". The model's forward probably hard-codes the batch size (e.g. x.view(2, -1)); "
            "use x.flatten(1) or x.view(x.shape[0], -1), or export with dynamic_batch=False. "
            "No ONNX file was written."
        )
    sizes = tuple(sorted({*PROOF_BATCH_SIZES, example}))
    ran = _run_batches(runner, args, sizes, check_batch=True)
    detail = f"dynamic (dim 0 symbolic; ONNX Runtime ran batch sizes {', '.join(map(str, ran))})"
    return DynamicBatchCheck(True, tuple(sym_in), tuple(sym_out), ran, True, detail)


def _run_batches(runner: Any, args, sizes, check_batch: bool) -> tuple[int, ...]:
    for size in sizes:
        try:
            outputs = runner(_with_batch(args, size))
        except BnfoldError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(
                f"ONNX Runtime could not run the exported file at batch size {size}: "
                f"{_root_cause(exc)}. No ONNX file was written."
            ) from exc
        wrong = [
            f"{name!r} has shape {tuple(out.shape)}"
            for name, out in zip(runner.output_names, outputs, strict=True)
            if check_batch and (out.ndim == 0 or out.shape[0] != size)
        ]
        if wrong:
            raise ExportError(
                f"at batch size {size} ONNX Runtime returned outputs of another batch size "
                f"({'; '.join(wrong)}): the exported graph specialised the batch dimension. "
                "Fix the forward or export with dynamic_batch=False. No ONNX file was written."
            )
    return tuple(sizes)


def _publish(staged: Path, target: Path, data_name: str | None, overwrite: bool) -> None:
    """Move the staged data file, then the .onnx file, into place (``bnfold.io.paths.publish``).
    Without ``overwrite``, a data file moved here is removed again if the .onnx file cannot
    follow (nothing was at its name before)."""
    moved: list[Path] = []
    try:
        for path in [staged, *([staged.parent / data_name] if data_name else [])]:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if data_name:  # onnx writes the data file owner-only; give it the .onnx file's mode
            os.chmod(staged.parent / data_name, stat.S_IMODE(staged.stat().st_mode))
            publish(staged.parent / data_name, target.parent / data_name, overwrite=overwrite)
            moved.append(target.parent / data_name)
        publish(staged, target, overwrite=overwrite)
    except BaseException as exc:
        if not overwrite:
            for path in moved:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        if isinstance(exc, OSError):
            raise SaveError(
                f"could not move the exported file into place at {target}: {exc}"
            ) from exc
        raise
