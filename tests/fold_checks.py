"""Shared assertions for fold tests: exactness, structure, caller untouched, precision ratio."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

import bnfold
from bnfold import zoo
from bnfold.io.inputs import as_args

FP64_REL_TOL = 1e-10  # folded vs original, float64: max abs diff / max abs output
# fp32 folded error / fp32 original error, both vs the fp64 reference, under PyTorch's native CPU
# kernels and under the default ones (oneDNN). The fold itself rounds each weight once (bitwise
# checked in test_foldmath); the rest is the kernels': a folded layer carries the BN's shift in a
# larger bias, and oneDNN's fp32 convolution on some CPUs (seen: AMD EPYC, AVX2) rounds a fused
# bias coarsely (conv(x, W', b') in one kernel has twice the error of conv(x, W') + b'), which takes
# plain 3-D convs to 2.0-2.2x there; the native kernels reach 2.1x on 27-term depthwise 3-D sums.
PRECISION_RATIO_MAX = 2.5


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything fold() must leave untouched: tensors (bitwise), flags, attribute names."""
    state = {f"t:{k}": v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    state.update({f"m:{n}": (type(m), m.training) for n, m in model.named_modules()})
    return state


def assert_same_snapshot(before: dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key, value in before.items():
        if key.startswith("t:"):
            assert value.dtype == after[key].dtype and torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


def run(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(*as_args(inputs))


def rel_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return float((reference - other).abs().max() / scale)


def fold_fp64(
    model: nn.Module, inputs: Any, *, folded: int | None = None, skipped: int | None = None
) -> bnfold.FoldResult:
    """Fold a float64 copy; assert exactness, structure, coverage and an untouched caller."""
    model = copy.deepcopy(model).double().eval()
    inputs = tuple(t.double() for t in as_args(inputs))
    before = snapshot(model)
    result = bnfold.fold(model, inputs)
    assert_same_snapshot(before, model)
    assert rel_error(run(model, inputs), run(result.model, inputs)) < FP64_REL_TOL
    _assert_coverage(model, result, inputs)
    assert len(result.folded) + len(result.skipped) == result.plan.bn_total
    if folded is not None:
        assert len(result.folded) == folded, result.skipped
    if skipped is not None:
        assert len(result.skipped) == skipped, result.skipped
    assert not result.model.training
    return result


def _assert_coverage(model: nn.Module, result: bnfold.FoldResult, inputs: Any) -> None:
    """Each fold removes exactly one batch-norm kernel; when every BN runs one kernel, the
    kernels left are exactly the skipped BNs."""
    before = bnfold.count_bn_kernels(model, inputs)
    after = bnfold.count_bn_kernels(result.model, inputs)
    assert after == before - len(result.folded), (before, after)
    if before == result.plan.bn_total:
        assert after == len(result.skipped)


def precision_ratio(model: nn.Module, inputs: Any, *, native_kernels: bool = True) -> float:
    """RMS error vs the float64 reference: folded fp32 over original fp32, both run with
    PyTorch's native CPU kernels (``native_kernels``) or the default ones (oneDNN)."""
    if native_kernels:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the flags' note on TF32 for Intel GPUs
            with torch.backends.mkldnn.flags(enabled=False):
                return precision_ratio(model, inputs, native_kernels=False)
    model = copy.deepcopy(model).float().eval()
    inputs32 = tuple(t.float() for t in as_args(inputs))
    inputs64 = tuple(t.double() for t in inputs32)
    reference = run(copy.deepcopy(model).double(), inputs64)
    folded = bnfold.fold(model, inputs32).model
    original_error = _rms(run(model, inputs32).double() - reference)
    folded_error = _rms(run(folded, inputs32).double() - reference)
    return folded_error / max(original_error, 1e-30)


def _rms(diff: torch.Tensor) -> float:
    return float(diff.detach().pow(2).mean().sqrt())


def assert_precision(model: nn.Module, inputs: Any) -> None:
    for native in (True, False):
        ratio = precision_ratio(model, inputs, native_kernels=native)
        kernels = "native" if native else "default"
        assert ratio <= PRECISION_RATIO_MAX, f"fp32 error ratio {ratio:.2f} ({kernels} kernels)"


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    return zoo.randomize_bn(model, seed=seed)
