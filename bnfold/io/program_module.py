"""A foldable ``nn.Module`` from a torch.export program: layer calls rebuilt as layer modules.

``ExportedProgram.module()`` is a flat aten graph: every layer is a ``call_function`` on
``aten.conv2d``/``aten.linear``/``aten.batch_norm``, and it refuses ``eval()``/``train()``.
``module_from_program`` turns each such call whose parameters are used nowhere else back into a
real ``nn.Conv*``/``nn.ConvTranspose*``/``nn.Linear``/``nn.BatchNorm*`` module under its original
name, in a plain ``torch.fx.GraphModule``. The fold engine then sees ordinary layers.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from bnfold.errors import LoadError

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class _Layer:
    """How to rebuild one aten call as a module: which arguments are its tensors (named as the
    module's attributes), and how to build it (None: not module-shaped)."""

    tensors: tuple[str, ...]
    build: Callable[[dict[str, Any], fx.Node], nn.Module | None]


def module_from_program(program: torch.export.ExportedProgram) -> tuple[fx.GraphModule, list[str]]:
    """A plain ``fx.GraphModule`` computing ``program``, with layer calls turned into modules.

    Returns the module (eval mode) and notes for the user (what was rebuilt, what was left).
    Parameters and buffers are shared with ``program.module()``, not copied.
    """
    flat = program.module()
    graph = flat.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)
    attrs: dict[str, Any] = {}  # what the new module holds, by dotted path
    counts: Counter[str] = Counter()
    left: Counter[str] = Counter()
    for owner, nodes in _liftable_groups(flat).items():
        module = _build_module(flat, nodes[0])
        if module is None:
            left[_op_name(nodes[0])] += len(nodes)
            continue
        attrs[owner] = module
        for node in nodes:
            _replace_with_module(graph, node, owner)
        counts[type(module).__name__] += 1
    for node in graph.nodes:
        if node.op == "call_function" and _op_name(node) in _LAYERS:
            left[_op_name(node)] += 1
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        if node.users:
            attrs[str(node.target)] = _get_attr(flat, str(node.target))
        else:
            graph.erase_node(node)
    module = fx.GraphModule(attrs, graph, class_name=type(flat).__name__.split(".")[-1])
    module.eval()
    return module, _notes(counts, left, program)


def dynamic_dims(program: torch.export.ExportedProgram) -> tuple[tuple[int, ...], ...]:
    """For each positional user input of ``program``, the dims that are symbolic (dynamic)."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    dims = []
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val") if name in placeholders else None
        shape = getattr(value, "shape", ())
        dims.append(tuple(i for i, size in enumerate(shape) if isinstance(size, torch.SymInt)))
    return tuple(dims)


def _liftable_groups(flat: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Layer calls grouped by owning module path; a group is kept only when its tensors are
    used by nothing but identical calls (a module called at several sites stays one module)."""
    groups: dict[str, list[fx.Node]] = defaultdict(list)
    keys: dict[str, tuple] = {}
    for node in flat.graph.nodes:
        layer = _layer_for(node)
        owner = _owner(node, layer) if layer is not None else None
        if owner is None:
            continue
        key = (node.target, _hyper_args(node, layer))
        if keys.setdefault(owner, key) != key:
            keys[owner] = ("conflict",)
        groups[owner].append(node)
    return {
        owner: nodes
        for owner, nodes in groups.items()
        if keys[owner] != ("conflict",) and _tensors_private(nodes, _layer_for(nodes[0]))
    }


def _owner(node: fx.Node, layer: _Layer) -> str | None:
    """The module path owning every tensor argument (``conv`` for ``conv.weight``), else None."""
    args = _bind(node)
    owners = set()
    for name in layer.tensors:
        value = args.get(name)
        if value is None:
            continue
        if not isinstance(value, fx.Node) or value.op != "get_attr":
            return None
        owner, _, leaf = str(value.target).rpartition(".")
        if not owner or leaf != name:
            return None
        owners.add(owner)
    return owners.pop() if len(owners) == 1 else None


def _tensors_private(nodes: list[fx.Node], layer: _Layer) -> bool:
    """True when the group's parameter nodes feed nothing but the group's own calls."""
    members = set(nodes)
    for node in nodes:
        args = _bind(node)
        for name in layer.tensors:
            value = args.get(name)
            if isinstance(value, fx.Node) and not set(value.users) <= members:
                return False
    return True


def _replace_with_module(graph: fx.Graph, node: fx.Node, owner: str) -> None:
    result = node
    if _op_name(node) == "_native_batch_norm_legit_no_training":
        (result,) = node.users  # the getitem(..., 0), checked by _build_batch_norm
    with graph.inserting_before(node):
        call = graph.call_module(owner, (_bind(node)["input"],))
    call.meta = dict(result.meta)
    result.replace_all_uses_with(call)
    for dead in (result, node) if result is not node else (node,):
        graph.erase_node(dead)


def _notes(counts: Counter[str], left: Counter[str], program: Any) -> list[str]:
    notes = []
    if counts:
        built = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        notes.append(f"rebuilt layer modules from the program's aten graph: {built}")
    if left:
        kept = ", ".join(f"{n} {name}" for name, n in sorted(left.items()))
        notes.append(
            f"left as functional aten calls (parameters shared or not module-shaped): {kept}"
        )
    training = sum(
        1
        for node in program.graph.nodes
        if node.op == "call_function" and _op_name(node) == "batch_norm" and _bind(node)["training"]
    )
    if training:
        notes.append(
            f"{training} batch norm(s) in the program use batch statistics (it was exported in "
            "train mode); they cannot be folded: re-export from model.eval()"
        )
    return notes


def _build_conv(args: dict[str, Any], node: fx.Node) -> nn.Module | None:
    weight = args["weight"].meta["val"]
    transposed = _op_name(node).startswith("conv_transpose") or bool(args.get("transposed"))
    ndim = weight.dim() - 2
    if ndim not in (1, 2, 3):
        return None
    groups = int(args.get("groups", 1))
    padding = args.get("padding", 0)
    common = dict(
        kernel_size=tuple(weight.shape[2:]),
        stride=_expand(args.get("stride", 1), ndim),
        padding=padding if isinstance(padding, str) else _expand(padding, ndim),
        dilation=_expand(args.get("dilation", 1), ndim),
        groups=groups,
        bias=args.get("bias") is not None,
        device="meta",
        dtype=weight.dtype,
    )
    if transposed:
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[ndim - 1]
        in_ch, out_ch = weight.shape[0], weight.shape[1] * groups
        common["output_padding"] = _expand(args.get("output_padding", 0), ndim)
    else:
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
        in_ch, out_ch = weight.shape[1] * groups, weight.shape[0]
    return cls(int(in_ch), int(out_ch), **common)


def _build_linear(args: dict[str, Any], node: fx.Node) -> nn.Module | None:
    weight = args["weight"].meta["val"]
    if weight.dim() != 2:
        return None
    out_features, in_features = (int(s) for s in weight.shape)
    bias = args.get("bias") is not None
    return nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=weight.dtype)


def _build_batch_norm(args: dict[str, Any], node: fx.Node) -> nn.Module | None:
    if args.get("training") or args.get("running_mean") is None:
        return None
    if (args.get("weight") is None) != (args.get("bias") is None):
        return None
    if _op_name(node) == "_native_batch_norm_legit_no_training":
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
            return None
    value = args["input"].meta.get("val") if isinstance(args["input"], fx.Node) else None
    rank = value.dim() if isinstance(value, torch.Tensor) else None
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
    if cls is None:
        return None
    stats = args["running_mean"].meta["val"]
    return cls(
        int(stats.shape[0]),
        eps=float(args["eps"]),
        momentum=float(args["momentum"]),
        affine=args.get("weight") is not None,
        device="meta",
        dtype=stats.dtype,
    )


_CONV = _Layer(("weight", "bias"), _build_conv)
_BATCH_NORM = _Layer(("weight", "bias", "running_mean", "running_var"), _build_batch_norm)
#: The aten ops rebuilt as modules, by name.
_LAYERS: dict[str, _Layer] = {
    **dict.fromkeys(["conv1d", "conv2d", "conv3d", "convolution"], _CONV),
    **dict.fromkeys(["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"], _CONV),
    "linear": _Layer(("weight", "bias"), _build_linear),
    "batch_norm": _BATCH_NORM,
    "_native_batch_norm_legit_no_training": _BATCH_NORM,
}


def _layer_for(node: fx.Node) -> _Layer | None:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if node.target.namespace != "aten":
        return None
    return _LAYERS.get(_op_name(node))


def _build_module(flat: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    layer = _layer_for(node)
    args = _bind(node)
    try:
        module = layer.build(args, node)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if module is None:
        return None
    parameters = dict(module.named_parameters(recurse=False))
    for name in layer.tensors:
        if args.get(name) is None:
            continue
        tensor = _get_attr(flat, str(args[name].target))
        if name not in parameters:
            module.register_buffer(name, tensor)
        elif isinstance(tensor, nn.Parameter):
            module.register_parameter(name, tensor)
        else:
            module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    if isinstance(module, _BATCH_NORMS):
        tracked = getattr(_get_attr(flat, _owner(node, layer)), "num_batches_tracked", None)
        if not isinstance(tracked, torch.Tensor):
            tracked = torch.tensor(0, dtype=torch.long)
        module.register_buffer("num_batches_tracked", tracked)
    return module


def _hyper_args(node: fx.Node, layer: _Layer) -> tuple:
    tensor_args = {*layer.tensors, "input"}
    return tuple(
        (name, repr(value))
        for name, value in sorted(_bind(node).items())
        if name not in tensor_args
    )


def _bind(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    bound: dict[str, Any] = {}
    for index, arg in enumerate(schema.arguments):
        if index < len(node.args):
            bound[arg.name] = node.args[index]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _op_name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", str(target)).split(".")[-1]


def _expand(value: Any, ndim: int) -> tuple[int, ...]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * ndim
    return tuple(int(v) for v in values)


def _get_attr(module: nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target`` (``LoadError`` when there is none)."""
    try:
        return operator.attrgetter(target)(module)
    except AttributeError:
        raise LoadError(f"the program reads {target}, which it does not hold") from None
