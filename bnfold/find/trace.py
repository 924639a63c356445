"""Reading a model's dataflow with torch.fx: the leaf tracer and shape propagation.

Conv, ConvTranspose, Linear and BatchNorm modules (and their subclasses) are leaves, so a custom
subclass forward never breaks the trace of the model around it.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.errors import ModelInputError, TraceError, first_line
from bnfold.find.functional import fetch_attr
from bnfold.find.leafcalls import LeafCalls
from bnfold.find.sites import LAYER_TYPES, is_affine_candidate
from bnfold.io.inputs import as_args
from bnfold.modes import inference

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


def runnable(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule (code generated) with ``gm``'s graph and attributes, for handing out
    a rewritten trace. A graph bnfold traced is copied into one without a tracer class: a
    GraphModule pickles its graph's tracer class by reference, and the folded model must load
    where bnfold is not installed."""
    if isinstance(gm, _LazyGraphModule):
        graph = fx.Graph()
        graph.output(graph.graph_copy(gm.graph, {}))
        return fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    gm.recompile()
    return gm


def trace_model(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule sharing its submodules and tensors, without changing it.

    A GraphModule (e.g. ``ExportedProgram.module()``) is used as it is. Raises ``TraceError``
    naming the cause when the model cannot be traced.
    """
    if isinstance(model, fx.GraphModule):
        return model
    try:
        module = trace_to_module(LeafTracer(), model)
    except Exception as exc:
        if _in_higher_order_op(exc):
            raise HigherOrderOpError(
                f"cannot analyse {type(model).__name__}: its forward calls a higher-order op "
                f"(torch.cond, torch.while_loop...) that torch.fx cannot trace ({first_line(exc)})"
                " and a recorded forward cannot follow. Pass a torch.export program (.pt2) of "
                "the model: its batch norms outside the op fold, those inside are reported"
            ) from exc
        raise TraceError(
            f"cannot trace {type(model).__name__} with torch.fx: {first_line(exc)}. Make the "
            "offending forward traceable (no Python control flow on tensor values) or pass a "
            "torch.export program (.pt2)."
        ) from exc
    return module


class HigherOrderOpError(TraceError):
    """The forward calls a higher-order op (``torch.cond``): neither fx nor a recording can
    read it (running it eagerly under a recording's modes breaks torch's compiler for the
    rest of the process), so the model must come as a ``torch.export`` program."""


def _in_higher_order_op(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside torch's higher-order ops (``torch.cond`` rejecting an
    fx proxy as its predicate)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return any("_higher_order_ops" in frame.filename for frame in frames)


def trace_to_module(tracer: fx.Tracer, root: nn.Module) -> fx.GraphModule:
    """Trace ``root`` into a GraphModule over it, leaving ``root`` and its modules as they were
    (fx stores tensor constants as new attributes of the root: the GraphModule takes them over).
    A forward that keeps a traced value on a module (``self.feat = y``, a list or dict cache)
    has an output the graph does not show: ``TraceError``. The graph pass reads graphs and never
    runs their Python code: torch's lazy GraphModule generates that code only when it is needed
    (``runnable``)."""
    saved = {module: _state(module) for module in root.modules()}
    try:
        graph = tracer.trace(root)
        kept = next((found for found in map(_kept_proxy, saved) if found), None)
        if kept is not None:
            raise TraceError(
                f"the forward keeps a traced value on a module ({kept}), an output the traced "
                "graph does not show"
            )
        return _LazyGraphModule(root, graph, class_name=type(root).__name__)
    finally:
        for module, state in saved.items():
            _restore(module, state)


def _state(module: nn.Module) -> _State:
    """A module's attributes, and a copy of each list, dict and set among them (torch's own
    registries, which hold no traced value, are not copied)."""
    attributes = dict(vars(module))
    contents = {
        name: copy.copy(value)
        for name, value in attributes.items()
        if name not in _REGISTRIES and isinstance(value, (list, dict, set))
    }
    return _State(attributes, contents)


class _State(NamedTuple):
    attributes: dict[str, Any]
    contents: dict[str, Any]  # a copy of each list, dict and set attribute


#: The attributes every nn.Module has (parameters, buffers, submodules, hooks).
_REGISTRIES = frozenset(vars(nn.Module()))


def _restore(module: nn.Module, state: _State) -> None:
    for name in set(vars(module)) - state.attributes.keys():
        del module.__dict__[name]
    module.__dict__.update(state.attributes)
    for name, contents in state.contents.items():
        value = state.attributes[name]
        if isinstance(value, list):
            value[:] = contents
        else:
            value.clear()
            value.update(contents)


def _kept_proxy(module: nn.Module) -> str | None:
    """``Type.attribute`` of a module attribute that holds a traced value, if any."""
    for name, value in vars(module).items():
        if name not in _REGISTRIES and _holds_proxy(value, depth=3):
            return f"{type(module).__name__}.{name}"
    return None


def _holds_proxy(value: Any, depth: int) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if depth == 0 or isinstance(value, (str, bytes, torch.Tensor, nn.Module)):
        return False
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_proxy(item, depth - 1) for item in value)
    return False


def propagate(
    gm: fx.GraphModule, example_inputs: Any, keep: set[str], reuse: LeafCalls | None = None
) -> tuple[dict[str, Any], Any]:
    """Run the traced model ``gm`` once in eval mode without autograd.

    Stores ``node.meta["bnfold_shape"]`` for every tensor-valued node and returns the input
    values of the nodes named in ``keep``, and the graph's output. Leaf calls whose arguments
    equal those of a call kept in ``reuse`` take its result (see ``bnfold.find.leafcalls``). The
    model's flags are restored afterwards. A failure raises ``ModelInputError`` naming the node
    and module that rejected the input.
    """
    run = _GraphRun(gm, keep, reuse)
    with inference(gm):
        try:
            result = run.run(as_args(example_inputs))
        except Exception as exc:
            raise input_rejected(_where(run.current), exc) from exc
    return run.kept, result


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
            return fetch_attr(self.module, str(node.target))
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


def _where(node: fx.Node | None) -> str:
    if node is None:
        return ""
    return f"layer '{node.target}'" if node.op == "call_module" else f"op '{node.name}'"


def input_rejected(where: str, exc: BaseException) -> ModelInputError:
    """The error for an example input the model rejects; ``where`` names the layer or op
    (empty: the model)."""
    return ModelInputError(
        f"{where or 'the model'} rejected the example input: {first_line(exc)}. Check the "
        "example inputs (batch, channels, spatial size, dtype)."
    )
