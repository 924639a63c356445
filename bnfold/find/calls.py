"""What a graph node calls and with which arguments: the op's name (only for ops torch or
``operator`` define), its arguments under torch's own keyword names, its recorded shape. Read
the same way for fx traces, exported programs (ATen ops) and recorded dataflows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from bnfold.find.recording import recorded_op


def op_name(node: fx.Node) -> str:
    """The name of a method, function or ATen op call (``view``, ``add``, ``_unsafe_view``);
    "" for any other node, and for a function torch or ``operator`` does not define (a user's
    ``torch.fx.wrap``-ped ``mean`` is not ``torch.mean``)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return ""
    if node.target is recorded_op:  # a tensor made outside the recorded ops has no op
        aten = node.meta.get("aten")
        return str(aten).split(".")[1] if aten else ""
    packet = getattr(node.target, "overloadpacket", None)  # an ATen op
    target = packet or node.target
    return getattr(target, "__name__", "") if _from_library(target) else ""


def is_aten(node: fx.Node) -> bool:
    """An ATen op call: of an exported program, or of a recorded dataflow."""
    return is_recorded(node) or hasattr(node.target, "overloadpacket")


def is_recorded(node: fx.Node) -> bool:
    """An op of a recorded dataflow (one execution; its arguments are the values it ran with)."""
    return node.target is recorded_op


def _from_library(target: Any) -> bool:
    """A function of torch (a ``torch.*`` function, a Tensor method, an ATen op) or of the
    ``operator`` module."""
    if getattr(target, "__objclass__", None) in (torch.Tensor, torch._C.TensorBase):
        return True
    home = getattr(target, "__module__", None) or ""
    return home.split(".")[0] in _LIBRARIES


_LIBRARIES = {"torch", "_operator", "operator"}


def call_arguments(node: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call's positional and keyword arguments, torch's NumPy-style keyword names (``axis``,
    ``keepdims``) under their own (``dim``, ``keepdim``); a recorded ATen op's are in its meta
    (its tensors as None, its node arguments are its distinct tensor inputs)."""
    if node.target is recorded_op:
        args, kwargs = node.meta.get("aten_args", ((), {}))
    else:
        args, kwargs = node.args, node.kwargs
    return tuple(args), {_KEYWORDS.get(key, key): value for key, value in kwargs.items()}


#: torch accepts these NumPy names for the keywords of its own functions and methods
_KEYWORDS = {"axis": "dim", "keepdims": "keepdim"}


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The node's output shape on the example input (None where it was not recorded)."""
    return node.meta.get("bnfold_shape")
