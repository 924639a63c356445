"""The model's own leaf-module calls during one eval forward, kept for checking its fx trace.

``LeafCalls`` counts the outermost calls of leaf modules (``bnfold.find.trace.LEAF_TYPES`` and
per-channel affine candidates) while the model runs, and keeps each call's arguments and result.
When the traced graph is run afterwards, a leaf node whose arguments equal those of the model's
own call of the same module can take that call's result instead of computing it again: the same
module applied to equal arguments gives an equal result. That makes checking a trace against
the model cost about one forward instead of two.

Reuse is refused whenever it could hide a difference: a kept tensor changed since the call (in
place, seen from its version counter), the arguments differ in any way (structure, dtype, shape,
value; NaN never compares equal), or the node passes keyword arguments the call did not. Once the
kept tensors pass ``KEEP_BYTES``, calls are still counted but no longer kept.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

#: Upper bound on the bytes of tensors kept alive for reuse (a rough sum: shared storage is
#: counted once per reference).
KEEP_BYTES = 256 * 2**20


@dataclass(frozen=True)
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Any
    versions: tuple[int, ...]  # of every tensor in args, kwargs and result, at the call's end


class LeafCalls:
    """Counts (``counts``: id(module) -> calls) the outermost calls of ``leaves`` and keeps
    those of ``reusable`` (worth it for layers; norms are cheap to compute again).

    Use as a context manager around one forward of the model that owns ``leaves``. While active,
    each leaf's ``forward`` is wrapped; on exit each is put back, with the module's own instance
    attribute ``forward`` if it had one.
    """

    def __init__(
        self,
        leaves: Iterable[nn.Module],
        reusable: Iterable[nn.Module] = (),
        keep_bytes: int = KEEP_BYTES,
    ) -> None:
        self._leaves = list(leaves)
        self._reusable = {id(module) for module in reusable}
        self._budget = keep_bytes
        self._depth = 0
        self._saved: list[tuple[nn.Module, Any]] = []  # module, its own forward attribute or None
        self._calls: dict[int, deque[_Call]] = {}
        self.counts: Counter = Counter()

    def __enter__(self) -> LeafCalls:
        for module in self._leaves:
            self._saved.append((module, module.__dict__.get("forward")))
            module.__dict__["forward"] = self._wrap(module, module.forward)
            if module._forward_hooks or module._forward_pre_hooks:
                self._reusable.discard(id(module))  # its result is seen before its own hooks
        return self

    def __exit__(self, *exc: object) -> None:
        for module, own in reversed(self._saved):
            del module.__dict__["forward"]
            if own is not None:
                module.__dict__["forward"] = own
        self._saved.clear()

    def _wrap(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            try:
                result = forward(*args, **kwargs)
            finally:
                self._depth -= 1
            if not self._depth:
                self._record(module, args, kwargs, result)
            return result

        return recorded

    def _record(self, module: nn.Module, args: Any, kwargs: Any, result: Any) -> None:
        self.counts[id(module)] += 1
        if self._budget < 0 or id(module) not in self._reusable:
            return
        tensors = _tensors((args, kwargs, result))
        self._budget -= sum(t.nbytes for t in tensors)
        if self._budget < 0:
            self._calls.clear()  # too large to keep: every leaf is computed again
            return
        call = _Call(args, kwargs, result, tuple(t._version for t in tensors))
        self._calls.setdefault(id(module), deque()).append(call)

    def reuse(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bool, Any]:
        """Take the module's next kept call: ``(True, result)`` when it had equal arguments and
        nothing it holds changed since, else ``(False, None)``."""
        queue = self._calls.get(id(module))
        if not queue:
            return False, None
        call = queue.popleft()
        held = _tensors((call.args, call.kwargs, call.result))
        if tuple(t._version for t in held) != call.versions:
            return False, None
        if not (_equal(call.args, tuple(args)) and _equal(call.kwargs, dict(kwargs))):
            return False, None
        return True, call.result


def _tensors(tree: Any) -> list[torch.Tensor]:
    args, kwargs, result = tree
    if (
        not kwargs
        and isinstance(result, torch.Tensor)
        and all(isinstance(arg, torch.Tensor) for arg in args)
    ):  # the usual call, without pytree
        return [*args, result]
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _equal(kept: Any, given: Any) -> bool:
    if (
        type(kept) is type(given) is tuple
        and len(kept) == len(given)
        and all(isinstance(value, torch.Tensor) for value in (*kept, *given))
    ):
        return all(_same_value(a, b) for a, b in zip(kept, given, strict=True))
    kept_leaves, kept_spec = pytree.tree_flatten(kept)
    given_leaves, given_spec = pytree.tree_flatten(given)
    if kept_spec != given_spec:
        return False
    return all(_same_value(a, b) for a, b in zip(kept_leaves, given_leaves, strict=True))


def _same_value(kept: Any, given: Any) -> bool:
    if isinstance(kept, torch.Tensor) or isinstance(given, torch.Tensor):
        return (
            isinstance(kept, torch.Tensor)
            and isinstance(given, torch.Tensor)
            and type(kept) is type(given)
            and kept.dtype == given.dtype
            and kept.shape == given.shape
            and kept.device == given.device
            and kept.stride() == given.stride()
            and bool(torch.equal(kept, given))
        )
    try:
        return type(kept) is type(given) and bool(kept == given)
    except Exception:  # values that cannot be compared are not reused
        return False
