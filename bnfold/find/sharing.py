"""Who else uses a module or a tensor: the graph-wide facts the aliasing rules of the pairing
read. A fold rewrites a layer's weights and removes a norm, so it is valid only when no other
call site, module slot or direct read sees those modules and tensors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from bnfold.find.functional import fetch_attr


@dataclass(frozen=True)
class Sharing:
    """Use counts over one traced (or recorded) graph."""

    module_calls: Counter  # call_module target -> calls
    tensor_slots: Counter  # id(tensor) -> parameter slots (over all modules) holding it
    outside_reads: Counter  # id(tensor) -> reads outside its module (``self.conv.weight``)
    attr_users: Counter  # get_attr target -> ops reading it

    def calls(self, node: fx.Node) -> int:
        return self.module_calls[node.target]


def graph_sharing(gm: fx.GraphModule, extra_reads: Counter | None = None) -> Sharing:
    """The use counts of ``gm``; ``extra_reads`` counts (by tensor id) reads of module tensors
    outside their module that the graph has no get_attr node for (a recorded forward's)."""
    slots = Counter(id(tensor) for _, tensor in gm.named_parameters(remove_duplicate=False))
    reads: Counter = Counter(extra_reads or {})
    attr_users: Counter = Counter()
    on_storage: dict[int, list[tuple[range, int]]] | None = None  # built at the first read
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        attr_users[node.target] += len(node.users)
        value = fetch_attr(gm, str(node.target))
        if isinstance(value, torch.Tensor):
            on_storage = _by_storage(gm) if on_storage is None else on_storage
            for key in {id(value), *_sharing(value, on_storage)}:
                reads[key] += len(node.users)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    return Sharing(calls, slots, reads, attr_users)


def _by_storage(gm: fx.GraphModule) -> dict[int, list[tuple[range, int]]]:
    """The model's parameters and buffers by storage: each one's byte range and id. fx reads a
    buffer (``self.bn.running_mean``, or a view of it it computes while tracing) through a
    constant of its own, another tensor object on the same memory."""
    found: dict[int, list[tuple[range, int]]] = {}
    for tensor in (*gm.parameters(), *gm.buffers()):
        place = _place(tensor)
        if place is not None:
            found.setdefault(place[0], []).append((place[1], id(tensor)))
    return found


def _sharing(value: torch.Tensor, on_storage: dict[int, list[tuple[range, int]]]) -> set[int]:
    """The ids of the model's tensors whose memory ``value`` overlaps."""
    place = _place(value)
    if place is None:
        return set()
    storage, span = place
    return {key for other, key in on_storage.get(storage, ()) if _overlap(span, other)}


def _place(tensor: torch.Tensor) -> tuple[int, range] | None:
    """A tensor's storage and the bytes it spans there (None for an empty tensor, which shares
    nothing); two parts of one flat storage are told apart."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    size = tensor.element_size()
    steps = zip(tensor.shape, tensor.stride(), strict=True)
    extent = 1 + sum((n - 1) * abs(step) for n, step in steps)
    start = tensor.storage_offset() * size
    return tensor.untyped_storage().data_ptr(), range(start, start + extent * size)


def _overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def global_hooks() -> bool:
    """Whether a forward hook or pre-hook for every module is registered
    (``torch.nn.modules.module.register_module_forward_hook`` and ``_pre_hook``); torch offers
    no public way to ask, so this reads the registries those functions fill."""
    registries = ("_global_forward_hooks", "_global_forward_pre_hooks")
    return any(getattr(torch.nn.modules.module, name, None) for name in registries)


def has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def is_parametrized(module: nn.Module) -> bool:
    """A parametrization or a weight norm (``weight_g``/``weight_v``, ``weight_orig``)."""
    if parametrize.is_parametrized(module):
        return True
    return any(
        name.endswith(("_g", "_v", "_orig")) for name, _ in module.named_parameters(recurse=False)
    )
