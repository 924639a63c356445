"""The pairing rules: pair every batch norm of a graph with a layer it folds into, or say why not.

For each norm: the norm's own conditions (not shared, no hooks, finite statistics), then the
layer after it is tried, then the layer before it: adjacency and fan-out, the layer's own
conditions (not shared, plain forward, channel count), then the pattern table's check
(``bnfold.find.patterns``). The use counts come from ``bnfold.find.sharing``. Reads the model,
never changes a weight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.find.affine import affine_site
from bnfold.find.functional import functional_layer, functional_norm, is_layer_call, is_norm_call
from bnfold.find.padded import prove_custom_layer
from bnfold.find.patterns import Position, Refusal, pattern_for
from bnfold.find.reach import Target, consumers, producers
from bnfold.find.sharing import Sharing, global_hooks, graph_sharing, has_hooks, is_parametrized
from bnfold.find.sites import (
    LAYER_TYPES,
    LayerSite,
    NormSite,
    has_stock_forward,
    input_of,
    is_affine_candidate,
    module_layer,
    module_norm,
    own_tensors,
)
from bnfold.find.skip_details import (
    extra_ops,
    no_producer_detail,
    non_affine_between,
    non_finite_detail,
)
from bnfold.find.subclasses import strip_norm
from bnfold.find.targets import (
    FoldTarget,
    conv_axis,
    duplicate_layers,
    fold_target,
    named,
    overflow_refusal,
    rank,
    sign_refusal,
)
from bnfold.find.unwrap import state_notes
from bnfold.folding.math import Affine, bn_affine
from bnfold.records import BnKind, Pair, Plan, Skip, SkipReason


@dataclass(frozen=True)
class PlannedPair:
    """A norm with the layers it folds into and the live objects the fold needs."""

    record: Pair
    norm: NormSite
    targets: tuple[FoldTarget, ...]
    affine: Affine  # the norm's whole map
    notes: tuple[str, ...] = ()  # what the fold across the ops between them assumes

    @property
    def layer(self) -> LayerSite:
        return self.targets[0].layer

    @property
    def position(self) -> Position:
        return self.targets[0].position


@dataclass(frozen=True)
class Analysis:
    """The plan, the graph it was read from (traced, the model itself, or recorded) and the
    pairs with the live objects the fold needs."""

    plan: Plan
    module: fx.GraphModule
    pairs: tuple[PlannedPair, ...]
    merges: tuple[Any, ...] = ()  # bnfold.find.branches.PlannedMerge: blocks to merge


Outcome = PlannedPair | Skip


@dataclass(frozen=True)
class Decisions:
    """Every norm call of one graph decided, in graph order, the plan notes of refused affine
    candidates (which are not batch norms, so not skips), and what the pairing read of the
    graph (its sites and their uses, for the passes after it)."""

    outcomes: tuple[Outcome, ...]
    notes: tuple[str, ...]
    context: PairingContext

    @property
    def pairs(self) -> tuple[PlannedPair, ...]:
        return tuple(o for o in self.outcomes if isinstance(o, PlannedPair))

    @property
    def skips(self) -> tuple[Skip, ...]:
        return tuple(o for o in self.outcomes if isinstance(o, Skip))


def decide(
    gm: fx.GraphModule,
    kept: dict[str, Any],
    allow_graph_rewrite: bool,
    *,
    extra_uses: Counter | None = None,
) -> Decisions:
    """Pair or skip every norm call of a traced (or recorded) graph; ``kept`` holds the inputs
    of subclass and affine-candidate calls, ``extra_uses`` counts (by tensor id) reads of
    module tensors outside their module that the graph has no get_attr node for."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    layers = _layer_sites(gm, modules, kept)
    norms = _norm_sites(gm, kept, modules)
    sharing = graph_sharing(gm, extra_uses)
    context = PairingContext(gm, layers, {n.out: n for n in norms}, sharing, allow_graph_rewrite)
    outcomes, notes = affine_refusals_to_notes([context.decide(norm) for norm in norms])
    decisions = Decisions(tuple(outcomes), tuple(notes), context)
    _check_unique_layers(decisions.pairs)
    return decisions


def _layer_sites(
    gm: fx.GraphModule, modules: dict[str, nn.Module], kept: dict[str, Any]
) -> dict[fx.Node, LayerSite]:
    layers = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], LAYER_TYPES):
            site = module_layer(node, str(node.target), modules[node.target])
            if not has_stock_forward(site.module):
                prove_custom_layer(site, kept.get(node.name, ()))
            layers[node] = site
        elif is_layer_call(node) and (site := functional_layer(gm, node)) is not None:
            layers[node] = site
    return layers


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


def affine_refusals_to_notes(outcomes: Sequence[Outcome]) -> tuple[list[Outcome], list[str]]:
    """A refused ``BnKind.AFFINE`` module is not a batch norm: its skip becomes a plan note
    (dropped when no layer is adjacent to it); every other outcome stays."""
    kept, notes = [], []
    for outcome in outcomes:
        if not isinstance(outcome, Skip) or outcome.bn_kind != BnKind.AFFINE:
            kept.append(outcome)
        elif outcome.reason not in (SkipReason.NO_PRODUCER, SkipReason.NON_AFFINE_BETWEEN):
            notes.append(f"{outcome.bn} ({outcome.bn_type}) left as it is: {outcome.detail}")
    return kept, notes


@dataclass
class PairingContext:
    """One graph as the pairing reads it: its layer calls, its norm calls (by the node of their
    output), who reads which node and tensor, and whether the graph may be rewritten."""

    gm: fx.GraphModule
    layers: dict[fx.Node, LayerSite]
    norms: dict[fx.Node, NormSite]
    sharing: Sharing
    allow_graph_rewrite: bool

    def decide(self, norm: NormSite) -> PlannedPair | Skip:
        if norm.problem is not None:
            return norm_skip(norm, norm.problem)
        affine = bn_affine(norm.params)
        refusal = self.norm_conditions(norm, affine)
        if refusal is not None:
            return norm_skip(norm, refusal)
        after = self._try(norm, Position.AFTER, affine)
        if isinstance(after, PlannedPair):
            return after
        before = self._try(norm, Position.BEFORE, affine)
        if isinstance(before, PlannedPair):
            return before
        if after is not None or before is not None:
            return after or before  # the refusal by the layer after the norm, else before it
        between = non_affine_between(self.gm, self.layers, norm)
        if between is not None:
            return norm_skip(norm, between)
        detail = no_producer_detail(self.gm, self.layers, norm)
        return norm_skip(norm, Refusal(SkipReason.NO_PRODUCER, detail))

    def norm_conditions(self, norm: NormSite, affine: Affine) -> Refusal | None:
        """The norm is called once, unhooked, with tensors nothing else reads and finite
        statistics (a functional norm: only where the graph may be rewritten)."""
        if global_hooks():
            return Refusal(
                SkipReason.HOOKS,
                f"a global module hook (torch.nn.modules.module.register_module_forward_hook or "
                f"_pre_hook) runs on every module call, {norm.name}'s and its layer's included",
            )
        if norm.module is not None:
            if self.sharing.calls(norm.node) > 1:
                return Refusal(
                    SkipReason.BN_SHARED,
                    f"{norm.name} is called {self.sharing.calls(norm.node)} times",
                )
            if has_hooks(norm.module):
                return Refusal(SkipReason.HOOKS, f"{norm.name} has forward hooks or pre-hooks")
            if any(self.sharing.outside_reads[id(t)] for t in own_tensors(norm.module)):
                return Refusal(
                    SkipReason.BN_SHARED,
                    f"{norm.name}'s parameters or buffers are also read elsewhere in the forward",
                )
        if norm.kind == BnKind.FUNCTIONAL and not self.allow_graph_rewrite:
            return Refusal(SkipReason.NEEDS_GRAPH_REWRITE, f"{norm.name} is a functional call")
        negative = bool((norm.params.running_var.detach() < 0).any())
        finite = torch.isfinite(affine.scale).all() and torch.isfinite(affine.shift).all()
        if negative or not finite:
            return Refusal(SkipReason.NON_FINITE, non_finite_detail(norm))
        return None

    def _try(self, norm: NormSite, position: Position, affine: Affine) -> PlannedPair | Skip | None:
        walk = producers if position == Position.AFTER else consumers
        reach = walk(self.gm, self.layers, norm)
        if reach is None:
            return None
        targets = tuple(fold_target(t, position, affine) for t in reach.targets)
        names = ", ".join(dict.fromkeys(t.layer.name for t in reach.targets))
        pattern = pattern_for(targets[0].layer.kind, position)
        refusal = (
            reach.refusal
            or duplicate_layers(reach)
            or sign_refusal(norm, reach, affine)
            or self._targets_refusal(norm, reach.targets, targets)
        )
        if refusal is not None:
            return norm_skip(norm, refusal, names, pattern.name)
        record = Pair(
            bn=norm.name,
            bn_type=norm.type_name,
            bn_kind=norm.kind,
            producer=names,
            producer_type=targets[0].layer.type_name,
            pattern=pattern.name,
            channels=norm.params.num_features,
            via=reach.via,
        )
        return PlannedPair(record, norm, targets, affine, reach.notes)

    def _targets_refusal(
        self, norm: NormSite, reached: tuple[Target, ...], folds: tuple[FoldTarget, ...]
    ) -> Refusal | None:
        """The conditions on each layer: the subclass's extra ops, the layer's own conditions,
        the channel axis and count, then the pattern table's check."""
        for target, fold in zip(reached, folds, strict=True):
            layer, position = target.layer, fold.position
            at = layer.node if position == Position.AFTER else input_of(layer.node)
            view = replace(layer.view, activation_rank=rank(at), channel_axis=target.channels.axis)
            refusal = (
                _extra_between(norm, layer, position)
                or self._layer_refusal(norm, target, position)
                or conv_axis(layer, view)
                or named(layer, pattern_for(layer.kind, position).check(view, fold.affine))
                or overflow_refusal(fold)
            )
            if refusal is not None:
                return refusal
        return None

    def _layer_refusal(self, norm: NormSite, target: Target, position: Position) -> Refusal | None:
        layer = target.layer
        refusal = self.layer_conditions(layer)
        if refusal is not None:
            return refusal
        expected = layer.view.out_channels if position == Position.AFTER else layer.view.in_channels
        if target.channels.size != expected:
            side = "output" if position == Position.AFTER else "input"
            return Refusal(
                SkipReason.CHANNEL_MISMATCH,
                f"{norm.name} has {target.channels.size} channels, {layer.name} "
                f"has {expected} {side} channels",
            )
        return None

    def layer_conditions(self, layer: LayerSite) -> Refusal | None:
        """The layer is used once, holds floating-point weights that nothing else reads, and
        computes what its class says."""
        if layer.module is not None and self.sharing.calls(layer.node) > 1:
            return Refusal(
                SkipReason.PRODUCER_SHARED,
                f"{layer.name} is called {self.sharing.calls(layer.node)} times",
            )
        if layer.module is None:
            if not self.allow_graph_rewrite:
                return Refusal(SkipReason.NEEDS_GRAPH_REWRITE, f"{layer.name} is a functional call")
            if self.sharing.attr_users[layer.weight_attr] > 1:
                return Refusal(
                    SkipReason.PRODUCER_SHARED, f"weight {layer.weight_attr} is used by several ops"
                )
        if not layer.weight.is_floating_point():
            return Refusal(SkipReason.NON_FLOAT, f"{layer.name} weight is {layer.weight.dtype}")
        if layer.problem is not None:
            return layer.problem
        if layer.module is not None and any(
            self.sharing.outside_reads[id(t)] for t in layer.tensors
        ):
            return Refusal(
                SkipReason.PRODUCER_SHARED,
                f"{layer.name}'s weight or bias is also read elsewhere in the forward",
            )
        if any(self.sharing.tensor_slots[id(t)] > 1 for t in layer.tensors):
            return Refusal(
                SkipReason.PRODUCER_SHARED,
                f"{layer.name}'s weight tensor is shared with another module",
            )
        if layer.module is not None and is_parametrized(layer.module):
            return Refusal(
                SkipReason.PARAMETRIZED, f"{layer.name} has a parametrized or weight-normed weight"
            )
        if layer.module is not None and has_hooks(layer.module):
            return Refusal(SkipReason.HOOKS, f"{layer.name} has forward hooks or pre-hooks")
        return None


def norm_skip(
    norm: NormSite, refusal: Refusal, producer: str | None = None, pattern: str | None = None
) -> Skip:
    """The skip of ``norm`` for ``refusal``, naming the layer and pattern tried, if any."""
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
            SkipReason.NON_AFFINE_BETWEEN,
            f"{norm.name} ({norm.type_name}) runs {extra_ops(norm.extra)} after its "
            f"batch norm, between the norm and {layer.name}; no layer is adjacent to "
            "the batch norm",
        )
    return None


def _check_unique_layers(pairs: list[PlannedPair]) -> None:
    """Two norms may fold into one layer only from opposite sides."""
    seen = Counter((id(t.layer.node), t.position) for p in pairs for t in p.targets)
    duplicated = [key for key, count in seen.items() if count > 1]
    if duplicated:
        raise AssertionError(f"internal error: a layer was paired twice on one side: {duplicated}")


def plan_notes(model: nn.Module, pairs: Sequence[PlannedPair]) -> tuple[str, ...]:
    """Notes on the model as a whole (train mode, dtype and device) and on each pair."""
    notes = list(state_notes(model))
    for pair in pairs:
        notes.extend(f"{pair.norm.name}: {note}" for note in pair.norm.notes)
        notes.extend(f"{pair.layer.name}: {note}" for note in pair.layer.notes)
        notes.extend(f"{pair.norm.name} -> {pair.record.producer}: {note}" for note in pair.notes)
    return tuple(dict.fromkeys(notes))
