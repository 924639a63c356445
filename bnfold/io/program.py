"""torch.export programs (``.pt2``): the strings torch would evaluate, and a foldable module.

``bnfold._pt2`` reads the archive (``torch.export.load`` is never called on a user's file).
Before torch sees the program, ``check_program_document`` refuses every string torch would
evaluate as Python (shape expressions go through ``sympy.sympify``, guards through ``exec``)
unless it is a plain expression; once it is built, ``check_graph_targets`` refuses a graph that
calls anything but torch operators and pure arithmetic.

``ExportedProgram.module()`` is a flat aten graph: every layer is a ``call_function`` on
``aten.conv2d``/``aten.linear``/``aten.batch_norm``, and it refuses ``eval()``/``train()``.
``module_from_program`` turns each such call whose parameters are used nowhere else back into a
real ``nn.Conv*``/``nn.ConvTranspose*``/``nn.Linear``/``nn.BatchNorm*`` module under its original
name, in a plain ``torch.fx.GraphModule``. The fold engine then sees ordinary layers.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from bnfold.errors import LoadError, UnsafeFileError

# ------------------------------------------------------------------ program safety checks

# Python callables (besides torch operators) a program's graph may call: pure arithmetic.
_SAFE_CALLABLES = frozenset(
    [
        getattr(operator, name)
        for name in (
            "getitem",
            "add",
            "sub",
            "mul",
            "truediv",
            "floordiv",
            "mod",
            "pow",
            "neg",
            "pos",
            "abs",
            "eq",
            "ne",
            "lt",
            "le",
            "gt",
            "ge",
            "and_",
            "or_",
            "xor",
            "not_",
            "invert",
            "lshift",
            "rshift",
        )
    ]
    + [getattr(math, name) for name in ("floor", "ceil", "trunc", "sqrt", "exp", "log")]
    + [
        getattr(torch, name)
        for name in (
            "_assert",
            "sym_int",
            "sym_float",
            "sym_max",
            "sym_min",
            "sym_not",
            "sym_ite",
            "sym_sum",
            "_check",
            "_check_is_size",
        )
        if hasattr(torch, name)
    ]
)
# Names a symbolic-shape expression may call or use (sympy and torch's sympy functions).
_SYMPY_CALLS = frozenset(
    {
        "Symbol",
        "Integer",
        "Float",
        "Rational",
        "Max",
        "Min",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "Mod",
        "Abs",
        "floor",
        "ceiling",
        "sqrt",
        "Piecewise",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
        "BitwiseFn_bitwise_and",
        "BitwiseFn_bitwise_or",
        "IsNonOverlappingAndDenseIndicator",
    }
)
_SYMPY_NAMES = frozenset({"oo", "zoo", "nan", "pi", "E", "true", "false", "True", "False"})
_SYMBOL_NAME = re.compile(r"^[a-z]{1,4}[0-9]+$")
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_ARITHMETIC = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.BoolOp,
    ast.Load,
    ast.operator,
    ast.unaryop,
    ast.cmpop,
    ast.boolop,
)


def check_graph_targets(path: Path, program: torch.export.ExportedProgram) -> None:
    """Refuse a program whose graph calls anything but torch operators and pure arithmetic."""
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if isinstance(graph, fx.Graph) else ():
            if node.op in ("call_method", "call_module"):
                _refuse_target(path, node, f"a {node.op} node")
            if node.op == "call_function" and not _safe_target(node.target):
                _refuse_target(path, node, f"{node.target!r}")


def _refuse_target(path: Path, node: fx.Node, what: str) -> None:
    raise UnsafeFileError(
        f"{path}: the program's node {node.name!r} calls {what}, which is not a PyTorch "
        "operator; running it could do anything. Refusing it. Re-export the model from "
        "trusted code with torch.export."
    )


def _safe_target(target: Any) -> bool:
    op_types = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
    if isinstance(target, op_types):
        return True
    try:
        return target in _SAFE_CALLABLES
    except TypeError:
        return False


def check_program_document(path: Path, name: str, program: Any) -> None:
    """Refuse a program document (``models/*.json``, parsed) holding a string torch would
    evaluate as code: every shape expression and guard must be a plain one (``UnsafeFileError``).
    """
    if not isinstance(program, dict):
        raise LoadError(f"{path}: damaged torch.export archive ({name} is not an object)")
    try:
        _check_strings(path, program)
    except RecursionError:
        raise LoadError(f"{path}: damaged torch.export archive ({name} nests too deep)") from None


def _check_strings(path: Path, program: dict) -> None:
    for key, value in _walk(program):
        if key == "expr_str" and not _safe_expression(value, _sympy_node_ok):
            _refuse_string(path, "a shape expression", value)
        elif key == "guards_code":
            for guard in value if isinstance(value, list) else [value]:
                if not _safe_expression(guard, _guard_node_ok):
                    _refuse_string(path, "a guard", guard)
        elif key == "as_graph" and not (
            isinstance(value, dict) and str(value.get("name", "")).isidentifier()
        ):
            _refuse_string(path, "a subgraph name", value)


def _refuse_string(path: Path, what: str, value: Any) -> None:
    raise UnsafeFileError(
        f"{path}: {what} in the program is not a plain expression ({str(value)[:80]!r}); "
        "torch would evaluate it as Python code, so it could run anything. Refusing it. "
        "Re-export the model from trusted code with torch.export."
    )


def _walk(value: Any):
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def _safe_expression(text: Any, node_ok: Callable[[ast.AST], bool]) -> bool:
    if not isinstance(text, str):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    strings = {
        id(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    # A string is harmless only as a symbol's name or an input's key (``L['x']``): anywhere
    # else sympy would parse it as a new expression, i.e. evaluate it.
    allowed = {id(_string_slot(node)) for node in ast.walk(tree)} - {id(None)}
    return strings <= allowed and all(node_ok(node) for node in ast.walk(tree))


def _string_slot(node: ast.AST) -> ast.AST | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
        return node.args[0] if node.func.id == "Symbol" else None
    if isinstance(node, ast.Subscript):
        root = node.value
        while isinstance(root, ast.Subscript):
            root = root.value
        return node.slice if isinstance(root, ast.Name) and root.id == "L" else None
    return None


def _sympy_node_ok(node: ast.AST) -> bool:
    """Sympy printing: calls of known functions, symbols, numbers, arithmetic, keywords."""
    if isinstance(node, _ARITHMETIC) or isinstance(node, ast.keyword):
        return True
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS
    if isinstance(node, ast.Name):
        return (
            node.id in _SYMPY_CALLS or node.id in _SYMPY_NAMES or bool(_SYMBOL_NAME.match(node.id))
        )
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool))


def _guard_node_ok(node: ast.AST) -> bool:
    """Guards: ``L['x'].size()[0] >= 2`` and sympy-style arithmetic over such terms."""
    if isinstance(node, _ARITHMETIC) or isinstance(node, ast.Subscript):
        return True
    if isinstance(node, ast.Attribute):
        return node.attr in _GUARD_METHODS or (
            isinstance(node.value, ast.Name)
            and node.value.id == "math"
            and node.attr in ("floor", "ceil", "trunc", "sqrt")
        )
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute):
            return node.func.attr in _GUARD_METHODS | {"floor", "ceil", "trunc", "sqrt"}
        return isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS
    if isinstance(node, ast.Name):
        return node.id in {"L", "math", "inf"} | _SYMPY_CALLS | _SYMPY_NAMES
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool))


# ------------------------------------------------------------------ program -> module


@dataclass(frozen=True)
class _Layer:
    """How to rebuild one aten call as a module: which args hold tensors, how to build it."""

    params: tuple[tuple[str, str], ...]  # (schema argument, attribute name on the module)
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
    root = nn.Module()
    counts: Counter[str] = Counter()
    left: Counter[str] = Counter()
    for owner, nodes in _liftable_groups(flat).items():
        module = _build_module(flat, nodes[0])
        if module is None:
            left[_op_name(nodes[0])] += len(nodes)
            continue
        _set_submodule(root, owner, module)
        for node in nodes:
            _replace_with_module(graph, node, owner)
        counts[type(module).__name__] += 1
    for node in graph.nodes:
        if node.op == "call_function" and _op_name(node) in _LAYER_OPS:
            left[_op_name(node)] += 1
    _drop_dead_attrs(graph)
    _copy_attrs(flat, root, graph)
    module = fx.GraphModule(root, graph, class_name=type(flat).__name__.split(".")[-1])
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
        if layer is None:
            continue
        owner = _owner(node, layer)
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
    for arg_name, attr in layer.params:
        value = args.get(arg_name)
        if value is None:
            continue
        if not isinstance(value, fx.Node) or value.op != "get_attr":
            return None
        owner, _, leaf = str(value.target).rpartition(".")
        if not owner or leaf != attr:
            return None
        owners.add(owner)
    return owners.pop() if len(owners) == 1 else None


def _tensors_private(nodes: list[fx.Node], layer: _Layer) -> bool:
    """True when the group's parameter nodes feed nothing but the group's own calls."""
    members = set(nodes)
    for node in nodes:
        args = _bind(node)
        for arg_name, _ in layer.params:
            value = args.get(arg_name)
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


def _drop_dead_attrs(graph: fx.Graph) -> None:
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)


def _copy_attrs(flat: fx.GraphModule, root: nn.Module, graph: fx.Graph) -> None:
    """Give ``root`` every attribute the remaining ``get_attr`` nodes read, at the same path."""
    for node in graph.nodes:
        if node.op != "get_attr" or _has_attr(root, str(node.target)):
            continue
        owner, _, leaf = str(node.target).rpartition(".")
        value = _get_attr(flat, str(node.target))
        parent = _ensure_submodule(root, owner)
        if isinstance(value, nn.Parameter):
            parent.register_parameter(leaf, value)
        elif isinstance(value, torch.Tensor):
            parent.register_buffer(leaf, value)
        else:
            setattr(parent, leaf, value)


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


# ------------------------------------------------------------------ module builders


def _build_conv(args: dict[str, Any], node: fx.Node) -> nn.Module | None:
    weight = args["weight"].meta["val"]
    transposed = _op_name(node).startswith("conv_transpose") or bool(args.get("transposed"))
    ndim = weight.dim() - 2
    groups = int(args.get("groups", 1))
    common = dict(
        kernel_size=tuple(weight.shape[2:]),
        stride=_expand(args.get("stride", 1), ndim),
        padding=args.get("padding", 0)
        if isinstance(args.get("padding"), str)
        else _expand(args.get("padding", 0), ndim),
        dilation=_expand(args.get("dilation", 1), ndim),
        groups=groups,
        bias=args.get("bias") is not None,
        device="meta",
        dtype=weight.dtype,
    )
    if ndim not in (1, 2, 3):
        return None
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
    return nn.Linear(
        in_features,
        out_features,
        bias=args.get("bias") is not None,
        device="meta",
        dtype=weight.dtype,
    )


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


_CONV_PARAMS = (("weight", "weight"), ("bias", "bias"))
_BN_PARAMS = (
    ("weight", "weight"),
    ("bias", "bias"),
    ("running_mean", "running_mean"),
    ("running_var", "running_var"),
)
_LAYERS: dict[str, _Layer] = {
    **{
        name: _Layer(_CONV_PARAMS, _build_conv)
        for name in (
            "conv1d",
            "conv2d",
            "conv3d",
            "conv_transpose1d",
            "conv_transpose2d",
            "conv_transpose3d",
            "convolution",
        )
    },
    "linear": _Layer(_CONV_PARAMS, _build_linear),
    "batch_norm": _Layer(_BN_PARAMS, _build_batch_norm),
    "_native_batch_norm_legit_no_training": _Layer(_BN_PARAMS, _build_batch_norm),
}
_LAYER_OPS = frozenset(_LAYERS)


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
    for arg_name, attr in layer.params:
        value = args.get(arg_name)
        if value is None:
            continue
        tensor = _get_attr(flat, str(value.target))
        if attr in module._parameters:
            if not isinstance(tensor, nn.Parameter):
                tensor = nn.Parameter(tensor, requires_grad=False)
            module._parameters[attr] = tensor
        else:
            module._buffers[attr] = tensor
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        owner = _owner(node, layer)
        tracked = _get_attr(flat, f"{owner}.num_batches_tracked", default=None)
        module._buffers["num_batches_tracked"] = (
            tracked if isinstance(tracked, torch.Tensor) else torch.tensor(0, dtype=torch.long)
        )
    return module


def _hyper_args(node: fx.Node, layer: _Layer) -> tuple:
    tensor_args = {name for name, _ in layer.params} | {"input"}
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


def _get_attr(module: nn.Module, target: str, default: Any = LoadError) -> Any:
    value: Any = module
    for part in target.split("."):
        if not hasattr(value, part):
            if default is LoadError:
                raise LoadError(f"the program reads {target}, which it does not hold")
            return default
        value = getattr(value, part)
    return value


def _has_attr(module: nn.Module, target: str) -> bool:
    return _get_attr(module, target, default=None) is not None


def _ensure_submodule(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split(".") if path else ():
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, leaf = path.rpartition(".")
    _ensure_submodule(root, owner).add_module(leaf, module)
