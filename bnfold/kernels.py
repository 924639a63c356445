"""Counting the batch-norm kernels a forward pass actually runs.

Module types can hide batch norms (functional calls, subclasses, wrappers), so coverage is
measured on the ATen ops dispatched during one eval-mode forward.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bnfold.modes import as_args, inference

# Composite ops (batch_norm, _batch_norm_impl_index) decompose into one of these kernels, so
# counting only these counts each batch norm once.
_KERNELS = (
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional",
    "cudnn_batch_norm",
    "miopen_batch_norm",
    "mkldnn_batch_norm",
)


class _BatchNormCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _KERNELS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_bn_kernels(model: nn.Module, example_inputs: Any) -> int:
    """Number of batch-norm kernels one eval-mode forward of ``model`` runs (flags restored)."""
    counter = _BatchNormCounter()
    with inference(model), counter:
        model(*as_args(example_inputs))
    return counter.count
