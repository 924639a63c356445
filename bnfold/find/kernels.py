"""Counting the batch-norm kernels a forward pass actually runs.

Module types can hide batch norms (functional calls, subclasses, wrappers), so coverage is
measured on the ATen ops dispatched during one eval-mode forward. Two corrections keep the count
equal to the batch norms a plan reports: instance norm, which ATen implements with a batch-norm
kernel, is not counted; and a FrozenBatchNorm2d-style module (``is_frozen_norm``),
which runs elementwise ops or ``F.batch_norm`` inside, counts as one batch norm per call whatever
it runs.

The find stage can count the forward it runs anyway (``count_find_forward``), so a caller that
needs the original model's count (the pipeline) pays no forward of its own; the count is asked
for, never imposed: the dispatch mode slows a forward by about a quarter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bnfold.errors import TraceError
from bnfold.find.sites import is_frozen_norm
from bnfold.find.unwrap import unwrap
from bnfold.io.inputs import as_args
from bnfold.modes import inference

# Composite ops (batch_norm, _batch_norm_impl_index) decompose into one of these kernels, so
# counting only these counts each batch norm once.
BATCH_NORM_KERNELS = (
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional",
    "cudnn_batch_norm",
    "miopen_batch_norm",
    "mkldnn_batch_norm",
)
#: The composite ops above those kernels: a dispatch mode sees them only where torch does not
#: decompose them first (inside the branch a ``torch.cond`` runs in eager mode).
COMPOSITE_BATCH_NORMS = ("batch_norm", "_batch_norm_impl_index")
#: Instance norm runs a batch-norm kernel inside: that kernel is not a batch norm of the model.
INSTANCE_NORMS = (F.instance_norm, torch.instance_norm)


def higher_order_name(target: Any) -> str:
    """A higher-order op's name (``cond``, ``wrap_with_set_grad_enabled``)."""
    name = getattr(target, "name", None)
    return name() if callable(name) else getattr(target, "__name__", str(target))


class _BatchNormCounter(TorchDispatchMode):
    supports_higher_order_operators = True  # torch.cond: the branch taken is counted

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.muted = 0  # > 0 inside an instance norm or a frozen norm

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not hasattr(func, "overloadpacket"):  # a higher-order op
            return self._higher_order(func, args, kwargs or {})
        name = func.overloadpacket.__name__
        if name in COMPOSITE_BATCH_NORMS:  # seen whole inside a branch of torch.cond
            return self._counted_once(func, args, kwargs or {})
        if name in BATCH_NORM_KERNELS and not self.muted:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def _counted_once(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A composite batch norm counts once, whatever kernel it runs inside."""
        self.count += 0 if self.muted else 1
        self.muted += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.muted -= 1

    def _higher_order(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run a higher-order op's code, counted: ``cond(pred, true_fn, false_fn, operands)``
        the branch ``pred`` picks; the no_grad and autocast wrappers of an exported program
        their body, in their context. Others run code this count cannot follow."""
        name = higher_order_name(func)
        if name == "cond" and not kwargs and len(args) == 4:
            pred, true_fn, false_fn, operands = args
            with self:
                return (true_fn if bool(pred) else false_fn)(*operands)
        if name == "wrap_with_set_grad_enabled" and not kwargs:
            with torch.set_grad_enabled(args[0]), self:
                return args[1](*args[2:])
        if name == "wrap_with_autocast" and not kwargs:
            device, dtype, enabled, cache = args[:4]
            with torch.autocast(device, dtype, enabled, cache), self:
                return args[4](*args[5:])
        raise TraceError(
            f"cannot count the batch norms of a forward that calls {name}, a higher-order op "
            "whose inner code the count cannot follow"
        )

    def pre_hook(self, module: nn.Module, args: Any) -> None:
        if is_frozen_norm(module):
            self.count += 0 if self.muted else 1
            self.muted += 1

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if is_frozen_norm(module):
            self.muted -= 1


class _InstanceNormMute(TorchFunctionMode):
    def __init__(self, counter: _BatchNormCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in INSTANCE_NORMS:
            return func(*args, **(kwargs or {}))
        self.counter.muted += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.muted -= 1


@contextmanager
def counting_bn_kernels() -> Iterator[_BatchNormCounter]:
    """Count the batch norms every forward run inside the block runs (``.count``), as
    ``count_bn_kernels`` does; the find stage counts its own forward of the model this way."""
    counter = _BatchNormCounter()
    hooks = (
        torch.nn.modules.module.register_module_forward_pre_hook(counter.pre_hook),
        torch.nn.modules.module.register_module_forward_hook(counter.post_hook),
    )
    try:
        with _InstanceNormMute(counter), counter:
            yield counter
    finally:
        for hook in hooks:
            hook.remove()


def count_bn_kernels(model: nn.Module, example_inputs: Any) -> int:
    """Number of batch norms one eval-mode forward of ``model`` runs (flags restored): ATen
    batch-norm kernels, except instance norm's, plus one per FrozenBatchNorm-style module call
    (see the module doc). Wrappers (torch.compile, DataParallel, DDP) are looked through."""
    model, _ = unwrap(model)
    with inference(model), counting_bn_kernels() as counter:
        model(*as_args(example_inputs))
    return counter.count


@dataclass
class KernelCount:
    """The batch norms one forward ran; None until it is counted."""

    count: int | None = None


_FIND_FORWARD: ContextVar[KernelCount | None] = ContextVar("bnfold_find_forward", default=None)


@contextmanager
def count_find_forward() -> Iterator[KernelCount]:
    """Within the block, the first forward the find stage runs to read a model's dataflow
    (``find_pairs``, ``fold``: the checked trace's run of the model) also counts its batch norms
    into the yielded record, as ``count_bn_kernels`` would. ``count`` stays None when no such
    forward ran (the dataflow was recorded instead, or it failed)."""
    counted = KernelCount()
    token = _FIND_FORWARD.set(counted)
    try:
        yield counted
    finally:
        _FIND_FORWARD.reset(token)


@contextmanager
def counted_when_asked() -> Iterator[None]:
    """Count the forward run in the block into ``count_find_forward``'s record, when one is
    active and has no count yet; otherwise run it as it is."""
    asked = _FIND_FORWARD.get()
    if asked is None or asked.count is not None:
        yield
        return
    with counting_bn_kernels() as counter:
        yield
    asked.count = counter.count
