"""The graph pass: find every batch norm, pair it with a layer it folds into, or say why not.

This module reads the model and never changes a weight. ``analyse`` returns the plan plus what
the fold stage needs (the traced graph and the sites); ``find_pairs`` returns the plan only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from bnfold.find.affine import affine_site, affine_skips_to_notes
from bnfold.find.patterns import Position, Refusal, pattern_for
from bnfold.find.sites import (
    LayerSite,
    NormSite,
    fetch_attr,
    functional_norm,
    has_stock_forward,
    is_affine_candidate,
    is_norm_call,
    layer_site,
    module_norm,
)
from bnfold.find.strip import strip_norm
from bnfold.find.trace import Traced
from bnfold.find.unwrap import state_notes
from bnfold.folding.math import Affine, bn_affine
from bnfold.records import BnKind, Pair, Plan, Skip, SkipReason


@dataclass(frozen=True)
class PlannedPair:
    """A pair with the live objects the fold needs."""

    record: Pair
    norm: NormSite
    layer: LayerSite
    position: Position
    affine: Affine


@dataclass(frozen=True)
class Analysis:
    plan: Plan
    traced: Traced
    pairs: tuple[PlannedPair, ...]


def decide(
    gm: fx.GraphModule,
    kept: dict[str, Any],
    allow_graph_rewrite: bool,
    *,
    extra_uses: Counter | None = None,
) -> tuple[list[PlannedPair], list[Skip], list[str]]:
    """Pair or skip every norm call of a traced (or recorded) graph; ``kept`` holds the inputs
    of subclass and affine-candidate calls, ``extra_uses`` counts (by tensor id) reads of
    module tensors outside their module that the graph has no get_attr node for."""
    module_calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    modules = dict(gm.named_modules(remove_duplicate=False))
    layers = {n: site for n in gm.graph.nodes if (site := layer_site(gm, n, modules)) is not None}
    reads = _attr_reads(gm) + (extra_uses or Counter())
    context = _Context(gm, layers, module_calls, _tensor_uses(gm), allow_graph_rewrite, reads)
    pairs: list[PlannedPair] = []
    skips: list[Skip] = []
    for norm in _norm_sites(gm, kept, modules):
        outcome = context.decide(norm)
        (pairs if isinstance(outcome, PlannedPair) else skips).append(outcome)
    _check_unique_layers(pairs)
    skips, notes = affine_skips_to_notes(skips)
    return pairs, skips, notes


def _norm_sites(
    gm: fx.GraphModule, kept: dict[str, Any], modules: dict[str, nn.Module]
) -> list[NormSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, _BatchNorm):
                site = module_norm(node, str(node.target), module)
                if site.kind == BnKind.SUBCLASS and site.problem is None:
                    strip_norm(site, kept.get(node.name, ()))
                sites.append(site)
            elif is_affine_candidate(module):  # FrozenBatchNorm2d-style or per-channel affine
                sites.append(affine_site(node, str(node.target), module, kept.get(node.name, ())))
        elif is_norm_call(node):
            sites.append(functional_norm(gm, node))
    return sites


def _tensor_uses(gm: fx.GraphModule) -> Counter:
    """How many parameters/buffers slots (over all modules) hold each tensor, by id."""
    uses: Counter = Counter()
    for _, tensor in gm.named_parameters(remove_duplicate=False):
        uses[id(tensor)] += 1
    return uses


@dataclass
class _Context:
    gm: fx.GraphModule
    layers: dict[fx.Node, LayerSite]
    module_calls: Counter
    tensor_uses: Counter
    allow_graph_rewrite: bool
    outside_reads: Counter = field(default_factory=Counter)  # id(tensor) -> reads elsewhere

    def decide(self, norm: NormSite) -> PlannedPair | Skip:
        if norm.problem is not None:
            return _skip(norm, norm.problem)
        affine = bn_affine(norm.params)
        refusal = self._norm_refusal(norm, affine)
        if refusal is not None:
            return _skip(norm, refusal)
        after = self._try(norm, Position.AFTER, affine)
        if isinstance(after, PlannedPair):
            return after
        before = self._try(norm, Position.BEFORE, affine)
        if isinstance(before, PlannedPair):
            return before
        for attempt in (after, before):
            if attempt is not None:
                return attempt
        return _skip(norm, Refusal(SkipReason.NO_PRODUCER, self._neighbours(norm)))

    def _norm_refusal(self, norm: NormSite, affine: Affine) -> Refusal | None:
        if norm.module is not None:
            if self.module_calls[norm.node.target] > 1:
                return Refusal(
                    SkipReason.BN_SHARED,
                    f"{norm.name} is called {self.module_calls[norm.node.target]} times",
                )
            if _has_hooks(norm.module):
                return Refusal(SkipReason.HOOKS, f"{norm.name} has forward hooks or pre-hooks")
            if any(self.outside_reads[id(t)] for t in _own_tensors(norm.module)):
                return Refusal(
                    SkipReason.BN_SHARED,
                    f"{norm.name}'s parameters or buffers are also read elsewhere in the forward",
                )
        if norm.kind == BnKind.FUNCTIONAL and not self.allow_graph_rewrite:
            return Refusal(SkipReason.NEEDS_GRAPH_REWRITE, f"{norm.name} is a functional call")
        negative = bool((norm.params.running_var.detach() < 0).any())
        finite = torch.isfinite(affine.scale).all() and torch.isfinite(affine.shift).all()
        if negative or not finite:
            return Refusal(SkipReason.NON_FINITE, _non_finite_detail(norm))
        return None

    def _try(self, norm: NormSite, position: Position, affine: Affine) -> PlannedPair | Skip | None:
        layer, refusal = self._neighbour(norm, position)
        if layer is None:
            return _skip(norm, refusal) if refusal is not None else None
        rank = _rank(norm.input) if position == Position.AFTER else _rank(norm.out)
        view = replace(layer.view, activation_rank=rank)
        pattern = pattern_for(layer.kind, position)
        refusal = (
            refusal
            or _extra_between(norm, layer, position)
            or self._layer_refusal(norm, layer, position)
            or pattern.check(view, affine)
        )
        if refusal is not None:
            return _skip(norm, refusal, layer.name, pattern.name)
        record = Pair(
            bn=norm.name,
            bn_type=norm.type_name,
            bn_kind=norm.kind,
            producer=layer.name,
            producer_type=layer.type_name,
            pattern=pattern.name,
            channels=norm.params.num_features,
        )
        return PlannedPair(record, norm, layer, position, affine)

    def _neighbour(
        self, norm: NormSite, position: Position
    ) -> tuple[LayerSite | None, Refusal | None]:
        if position == Position.AFTER:
            layer = self.layers.get(norm.input) if norm.input is not None else None
            if layer is None:
                return None, None
            users = [u for u in layer.node.users if u is not norm.node]
            if users:
                names = ", ".join(u.name for u in users)
                return layer, Refusal(
                    SkipReason.PRODUCER_FANOUT, f"{layer.name} output also feeds {names}"
                )
            return layer, None
        followers = [u for u in norm.out.users if u in self.layers and _first_input(u) is norm.out]
        if not followers:
            return None, None
        layer = followers[0]
        others = [u for u in norm.out.users if u is not layer]
        if others:
            names = ", ".join(u.name for u in others)
            return self.layers[layer], Refusal(
                SkipReason.BN_FANOUT, f"{norm.name} output also feeds {names}"
            )
        return self.layers[layer], None

    def _layer_refusal(
        self, norm: NormSite, layer: LayerSite, position: Position
    ) -> Refusal | None:
        if layer.module is not None and self.module_calls[layer.node.target] > 1:
            return Refusal(
                SkipReason.PRODUCER_SHARED,
                f"{layer.name} is called {self.module_calls[layer.node.target]} times",
            )
        if layer.module is None:
            if not self.allow_graph_rewrite:
                return Refusal(SkipReason.NEEDS_GRAPH_REWRITE, f"{layer.name} is a functional call")
            if _attr_uses(self.gm, layer.weight_attr) > 1:
                return Refusal(
                    SkipReason.PRODUCER_SHARED, f"weight {layer.weight_attr} is used by several ops"
                )
        if not layer.weight.is_floating_point():
            return Refusal(SkipReason.NON_FLOAT, f"{layer.name} weight is {layer.weight.dtype}")
        if layer.module is not None and not has_stock_forward(layer.module):
            return Refusal(
                SkipReason.UNSUPPORTED_FORWARD,
                f"{layer.name} ({layer.type_name}) overrides forward; its output is "
                "not known to be the plain layer's",
            )
        if layer.module is not None and any(self.outside_reads[id(t)] for t in layer.tensors):
            return Refusal(
                SkipReason.PRODUCER_SHARED,
                f"{layer.name}'s weight or bias is also read elsewhere in the forward",
            )
        shared = [t for t in layer.tensors if self.tensor_uses[id(t)] > 1]
        if shared:
            return Refusal(
                SkipReason.PRODUCER_SHARED,
                f"{layer.name}'s weight tensor is shared with another module",
            )
        if layer.module is not None:
            if _is_parametrized(layer.module):
                return Refusal(
                    SkipReason.PARAMETRIZED,
                    f"{layer.name} has a parametrized or weight-normed weight",
                )
            if _has_hooks(layer.module):
                return Refusal(SkipReason.HOOKS, f"{layer.name} has forward hooks or pre-hooks")
        expected = layer.view.out_channels if position == Position.AFTER else layer.view.in_channels
        if norm.params.num_features != expected:
            side = "output" if position == Position.AFTER else "input"
            return Refusal(
                SkipReason.CHANNEL_MISMATCH,
                f"{norm.name} has {norm.params.num_features} channels, {layer.name} "
                f"has {expected} {side} channels",
            )
        return None

    def _neighbours(self, norm: NormSite) -> str:
        """What the norm reads and feeds, naming each op (e.g. ``1 (ReLU)``), and the layer
        behind a single consumer when there is one (BN → ReLU → Conv)."""
        source = self._describe(norm.input) if norm.input is not None else "nothing"
        users = list(norm.out.users)
        feeds = ", ".join(self._describe(u) for u in users) or "nothing"
        text = f"{norm.name} reads {source} and feeds {feeds}"
        layers = [self.layers[v] for v in users[0].users if v in self.layers] if users else []
        if len(users) == 1 and layers:
            text += (
                f"; {self._describe(users[0])} sits between it and {layers[0].name}, so "
                "there is no adjacent layer to fold into"
            )
        return text

    def _describe(self, node: fx.Node) -> str:
        if node.op == "placeholder":
            return f"the input '{node.name}'"
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            return f"{node.target} ({type(module).__name__})"
        if node.op == "call_function":  # the op's name: relu, aten.relu.default...
            op = node.meta.get("aten") or getattr(node.target, "__name__", None) or node.target
            op = str(op).removeprefix("aten.").removesuffix(".default")
            if node.name.rstrip("_0123456789") != op.rstrip("_"):
                return f"{node.name} ({op})"
        return node.name


def _non_finite_detail(norm: NormSite) -> str:
    """Which statistics or parameters are not finite (or negative), and what to do."""
    params = norm.params
    named = {
        "running_mean": params.running_mean,
        "running_var": params.running_var,
        "weight": params.weight,
        "bias": params.bias,
    }
    problems = []
    for name, tensor in named.items():
        if tensor is None:
            continue
        bad = int((~torch.isfinite(tensor.detach())).sum())
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


def _skip(
    norm: NormSite, refusal: Refusal, producer: str | None = None, pattern: str | None = None
) -> Skip:
    return Skip(
        bn=norm.name,
        bn_type=norm.type_name,
        reason=refusal.reason,
        detail=refusal.detail,
        producer=producer,
        pattern=pattern,
        bn_kind=norm.kind,
    )


def _extra_between(norm: NormSite, layer: LayerSite, position: Position) -> Refusal | None:
    """A subclass's extra behaviour runs after its batch norm: the norm can fold into the layer
    before it, never into the layer after it (the extra ops sit in between)."""
    if (
        position == Position.BEFORE
        and norm.kind == BnKind.SUBCLASS
        and not isinstance(norm.extra, nn.Identity)
    ):
        return Refusal(
            SkipReason.NO_PRODUCER,
            f"{norm.name} ({norm.type_name}) runs {_extra_ops(norm.extra)} after its "
            f"batch norm, between the norm and {layer.name}; no layer is adjacent to "
            "the batch norm",
        )
    return None


def _extra_ops(extra: nn.Module) -> str:
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


def _rank(node: fx.Node | None) -> int:
    shape = node.meta.get("bnfold_shape") if node is not None else None
    return len(shape) if shape is not None else -1


def _first_input(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input")


def _attr_uses(gm: fx.GraphModule, target: str | None) -> int:
    return sum(len(n.users) for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)


def _attr_reads(gm: fx.GraphModule) -> Counter:
    """Tensors the forward reads directly (``self.conv.weight``), by id."""
    reads: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            value = fetch_attr(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                reads[id(value)] += len(node.users)
    return reads


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _is_parametrized(module: nn.Module) -> bool:
    if parametrize.is_parametrized(module):
        return True
    return any(
        name.endswith(("_g", "_v", "_orig")) for name, _ in module.named_parameters(recurse=False)
    )


def _check_unique_layers(pairs: list[PlannedPair]) -> None:
    """Two norms may fold into one layer only from opposite sides."""
    seen = Counter((id(p.layer.node), p.position) for p in pairs)
    duplicated = [key for key, count in seen.items() if count > 1]
    if duplicated:
        raise AssertionError(f"internal error: a layer was paired twice on one side: {duplicated}")


def plan_notes(model: nn.Module, pairs: list[PlannedPair]) -> tuple[str, ...]:
    notes = []
    if model.training:
        notes.append("model was in train mode: the fold computes the eval-mode function")
    notes.extend(state_notes(model))
    for pair in pairs:
        notes.extend(f"{pair.norm.name}: {note}" for note in pair.norm.notes)
    return tuple(notes)
