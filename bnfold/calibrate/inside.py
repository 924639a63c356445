"""What a BatchNorm subclass's own forward really normalises, during recalibration.

A subclass with its own forward (timm's ``BatchNormAct2d``, a token BatchNorm that transposes
``(B, L, C)`` before its batch norm, a forward that scales its input first) may change its input
before the batch norm runs, so the module's input is not what it normalises. While such a layer's
forward runs, ``NormCalls`` (a torch-function mode, on only inside those calls, in the thread that
runs them) sees each call of ``F.batch_norm`` or ``torch.batch_norm`` on the layer's own running
buffers and hands its input to the observer, which takes that call's statistics from it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

#: Where each batch-norm function takes its input and its running mean, by position.
_POSITIONS = {F.batch_norm: (0, 1), torch.batch_norm: (0, 3)}
_NAMES = ("input", "running_mean")


class NormCalls(TorchFunctionMode):
    """Hands ``take(owner, input)`` every batch-norm call whose running mean is one of
    ``owners`` (keyed by the buffer's id), in a thread inside ``watching()``: entered and left
    by that thread alone, nested calls entering it once."""

    def __init__(self, owners: dict[int, Any], take: Callable[[Any, torch.Tensor], None]) -> None:
        super().__init__()
        self.owners, self.take = owners, take
        self._depth = threading.local()

    @contextmanager
    def watching(self) -> Iterator[None]:
        depth = getattr(self._depth, "value", 0)
        self._depth.value = depth + 1
        try:
            if depth:
                yield
            else:
                with self:
                    yield
        finally:
            self._depth.value = depth

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        positions = _POSITIONS.get(func)
        if positions is not None:
            x, mean = (
                args[i] if len(args) > i else kwargs.get(name)
                for i, name in zip(positions, _NAMES, strict=True)
            )
            owner = self.owners.get(id(mean))
            if owner is not None and isinstance(x, torch.Tensor):
                self.take(owner, x)
        return func(*args, **kwargs)
