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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from bnfold.find.pairing import PairingContext, PlannedPair
from bnfold.find.patterns import LayerKind
from bnfold.find.reach import is_sum
from bnfold.find.sites import LayerSite, NormSite, input_of
from bnfold.find.skip_details import describe_node
from bnfold.folding.math import Affine, bn_affine
from bnfold.records import BnKind, BranchKind

CONV_KINDS = (LayerKind.CONV, LayerKind.CONV_TRANSPOSE)
_BATCH_NORMS = (BnKind.MODULE, BnKind.SUBCLASS, BnKind.FUNCTIONAL)


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


def _chain(add: fx.Node) -> tuple[list[Any], list[fx.Node]]:
    """The addends of a chain of sums ending in ``add`` and its sum nodes (an inner sum used
    only by the next one is part of the chain)."""
    addends, chain = [], [add]
    for arg in add.args:
        if isinstance(arg, fx.Node) and _inner_sum(arg):
            inner, inner_chain = _chain(arg)
            addends.extend(inner)
            chain.extend(inner_chain)
        elif isinstance(arg, fx.Node) and (started := _zero_start(arg)) is not None:
            addends.append(started)  # sum(branches) and out = 0; out = out + b(x)
            chain.append(arg)
        else:
            addends.append(arg)
    return addends, chain


def _zero_start(node: fx.Node) -> fx.Node | None:
    """``t`` of a ``0 + t`` (or ``t + 0``) read only by the next sum, else None."""
    if node.op != "call_function" or node.target not in (operator.add, operator.iadd):
        return None
    if node.kwargs or len(node.args) != 2 or len(node.users) != 1:
        return None
    if not is_sum(next(iter(node.users))):
        return None
    nodes = [a for a in node.args if isinstance(a, fx.Node)]
    zeros = [a for a in node.args if type(a) in (int, float) and a == 0]
    return nodes[0] if len(nodes) == 1 and len(zeros) == 1 else None


def _inner_sum(node: fx.Node) -> bool:
    """A sum read only by the next sum of its chain."""
    return is_sum(node) and len(node.users) == 1 and is_sum(next(iter(node.users)))


@dataclass(frozen=True)
class BlockSearch:
    """The blocks of a graph, and why each sum tried is no block (by its sum node)."""

    blocks: tuple[Block, ...]
    refused: dict[fx.Node, str]

    def why_not(self, add: fx.Node) -> str | None:
        """Why the chain of sums ``add`` belongs to is no block, from the outermost sum in."""
        chain = [add]
        while _inner_sum(chain[-1]):
            chain.append(next(iter(chain[-1].users)))
        return next((self.refused[n] for n in reversed(chain) if n in self.refused), None)


@dataclass
class _Finder:
    context: PairingContext  # the sites and uses the pairing read
    pairs: dict[fx.Node, PlannedPair]  # norm node -> its "conv→bn" pair
    paired_layers: Counter  # layer node -> planned pairs folding into it
    refused: dict[fx.Node, str] = field(default_factory=dict)

    def blocks_at(self, add: fx.Node) -> list[Block]:
        """The block whose final sum is ``add``, else the blocks of its inner sums (in
        ``(a + b + x) + y`` the branches summed first may merge when ``y`` is no branch)."""
        block = self.block(add)
        if isinstance(block, Block):
            return [block]
        self.refused[add] = block
        inner = [a for a in add.args if isinstance(a, fx.Node) and _inner_sum(a)]
        return [block for node in inner for block in self.blocks_at(node)]

    def block(self, add: fx.Node) -> Block | str:
        """The block whose final sum is ``add``, or why it is none."""
        addends, chain = _chain(add)
        if len(addends) < 2 or len(set(addends)) != len(addends):
            return "it adds a value to itself"
        found = [self.branch(node, chain) for node in addends]
        missing = [node for node, item in zip(addends, found, strict=True) if item is None]
        if missing:
            return (
                f"{self.describe(missing[0])} is no branch (a Conv → BN, a Conv, a BN or the "
                "input itself, each read by the sum alone)"
            )
        sources = {source for source, _ in found}
        branches = tuple(branch for _, branch in found)
        if len(sources) != 1:
            return _strays(addends, found, self.describe)
        if not self.shapes_agree(addends, add):
            return "an addend is broadcast"
        kinds = {b.kind for b in branches}
        if kinds.isdisjoint({BranchKind.CONV, BranchKind.CONV_BN}):
            return "no branch has a conv"
        if kinds.isdisjoint({BranchKind.BN, BranchKind.CONV_BN}):
            return "no branch has a batch norm"
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
            if self.paired_layers[node] or self.context.layer_conditions(layer):
                return None
            return input_of(node), LiveBranch(BranchKind.CONV, layer=layer)
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
            return input_of(conv), branch
        if norm.input is None or norm.kind not in (BnKind.MODULE, BnKind.FUNCTIONAL):
            return None
        if norm.problem or self.context.norm_conditions(norm, bn_affine(norm.params)):
            return None
        return norm.input, LiveBranch(BranchKind.BN, norm=norm, affine=bn_affine(norm.params))

    def describe(self, value: Any) -> str:
        return describe_node(self.context.gm, value) if isinstance(value, fx.Node) else repr(value)

    def norm_at(self, node: fx.Node) -> NormSite | None:
        """The batch norm (module, subclass or functional) whose output ``node`` is."""
        site = self.context.norms.get(node)
        return site if site is not None and site.kind in _BATCH_NORMS else None

    def layer_at(self, node: fx.Node) -> LayerSite | None:
        site = self.context.layers.get(node)
        return site if site is not None and site.kind in CONV_KINDS else None

    @staticmethod
    def shapes_agree(addends: list[fx.Node], add: fx.Node) -> bool:
        """No addend is broadcast (unknown shapes, as in a recorded graph, agree)."""
        shape = add.meta.get("bnfold_shape")
        return shape is None or all(n.meta.get("bnfold_shape") == shape for n in addends)


def _strays(
    addends: list[fx.Node],
    found: list[tuple[fx.Node, LiveBranch]],
    describe: Callable[[fx.Node], str],
) -> str:
    """Why branches on several inputs are no block: the addend off the one input the layer
    and norm branches share, else the inputs."""
    shared = {source for source, branch in found if branch.kind != BranchKind.IDENTITY}
    if len(shared) == 1:
        block_input = shared.pop()
        pairs = zip(addends, found, strict=True)
        off = next(node for node, (source, _) in pairs if source is not block_input)
        return f"{describe(off)} is no branch on the block input ({describe(block_input)})"
    names = ", ".join(sorted({describe(source) for source, _ in found}))
    return f"its branches read different inputs ({names})"


def _runs_more(norm: NormSite) -> bool:
    """A BatchNorm subclass whose forward runs more than its batch norm."""
    return norm.kind == BnKind.SUBCLASS and not isinstance(norm.extra, nn.Identity)


def _used_only_by(node: fx.Node, chain: list[fx.Node]) -> bool:
    return len(node.users) == 1 and next(iter(node.users)) in chain


def find_blocks(context: PairingContext, pairs: tuple[PlannedPair, ...]) -> BlockSearch:
    """Every block of the pairing's graph (see the module doc), in graph order, and why each
    other sum tried is none."""
    conv_bn = {
        p.norm.node: p
        for p in pairs
        if p.record.pattern == "conv→bn" and len(p.targets) == 1 and not p.record.via
    }
    paired_layers = Counter(t.layer.node for p in pairs for t in p.targets)
    finder = _Finder(context, conv_bn, paired_layers)
    blocks = []
    for node in context.gm.graph.nodes:
        if not is_sum(node) or _inner_sum(node):  # not a sum, or an inner sum of a chain
            continue
        blocks.extend(finder.blocks_at(node))
    return BlockSearch(tuple(blocks), finder.refused)
