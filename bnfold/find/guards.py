"""Tracing one module's forward on a real input, keeping the branch decisions it made.

``ConcreteTracer`` runs every traced op on real example values, so Python control flow is decided
by the example, and keeps every node whose value Python turned into a decision (``if``,
``while``, iteration). A decision on the input's *metadata* (``x.numel() > 0``, ``x.dim() == 4``,
``x.requires_grad``) holds for every input of that shape and kind; a decision on its *values*
(``x.mean() > 0``) holds only for the example, so a forward that makes one cannot be specialised
on it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches

from bnfold.errors import first_line
from bnfold.find.functional import fetch_attr
from bnfold.find.trace import LeafTracer, trace_to_module
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

    @property
    def notes(self) -> tuple[str, ...]:
        """What the trace assumed, as plan notes (read them before the graph is changed)."""
        return tuple(f"forward specialised on {describe(guard)}" for guard in self.guards)


class ConcreteTracer(LeafTracer):
    """A leaf tracer that evaluates each node on real values while tracing; each node whose
    value decided control flow is appended to ``guards``."""

    def __init__(self, example_args: tuple[Any, ...]) -> None:
        super().__init__()
        self._inputs = iter(example_args)
        self.guards: list[fx.Node] = []

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind != "output":
            # fx patches Module.__call__/__getattr__ while tracing; this is its own switch
            # back to the originals, so real modules run
            with _maybe_revert_all_patches():
                node.meta["concrete"] = self._evaluate(node)
        return node

    def _evaluate(self, node: fx.Node) -> Any:
        def value(arg: Any) -> Any:
            return arg.meta["concrete"] if isinstance(arg, fx.Node) else arg

        args = fx.node.map_aggregate(node.args, value)
        kwargs = fx.node.map_aggregate(node.kwargs, value)
        if node.op == "placeholder":
            return next(self._inputs, None)
        if node.op == "get_attr":
            return fetch_attr(self.root, node.target)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.root.get_submodule(node.target)(*args, **kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        self.guards.append(obj.node)
        return bool(obj.node.meta["concrete"])

    def iter(self, obj: fx.Proxy) -> Iterator:
        self.guards.append(obj.node)
        return iter(obj[i] for i in range(len(obj.node.meta["concrete"])))


def trace_guarded(module: nn.Module, example_args: tuple[Any, ...]) -> Guarded | str:
    """Trace ``module`` on ``example_args`` (eval mode, no autograd, flags restored), or say why
    its forward cannot be specialised on them: the trace fails, or it branches on the input's
    values."""
    tracer = ConcreteTracer(example_args)
    try:
        with inference(module):
            traced = trace_to_module(tracer, module)
    except Exception as exc:
        return f"tracing its forward failed: {first_line(exc)}"
    dependent = value_dependent_nodes(traced)
    on_values = [guard for guard in tracer.guards if guard in dependent]
    if on_values:
        return (
            f"its forward branches on the values of its input ({describe(on_values[0])}); "
            "a fold would fix one branch"
        )
    return Guarded(traced, tuple(tracer.guards))


#: What a guard may read of a tensor and still hold at every size: its rank, dtype, device.
_SIZE_FREE = frozenset({"dim", "ndim", "ndimension", "dtype", "device", "is_cuda", "layout"})


def reads_sizes(guard: fx.Node) -> bool:
    """Whether a guard reads a tensor's sizes (``x.shape``, ``x.size()``, ``x.numel()``), so
    that another input size may decide it the other way; rank, dtype and device checks
    (``x.dim() != 4``) do not."""
    if _emptiness_check(guard):
        return False
    seen, todo = set(), [guard]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if is_metadata(node):
            read = node.args[1] if node.op == "call_function" else node.target
            if read not in _SIZE_FREE:
                return True
            continue
        todo.extend(node.all_input_nodes)
    return False


def size_read(node: fx.Node) -> fx.Node | None:
    """A read of the input's sizes that ``node`` depends on, other than its channel count
    (``x.shape[1]``, ``x.size(1)``: the same at every size a per-channel map accepts)."""
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        current = todo.pop()
        if current in seen or _channel_count(current):
            continue
        seen.add(current)
        if is_metadata(current):
            if reads_sizes(current):
                return current
            continue
        todo.extend(current.all_input_nodes)
    return None


def _channel_count(node: fx.Node) -> bool:
    """``x.shape[1]``, ``x.size(1)``, ``C`` of ``N, C = x.shape[:2]``, ``x.shape[-3]`` of 4-D."""
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        tensor = node.args[0].meta.get("concrete") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(dim, int) or not isinstance(tensor, Tensor):
            return False
        return dim % max(tensor.dim(), 1) == 1
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    source, index = node.args
    dims = _dims(source) if isinstance(source, fx.Node) else None
    return (
        isinstance(index, int)
        and dims is not None
        and -len(dims) <= index < len(dims)
        and (dims[index] == 1)
    )


def _dims(node: fx.Node) -> list[int] | None:
    """Which dims of the input a size tuple holds: all for ``x.shape``, ``x.size()``; those
    of a slice of one."""
    if not isinstance(node.meta.get("concrete"), torch.Size):
        return None
    if is_metadata(node):
        return list(range(len(node.meta["concrete"])))
    if node.op == "call_function" and node.target is operator.getitem:
        source, index = node.args
        parent = _dims(source) if isinstance(source, fx.Node) else None
        if parent is not None and isinstance(index, slice):
            return parent[index]
    return None


def _emptiness_check(guard: fx.Node) -> bool:
    """``x.numel() > 0`` and the like: the same for every input that is not empty."""
    if guard.op != "call_function" or guard.target not in _INFIX or len(guard.args) != 2:
        return False
    counted = [a for a in guard.args if isinstance(a, fx.Node)]
    zero = [a for a in guard.args if type(a) is int and a == 0]
    return (
        len(counted) == 1
        and len(zero) == 1
        and counted[0].op == "call_method"
        and counted[0].target in ("numel", "nelement")
    )


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
    expr = _expression(guard, depth=10, top=True)
    return f"{expr} -> {concrete}" if isinstance(concrete, (bool, int)) else expr


#: Python operators fx records as calls, written back as operators.
_INFIX = {
    operator.add: "+",
    operator.sub: "-",
    operator.mul: "*",
    operator.truediv: "/",
    operator.floordiv: "//",
    operator.mod: "%",
    operator.lt: "<",
    operator.le: "<=",
    operator.gt: ">",
    operator.ge: ">=",
    operator.eq: "==",
    operator.ne: "!=",
}


def _expression(node: Any, depth: int, top: bool = False) -> str:
    if isinstance(node, slice):
        parts = ("" if v is None else _expression(v, depth) for v in (node.start, node.stop))
        return ":".join(parts) + ("" if node.step is None else f":{node.step}")
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op in ("placeholder", "get_attr"):
        return str(node.target) if node.op != "placeholder" else node.name
    if depth == 0:
        return "…"
    args = [_expression(a, depth - 1) for a in node.args]
    if node.op == "call_function" and node.target in _INFIX and len(args) == 2:
        text = f"{args[0]} {_INFIX[node.target]} {args[1]}"
        return text if top else f"({text})"
    if node.op == "call_function" and node.target is operator.getitem and len(args) == 2:
        return f"{args[0]}[{args[1]}]"
    if node.op == "call_function" and node.target is getattr and len(args) == 2:
        return f"{args[0]}.{node.args[1]}"
    if node.op == "call_method":
        return f"{args[0]}.{node.target}({', '.join(args[1:])})"
    if node.op == "call_module":
        return f"{node.target}({', '.join(args)})"
    return f"{getattr(node.target, '__name__', node.target)}({', '.join(args)})"
