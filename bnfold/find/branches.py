"""What each block of parallel branches becomes (blocks: ``bnfold.find.blocks``): one conv
(RepVGG, MobileOne, ACNet, DBB-style re-parameterisation, read from the dataflow) when its
geometry aligns (``bnfold.find.alignment``), merging is on and the graph may be rewritten; its
norms are then pairs with pattern "branches→conv". Otherwise its Conv -> BN pairs fold as they
are and its identity BNs are skipped with the reason. Reads the graph, never changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from bnfold.find.alignment import Alignment, align, geometry
from bnfold.find.blocks import Block, BlockSearch, find_blocks
from bnfold.find.functional import fetch_attr
from bnfold.find.pairing import Decisions, PairingContext, PlannedPair, norm_skip
from bnfold.find.patterns import LayerKind, Refusal
from bnfold.find.reach import is_sum
from bnfold.find.sites import has_stock_forward
from bnfold.find.skip_details import describe_node
from bnfold.find.targets import weight_overflow
from bnfold.find.writes import first_write
from bnfold.folding.math import FoldedWeights, largest_magnitude
from bnfold.folding.merge import BranchTerm, MergedShape, merge_branches
from bnfold.records import Branch, BranchKind, BranchMerge, Pair, Skip, SkipReason

MERGED_PATTERN = "branches→conv"


@dataclass(frozen=True)
class PlannedMerge:
    """A block that merges, with its alignment and the records of its norms."""

    record: BranchMerge
    block: Block
    alignment: Alignment
    pairs: tuple[Pair, ...]


Outcome = PlannedPair | Skip | Pair  # a Pair: a norm merged with its block


@dataclass(frozen=True)
class BranchDecisions:
    """The pairing's outcomes with the blocks decided: merged norms become ``Pair`` records
    (pattern "branches→conv"), identity BNs of blocks that do not merge become skips."""

    outcomes: tuple[Outcome, ...]
    merges: tuple[PlannedMerge, ...]
    notes: tuple[str, ...]

    @property
    def pairs(self) -> tuple[PlannedPair, ...]:
        """The pairs still folded adjacently."""
        return tuple(o for o in self.outcomes if isinstance(o, PlannedPair))

    @property
    def records(self) -> tuple[Pair, ...]:
        return tuple(o if isinstance(o, Pair) else o.record for o in self.outcomes if _paired(o))

    @property
    def skips(self) -> tuple[Skip, ...]:
        return tuple(o for o in self.outcomes if isinstance(o, Skip))


def _paired(outcome: Outcome) -> bool:
    return not isinstance(outcome, Skip)


def decide_branches(
    gm: fx.GraphModule,
    decisions: Decisions,
    *,
    merge: bool,
    cannot_rewrite: str | None,
) -> BranchDecisions:
    """Decide every block of ``gm`` given the pairing's ``decisions``: merge it when it aligns,
    ``merge`` is on and the graph may be rewritten (``cannot_rewrite`` None, else why not)."""
    changes: dict[str, Outcome] = {}
    merges, notes, taken = [], [], set()
    search = find_blocks(decisions.context, decisions.pairs)
    for block in search.blocks:
        result = _unwritten(gm, block) or _block_alignment(block)
        if isinstance(result, Alignment):
            result = _overflow(block, result) or result
        if isinstance(result, Refusal):
            notes.append(f"branches summed at {block.add.name} not merged: {result.detail}")
        elif not merge:
            result = Refusal(
                SkipReason.BRANCH_MERGE_OFF,
                f"branches summed at {block.add.name} are kept apart (merge_branches=False)",
            )
        elif cannot_rewrite is not None:
            result = Refusal(SkipReason.NEEDS_GRAPH_REWRITE, cannot_rewrite)
        if isinstance(result, Refusal):
            for branch in block.branches:
                if branch.kind == BranchKind.BN:
                    changes[branch.norm.name] = norm_skip(branch.norm, result, None, MERGED_PATTERN)
            continue
        planned = _planned(gm, block, result, taken)
        merges.append(planned)
        changes.update((pair.bn, pair) for pair in planned.pairs)
    outcomes = tuple(changes.get(_bn(o), o) for o in decisions.outcomes)
    outcomes = _explained(outcomes, search, decisions.context)
    return BranchDecisions(outcomes, tuple(merges), (*decisions.notes, *notes))


def _explained(
    outcomes: tuple[Outcome, ...], search: BlockSearch, context: PairingContext
) -> tuple[Outcome, ...]:
    """A BN left without a layer whose output goes into a sum of branches that is no block
    (an identity BN) says why the sum does not merge."""
    norms = {norm.name: norm for norm in context.norms.values()}
    explained = []
    for outcome in outcomes:
        lost = isinstance(outcome, Skip) and outcome.reason == SkipReason.NO_PRODUCER
        norm = norms.get(outcome.bn) if lost else None
        users = list(norm.out.users) if norm is not None else []
        if len(users) == 1 and is_sum(users[0]):
            why = search.why_not(users[0])
            if why is not None:
                detail = f"{outcome.detail}; {users[0].name} merges no branches: {why}"
                outcome = replace(outcome, detail=detail)
        explained.append(outcome)
    return tuple(explained)


#: Why the branches of a block are not merged in a recorded dataflow.
RECORDED = (
    "the dataflow was recorded from real forwards (torch.fx could not trace the model); merging "
    "parallel branches into one conv needs a traced graph to rewrite"
)


def recorded_decisions(gm: fx.GraphModule, decisions: Decisions, merge: bool) -> Decisions:
    """``decisions`` of a recorded dataflow with the identity BNs of its blocks skipped
    (``SkipReason.NEEDS_GRAPH_REWRITE``, or ``BRANCH_MERGE_OFF`` when ``merge`` is off): a
    recorded dataflow folds in the model as it is."""
    branches = decide_branches(gm, decisions, merge=merge, cannot_rewrite=RECORDED)
    return replace(decisions, outcomes=branches.outcomes, notes=branches.notes)


def merged_weights(block: Block, alignment: Alignment) -> FoldedWeights:
    """The float64 weight and bias of the one conv a block merges into
    (``bnfold.folding.merge``), from its branches' own weights."""
    like = block.convs[0].layer.weight
    offsets = iter(alignment.offsets)
    terms = []
    for branch in block.branches:
        layer = branch.layer
        if layer is None:
            terms.append(BranchTerm(None, None, branch.affine, alignment.centre))
        else:
            terms.append(BranchTerm(layer.weight, layer.bias, branch.affine, next(offsets)))
    shape = MergedShape(
        alignment.out_channels, alignment.in_channels, alignment.groups, alignment.kernel
    )
    return merge_branches(terms, shape, like.device)


def _overflow(block: Block, alignment: Alignment) -> Refusal | None:
    """The merged weights must fit the branch convs' dtype (float16 kernels scaled by large BN
    scales can sum past 65504). A bound from each branch's largest magnitudes decides almost
    every block; only where it cannot are the merged weights computed."""
    dtype = block.convs[0].layer.weight.dtype
    if dtype != torch.float16:  # the other float dtypes reach 3e38 (see ``overflow_refusal``)
        return None
    bound = 0.0
    for branch in block.branches:
        scale = largest_magnitude(branch.affine.scale) if branch.affine else 1.0
        shift = largest_magnitude(branch.affine.shift) if branch.affine else 0.0
        layer = branch.layer
        weight = largest_magnitude(layer.weight) if layer is not None else 1.0
        bias = largest_magnitude(layer.bias) if layer is not None else 0.0
        bound += max(weight * scale, bias * scale + shift)
    return weight_overflow(
        bound,
        lambda: merged_weights(block, alignment),
        dtype,
        f"merged into one conv, the branches of {block.add.name}",
    )


def _bn(outcome: PlannedPair | Skip) -> str:
    return outcome.bn if isinstance(outcome, Skip) else outcome.record.bn


def _unwritten(gm: fx.GraphModule, block: Block) -> Refusal | None:
    """The merged conv reads the block's input at the sum: no op between the branches' first
    read and the sum may write into it in place (``bnfold.find.writes``)."""
    writer = first_write(gm, block.input, block.input, {block.add}, frozenset(block.chain))
    if writer is None:
        return None
    return Refusal(
        SkipReason.IN_PLACE_WRITE,
        f"{describe_node(gm, writer)} writes in place into the block's input "
        f"{block.input.name} before the sum {block.add.name}; one merged conv reading it at the "
        "sum would read the changed values",
    )


def _block_alignment(block: Block) -> Alignment | Refusal:
    for branch in block.convs:
        layer = branch.layer
        if layer.kind == LayerKind.CONV_TRANSPOSE:
            return Refusal(
                SkipReason.BRANCHES_MISALIGNED,
                f"{layer.name} is a ConvTranspose; only Conv branches merge",
            )
        if layer.module is not None and not has_stock_forward(layer.module):
            return Refusal(
                SkipReason.BRANCHES_MISALIGNED,
                f"{layer.label} has its own forward (it may pad at run time); only plain conv "
                "branches merge",
            )
    identity = [b for b in block.branches if b.kind in (BranchKind.BN, BranchKind.IDENTITY)]
    name = None
    if identity:
        first = identity[0]
        name = first.norm.name if first.norm is not None else f"{block.input.name} (identity)"
    return align([geometry(b.layer) for b in block.convs], name)


def _planned(gm: fx.GraphModule, block: Block, alignment: Alignment, taken: set) -> PlannedMerge:
    path = _free_path(gm, _merged_path(block), taken)
    conv_type = f"Conv{len(alignment.kernel)}d"
    branches, pairs = [], []
    for branch in block.branches:
        layer, norm = branch.layer, branch.norm
        kernel = tuple(layer.weight.shape[2:]) if layer is not None else None
        conv_name = layer.name if layer is not None else None
        branches.append(Branch(branch.kind, conv_name, norm.name if norm else None, kernel))
        if norm is not None:
            pairs.append(
                Pair(
                    norm.name,
                    norm.type_name,
                    norm.kind,
                    path,
                    conv_type,
                    MERGED_PATTERN,
                    norm.params.num_features,
                )
            )
    record = BranchMerge(
        add=block.add.name,
        input=block.input.name,
        branches=tuple(branches),
        conv=path,
        conv_type=conv_type,
        kernel=alignment.kernel,
        stride=alignment.stride,
        padding=alignment.padding,
        groups=alignment.groups,
    )
    return PlannedMerge(record, block, alignment, tuple(pairs))


def _merged_path(block: Block) -> str:
    """``<common parent of the branch modules>.merged`` (``merged`` at the root)."""
    paths = [b.layer.name for b in block.convs if b.layer.module is not None]
    paths += [b.norm.name for b in block.branches if b.norm is not None and b.norm.module]
    parts = [p.split(".")[:-1] for p in paths]
    common: list[str] = []
    for atoms in zip(*parts, strict=False) if parts else ():
        if len(set(atoms)) != 1:
            break
        common.append(atoms[0])
    return ".".join([*common, "merged"])


def _free_path(gm: fx.GraphModule, path: str, taken: set) -> str:
    """``path``, or ``path_1``, ``path_2``... when the name is in use."""
    candidate, number = path, 0
    while candidate in taken or _exists(gm, candidate):
        number += 1
        candidate = f"{path}_{number}"
    taken.add(candidate)
    return candidate


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        fetch_attr(gm, path)
    except AttributeError:
        return False
    return True
