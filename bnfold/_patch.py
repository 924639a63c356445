"""Temporarily wrapping module instances' ``forward`` (lighter than module hooks).

A module's ``__call__`` looks ``forward`` up on the instance first, so an instance attribute
replaces the class's method for that module alone. ``nn.Module.__call__`` then still runs the
module's own pre-hooks before the wrapper and its forward hooks after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_ABSENT = object()

Forward = Callable[..., Any]


class ForwardPatches:
    """Wrapped forwards, each put back (with the module's own instance attribute, if it had
    one) by ``restore``."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, Any]] = []

    def wrap(self, module: nn.Module, make: Callable[[Forward], Forward]) -> None:
        """Replace ``module``'s forward by ``make(current forward)``."""
        self._saved.append((module, module.__dict__.get("forward", _ABSENT)))
        module.__dict__["forward"] = make(module.forward)

    def restore(self) -> None:
        for module, own in reversed(self._saved):
            del module.__dict__["forward"]
            if own is not _ABSENT:
                module.__dict__["forward"] = own
        self._saved.clear()
