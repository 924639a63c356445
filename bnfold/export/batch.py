"""The batch-dimension proof: export with a batch of at least 2, then show that the written
file's dim 0 is symbolic and that ONNX Runtime runs it at other batch sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import BnfoldError, ExportError, UsageError
from bnfold.export.exporter import root_cause
from bnfold.io.inputs import as_args
from bnfold.records import Record
from bnfold.runtime import OrtRunner, ort_runner

#: Batch sizes (besides the example's) at which ONNX Runtime must run a dynamic-batch export.
PROOF_BATCH_SIZES = (1, 3)


@dataclass(frozen=True)
class DynamicBatchCheck(Record):
    """The proof that the exported file accepts any batch size (or why there is none)."""

    requested: bool
    symbolic_inputs: tuple[str, ...]  # inputs whose dim 0 is symbolic in the file
    symbolic_outputs: tuple[str, ...]
    batch_sizes_run: tuple[int, ...]  # batch sizes ONNX Runtime ran with correct output batch
    proven: bool
    detail: str


def example_args(example_inputs: Any, dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    """The example inputs as positional tensors; for a dynamic batch, one batch size shared by
    all, and a batch-1 example repeated to 2 (at 1 the exporter would specialise the batch)."""
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
    if not dynamic_batch:
        return args
    sizes = {arg.shape[0] for arg in args}
    if len(sizes) > 1:
        raise UsageError(
            f"example inputs have different sizes on dim 0 ({sorted(sizes)}); a dynamic "
            "batch needs one batch size shared by every input (or pass dynamic_batch=False)"
        )
    return tuple(torch.cat([arg, arg]) for arg in args) if sizes == {1} else args


def batch_size(args: tuple[torch.Tensor, ...]) -> int:
    return int(args[0].shape[0]) if args[0].dim() else 1


def prove_batch(
    proto: Any, staged: Path, args: tuple[torch.Tensor, ...], dynamic_batch: bool
) -> DynamicBatchCheck:
    """Read dim 0 of the inputs and outputs of ``proto`` (the model written to ``staged``) and
    run the file on ONNX Runtime: at the example's batch size only for a fixed batch; at
    ``PROOF_BATCH_SIZES`` too, each output with the batch it was given, for a dynamic one.
    ``ExportError`` when the batch was specialised."""
    sym_in, fixed_in = _symbolic_dim0(proto.graph.input)
    sym_out, fixed_out = _symbolic_dim0(proto.graph.output)
    symbolic = (tuple(sym_in), tuple(sym_out))
    example = batch_size(args)
    try:
        runner = ort_runner(staged)
    except BnfoldError as exc:
        raise ExportError(f"{exc}. No ONNX file was written.") from exc
    if not dynamic_batch:
        ran = _run_batches(runner, args, (example,), check_batch=False)
        return DynamicBatchCheck(
            False, *symbolic, ran, False, f"fixed to {example} (dynamic_batch=False)"
        )
    if fixed_in or fixed_out:
        raise ExportError(
            "the export specialised the batch dimension: "
            + "; ".join(fixed_in + fixed_out)
            + ". The model's forward probably hard-codes the batch size (e.g. x.view(2, -1)); "
            "use x.flatten(1) or x.view(x.shape[0], -1), or export with dynamic_batch=False. "
            "No ONNX file was written."
        )
    ran = _run_batches(runner, args, tuple(sorted({*PROOF_BATCH_SIZES, example})), True)
    detail = f"dynamic (dim 0 symbolic; ONNX Runtime ran batch sizes {', '.join(map(str, ran))})"
    return DynamicBatchCheck(True, *symbolic, ran, True, detail)


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


def _run_batches(
    runner: OrtRunner, args: tuple[torch.Tensor, ...], sizes: tuple[int, ...], check_batch: bool
) -> tuple[int, ...]:
    for size in sizes:
        rows = torch.arange(size) % batch_size(args)  # the example rows repeated or cut
        try:
            outputs = runner(tuple(arg[rows] for arg in args))
        except BnfoldError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(
                f"ONNX Runtime could not run the exported file at batch size {size}: "
                f"{root_cause(exc)}. No ONNX file was written."
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
    return sizes
