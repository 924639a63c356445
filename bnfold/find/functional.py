"""Functional batch norms and layers in a traced graph: ``torch.nn.functional`` calls,
``torch.batch_norm`` and the ATen ops that ``torch.export`` programs hold.

Each form passes its arguments in its own order; the tables below name them by position so a
call node's arguments are read by name. Statistics, weights and biases must be stored tensors
(``get_attr`` nodes or constants), never values computed in the forward.
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnfold.find.patterns import LayerKind, LayerView, Refusal
from bnfold.find.sites import LayerSite, NormSite, padding_amount
from bnfold.folding.math import BnParams
from bnfold.records import BnKind, SkipReason

aten = torch.ops.aten

_BATCH_NORM_ARGS = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
    "cudnn_enabled",
)
#: Functional batch norms: target -> names of the positional parameters.
NORM_ARGS: dict[Any, tuple[str, ...]] = {
    F.batch_norm: tuple(inspect.signature(F.batch_norm).parameters),
    torch.batch_norm: _BATCH_NORM_ARGS,
    aten.batch_norm.default: _BATCH_NORM_ARGS,
    # batch_norm's arguments without ``training`` and ``cudnn_enabled``
    aten._native_batch_norm_legit_no_training.default: (*_BATCH_NORM_ARGS[:5], "momentum", "eps"),
}
_TUPLE_NORMS = {aten._native_batch_norm_legit_no_training.default}  # (out, mean, invstd)

_LINEAR = ("input", "weight", "bias")
_CONV = (*_LINEAR, "stride", "padding", "dilation", "groups")
_CONVT = (*_LINEAR, "stride", "padding", "output_padding", "groups", "dilation")
_CONVOLUTION = (*_CONV[:-1], "transposed", "output_padding", "groups")
#: Functional layers: target -> (kind, or None when ``transposed`` says; names of the positional
#: parameters).
LAYER_ARGS: dict[Any, tuple[LayerKind | None, tuple[str, ...]]] = {
    F.linear: (LayerKind.LINEAR, _LINEAR),
    aten.linear.default: (LayerKind.LINEAR, _LINEAR),
    aten.convolution.default: (None, _CONVOLUTION),
    F.conv1d: (LayerKind.CONV, _CONV),
    F.conv2d: (LayerKind.CONV, _CONV),
    F.conv3d: (LayerKind.CONV, _CONV),
    aten.conv1d.default: (LayerKind.CONV, _CONV),
    aten.conv2d.default: (LayerKind.CONV, _CONV),
    aten.conv3d.default: (LayerKind.CONV, _CONV),
    F.conv_transpose1d: (LayerKind.CONV_TRANSPOSE, _CONVT),
    F.conv_transpose2d: (LayerKind.CONV_TRANSPOSE, _CONVT),
    F.conv_transpose3d: (LayerKind.CONV_TRANSPOSE, _CONVT),
    aten.conv_transpose1d.default: (LayerKind.CONV_TRANSPOSE, _CONVT),
    aten.conv_transpose2d.input: (LayerKind.CONV_TRANSPOSE, _CONVT),
    aten.conv_transpose3d.input: (LayerKind.CONV_TRANSPOSE, _CONVT),
}


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The value at a dotted attribute path (a ``get_attr`` target), read without
    ``Module.__getattr__`` (fx patches it while tracing)."""
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


def bound_args(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """Positional and keyword arguments of a call node, by parameter name."""
    values = dict(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def is_norm_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in NORM_ARGS


def is_layer_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LAYER_ARGS


def functional_norm(gm: fx.GraphModule, node: fx.Node) -> NormSite:
    """A functional batch norm; statistics must be module tensors or constants."""
    args = bound_args(node, NORM_ARGS[node.target])
    out = _tuple_output(node) if node.target in _TUPLE_NORMS else node
    input_ = args.get("input")
    site = NormSite(
        node=node,
        out=out,
        input=input_ if isinstance(input_, fx.Node) else None,
        name=node.name,
        type_name=op_name(node.target),
        kind=BnKind.FUNCTIONAL,
    )
    if args.get("training", False) is not False:
        site.problem = Refusal(
            SkipReason.FUNCTIONAL_TRAINING,
            f"{site.type_name} is called with training={args['training']}",
        )
        return site
    values = {
        key: _constant(gm, args.get(key))
        for key in ("running_mean", "running_var", "weight", "bias")
    }
    if values["running_mean"] is None or values["running_var"] is None:
        site.problem = Refusal(
            SkipReason.NO_RUNNING_STATS, f"{site.type_name} has no running statistics"
        )
        return site
    if any(value is _NOT_CONSTANT for value in values.values()):
        site.problem = Refusal(
            SkipReason.UNSUPPORTED_FORWARD,
            "its statistics or affine parameters are computed in the forward, not stored tensors",
        )
        return site
    eps = float(args.get("eps", 1e-5))
    site.params = BnParams(**values, eps=eps)
    if out is None:
        site.problem = Refusal(
            SkipReason.UNSUPPORTED_FORWARD, "the saved mean/invstd outputs are used"
        )
    return site


def erase_norm(graph: fx.Graph, norm: NormSite, source: fx.Node) -> None:
    """Take a functional norm out of ``graph``: its readers read ``source`` instead."""
    norm.out.replace_all_uses_with(source)
    for user in list(norm.node.users):
        if not user.users:
            graph.erase_node(user)
    if not norm.node.users:
        graph.erase_node(norm.node)


def erase_dead_code(graph: fx.Graph) -> None:
    """Erase the nodes nothing reads any more (a removed norm's statistics, a merged branch's
    weights, a shape check), but never a call that may write: torch's dead-code pass takes an
    in-place method whose result is not read (``x.relu_()``) for dead code, and that call may be
    a model's activation."""
    graph.eliminate_dead_code(is_impure_node=_may_write)


def _may_write(node: fx.Node) -> bool:
    """A module call, an in-place op (``writes_first_input``), ``out=``, an item assignment, or
    whatever torch itself calls impure."""
    if node.op == "call_module" or node.is_impure():
        return True
    return writes_first_input(node) or "out" in node.kwargs


def writes_first_input(node: fx.Node) -> bool:
    """A method or function call that writes into its first input: an in-place method or ATen
    op (``add_``, ``aten.relu_``), a Python in-place operator, or ``inplace=True`` by keyword or
    by position (``F.relu(x, True)``)."""
    if node.op not in ("call_method", "call_function"):
        return False
    if node.target in IN_PLACE_OPERATORS or _inplace_argument(node) is True:
        return True
    name = _call_name(node)
    return name.endswith("_") and not name.startswith("_")


def _call_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    aten = node.meta.get("aten")  # a recorded ATen op
    if aten is not None:
        return str(aten).split(".")[1]
    target = getattr(node.target, "overloadpacket", None) or node.target
    return str(getattr(target, "__name__", ""))


def _inplace_argument(node: fx.Node) -> object:
    """The ``inplace`` argument of a call, by keyword or by position."""
    if "inplace" in node.kwargs:
        return node.kwargs["inplace"]
    names = _parameters(node.target) if node.op == "call_function" else ()
    if "inplace" in names and names.index("inplace") < len(node.args):
        return node.args[names.index("inplace")]
    return None


@functools.cache
def _parameters(target: object) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return ()


#: Python's in-place operators (item assignment torch already counts as impure).
IN_PLACE_OPERATORS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.imatmul,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
    }
)


def functional_layer(gm: fx.GraphModule, node: fx.Node) -> LayerSite | None:
    """A functional Conv/ConvTranspose/Linear call whose weight (and bias) are stored
    tensors, else None."""
    kind, names = LAYER_ARGS[node.target]
    args = bound_args(node, names)
    weight_node = args.get("weight")
    if not (isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"):
        return None
    weight = fetch_attr(gm, weight_node.target)
    bias = _constant(gm, args.get("bias"))
    if bias is _NOT_CONSTANT or not isinstance(weight, torch.Tensor):
        return None
    if kind is None:
        kind = LayerKind.CONV_TRANSPOSE if args.get("transposed") else LayerKind.CONV
    view = _layer_view(kind, weight, int(args.get("groups", 1)), args)
    attr = str(weight_node.target)
    return LayerSite(node, attr, op_name(node.target), weight, bias, view, weight_attr=attr)


def _layer_view(
    kind: LayerKind, weight: torch.Tensor, groups: int, args: dict[str, Any]
) -> LayerView:
    if kind == LayerKind.LINEAR:
        return LayerView(kind, weight.shape[1], weight.shape[0], 1, (), "zeros", -1)
    kernel = tuple(weight.shape[2:])
    pad = padding_amount(args.get("padding", 0), kernel, args.get("dilation", 1))
    if kind == LayerKind.CONV_TRANSPOSE:
        c_in, c_out = weight.shape[0], weight.shape[1] * groups
    else:
        c_in, c_out = weight.shape[1] * groups, weight.shape[0]
    return LayerView(kind, c_in, c_out, groups, pad, "zeros", -1)


_NOT_CONSTANT = object()  # a value computed in the forward


def _constant(gm: fx.GraphModule, arg: Any) -> Any:
    """The tensor behind a get_attr argument, None for None, _NOT_CONSTANT otherwise."""
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = fetch_attr(gm, arg.target)
        return value if isinstance(value, torch.Tensor) else _NOT_CONSTANT
    if isinstance(arg, torch.Tensor):
        return arg
    return _NOT_CONSTANT


def _tuple_output(node: fx.Node) -> fx.Node | None:
    """For ops returning (out, save_mean, save_invstd): the getitem 0 user, if it is the only
    one used."""
    out = None
    for user in node.users:
        index = user.args[1] if user.target is operator.getitem else None
        if index == 0:
            out = user
        elif user.users:
            return None
    return out


def op_name(target: Any) -> str:
    """``F.conv2d``, ``torch.batch_norm``, ``aten.conv2d.default``."""
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}"
    module = getattr(target, "__module__", "") or ""
    prefix = "F." if module.startswith("torch.nn.functional") else "torch."
    return prefix + getattr(target, "__name__", str(target))
