"""Blocks of parallel branches summed on one input, found in a traced graph.

A block is a sum (``a + b + c``, ``torch.add``, ``Tensor.add``, ``aten.add.Tensor``, never with
``alpha``; an add in a recorded dataflow) whose every addend is one of the branch kinds on one
shared node ``x``: Conv -> BN, a Conv without BN, BN(x) (an identity BN) or ``x`` itself. Every
value between ``x`` and the sum is used once (``x`` itself may feed other nodes); the convs and
norms meet the conditions of any fold (``bnfold.find.pairing``); a Conv -> BN branch is the
norm's own planned "conv→bn" pair and its conv folds into no other pair; no addend is
broadcast; and the block holds at least one conv and one batch norm. What a block becomes is
decided in ``bnfold.find.branches``. Reads the graph, never changes it.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from bnfold.find.functional import functional_layer, functional_norm, is_layer_call, is_norm_call
from bnfold.find.pairing import PlannedPair, layer_conditions, norm_conditions
from bnfold.find.patterns import LayerKind
from bnfold.find.sharing import Sharing
from bnfold.find.sites import LayerSite, NormSite, module_layer, module_norm
from bnfold.folding.math import Affine, bn_affine
from bnfold.records import BnKind, BranchKind

ADD_FUNCTIONS = (operator.add, torch.add, torch.ops.aten.add.Tensor)
RECORDED_ADD = "aten.add.Tensor"  # node.meta["aten"] of an add in a recorded dataflow
CONV_KINDS = (LayerKind.CONV, LayerKind.CONV_TRANSPOSE)


@dataclass(frozen=True)
class LiveBranch:
    """One addend of a block: its kind, conv (Conv kinds), norm (BN kinds) and the norm's
    affine map."""

    kind: BranchKind
    layer: LayerSite | None = None
    norm: NormSite | None = None
    affine: Affine | None = None


@dataclass(frozen=True)
class Block:
    """A sum of branches on ``input``: ``add`` is the final sum, ``chain`` every sum node."""

    add: fx.Node
    chain: tuple[fx.Node, ...]
    input: fx.Node
    branches: tuple[LiveBranch, ...]

    @property
    def convs(self) -> tuple[LiveBranch, ...]:
        return tuple(b for b in self.branches if b.layer is not None)


def is_add(node: fx.Node) -> bool:
    """A plain sum of tensors (no ``alpha``, no ``out``)."""
    if node.op == "call_function" and node.meta.get("aten") == RECORDED_ADD:
        return True
    plain = node.op == "call_method" and node.target == "add"
    plain = plain or (node.op == "call_function" and node.target in ADD_FUNCTIONS)
    if not plain or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    return set(node.kwargs) <= {"alpha"} and all(isinstance(a, fx.Node) for a in node.args)


def _chain(add: fx.Node) -> tuple[list[Any], list[fx.Node]]:
    """The addends of a chain of sums ending in ``add`` and its sum nodes (an inner sum used
    only by the next one is part of the chain)."""
    addends, chain = [], [add]
    for arg in add.args:
        if isinstance(arg, fx.Node) and is_add(arg) and len(arg.users) == 1:
            inner, inner_chain = _chain(arg)
            addends.extend(inner)
            chain.extend(inner_chain)
        else:
            addends.append(arg)
    return addends, chain


@dataclass
class _Finder:
    gm: fx.GraphModule
    sharing: Sharing
    allow_graph_rewrite: bool
    pairs: dict[fx.Node, PlannedPair]  # norm node -> its "conv→bn" pair
    paired_layers: Counter  # layer node -> planned pairs folding into it
    modules: dict[str, nn.Module]

    def block(self, add: fx.Node) -> Block | None:
        addends, chain = _chain(add)
        if len(addends) < 2 or len(set(addends)) != len(addends):
            return None
        found = [self.branch(node, chain) for node in addends]
        if any(item is None for item in found):
            return None
        sources = {source for source, _ in found}
        branches = tuple(branch for _, branch in found)
        if len(sources) != 1 or not self.shapes_agree(addends, add):
            return None
        kinds = {b.kind for b in branches}
        if kinds.isdisjoint({BranchKind.CONV, BranchKind.CONV_BN}):
            return None
        if kinds.isdisjoint({BranchKind.BN, BranchKind.CONV_BN}):
            return None
        return Block(add, tuple(chain), sources.pop(), branches)

    def branch(self, node: Any, chain: list[fx.Node]) -> tuple[fx.Node, LiveBranch] | None:
        """The addend ``node`` as a branch, with the node it reads (None: no branch kind)."""
        if not isinstance(node, fx.Node):
            return None
        norm = self.norm_at(node)
        layer = self.layer_at(node)
        if (norm is not None or layer is not None) and not _used_only_by(node, chain):
            return None
        if norm is not None:
            return self.norm_branch(norm)
        if layer is not None:
            if self.paired_layers[node] or layer_conditions(
                self.gm, self.sharing, layer, self.allow_graph_rewrite
            ):
                return None
            return _input(node), LiveBranch(BranchKind.CONV, layer=layer)
        return node, LiveBranch(BranchKind.IDENTITY)

    def norm_branch(self, norm: NormSite) -> tuple[fx.Node, LiveBranch] | None:
        pair = self.pairs.get(norm.node)
        if pair is not None and _runs_more(pair.norm):
            return None  # a subclass's own ops (an activation) run after its batch norm
        if pair is not None and pair.layer.kind in CONV_KINDS:
            conv = pair.layer.node
            if self.paired_layers[conv] != 1 or len(conv.users) != 1:
                return None
            branch = LiveBranch(BranchKind.CONV_BN, pair.layer, pair.norm, pair.affine)
            return _input(conv), branch
        if norm.input is None or norm.kind not in (BnKind.MODULE, BnKind.FUNCTIONAL):
            return None
        if norm_conditions(self.gm, self.sharing, norm, self.allow_graph_rewrite):
            return None
        return norm.input, LiveBranch(BranchKind.BN, norm=norm, affine=bn_affine(norm.params))

    def norm_at(self, node: fx.Node) -> NormSite | None:
        """The batch norm whose output ``node`` is."""
        call = node.args[0] if node.target is operator.getitem and node.args else node
        if not isinstance(call, fx.Node):
            return None
        if call.op == "call_module":
            module = self.modules.get(str(call.target))
            if isinstance(module, _BatchNorm):
                site = module_norm(call, str(call.target), module)
                return site if site.out is node else None
        if is_norm_call(call):
            site = functional_norm(self.gm, call)
            return site if site.out is node else None
        return None

    def layer_at(self, node: fx.Node) -> LayerSite | None:
        site = None
        if node.op == "call_module":
            module = self.modules.get(str(node.target))
            if isinstance(module, _ConvNd):
                site = module_layer(node, str(node.target), module)
        elif is_layer_call(node):
            site = functional_layer(self.gm, node)
        return site if site is not None and site.kind in CONV_KINDS else None

    @staticmethod
    def shapes_agree(addends: list[fx.Node], add: fx.Node) -> bool:
        """No addend is broadcast (unknown shapes, as in a recorded graph, agree)."""
        shape = add.meta.get("bnfold_shape")
        return shape is None or all(n.meta.get("bnfold_shape") == shape for n in addends)


def _runs_more(norm: NormSite) -> bool:
    """A BatchNorm subclass whose forward runs more than its batch norm."""
    return norm.kind == BnKind.SUBCLASS and not isinstance(norm.extra, nn.Identity)


def _used_only_by(node: fx.Node, chain: list[fx.Node]) -> bool:
    return len(node.users) == 1 and next(iter(node.users)) in chain


def _input(node: fx.Node) -> fx.Node | None:
    value = node.args[0] if node.args else node.kwargs.get("input")
    return value if isinstance(value, fx.Node) else None


def find_blocks(
    gm: fx.GraphModule,
    pairs: tuple[PlannedPair, ...],
    sharing: Sharing,
    allow_graph_rewrite: bool,
) -> list[Block]:
    """Every block of ``gm`` (see the module doc), in graph order."""
    conv_bn = {
        p.norm.node: p
        for p in pairs
        if p.record.pattern == "conv→bn" and len(p.targets) == 1 and not p.record.via
    }
    paired_layers = Counter(t.layer.node for p in pairs for t in p.targets)
    modules = dict(gm.named_modules(remove_duplicate=False))
    finder = _Finder(gm, sharing, allow_graph_rewrite, conv_bn, paired_layers, modules)
    blocks = []
    for node in gm.graph.nodes:
        inner = len(node.users) == 1 and is_add(next(iter(node.users)))
        if not is_add(node) or inner:  # not a sum, or an inner sum of a chain
            continue
        block = finder.block(node)
        if block is not None:
            blocks.append(block)
    return blocks
