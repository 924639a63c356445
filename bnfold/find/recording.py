"""Recording a model's real dataflow during one eval forward (for models torch.fx cannot trace).

While the model runs once on real inputs (eval mode, no autograd):

- global module hooks see every module call. Conv/ConvTranspose/Linear/BatchNorm modules (and
  subclasses) and per-channel affine candidates (``bnfold.find.affine``) are *leaves*: one node per
  call, their internals unseen, exactly as ``bnfold.find.trace.LeafTracer`` keeps them;
- a ``TorchDispatchMode`` sees every ATen op run outside leaves: one node per op, with edges
  from the nodes that produced its tensor arguments (tensors are matched by identity, so
  in-place ops and ops returning their input keep the chain right);
- a ``TorchFunctionMode`` notices where Python reads tensor *values* (``item``, ``bool``,
  ``tolist``, ``numpy``): from there on, what runs may depend on the input's values.

A tensor still referenced when the forward returns (returned inside a custom object, cached on a
module) counts as read by the output, so a fold never changes a value that escapes. The result is
a ``torch.fx`` graph over the model's own modules, shaped like a ``LeafTracer`` trace, so the graph
pass applies the same rules to it. It describes one execution and is never run.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bnfold.find.kernels import BATCH_NORM_KERNELS, INSTANCE_NORMS, higher_order_name
from bnfold.find.sites import needs_example_input, own_tensors
from bnfold.find.trace import input_rejected, is_leaf
from bnfold.io.inputs import as_args
from bnfold.modes import inference

_VALUE_READ_OPS = frozenset({"_local_scalar_dense", "equal", "is_nonzero"})
_VALUE_READ_METHODS = frozenset({"tolist", "numpy", "__array__", "item"})


def _tensors(tree: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)]


def recorded_op(*args: Any) -> Any:
    """Stands for an ATen op (``node.meta["aten"]``) in a recorded graph; never called."""
    raise RuntimeError("a recorded dataflow graph describes one execution and cannot be run")


@dataclass(frozen=True)
class LooseNorm:
    """A batch-norm kernel run outside any BatchNorm module (a functional call)."""

    op: str
    where: str  # module path of the innermost enclosing module, "" for the model's own forward


@dataclass
class Recording:
    """The dataflow of one eval forward, as a graph over the model's leaf modules."""

    module: fx.GraphModule
    kept: dict[str, tuple[Any, ...]]  # node name -> inputs of subclass/affine leaf calls
    read_detail: str | None  # the first read of tensor values into Python and where, if any
    outside_uses: Counter  # id(tensor) -> ops outside leaf modules that read a leaf's tensor
    loose_norms: list[LooseNorm]
    input_shapes: tuple[tuple[int, ...], ...]


@dataclass
class _Frame:
    module: nn.Module
    node: fx.Node | None  # the leaf call node (only for an outermost leaf)
    inside_leaf: bool


@dataclass
class _State:
    """What the module hooks and the two modes share while one forward is recorded."""

    paths: dict[int, str]
    leaf_tensors: set[int]
    index_buffers: set[int] = field(default_factory=set)  # the model's integer buffers
    graph: fx.Graph = field(default_factory=fx.Graph)
    producers: dict[int, tuple[weakref.ref, fx.Node]] = field(default_factory=dict)
    stack: list[_Frame] = field(default_factory=list)
    leaf_depth: int = 0
    instance_norm_depth: int = 0
    kept: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    read_detail: str | None = None
    outside_uses: Counter = field(default_factory=Counter)
    loose_norms: list[LooseNorm] = field(default_factory=list)

    def _argument(self, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        return value if id(value) in self.index_buffers else None

    def node_for(self, tensor: Tensor) -> fx.Node:
        """The node that produced ``tensor``; a fresh ``tensor`` node for one made elsewhere."""
        entry = self.producers.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        node = self.add_node("call_function", recorded_op, (), "tensor")
        self.produced(tensor, node)
        return node

    def produced(self, tensor: Tensor, node: fx.Node) -> None:
        self.producers[id(tensor)] = (weakref.ref(tensor), node)
        node.meta.setdefault("bnfold_shape", tuple(tensor.shape))

    def add_node(self, op: str, target: Any, args: tuple, name: str | None = None) -> fx.Node:
        return self.graph.create_node(op, target, args, {}, name=name)

    def where(self) -> str:
        for frame in reversed(self.stack):
            path = self.paths.get(id(frame.module))
            if path is not None:
                return path
        return ""

    def value_read(self, what: str) -> None:
        if self.read_detail is None:
            self.read_detail = f"{what} in {self.where() or 'the model forward'}"

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        node = None  # a node for an outermost leaf call only
        if self.leaf_depth == 0 and id(module) in self.paths and is_leaf(module):
            inputs = tuple(self.node_for(t) for t in _tensors(args))
            node = self.add_node("call_module", self.paths[id(module)], inputs)
        inside_leaf = self.leaf_depth > 0 or node is not None
        self.stack.append(_Frame(module, node, inside_leaf))
        if inside_leaf:  # from here on ops are the leaf's own, the copy below included
            self.leaf_depth += 1
        if node is not None and needs_example_input(module):
            # a copy: an input kept alive here would count as escaping the forward
            self.kept[node.name] = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        while self.stack:
            frame = self.stack.pop()
            if frame.inside_leaf:
                self.leaf_depth -= 1
            if frame.module is module:
                break
        else:
            return
        if frame.node is not None:
            for tensor in _tensors(output):
                self.produced(tensor, frame.node)

    def leaf_reads(self, args: tuple, kwargs: dict) -> None:
        """Inside a leaf: a tensor produced outside it is an input of the leaf call, however
        it was passed (positionally, by keyword, through an attribute)."""
        leaf = next(frame.node for frame in reversed(self.stack) if frame.node is not None)
        for tensor in _tensors((args, kwargs)):
            entry = self.producers.get(id(tensor))
            if entry is not None and entry[0]() is tensor and entry[1] not in leaf.args:
                leaf.args = (*leaf.args, entry[1])

    def op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        inputs = _tensors((args, kwargs))
        for tensor in inputs:
            if id(tensor) in self.leaf_tensors:
                self.outside_uses[id(tensor)] += 1
        name = func.overloadpacket.__name__
        node = self.add_node(
            "call_function",
            recorded_op,
            tuple(dict.fromkeys(self.node_for(t) for t in inputs)),
            name,
        )
        node.meta["aten"] = str(func)
        # the op's other arguments (dims, sizes, flags); of its tensors only the model's own
        # index buffers (a stored channel permutation), the others as None
        node.meta["aten_args"] = pytree.tree_map(self._argument, (args, kwargs))
        if name in BATCH_NORM_KERNELS and self.instance_norm_depth == 0:
            self.loose_norms.append(LooseNorm(f"aten.{name}", self.where()))
        for tensor in _tensors(out):
            self.produced(tensor, node)
        if name in _VALUE_READ_OPS:
            self.value_read(f"aten.{name}")
        elif _shape_from_values(func, args, self.index_buffers) or _made_sparse(args, out):
            self.value_read(f"aten.{name}, whose result's shape depends on the input's values,")


def _shape_from_values(func: Any, args: tuple, constants: set[int]) -> bool:
    """An op whose result's shape depends on the values of a tensor the input may change
    (``nonzero``, ``masked_select``, ``unique``, ``bincount``, ``x[mask]``: torch tags them
    ``dynamic_output_shape``), so code after it may route by values. Indexing with integer
    tensors has the indices' shape; a mask the model stores (``constants``: ids of its integer
    and boolean buffers) is the same for every input."""
    if torch.Tag.dynamic_output_shape not in getattr(func, "tags", ()):
        return False
    deciding = _tensors(args)
    if func.overloadpacket is torch.ops.aten.index:
        deciding = [t for t in _tensors(args[1:]) if t.dtype in (torch.bool, torch.uint8)]
    return any(id(t) not in constants for t in deciding)


def _made_sparse(args: tuple, out: Any) -> bool:
    """A dense tensor made sparse: how many values it keeps (``indices().shape``) depends on
    how many are zero (torch does not tag these conversions)."""
    made = any(t.layout != torch.strided for t in _tensors(out))
    return made and any(t.layout == torch.strided for t in _tensors(args))


class Unrecordable(Exception):
    """The forward calls an op a recording cannot follow: a higher-order op (``torch.cond``,
    ``torch.ops.higher_order.*``) that runs code of its own."""


class _OpRecorder(TorchDispatchMode):
    supports_higher_order_operators = True  # to refuse them by name, not with torch's error

    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not hasattr(func, "overloadpacket"):  # not an ATen op: a higher-order op
            raise Unrecordable(
                f"the forward calls {higher_order_name(func)}, a higher-order op (as "
                "torch.cond) whose branches a recording of one forward cannot follow"
            )
        kwargs = kwargs or {}
        if self.state.leaf_depth > 0:
            self.state.leaf_reads(args, kwargs)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        self.state.op(func, args, kwargs, out)
        return out


class _ReadWatcher(TorchFunctionMode):
    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in INSTANCE_NORMS:
            self.state.instance_norm_depth += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.state.instance_norm_depth -= 1
        name = getattr(func, "__name__", "")
        if name in _VALUE_READ_METHODS and self.state.leaf_depth == 0:
            self.state.value_read(f"Tensor.{name}")
        return func(*args, **kwargs)


def record(model: nn.Module, example_inputs: Any) -> Recording:
    """Run ``model`` once (eval mode, no autograd, flags restored) and record its dataflow.

    Raises ``ModelInputError`` naming the innermost module when the forward fails.
    """
    args = as_args(example_inputs)
    paths = {id(m): name for name, m in model.named_modules() if name}
    leaf_tensors = {id(t) for m in model.modules() if is_leaf(m) for t in own_tensors(m)}
    indices = {id(t) for t in model.buffers() if not t.is_floating_point()}
    state = _State(paths=paths, leaf_tensors=leaf_tensors, index_buffers=indices)
    leaves = _tensors(args)
    for i, tensor in enumerate(leaves):
        state.produced(tensor, state.add_node("placeholder", f"input_{i}", ()))
    pre = torch.nn.modules.module.register_module_forward_pre_hook(state.pre_hook)
    post = torch.nn.modules.module.register_module_forward_hook(state.post_hook)
    try:
        with inference(model), _ReadWatcher(state), _OpRecorder(state):
            output = model(*args)
    except Unrecordable:
        raise
    except Exception as exc:
        where = state.where()
        raise input_rejected(f"layer {where!r}" if where else "", exc) from exc
    finally:
        pre.remove()
        post.remove()
    returned = [state.node_for(t) for t in _tensors(output)]
    alive = [node for ref, node in state.producers.values() if ref() is not None]
    escaped = [n for n in alive if n.op == "call_module" and n not in returned]
    del output
    state.graph.output(tuple(dict.fromkeys(returned + escaped)))
    module = fx.GraphModule(model, state.graph, class_name=type(model).__name__)
    return Recording(
        module=module,
        kept=state.kept,
        read_detail=state.read_detail,
        outside_uses=state.outside_uses,
        loose_norms=state.loose_norms,
        input_shapes=tuple(tuple(t.shape) for t in leaves),
    )
