"""The details of skips that need more than one line to say: what a norm with no adjacent layer
reads and feeds, which non-affine op stands between a norm and a layer, which statistics are not
finite, which ops a subclass runs after its norm."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.find.calls import shape_of
from bnfold.find.channels import start
from bnfold.find.passthrough import passes_through, step
from bnfold.find.patterns import Refusal
from bnfold.find.sharing import has_hooks
from bnfold.find.sites import LayerSite, NormSite, input_of
from bnfold.records import SkipReason


def no_producer_detail(gm: fx.GraphModule, layers: dict[fx.Node, LayerSite], norm: NormSite) -> str:
    """What the norm reads and feeds, naming each op (e.g. ``1 (ReLU)``), and the layer
    behind a single consumer when there is one (BN → ReLU → Conv)."""
    source = describe_node(gm, norm.input) if norm.input is not None else "nothing"
    users = list(norm.out.users)
    feeds = ", ".join(describe_node(gm, u) for u in users) or "nothing"
    text = f"{norm.name} reads {source} and feeds {feeds}"
    behind = [layers[v] for v in users[0].users if v in layers] if users else []
    if len(users) == 1 and behind:
        text += (
            f"; {describe_node(gm, users[0])} sits between it and {behind[0].name}, so "
            "there is no adjacent layer to fold into"
        )
    for op, toward_input in ((norm.input, True), (users[0] if users else None, False)):
        if op is not None and _stops_here(gm, op, norm, toward_input):
            text += f"; {_spreads(gm, op)}"
    return text


def _stops_here(gm: fx.GraphModule, op: fx.Node, norm: NormSite, toward_input: bool) -> bool:
    """``op`` is one a per-channel map may pass, but not with this norm's channels."""
    if op.op == "placeholder" or not passes_through(gm, op):
        return False
    channels = start(norm.params.num_features)
    return step(gm, op, channels, toward_input=toward_input) is None


def _spreads(gm: fx.GraphModule, op: fx.Node) -> str:
    """An op a per-channel map may pass, that it did not pass here, and its shapes."""
    source, after = input_of(op), shape_of(op)
    before = shape_of(source) if source is not None else None
    turns = f" turns {before} into {after}:" if before and after else ":"
    return (
        f"{describe_node(gm, op)}{turns} the fold cannot follow the channels across it here "
        "(they do not stay whole on one axis, or bnfold does not read this form of the op)"
    )


def non_affine_between(
    gm: fx.GraphModule, layers: dict[fx.Node, LayerSite], norm: NormSite
) -> Refusal | None:
    """A norm whose single consumer is one non-affine op (an activation) whose single consumer
    is a layer (BN → ReLU → Conv), or whose input is such an op on a layer's output (Conv → ReLU
    → BN): the refusal naming that op."""
    users = list(norm.out.users)
    if len(users) == 1 and _blocks(gm, users[0], norm.out):
        op = users[0]
        behind = [layers[v] for v in op.users if v in layers]
        if len(op.users) == 1 and behind and input_of(next(iter(op.users))) is op:
            return _between(gm, op, f"{norm.name} feeds", f"which feeds {behind[0].label}")
    op = norm.input
    if op is not None and len(op.users) == 1 and op.all_input_nodes:
        source = op.all_input_nodes[0]
        if source in layers and len(source.users) == 1 and _blocks(gm, op, source):
            text = f"{layers[source].label} feeds"
            return _between(gm, op, text, f"which feeds {norm.name}")
    return None


def _blocks(gm: fx.GraphModule, op: fx.Node, value: fx.Node) -> bool:
    """``op`` is a call whose only input is ``value`` and that does not pass a per-channel
    affine map through (``bnfold.find.passthrough``)."""
    if op.op not in ("call_function", "call_method", "call_module"):
        return False
    return op.all_input_nodes == [value] and not passes_through(gm, op)


def _between(gm: fx.GraphModule, op: fx.Node, before: str, after: str) -> Refusal:
    module = gm.get_submodule(str(op.target)) if op.op == "call_module" else None
    if isinstance(module, _BatchNorm):
        return Refusal(
            SkipReason.NO_PRODUCER,
            f"{before} {describe_node(gm, op)}, {after}; a batch norm folds into a layer, not "
            "into another batch norm: fold the result again to fold this one too (that layer's "
            "weights are then rounded twice)",
        )
    if module is not None and has_hooks(module):
        return Refusal(
            SkipReason.HOOKS,
            f"{before} {describe_node(gm, op)}, {after}; that module has hooks, which may change "
            "its output, so the batch norm cannot move across it",
        )
    return Refusal(
        SkipReason.NON_AFFINE_BETWEEN,
        f"{before} {describe_node(gm, op)}, {after}; that op is not a per-channel affine map, so "
        "the batch norm has no adjacent layer to fold into",
    )


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node as a detail names it: ``the input 'x'``, ``act (ReLU)``, ``mul``, ``add_3 (add)``."""
    if node.op == "placeholder":
        return f"the input '{node.name}'"
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return f"{node.target} ({type(module).__name__})"
    if node.op in ("call_function", "call_method"):  # the op's name: relu, aten.relu.default...
        op = node.meta.get("aten") or getattr(node.target, "__name__", None) or node.target
        op = str(op).removeprefix("aten.").removesuffix(".default")
        if node.name.rstrip("_0123456789") != op.rstrip("_"):
            return f"{node.name} ({op})"
    return node.name


def non_finite_detail(norm: NormSite) -> str:
    """Which statistics or parameters are not finite (or negative), and what to do."""
    params = norm.params
    problems = []
    for name in ("running_mean", "running_var", "weight", "bias"):
        tensor = getattr(params, name)
        bad = 0 if tensor is None else int((~torch.isfinite(tensor.detach())).sum())
        if bad:
            problems.append(f"{name} is not finite in {bad} of {tensor.numel()} channels")
    negative = int((params.running_var.detach() < 0).sum())
    if negative:
        problems.append(f"running_var is negative in {negative} channels")
    if not problems:
        problems.append("its scale gamma/sqrt(var + eps) is not finite")
    return (
        f"{norm.name}: {'; '.join(problems)}; recalibrate the statistics (bnfold "
        "recalibrate) or fix them before folding"
    )


def extra_ops(extra: nn.Module) -> str:
    """The ops a stripped subclass forward runs, by name (``relu``, ``drop (Dropout)``)."""
    graph = getattr(extra, "graph", None)
    if not isinstance(graph, fx.Graph):
        return type(extra).__name__
    modules = dict(extra.named_modules())
    names = []
    for node in graph.nodes:
        if node.op == "call_module":
            names.append(f"{node.target} ({type(modules[node.target]).__name__})")
        elif node.op in ("call_function", "call_method"):
            names.append(getattr(node.target, "__name__", str(node.target)))
    return ", ".join(dict.fromkeys(names)) or "more ops"
