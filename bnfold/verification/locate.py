"""Name the first layer whose output diverges between an original model and its folded copy
(``bnfold.verify`` asks when the folded PyTorch candidate fails): forward hooks record the first
output of every leaf module in both models, compared in the original's execution order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnfold.io.inputs import as_args
from bnfold.modes import inference
from bnfold.runtime import flatten_outputs, float_dtype
from bnfold.verification.compare import CPU_FP32, Tolerance, compare_arrays
from bnfold.verification.inputs import as_cpu_fp32
from bnfold.verification.records import LayerDivergence


@dataclass
class _Call:
    """The first call of one module during a traced forward."""

    order: int
    module: nn.Module
    value: torch.Tensor | None  # a copy of the first tensor output (safe from in-place ops)
    input_ids: tuple[int, ...]
    output_id: int | None


def _trace_calls(model: nn.Module, args: tuple[torch.Tensor, ...]) -> dict[str, _Call]:
    """Run ``model`` once (eval, no grad) recording each leaf module's first call."""

    calls: dict[str, _Call] = {}
    alive: list[Any] = []  # keeps traced tensors alive so their ids stay unique
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in calls:
                return
            outs = flatten_outputs(output)
            ins = flatten_outputs(inputs)
            alive.extend([*outs, *ins])
            value = outs[0].detach().clone() if outs else None
            calls[name] = _Call(
                len(calls), module, value, tuple(id(t) for t in ins), id(outs[0]) if outs else None
            )

        return record

    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with inference(model):
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _comparison_points(
    ref: dict[str, _Call], cand: dict[str, _Call], pairs: list[tuple[str, str]] | None
) -> list[tuple[str, str, str | None]]:
    """(reference module, candidate module, BN folded into it) to compare, in reference order."""
    if pairs is None:
        pairs = _infer_pairs(ref, cand)
    skip: set[str] = set()
    extra: dict[str, tuple[str, str]] = {}  # reference name -> (candidate name, folded BN)
    folded_into: dict[str, str] = {}
    for producer, bn in pairs:
        if producer not in ref or bn not in ref:
            continue
        if ref[producer].order < ref[bn].order:  # layer -> BN: the layer now outputs BN's output
            skip.update({producer, bn})
            extra[bn] = (producer, bn)
        else:  # BN -> layer: the layer's output is unchanged, the BN's is gone
            skip.add(bn)
            folded_into[producer] = bn
    points = []
    for name in sorted(ref, key=lambda n: ref[n].order):
        if name in extra and extra[name][0] in cand:
            points.append((name, *extra[name]))
        elif name not in skip and name in cand:
            points.append((name, name, folded_into.get(name)))
    return points


def _infer_pairs(ref: dict[str, _Call], cand: dict[str, _Call]) -> list[tuple[str, str]]:
    """Folded (layer, BN) pairs, read from the traces: a BN of the original that is gone or an
    Identity in the candidate, and the layer whose output it consumed (or that consumed it)."""
    by_output = {call.output_id: name for name, call in ref.items() if call.output_id is not None}
    pairs = []
    for name, call in ref.items():
        if not isinstance(call.module, nn.modules.batchnorm._BatchNorm):
            continue
        if name in cand and not isinstance(cand[name].module, nn.Identity):
            continue
        producer = next((by_output[i] for i in call.input_ids if i in by_output), None)
        if producer is not None and _is_layer(ref[producer].module):
            pairs.append((producer, name))
            continue
        consumer = next(
            (
                n
                for n, c in ref.items()
                if call.output_id in c.input_ids and _is_layer(c.module) and c.order > call.order
            ),
            None,
        )
        if consumer is not None:
            pairs.append((consumer, name))
    return pairs


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


def locate_divergence(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Any,
    tolerance: Tolerance | None = None,
    pairs: list[tuple[str, str]] | None = None,
) -> LayerDivergence | None:
    """The first layer, in the reference's execution order, whose output differs beyond
    ``tolerance`` between ``reference`` and the folded ``candidate``.

    Modules are matched by name (folding keeps module paths; a folded BN becomes Identity or
    disappears). For each folded (layer, BN) pair, the layer's output in the candidate is
    compared with the BN's output in the reference. ``pairs`` come from a FoldResult when
    available, else they are read from the traces. Returns None when no module output diverges.
    ``tolerance`` defaults to ``bnfold.verification.compare.CPU_FP32``.
    """

    tolerance = tolerance or CPU_FP32
    args = tuple(as_cpu_fp32(a) for a in as_args(example_inputs))
    ref_calls = _trace_calls(reference, _in_dtype_of(reference, args))
    cand_calls = _trace_calls(candidate, _in_dtype_of(candidate, args))
    for ref_name, cand_name, folded in _comparison_points(ref_calls, cand_calls, pairs):
        ref_value, cand_value = ref_calls[ref_name].value, cand_calls[cand_name].value
        if ref_value is None or cand_value is None or ref_value.shape != cand_value.shape:
            continue
        stats = compare_arrays(_numpy(ref_value), _numpy(cand_value), tolerance)
        if stats.ratio > 1.0:
            return LayerDivergence(cand_name, ref_name, folded, stats.max_abs, stats.ratio, 0)
    return None


def _in_dtype_of(model: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Floating inputs cast to the model's own floating dtype (a half model runs in half)."""

    dtype = float_dtype(model)
    return tuple(a.to(dtype) if a.is_floating_point() else a for a in args)


def _numpy(tensor: torch.Tensor) -> Any:
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
