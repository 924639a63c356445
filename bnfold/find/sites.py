"""The nodes that matter in a traced graph, as sites: batch norm calls and Conv/ConvTranspose/
Linear calls. This module recognises them as modules (``call_module``) and holds the predicates
for per-channel affine candidates; ``bnfold.find.functional`` recognises functional and ATen
calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from bnfold.find.patterns import LayerKind, LayerView, Refusal
from bnfold.folding.math import BnParams, Layout
from bnfold.records import BnKind, SkipReason

#: The module types that are layers a norm folds into.
LAYER_TYPES: tuple[type[nn.Module], ...] = (_ConvNd, nn.Linear)
_STOCK_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_STOCK_LAYER_FORWARDS = (
    nn.Conv1d.forward,
    nn.Conv2d.forward,
    nn.Conv3d.forward,
    nn.ConvTranspose1d.forward,
    nn.ConvTranspose2d.forward,
    nn.ConvTranspose3d.forward,
    nn.Linear.forward,
)


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
    weight: torch.Tensor
    bias: torch.Tensor | None
    view: LayerView
    module: nn.Module | None = None  # None for functional layers
    weight_attr: str | None = None  # functional layers: get_attr target of the weight
    problem: Refusal | None = None  # why the layer's own forward is not the plain layer's
    notes: tuple[str, ...] = ()  # what a proven custom forward was specialised on

    @property
    def kind(self) -> LayerKind:
        return self.view.kind

    @property
    def label(self) -> str:
        """``conv1 (Conv2d)``: the layer as skip details name it."""
        return f"{self.name} ({self.type_name})"

    @property
    def layout(self) -> Layout:
        return Layout(self.view.groups, self.kind == LayerKind.CONV_TRANSPOSE)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the fold would rewrite."""
        return tuple(t for t in (self.weight, self.bias) if t is not None)


def input_of(node: fx.Node) -> fx.Node | None:
    """The node a call reads as its first (input) argument, given by position or as
    ``input=``; None when that is not a node."""
    value = node.args[0] if node.args else node.kwargs.get("input")
    return value if isinstance(value, fx.Node) else None


def nodes_in(value: Any) -> list[fx.Node]:
    """Every node in a call's arguments (nested lists, tuples, dicts), repeats kept."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def is_stock_norm(module: nn.Module) -> bool:
    """True for a BatchNorm module (or SyncBatchNorm) whose class keeps torch's forward."""
    return type(module).forward in _STOCK_FORWARDS


def has_stock_forward(module: nn.Module) -> bool:
    """True when a Conv/ConvTranspose/Linear module computes exactly what its class says."""
    return type(module).forward in _STOCK_LAYER_FORWARDS


def module_site(node: fx.Node, name: str, module: nn.Module, kind: BnKind) -> NormSite:
    """The site of a norm-like module call; params and problem are filled in after."""
    arg = node.args[0] if node.args else None
    input_ = arg if isinstance(arg, fx.Node) else None
    return NormSite(node, node, input_, name, type(module).__name__, kind, module=module)


def own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's own parameters and buffers (not its children's)."""
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def module_norm(node: fx.Node, name: str, module: _BatchNorm) -> NormSite:
    """A call of a BatchNorm module (stock, SyncBatchNorm or subclass)."""
    kind = BnKind.MODULE if is_stock_norm(module) else BnKind.SUBCLASS
    site = module_site(node, name, module, kind)
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


def module_layer(node: fx.Node, name: str, module: nn.Module) -> LayerSite:
    """A call of a Conv/ConvTranspose/Linear module."""
    if isinstance(module, nn.Linear):
        view = LayerView(
            LayerKind.LINEAR, module.in_features, module.out_features, 1, (), "zeros", -1
        )
    else:
        transposed = isinstance(module, _ConvTransposeNd)
        view = LayerView(
            LayerKind.CONV_TRANSPOSE if transposed else LayerKind.CONV,
            module.in_channels,
            module.out_channels,
            module.groups,
            padding_amount(module.padding, module.kernel_size, module.dilation),
            module.padding_mode,
            -1,
        )
    return LayerSite(node, name, type(module).__name__, module.weight, module.bias, view, module)


def padding_amount(padding: Any, kernel: tuple[int, ...], dilation: Any) -> tuple[int, ...]:
    """The padding of a conv per spatial dim; ``padding`` and ``dilation`` as a module or a
    functional call holds them (a string, an int, or ints per dim)."""
    if padding == "valid":
        return tuple(0 for _ in kernel)
    if padding == "same":
        dilation = per_dim(dilation, len(kernel))
        return tuple(d * (k - 1) for k, d in zip(kernel, dilation, strict=False))
    return per_dim(padding, len(kernel))


def per_dim(value: Any, n: int) -> tuple[int, ...]:
    """An int or a list of ints as one int per spatial dim."""
    if isinstance(value, (list, tuple)):
        if len(value) == n:
            return tuple(int(v) for v in value)
        value = value[0]
    return tuple(int(value) for _ in range(n))


def is_affine_candidate(module: nn.Module) -> bool:
    """A user module (not from torch) without children whose floating-point tensors are all
    per-channel vectors of one length (scalars allowed), at least one of them."""
    if isinstance(module, (_BatchNorm, *LAYER_TYPES)):
        return False
    if type(module).__module__.split(".")[0] == "torch":
        return False
    if next(module.children(), None) is not None:
        return False
    lengths = set()
    for tensor in own_tensors(module):
        if tensor.dim() > 1 or (tensor.dim() == 1 and not tensor.is_floating_point()):
            return False
        if tensor.dim() == 1:
            lengths.add(tensor.numel())
    return len(lengths) == 1


def is_frozen_norm(module: nn.Module) -> bool:
    """A candidate holding ``running_mean`` and ``running_var`` buffers (FrozenBatchNorm2d)."""
    buffers = dict(module.named_buffers(recurse=False))
    return "running_mean" in buffers and "running_var" in buffers and is_affine_candidate(module)


def needs_example_input(module: nn.Module) -> bool:
    """Modules whose calls the graph pass needs the real input of: BatchNorm subclasses (to
    strip their forward), Conv subclasses with their own forward (to prove it pads then
    convolves) and affine candidates (to prove them)."""
    if isinstance(module, _BatchNorm):
        return not is_stock_norm(module)
    if isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd):
        return not has_stock_forward(module)
    return is_affine_candidate(module)
