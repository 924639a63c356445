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
    on_storage = _by_storage(gm)
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        attr_users[node.target] += len(node.users)
        value = fetch_attr(gm, str(node.target))
        if isinstance(value, torch.Tensor):
            for key in {id(value), *on_storage.get(_storage(value), ())}:
                reads[key] += len(node.users)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    return Sharing(calls, slots, reads, attr_users)


def _by_storage(gm: fx.GraphModule) -> dict[int, set[int]]:
    """The ids of the model's parameters and buffers on each storage: fx reads a buffer
    (``self.bn.running_mean``) through a constant of its own (``_tensor_constant0``), another
    tensor object on the same memory."""
    found: dict[int, set[int]] = {}
    for tensor in (*gm.parameters(), *gm.buffers()):
        key = _storage(tensor)
        if key is not None:
            found.setdefault(key, set()).add(id(tensor))
    return found


def _storage(tensor: torch.Tensor) -> int | None:
    """Where a tensor's memory starts (None for an empty tensor, which shares nothing)."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    return tensor.untyped_storage().data_ptr()


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
