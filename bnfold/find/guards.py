"""Tracing one module's forward on a real input, keeping the branch decisions it made.

``trace_guarded`` runs ``bnfold.find.trace.ConcreteTracer`` and keeps every node whose value Python
turned into a decision (``if``, ``while``, iteration). A decision on the input's *metadata*
(``x.numel() > 0``, ``x.dim() == 4``, ``x.requires_grad``) holds for every input of that shape
and kind; a decision on its *values* (``x.mean() > 0``) holds only for the example, so a
forward that makes one cannot be specialised on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from bnfold.find.trace import ConcreteTracer
from bnfold.find.trace import graph_module as _graph_module
from bnfold.find.trace import trace_without_side_effects as _trace_without_side_effects
from bnfold.modes import inference

METADATA_ATTRS = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "ndim",
        "requires_grad",
        "is_cuda",
        "layout",
        "is_sparse",
        "is_quantized",
    }
)
METADATA_METHODS = frozenset(
    {
        "size",
        "dim",
        "numel",
        "nelement",
        "ndimension",
        "is_contiguous",
        "is_floating_point",
        "get_device",
        "element_size",
    }
)


@dataclass(frozen=True)
class Guarded:
    """A concrete trace and the nodes its control flow was decided on."""

    module: fx.GraphModule
    guards: tuple[fx.Node, ...]

    def value_guards(self) -> list[fx.Node]:
        """Decisions that depend on the input's values (not only its shape or dtype)."""
        dependent = value_dependent_nodes(self.module)
        return [guard for guard in self.guards if guard in dependent]


def trace_guarded(module: nn.Module, example_args: tuple[Any, ...]) -> Guarded:
    """Trace ``module`` on ``example_args`` (eval mode, no autograd, flags restored)."""

    class GuardTracer(ConcreteTracer):
        def __init__(self) -> None:
            super().__init__(example_args)
            self.guard_nodes: list[fx.Node] = []

        def to_bool(self, obj: fx.Proxy) -> bool:
            self.guard_nodes.append(obj.node)
            return super().to_bool(obj)

        def iter(self, obj: fx.Proxy) -> Any:
            self.guard_nodes.append(obj.node)
            return super().iter(obj)

    tracer = GuardTracer()
    with inference(module):
        graph = _trace_without_side_effects(tracer, module)
    return Guarded(_graph_module(tracer, graph), tuple(tracer.guard_nodes))


def is_metadata(node: fx.Node) -> bool:
    """``x.shape``, ``x.dtype``, ``x.size()``, ``x.numel()``...: reads no tensor values."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in METADATA_ATTRS
    return node.op == "call_method" and node.target in METADATA_METHODS


def value_dependent_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on the first input's values (not only on its metadata)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dependent: set[fx.Node] = set(placeholders[:1])
    for node in gm.graph.nodes:
        if node in dependent or is_metadata(node):
            continue
        if any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    return dependent


def describe(guard: fx.Node) -> str:
    """``gt(x.numel(), 0) -> True`` style text for a guard node (read it before the graph is
    changed)."""
    concrete = guard.meta.get("concrete")
    expr = _expression(guard, depth=3)
    return f"{expr} -> {concrete}" if isinstance(concrete, (bool, int)) else expr


def _expression(node: Any, depth: int) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if depth == 0 or node.op in ("placeholder", "get_attr"):
        return str(node.target) if node.op != "placeholder" else node.name
    args = [_expression(a, depth - 1) for a in node.args]
    if node.op == "call_function" and node.target is getattr and len(args) == 2:
        return f"{args[0]}.{node.args[1]}"
    if node.op == "call_method":
        return f"{args[0]}.{node.target}({', '.join(args[1:])})"
    if node.op == "call_module":
        return f"{node.target}({', '.join(args)})"
    return f"{getattr(node.target, '__name__', node.target)}({', '.join(args)})"
