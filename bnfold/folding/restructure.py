"""Graph surgery for merged branch blocks: each block's sum becomes one call of a new conv.

The merged conv is registered in the GraphModule at the block's planned path (beside its branch
modules), its weights computed in float64 from the branches' original weights
(``bnfold.folding.merge``) and rounded once to the branch convs' dtype. The sum, the branch
nodes and the branch modules are taken out of the graph; the block input stays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from bnfold.find.branches import PlannedMerge, merged_weights

_CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def merge_blocks(gm: fx.GraphModule, merges: Sequence[PlannedMerge]) -> None:
    """Replace each planned block of ``gm`` by one call of its merged conv (a block whose input
    is an earlier block's sum reads that block's merged conv)."""
    replaced: dict[fx.Node, fx.Node] = {}
    for merge in merges:
        block = merge.block
        gm.add_submodule(merge.record.conv, _merged_conv(merge))
        with gm.graph.inserting_before(block.add):
            source = replaced.get(block.input, block.input)
            call = gm.graph.call_module(merge.record.conv, (source,))
        block.add.replace_all_uses_with(call)
        replaced[block.add] = call
        _erase_branches(gm.graph, merge)
        _delete_branch_modules(gm, merge)


def _merged_conv(merge: PlannedMerge) -> nn.Module:
    """The new conv of a block, in eval mode, with the dtype and device of its branch convs."""
    alignment = merge.alignment
    like = merge.block.convs[0].layer.weight
    weights = merged_weights(merge.block, alignment)
    conv = _CONV_TYPES[len(alignment.kernel)](
        alignment.in_channels,
        alignment.out_channels,
        alignment.kernel,
        stride=alignment.stride,
        padding=alignment.padding,
        dilation=alignment.dilation,
        groups=alignment.groups,
        device=like.device,
        dtype=like.dtype,
    )
    with torch.no_grad():  # copy_ rounds float64 to the weight's dtype once
        conv.weight.copy_(weights.weight)
        conv.bias.copy_(weights.bias)
    conv.requires_grad_(like.requires_grad)
    return conv.eval()


def _erase_branches(graph: fx.Graph, merge: PlannedMerge) -> None:
    """Erase the sums and every branch node (conv, norm and the norm's getitem readers)."""
    doomed = set(merge.block.chain)
    for branch in merge.block.branches:
        if branch.norm is not None:
            doomed |= {branch.norm.node, branch.norm.out, *branch.norm.node.users}
        if branch.layer is not None:
            doomed.add(branch.layer.node)
    for node in reversed(list(graph.nodes)):
        if node in doomed and not node.users:
            graph.erase_node(node)


def _delete_branch_modules(gm: fx.GraphModule, merge: PlannedMerge) -> None:
    """Delete the branch convs and norms, then the containers they leave empty."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for branch in merge.block.branches:
        for site in (branch.layer, branch.norm):
            if site is not None and site.module is not None and site.name not in called:
                gm.delete_submodule(site.name)
                _delete_empty_parents(gm, site.name, called)


def _delete_empty_parents(gm: fx.GraphModule, path: str, called: set[str]) -> None:
    parent = path.rpartition(".")[0]
    while parent and parent not in called:
        module = gm.get_submodule(parent)
        if type(module) is not nn.Module and not isinstance(module, _CONTAINERS):
            return
        if any(True for _ in module.children()) or any(True for _ in module.parameters()):
            return
        if any(True for _ in module.buffers()):
            return
        gm.delete_submodule(parent)
        parent = parent.rpartition(".")[0]
