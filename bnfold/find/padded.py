"""Conv subclasses whose forward only pads its input before the plain convolution: "same"
padding computed at run time, as TensorFlow-ported models do (an ``F.pad`` whose amounts come
from the input's size, or a ``nn.ZeroPad2d`` child, then ``F.conv2d`` of the module's own weight
and bias with its stride, dilation and groups). Such a layer folds like a plain conv.

The forward is traced on the call's real input (``trace_guarded``) and its graph must be

    input -> pad ops -> one convolution -> output

where each pad is a zero (or reflect/replicate/circular) pad whose amounts depend on sizes only,
and the convolution reads the module's own ``weight`` and ``bias`` with its stride, dilation and
groups (padding 0 or its own). Anything else is refused, naming the op that is not understood.
A zero pad counts as padding whatever its amount on the example: the amount is computed at run
time, and a forward that decides from the input's size whether (or how) to pad may zero-pad on
another size, whatever it did on the example. The proof holds for the path the example takes: a
forward that computes something other than pads and its convolution on another size is outside
it (the plan's notes name every decision the trace took on the input's size).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.padding import (
    _CircularPadNd,
    _ConstantPadNd,
    _ReflectionPadNd,
    _ReplicationPadNd,
)

from bnfold.find.functional import LAYER_ARGS, bound_args, is_layer_call
from bnfold.find.guards import describe, is_metadata, trace_guarded
from bnfold.find.patterns import LayerKind, Refusal
from bnfold.find.sites import LayerSite, input_of, nodes_in, padding_amount, per_dim
from bnfold.find.skip_details import describe_node
from bnfold.records import SkipReason

_PAD_ARGS = ("input", "pad", "mode", "value")
#: Functional pads: target -> names of the positional parameters.
PAD_FUNCTIONS: dict[Any, tuple[str, ...]] = {
    F.pad: _PAD_ARGS,
    torch._C._nn.pad: _PAD_ARGS,
    torch.constant_pad_nd: ("input", "pad", "value"),
}
#: Pad modules and the mode each pads with.
PAD_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (_ConstantPadNd, "constant"),
    (_ReflectionPadNd, "reflect"),
    (_ReplicationPadNd, "replicate"),
    (_CircularPadNd, "circular"),
)


@dataclass(frozen=True)
class PadOp:
    """One pad op between the forward's input and its convolution."""

    node: fx.Node
    mode: str  # "constant", "reflect", "replicate", "circular"
    value: Any  # the constant of a constant pad (a literal or a node)
    amounts: Any  # the pad amounts (literals or nodes)


@dataclass(frozen=True)
class PaddedForward:
    """What a proven forward does before its convolution: the convolution's own (zero)
    padding, how else its input may be zero-padded (``None``: never), and the decisions its
    trace took on the input's size, as notes."""

    conv_padding: tuple[int, ...]
    zero_pad: str | None
    notes: tuple[str, ...]


def is_padded_conv_candidate(module: nn.Module) -> bool:
    """A Conv (not ConvTranspose) module, the kind whose custom forward can be proven here."""
    return isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd)


def prove_custom_layer(site: LayerSite, example_args: tuple[Any, ...]) -> None:
    """For a layer whose class overrides forward: fill ``site.view`` and ``site.notes`` when its
    forward is proven to be pads then the plain convolution, else set ``site.problem``."""
    lead = f"{site.label} overrides forward"
    if not is_padded_conv_candidate(site.module):
        site.problem = Refusal(
            SkipReason.UNSUPPORTED_FORWARD,
            f"{lead}; its output is not known to be the plain layer's",
        )
        return
    proof = prove_padded_conv(site.module, example_args)
    if isinstance(proof, str):
        site.problem = Refusal(SkipReason.UNSUPPORTED_FORWARD, f"{lead}: {proof}")
        return
    site.view = replace(
        site.view, padding=proof.conv_padding, padding_mode="zeros", runtime_padding=proof.zero_pad
    )
    site.notes = proof.notes


def prove_padded_conv(module: _ConvNd, example_args: tuple[Any, ...]) -> PaddedForward | str:
    """What the forward of ``module`` does before its convolution, or why it is not proven
    (naming the op not understood). A module without a bias is traced again with one, so the
    bias a fold adds is known to be read."""
    if not example_args:
        return "its forward was not run on an example input"
    proof = _prove(module, example_args)
    if isinstance(proof, str) or module.bias is not None:
        return proof
    with_bias = _prove(_with_bias(module), example_args)
    if isinstance(with_bias, str):
        return f"given a bias (as folding gives it), {with_bias}"
    return proof


def _prove(module: _ConvNd, example_args: tuple[Any, ...]) -> PaddedForward | str:
    traced = trace_guarded(module, tuple(example_args))
    if isinstance(traced, str):
        return traced
    proof = _read_graph(traced.module, module)
    if isinstance(proof, str):
        return proof
    if proof.zero_pad is None and traced.guards:  # another size may take another path
        guard = describe(traced.guards[0])
        proof = replace(
            proof, zero_pad=f"its forward decides from the input's size how to pad ({guard})"
        )
    return replace(proof, notes=traced.notes)


def _with_bias(module: _ConvNd) -> _ConvNd:
    """A shallow copy of ``module`` holding a zero bias (the module itself is not changed)."""
    probe = copy.copy(module)
    object.__setattr__(probe, "_parameters", dict(module._parameters))
    weight = module.weight
    zeros = torch.zeros(module.out_channels, dtype=weight.dtype, device=weight.device)
    probe.bias = nn.Parameter(zeros, requires_grad=False)
    return probe


def _read_graph(gm: fx.GraphModule, module: _ConvNd) -> PaddedForward | str:
    """Check the graph is input -> pads -> one convolution of the module's own tensors."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return f"its forward takes {len(placeholders)} inputs, expected 1"
    output = next(n for n in gm.graph.nodes if n.op == "output")
    conv = output.args[0]
    if not _is_conv(conv):
        return f"its forward returns {_name(gm, conv)}, not the output of a convolution"
    args = bound_args(conv, LAYER_ARGS[conv.target][1])
    conv_padding = _conv_args(gm, module, args)
    if isinstance(conv_padding, str):
        return conv_padding
    pads = _chain(gm, args.get("input"), placeholders[0])
    if isinstance(pads, str):
        return pads
    chain = {conv, placeholders[0], *(pad.node for pad in pads)}
    for node in gm.graph.nodes:
        if node.op != "get_attr" and node not in chain and _is_tensor(node):
            return f"its forward also runs {_name(gm, node)}, which is neither a pad nor its conv"
    return _padding(gm, pads, conv_padding)


def _is_conv(node: Any) -> bool:
    return (
        isinstance(node, fx.Node)
        and is_layer_call(node)
        and LAYER_ARGS[node.target][0] == LayerKind.CONV
    )


def _conv_args(gm: fx.GraphModule, module: _ConvNd, args: dict[str, Any]) -> tuple[int, ...] | str:
    """The convolution's own padding, or what differs from the module's weight, bias, stride,
    dilation or groups."""
    if not _is_attr(args.get("weight"), "weight"):
        return f"its convolution's weight is {_name(gm, args.get('weight'))}, not its own weight"
    bias = args.get("bias")
    if module.bias is not None and not _is_attr(bias, "bias"):
        return f"its convolution's bias is {_name(gm, bias)}, not its own bias"
    if module.bias is None and bias is not None:
        return f"its convolution's bias is {_name(gm, bias)}, while it has none"
    dims = len(module.kernel_size)
    for name, own in (("stride", module.stride), ("dilation", module.dilation)):
        value = per_dim(_concrete(args.get(name, 1)), dims)
        if value != tuple(own):
            return f"its convolution's {name} is {value}, not its own {tuple(own)}"
    groups = _concrete(args.get("groups", 1))
    if groups != module.groups:
        return f"its convolution's groups is {groups}, not its own {module.groups}"
    padding = args.get("padding", 0)
    if isinstance(padding, fx.Node):
        return f"its convolution's padding is computed in the forward ({padding.name})"
    amount = padding_amount(padding, module.kernel_size, module.dilation)
    own = padding_amount(module.padding, module.kernel_size, module.dilation)
    if any(amount) and (amount != own or (padding == "same") != (module.padding == "same")):
        return f"its convolution pads by {padding!r}, neither 0 nor its own {module.padding!r}"
    return amount


def _chain(gm: fx.GraphModule, value: Any, source: fx.Node) -> list[PadOp] | str:
    """The pad ops from ``value`` back to the forward's input ``source``."""
    pads = []
    while value is not source:
        pad = _pad_op(gm, value)
        if pad is None:
            return f"its convolution reads {_name(gm, value)}, which is not a pad of its input"
        pads.append(pad)
        value = input_of(pad.node)
    return pads


def _pad_op(gm: fx.GraphModule, node: Any) -> PadOp | None:
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    if node.op == "call_function" and node.target in PAD_FUNCTIONS:
        args = bound_args(node, PAD_FUNCTIONS[node.target])
        return PadOp(node, args.get("mode", "constant"), args.get("value"), args.get("pad"))
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if type(module).__module__.split(".")[0] != "torch":
            return None
        for kind, mode in PAD_MODULES:
            if isinstance(module, kind):
                return PadOp(node, mode, getattr(module, "value", None), module.padding)
    return None


def _pads(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if _pad_op(gm, n) is not None]


def _padding(gm: fx.GraphModule, pads: list[PadOp], conv_padding: tuple[int, ...]) -> Any:
    """How the pads may zero-pad the input, or which pad is not understood."""
    dependent = _value_dependent(gm)
    zero_pads = []
    for pad in pads:
        if any(n in dependent for n in nodes_in((pad.amounts, pad.value))):
            return f"{_name(gm, pad.node)} pads by amounts that depend on tensor values"
        if pad.mode not in ("constant", "reflect", "replicate", "circular"):
            return f"{_name(gm, pad.node)} pads in mode {pad.mode!r}"
        if pad.mode != "constant":
            continue
        if isinstance(pad.value, fx.Node) or pad.value not in (None, 0):
            return f"{_name(gm, pad.node)} pads with the constant {_concrete(pad.value)!r}, not 0"
        if nodes_in(pad.amounts) or any(_flat(pad.amounts)):
            zero_pads.append(pad)
    if not zero_pads:
        return PaddedForward(conv_padding, None, ())
    amounts = ", ".join(f"{_name(gm, p.node)} by {_concrete(p.amounts)}" for p in zero_pads)
    return PaddedForward(conv_padding, f"its forward zero-pads its input ({amounts})", ())


def _value_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on tensor values (the input's or the module's tensors), not
    only on their sizes."""
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            dependent.add(node)
        elif not is_metadata(node) and any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _flat(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [item for part in value for item in _flat(part)]
    return [value]


def _concrete(value: Any) -> Any:
    """A node's value on the example (recorded by the concrete trace), or the literal."""
    if isinstance(value, fx.Node):
        return value.meta.get("concrete")
    if isinstance(value, (list, tuple)):
        return type(value)(_concrete(item) for item in value)
    return value


def _is_attr(node: Any, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and node.target == name


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("concrete"), torch.Tensor)


def _name(gm: fx.GraphModule, node: Any) -> str:
    """``mul``, ``static_padding (ZeroPad2d)``, or a literal's repr."""
    return describe_node(gm, node) if isinstance(node, fx.Node) else repr(node)
