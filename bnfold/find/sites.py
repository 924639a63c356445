"""Recognising the nodes that matter in a traced graph: batch norms and Conv/ConvT/Linear layers.

Both appear as modules (``call_module``), as ``torch.nn.functional`` calls, or as ATen ops (the
form ``torch.export`` programs take). Each recogniser returns a site record or ``None``.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from bnfold.find.patterns import LayerKind, LayerView, Refusal
from bnfold.folding.math import BnParams, Layout
from bnfold.records import BnKind, SkipReason

aten = torch.ops.aten

_STOCK_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_STOCK_LAYER_FORWARDS = tuple(
    cls.forward
    for cls in (
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        nn.Linear,
    )
)

# Functional batch norms: target -> names of the positional parameters.
_FN_NORMS: dict[Any, tuple[str, ...]] = {
    F.batch_norm: tuple(inspect.signature(F.batch_norm).parameters),
    torch.batch_norm: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
    aten.batch_norm.default: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
    aten._native_batch_norm_legit_no_training.default: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "momentum",
        "eps",
    ),
}
_TUPLE_NORMS = {aten._native_batch_norm_legit_no_training.default}

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "output_padding",
    "groups",
    "dilation",
)
_CONVOLUTION_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
)
_FN_LAYERS: dict[Any, tuple[LayerKind | None, tuple[str, ...]]] = {
    F.linear: (LayerKind.LINEAR, ("input", "weight", "bias")),
    aten.linear.default: (LayerKind.LINEAR, ("input", "weight", "bias")),
    aten.convolution.default: (None, _CONVOLUTION_ARGS),
}
for _fn in (
    F.conv1d,
    F.conv2d,
    F.conv3d,
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
):
    _FN_LAYERS[_fn] = (LayerKind.CONV, _CONV_ARGS)
for _fn in (
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
):
    _FN_LAYERS[_fn] = (LayerKind.CONV_TRANSPOSE, _CONVT_ARGS)


@dataclass
class NormSite:
    """One batch norm call in the graph."""

    node: fx.Node  # the call
    out: fx.Node  # the node whose value is the normalised tensor
    input: fx.Node | None
    name: str  # module path, or node name for functional norms
    type_name: str
    kind: BnKind
    params: BnParams | None = None
    module: nn.Module | None = None
    problem: Refusal | None = None
    notes: tuple[str, ...] = ()
    extra: Any = field(default=None, repr=False)  # stripped forward of a subclass


@dataclass
class LayerSite:
    """One Conv/ConvTranspose/Linear call in the graph."""

    node: fx.Node
    name: str  # module path, or the weight's attribute path for functional layers
    type_name: str
    kind: LayerKind
    weight: torch.Tensor
    bias: torch.Tensor | None
    layout: Layout
    view: LayerView
    module: nn.Module | None  # None for functional layers
    weight_attr: str | None = None  # functional layers: get_attr target of the weight
    tensors: tuple[torch.Tensor, ...] = ()  # every tensor the fold would rewrite


def is_stock_norm(module: nn.Module) -> bool:
    """True for a BatchNorm module (or SyncBatchNorm) whose class keeps torch's forward."""
    return type(module).forward in _STOCK_FORWARDS


def has_stock_forward(module: nn.Module) -> bool:
    """True when a Conv/ConvTranspose/Linear module computes exactly what its class says."""
    return type(module).forward in _STOCK_LAYER_FORWARDS


def fetch_attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def bound_args(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """Positional and keyword arguments of a call node, by parameter name."""
    values = dict(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def is_norm_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _FN_NORMS


def functional_norm(gm: fx.GraphModule, node: fx.Node) -> NormSite:
    """A functional batch norm; statistics must be module tensors or constants."""
    args = bound_args(node, _FN_NORMS[node.target])
    out = node
    if node.target in _TUPLE_NORMS:
        out = _tuple_output(node)
    site = NormSite(
        node=node,
        out=out,
        input=_as_node(args.get("input")),
        name=node.name,
        type_name=_fn_name(node.target),
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
    eps = args.get("eps", 1e-5)
    site.params = BnParams(
        values["running_mean"], values["running_var"], values["weight"], values["bias"], float(eps)
    )
    if out is None:
        site.problem = Refusal(
            SkipReason.UNSUPPORTED_FORWARD, "the saved mean/invstd outputs are used"
        )
    return site


def module_norm(node: fx.Node, name: str, module: _BatchNorm) -> NormSite:
    """A call of a BatchNorm module (stock, SyncBatchNorm or subclass)."""
    stock = is_stock_norm(module)
    site = NormSite(
        node=node,
        out=node,
        input=_as_node(node.args[0]) if node.args else None,
        name=name,
        type_name=type(module).__name__,
        kind=BnKind.MODULE if stock else BnKind.SUBCLASS,
        module=module,
    )
    if module.running_mean is None or module.running_var is None:
        site.problem = Refusal(SkipReason.NO_RUNNING_STATS, f"{name} has track_running_stats=False")
        return site
    site.params = BnParams(
        module.running_mean,
        module.running_var,
        module.weight if module.affine else None,
        module.bias if module.affine else None,
        float(module.eps),
    )
    return site


def layer_site(
    gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module] | None = None
) -> LayerSite | None:
    """Recognise a Conv/ConvTranspose/Linear call (module or functional), else None.
    ``modules`` (qualified name -> module) saves looking each module up again."""
    if node.op == "call_module":
        module = modules[node.target] if modules else gm.get_submodule(node.target)
        if isinstance(module, (_ConvNd, nn.Linear)):
            return _module_layer(node, str(node.target), module)
        return None
    if node.op == "call_function" and node.target in _FN_LAYERS:
        return _functional_layer(gm, node)
    return None


def _module_layer(node: fx.Node, name: str, module: nn.Module) -> LayerSite:
    if isinstance(module, nn.Linear):
        view = LayerView(
            LayerKind.LINEAR, module.in_features, module.out_features, 1, (), "zeros", -1
        )
        layout = Layout()
        kind = LayerKind.LINEAR
    else:
        transposed = isinstance(module, _ConvTransposeNd)
        kind = LayerKind.CONV_TRANSPOSE if transposed else LayerKind.CONV
        padding = _padding_amount(module.padding, module.kernel_size, module.dilation)
        view = LayerView(
            kind,
            module.in_channels,
            module.out_channels,
            module.groups,
            padding,
            module.padding_mode,
            -1,
        )
        layout = Layout(module.groups, transposed)
    tensors = tuple(t for t in (module.weight, module.bias) if t is not None)
    return LayerSite(
        node,
        name,
        type(module).__name__,
        kind,
        module.weight,
        module.bias,
        layout,
        view,
        module,
        tensors=tensors,
    )


def _functional_layer(gm: fx.GraphModule, node: fx.Node) -> LayerSite | None:
    kind, names = _FN_LAYERS[node.target]
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
    groups = int(args.get("groups", 1))
    if kind == LayerKind.LINEAR:
        view = LayerView(kind, weight.shape[1], weight.shape[0], 1, (), "zeros", -1)
    else:
        spatial = weight.dim() - 2
        padding = args.get("padding", 0)
        kernel = tuple(weight.shape[2:])
        dilation = _tuple(args.get("dilation", 1), spatial)
        pad = _padding_amount(
            padding if isinstance(padding, str) else _tuple(padding, spatial), kernel, dilation
        )
        if kind == LayerKind.CONV_TRANSPOSE:
            c_in, c_out = weight.shape[0], weight.shape[1] * groups
        else:
            c_in, c_out = weight.shape[1] * groups, weight.shape[0]
        view = LayerView(kind, c_in, c_out, groups, pad, "zeros", -1)
    tensors = tuple(t for t in (weight, bias) if t is not None)
    return LayerSite(
        node,
        str(weight_node.target),
        _fn_name(node.target),
        kind,
        weight,
        bias,
        Layout(groups, kind == LayerKind.CONV_TRANSPOSE),
        view,
        None,
        weight_attr=str(weight_node.target),
        tensors=tensors,
    )


def _padding_amount(
    padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...]:
    if padding == "valid":
        return tuple(0 for _ in kernel)
    if padding == "same":
        return tuple(d * (k - 1) for k, d in zip(kernel, dilation, strict=False))
    return tuple(int(p) for p in padding)


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return (
            tuple(int(v) for v in value)
            if len(value) == n
            else tuple(int(value[0]) for _ in range(n))
        )
    return tuple(int(value) for _ in range(n))


class _NotConstant:
    pass


_NOT_CONSTANT = _NotConstant()


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


def _as_node(arg: Any) -> fx.Node | None:
    return arg if isinstance(arg, fx.Node) else None


def _fn_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}"
    module = getattr(target, "__module__", "") or ""
    prefix = "F." if module.startswith("torch.nn.functional") else "torch."
    return prefix + getattr(target, "__name__", str(target))


def is_affine_candidate(module: nn.Module) -> bool:
    """A user module (not from torch) without children whose floating-point tensors are all
    per-channel vectors of one length (scalars allowed), at least one of them."""
    if isinstance(module, (_BatchNorm, _ConvNd, nn.Linear)):
        return False
    if type(module).__module__.split(".")[0] == "torch":
        return False
    if next(module.children(), None) is not None:
        return False
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    lengths = set()
    for tensor in tensors:
        if tensor.dim() > 1 or (tensor.dim() == 1 and not tensor.is_floating_point()):
            return False
        if tensor.dim() == 1:
            lengths.add(tensor.numel())
    return len(lengths) == 1


def is_frozen_norm(module: nn.Module) -> bool:
    """A candidate holding ``running_mean`` and ``running_var`` buffers (FrozenBatchNorm2d)."""
    buffers = dict(module.named_buffers(recurse=False))
    return "running_mean" in buffers and "running_var" in buffers and is_affine_candidate(module)


def affine_kind(module: nn.Module) -> BnKind:
    return BnKind.FROZEN if is_frozen_norm(module) else BnKind.AFFINE
