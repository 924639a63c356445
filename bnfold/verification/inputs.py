"""What every candidate is compared on and with: the input batches (the caller's, plus seeded
random batches of other sizes), the references, and the tolerance table for the original
model's precision. A half-precision original and its float32 copy see the very same inputs
(``as_cpu_fp32``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold.errors import ModelInputError, UsageError, first_line
from bnfold.io.inputs import as_args
from bnfold.runtime import TorchRunner, float_dtype
from bnfold.verification.compare import DEFAULT_TOLERANCES, HALF_EPS, Tolerance, half_tolerance
from bnfold.verification.records import InputInfo

Batch = tuple[torch.Tensor, ...]


def input_batches(
    inputs: Any, random_batch_sizes: Sequence[int], seed: int, precision: torch.dtype
) -> tuple[list[Batch], list[InputInfo]]:
    """The caller's batches (a list means several; a tensor or a tuple of tensors is one), then
    one seeded random batch per size in ``random_batch_sizes``, each described."""
    samples = _sample_batches(inputs, precision)
    batches, infos = [], []
    for batch in samples:
        batches.append(batch)
        infos.append(InputInfo("sample", int(batch[0].shape[0]), _shapes(batch)))
    for number, size in enumerate(random_batch_sizes):
        if size < 1:
            raise UsageError(f"random batch sizes must be >= 1, got {size}")
        batch = _random_batch(samples[0], size, seed + number, precision)
        batches.append(batch)
        infos.append(InputInfo("random", size, _shapes(batch), seed + number))
    return batches, infos


def as_cpu_fp32(tensor: torch.Tensor, precision: torch.dtype = torch.float32) -> torch.Tensor:
    """A float32 CPU copy of a floating tensor whose values are all representable in
    ``precision`` (rounded to it first when it is a half type); other tensors on CPU as they
    are."""
    tensor = tensor.detach().to("cpu")
    if not tensor.is_floating_point():
        return tensor
    if precision in HALF_EPS:
        tensor = tensor.to(precision)
    return tensor.float()


def _sample_batches(inputs: Any, precision: torch.dtype) -> list[Batch]:
    batches = list(inputs) if isinstance(inputs, list) else [inputs]
    if not batches:
        raise UsageError("verify needs at least one input batch to learn the input shapes")
    result = []
    for number, batch in enumerate(batches):
        args = as_args(batch)
        for index, arg in enumerate(args):
            if not isinstance(arg, torch.Tensor) or arg.dim() == 0:
                raise UsageError(
                    f"input batch {number}, argument {index}: expected a tensor with a batch "
                    f"dimension, got {type(arg).__name__}"
                )
        result.append(tuple(as_cpu_fp32(arg, precision) for arg in args))
    return result


def _random_batch(like: Batch, batch: int, seed: int, precision: torch.dtype) -> Batch:
    """Seeded standard-normal float inputs shaped like ``like`` with ``batch`` rows (rounded
    to ``precision``); non-float inputs (e.g. token ids) repeat the sample's rows instead."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for arg in like:
        if arg.is_floating_point():
            values = torch.randn((batch, *arg.shape[1:]), generator=gen, dtype=torch.float32)
            out.append(as_cpu_fp32(values, precision))
        else:
            out.append(arg[torch.arange(batch) % arg.shape[0]])
    return tuple(out)


def _shapes(batch: Batch) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in arg.shape) for arg in batch)


@dataclass
class Reference:
    """One model every candidate is compared with, and its outputs on each input batch."""

    label: str | None  # None for the original as it is; "float32" for the copy of a half model
    module: nn.Module
    outputs: list[list[np.ndarray]] = field(default_factory=list)

    def run(self, batches: list[Batch], infos: list[InputInfo]) -> None:
        """Fill ``outputs``; ``ModelInputError`` naming the batch the model rejects."""
        runner = TorchRunner(self.module)
        for number, (batch, info) in enumerate(zip(batches, infos, strict=True)):
            try:
                self.outputs.append(runner(batch))
            except Exception as exc:
                hint = (
                    "; if it only accepts a fixed batch size, leave out the random batches "
                    "(random_batch_sizes=())"
                    if info.source == "random"
                    else ""
                )
                raise ModelInputError(
                    f"the reference model failed on input #{number} ({info.source} batch of "
                    f"{info.batch_size}, shapes {list(info.shapes)}): {type(exc).__name__}: "
                    f"{first_line(exc, with_type=False)}{hint}"
                ) from exc


def precision_of(model: nn.Module) -> torch.dtype:
    """The original model's floating dtype (float32 when it has no floating tensor)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"the reference must be an nn.Module, got {type(model).__name__}")
    return float_dtype(model)


def tolerances_for(
    precision: torch.dtype, overrides: Mapping[str, Tolerance] | None
) -> dict[str, Tolerance]:
    """Per candidate kind: ``DEFAULT_TOLERANCES``, or ``half_tolerance`` for a half-precision
    original, then the caller's ``overrides``."""
    if precision in HALF_EPS:
        base = {
            kind: half_tolerance(precision, "cuda" if kind.endswith("cuda") else "cpu")
            for kind in DEFAULT_TOLERANCES
        }
    else:
        base = dict(DEFAULT_TOLERANCES)
    return {**base, **(overrides or {})}


def references(model: nn.Module, precision: torch.dtype) -> tuple[list[Reference], list[str]]:
    """The references and a note on each conversion. The caller's model is never converted in
    place: a copy is made when it is not already float32 on CPU (or, for a half original, on
    CPU)."""
    on_cpu = all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    if precision not in HALF_EPS:
        floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        if on_cpu and all(t.dtype == torch.float32 for t in floats):
            return [Reference(None, model)], []
        converted = copy.deepcopy(model).to("cpu").float()
        note = "the reference was converted to a float32 CPU copy for verification"
        return [Reference(None, converted)], [note]
    original = model if on_cpu else copy.deepcopy(model).to("cpu")
    name = str(precision).removeprefix("torch.")
    note = (
        f"half precision: every candidate runs on inputs in its own dtype (rounded to {name} "
        f"once) and is compared with the {name} original and with a float32 copy of it"
    )
    return [Reference(None, original), Reference("float32", copy.deepcopy(original).float())], [
        note
    ]


def reference_setting(precision: torch.dtype) -> str:
    if precision not in HALF_EPS:
        return "original model, eval mode, float32, CPU"
    name = str(precision).removeprefix("torch.")
    return f"original model, eval mode, {name}, CPU; and its float32 copy"
