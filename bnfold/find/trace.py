"""Reading a model's dataflow with torch.fx: tracers and shape propagation.

Conv, ConvTranspose, Linear and BatchNorm modules (and their subclasses) are leaves, so a custom
subclass forward never breaks the trace of the model around it. ``ConcreteTracer`` also runs every
traced op on real example values, so Python control flow on shapes (``if x.numel() > 0``,
``input.dim() != 4``) is decided by the example and recorded as a guard.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from bnfold.errors import ModelInputError, TraceError, first_line
from bnfold.find.leafcalls import LeafCalls
from bnfold.find.sites import is_affine_candidate
from bnfold.io.inputs import as_args
from bnfold.modes import inference

LAYER_TYPES: tuple[type[nn.Module], ...] = (_ConvNd, nn.Linear)
LEAF_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, *LAYER_TYPES)


def is_leaf(module: nn.Module) -> bool:
    """A module the graph pass sees as one call: a layer, a norm, or a per-channel affine
    candidate (FrozenBatchNorm2d-style)."""
    return isinstance(module, LEAF_TYPES) or is_affine_candidate(module)


class LeafTracer(fx.Tracer):
    """fx tracer that keeps Conv/ConvTranspose/Linear/BatchNorm (and subclasses) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) is nn.Identity:  # traced through: conv -> Identity -> BN is conv -> BN
            return False
        if is_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class ConcreteTracer(LeafTracer):
    """A tracer that evaluates each node on real values while tracing.

    Control flow on traced values is decided by the example inputs; each decision is appended
    to ``guards`` so the caller can report what the trace assumed.
    """

    def __init__(self, example_args: tuple[Any, ...]) -> None:
        super().__init__()
        self._example_args = list(example_args)
        self._placeholders = 0
        self.guards: list[str] = []

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind != "output":
            with _unpatched():  # run real modules, not fx's tracing wrappers
                node.meta["concrete"] = self._evaluate(node)
        return node

    def _evaluate(self, node: fx.Node) -> Any:
        def value(arg: Any) -> Any:
            return arg.meta["concrete"] if isinstance(arg, fx.Node) else arg

        args = fx.node.map_aggregate(node.args, value)
        kwargs = fx.node.map_aggregate(node.kwargs, value)
        if node.op == "placeholder":
            index = self._placeholders
            self._placeholders += 1
            return self._example_args[index] if index < len(self._example_args) else None
        if node.op == "get_attr":
            return _fetch_attr(self.root, node.target)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.root.get_submodule(node.target)(*args, **kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        decided = bool(obj.node.meta["concrete"])
        self.guards.append(f"{obj.node.format_node()} -> {decided}")
        return decided

    def iter(self, obj: fx.Proxy) -> Iterator:
        concrete = obj.node.meta["concrete"]
        self.guards.append(f"iterated {obj.node.name} of length {len(concrete)}")
        return iter(obj[i] for i in range(len(concrete)))


def _unpatched() -> Any:
    """fx patches Module.__call__/__getattr__ while tracing; concrete evaluation needs the
    originals. ``_maybe_revert_all_patches`` is torch.fx's own switch for this."""
    from torch.fx._symbolic_trace import _maybe_revert_all_patches

    return _maybe_revert_all_patches()


def _fetch_attr(root: nn.Module, target: str) -> Any:
    """Attribute lookup that bypasses ``Module.__getattr__`` (fx patches it while tracing)."""
    value: Any = root
    for atom in target.split("."):
        if isinstance(value, nn.Module):
            for table in ("_parameters", "_buffers", "_modules"):
                entries = object.__getattribute__(value, table)
                if atom in entries:
                    value = entries[atom]
                    break
            else:
                value = object.__getattribute__(value, atom)
        else:
            value = getattr(value, atom)
    return value


def _lazy_graph_module() -> type[fx.GraphModule]:
    """The graph pass reads a trace's graph and never runs its Python code: torch's lazy
    GraphModule skips generating that code until it is needed (a GraphModule where it is
    missing)."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:
        return fx.GraphModule
    return _LazyGraphModule


_AnalysisModule = _lazy_graph_module()


def runnable(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule (code generated) with ``gm``'s graph and attributes, for handing out
    a rewritten trace."""
    if _AnalysisModule is not fx.GraphModule and isinstance(gm, _AnalysisModule):
        return fx.GraphModule(gm, gm.graph, class_name=type(gm).__name__)
    gm.recompile()
    return gm


@dataclass(frozen=True)
class Traced:
    """A traced model: a GraphModule sharing the model's submodules and tensors."""

    module: fx.GraphModule
    method: str  # "fx", "fx-concrete" or "graph-module"
    guards: tuple[str, ...] = ()


def trace_model(model: nn.Module, example_inputs: Any) -> Traced:
    """Trace ``model`` into a GraphModule without changing it.

    A GraphModule (e.g. ``ExportedProgram.module()``) is used as it is. Raises ``TraceError``
    naming the cause when the model cannot be traced.
    """
    if isinstance(model, fx.GraphModule):
        return Traced(module=model, method="graph-module")
    tracer = LeafTracer()
    try:
        graph = trace_without_side_effects(tracer, model)
    except Exception as exc:
        raise TraceError(
            f"cannot trace {type(model).__name__} with torch.fx: {first_line(exc)}. Make the "
            "offending forward traceable (no Python control flow on tensor values) or pass a "
            "torch.export program (.pt2)."
        ) from exc
    return Traced(module=graph_module(tracer, graph), method="fx")


def trace_concrete(module: nn.Module, example_inputs: Any) -> Traced:
    """Trace ``module`` deciding control flow by the example inputs (guards recorded)."""
    tracer = ConcreteTracer(as_args(example_inputs))
    with inference(module):
        graph = trace_without_side_effects(tracer, module)
    return Traced(graph_module(tracer, graph), "fx-concrete", tuple(tracer.guards))


def trace_without_side_effects(tracer: fx.Tracer, root: nn.Module) -> fx.Graph:
    """fx stores tensor constants as new attributes of the root; take them off again."""
    before = set(root.__dict__)
    try:
        graph = tracer.trace(root)
    finally:
        added = set(root.__dict__) - before
        tracer.added_constants = {name: root.__dict__[name] for name in added}
        for name in added:
            del root.__dict__[name]
    return graph


def graph_module(tracer: fx.Tracer, graph: fx.Graph) -> fx.GraphModule:
    root = tracer.root
    for name, value in tracer.added_constants.items():
        root.__dict__[name] = value
    try:
        name = type(root).__name__
        return _AnalysisModule(root, graph, class_name=name)
    finally:
        for name in tracer.added_constants:
            del root.__dict__[name]


def propagate(
    traced: Traced,
    example_inputs: Any,
    keep: set[str],
    outputs: list[Any] | None = None,
    reuse: LeafCalls | None = None,
) -> dict[str, Any]:
    """Run the traced model once in eval mode without autograd.

    Stores ``node.meta["bnfold_shape"]`` for every tensor-valued node and returns the input
    values of the nodes named in ``keep`` (and appends the graph's output to ``outputs`` when
    given). Leaf calls whose arguments equal those of a call kept in ``reuse`` take its result
    (see ``bnfold.leafcalls``). The model's flags are restored afterwards. A failure raises
    ``ModelInputError`` naming the node and module that rejected the input.
    """
    run = _GraphRun(traced.module, keep, reuse)
    with inference(traced.module):
        try:
            result = run.run(as_args(example_inputs))
        except Exception as exc:
            raise ModelInputError(_rejection_message(run.current, exc)) from exc
    if outputs is not None:
        outputs.append(result)
    return run.kept


class _GraphRun:
    """Runs a graph node by node (what ``fx.Interpreter`` does, with less per-node overhead),
    recording tensor shapes, the inputs of the ``keep`` nodes, and taking reusable leaf results
    from ``reuse``. Each value is dropped after its last use."""

    def __init__(self, module: fx.GraphModule, keep: set[str], reuse: LeafCalls | None) -> None:
        self.module = module
        self.keep = keep
        self.reuse = reuse
        self.kept: dict[str, Any] = {}
        self.current: fx.Node | None = None

    def run(self, args: tuple[Any, ...]) -> Any:
        graph = self.module.graph
        inputs = iter(graph.process_inputs(*args))
        env: dict[fx.Node, Any] = {}
        last_uses = _last_uses(graph)
        for node in graph.nodes:
            self.current = node
            if node.op == "output":
                return graph.process_outputs(fx.node.map_arg(node.args[0], env.__getitem__))
            if node.name in self.keep:
                self.kept[node.name] = fx.node.map_arg(node.args, env.__getitem__)
            value = self._value(node, env, inputs)
            if isinstance(value, torch.Tensor):
                node.meta["bnfold_shape"] = tuple(value.shape)
            env[node] = value
            for done in last_uses.get(node, ()):
                del env[done]
        raise RuntimeError("the graph has no output node")

    def _value(self, node: fx.Node, env: dict[fx.Node, Any], inputs: Iterator[Any]) -> Any:
        if node.op == "placeholder":
            return _placeholder(node, inputs)
        if node.op == "get_attr":
            return _fetch_attr(self.module, str(node.target))
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = dict(fx.node.map_arg(node.kwargs, env.__getitem__))
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        module = self.module.get_submodule(str(node.target))
        if self.reuse is not None:
            reused, result = self.reuse.reuse(module, args, kwargs)
            if reused:
                return result
        return module(*args, **kwargs)


def _placeholder(node: fx.Node, inputs: Iterator[Any]) -> Any:
    if str(node.target).startswith("*"):
        return list(inputs)
    try:
        return next(inputs)
    except StopIteration:
        if node.args:  # a default value
            return node.args[0]
        raise TypeError(f"missing input for {node.target!r}") from None


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values whose last reader it is (the output node keeps its own)."""
    seen: set[fx.Node] = set()
    last: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(graph.nodes):
        if node.op == "output":
            seen.update(node.all_input_nodes)
            continue
        for source in node.all_input_nodes:
            if source not in seen:
                seen.add(source)
                last.setdefault(node, []).append(source)
    return last


def _rejection_message(node: fx.Node | None, exc: BaseException) -> str:
    where = "the model"
    if node is not None:
        where = f"layer '{node.target}'" if node.op == "call_module" else f"op '{node.name}'"
    return (
        f"{where} rejected the example input: {first_line(exc)}. "
        "Check --input-shape (batch, channels, spatial size) and dtype."
    )
