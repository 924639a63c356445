"""Module and graph surgery: apply a plan's folds to (a copy of) the model.

The math is in ``bnfold.folding.math``; this module moves tensors in and out of the model. Every
fold is computed in float64 and each layer's weight is rounded once to its own dtype, even when
two norms fold into the same layer (one before it, one after it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from bnfold.find.analyse import analyse
from bnfold.find.functional import erase_dead_code, erase_norm
from bnfold.find.pairing import Analysis, PlannedPair
from bnfold.find.patterns import Position
from bnfold.find.sites import LayerSite, NormSite
from bnfold.find.targets import FoldTarget
from bnfold.find.trace import runnable
from bnfold.find.unwrap import unwrap
from bnfold.folding.clone import clone_model
from bnfold.folding.math import (
    Affine,
    FoldedWeights,
    Workspace,
    fold_into_input,
    fold_into_output,
    output_bias,
    scale_output_channels_,
)
from bnfold.folding.restructure import merge_blocks
from bnfold.modes import set_eval
from bnfold.records import BnKind, FoldedPair, FoldResult, Pair

LARGE_SCALE = 1e3  # |gamma / sqrt(var + eps)| above this amplifies weight rounding error


def fold(
    model: nn.Module,
    example_inputs: Any,
    *,
    inplace: bool = False,
    extra_inputs: Sequence[Any] = (),
    merge_branches: bool = True,
) -> FoldResult:
    """Fold every foldable batch norm of ``model`` into the layers it reaches (next to it, or
    through the ops ``find_pairs`` follows).

    Returns a ``FoldResult`` whose ``model`` computes the eval-mode function of ``model`` with
    the folded norms removed (plain BN modules become ``nn.Identity``, layers gain a bias;
    functional norms are removed from a rewritten ``torch.fx.GraphModule``). With
    ``inplace=False`` (default) the caller's model is not changed at all; with ``inplace=True``
    the model itself is folded and returned (functional norms, which need a graph rewrite, are
    then skipped unless the model is a GraphModule).

    Wrappers (``torch.compile``, ``DataParallel``, ``DistributedDataParallel``) are taken off:
    ``result.model`` is the folded inner module (see ``bnfold.find.unwrap``). A model torch.fx
    cannot trace is analysed from recorded forwards on ``example_inputs`` and ``extra_inputs``
    and folded at module level (see ``find_pairs``).

    Parallel branches summed on one input that align (RepVGG/MobileOne/ACNet-style blocks, see
    ``find_pairs``) are merged into one new conv each, registered beside the branch modules of
    a rewritten GraphModule (``result.merges``); ``merge_branches=False`` keeps the structure.
    Merging needs a graph rewrite: with ``inplace=True`` on a module that is not a GraphModule
    the blocks are kept (their identity BNs are skipped with a reason).
    """
    model, wrapper_notes = unwrap(model)
    work = model if inplace else clone_model(model)
    allow_rewrite = not inplace or isinstance(model, fx.GraphModule)
    analysis = analyse(
        work,
        example_inputs,
        allow_graph_rewrite=allow_rewrite,
        extra_inputs=extra_inputs,
        merge_branches=merge_branches,
    )
    plan = replace(analysis.plan, notes=(*wrapper_notes, *analysis.plan.notes))
    gm = analysis.module
    functional = [
        p
        for p in analysis.pairs
        if p.norm.module is None or any(t.layer.module is None for t in p.targets)
    ]
    rewrite = bool(functional) or bool(analysis.merges) or isinstance(work, fx.GraphModule)
    target = gm if rewrite else work
    workspace = Workspace()
    for group in _by_layer(analysis.pairs):
        _fold_layer_group(target, group, workspace)
    paths: dict[int, list[str]] = {}  # every name each module is registered under
    for name, module in target.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    for pair in analysis.pairs:
        _remove_norm(target, pair.norm, paths.get(id(pair.norm.module), []))
    merge_blocks(gm, analysis.merges)
    if rewrite:
        erase_dead_code(gm.graph)
        gm.graph.lint()
        target = runnable(gm)
    set_eval(target)
    return FoldResult(
        model=target,
        plan=plan,
        folded=_folded_records(analysis),
        skipped=plan.skipped,
        graph_rewritten=rewrite,
        inplace=inplace,
        merges=plan.merges,
    )


def _folded_records(analysis: Analysis) -> tuple[FoldedPair, ...]:
    """A record per folded norm, adjacent or merged with its block, in plan order."""
    folded = {
        pair.record.bn: _record(pair.record, pair.norm, pair.affine) for pair in analysis.pairs
    }
    for merge in analysis.merges:
        norms = {b.norm.name: b for b in merge.block.branches if b.norm is not None}
        for record in merge.pairs:
            branch = norms[record.bn]
            folded[record.bn] = _record(record, branch.norm, branch.affine)
    return tuple(folded[pair.bn] for pair in analysis.plan.pairs)


def _by_layer(pairs: tuple[PlannedPair, ...]) -> list[list[FoldTarget]]:
    groups: dict[int, list[FoldTarget]] = {}
    for pair in pairs:
        for target in pair.targets:
            groups.setdefault(id(target.layer.node), []).append(target)
    return list(groups.values())


def _fold_layer_group(root: nn.Module, group: list[FoldTarget], workspace: Workspace) -> None:
    """Fold the (one or two) norms of one layer in float64, then write the result once."""
    layer = group[0].layer
    device = layer.weight.device
    affines = [Affine(t.affine.scale.to(device), t.affine.shift.to(device)) for t in group]
    if len(group) == 1 and group[0].position == Position.AFTER and layer.weight.is_contiguous():
        with torch.no_grad():  # the common case, without a weight-sized float64 copy
            scale_output_channels_(layer.weight, affines[0].scale, layer.layout, workspace)
        _write_bias(root, layer, output_bias(layer.bias, affines[0]))
        return
    weights = FoldedWeights(layer.weight.detach(), layer.bias)
    for target, affine in sorted(
        zip(group, affines, strict=True), key=lambda item: item[0].position != Position.BEFORE
    ):
        fold_fn = fold_into_output if target.position == Position.AFTER else fold_into_input
        weights = fold_fn(weights.weight, weights.bias, affine, layer.layout)
    with torch.no_grad():  # copy_ rounds float64 to the weight's dtype once
        layer.weight.copy_(weights.weight)
    _write_bias(root, layer, weights.bias)


def _write_bias(root: nn.Module, layer: LayerSite, bias64: torch.Tensor) -> None:
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(bias64)
        return
    bias = nn.Parameter(bias64.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    if layer.module is not None:
        layer.module.bias = bias
        return
    _add_functional_bias(root, layer, bias)


def _add_functional_bias(gm: fx.GraphModule, layer: LayerSite, bias: nn.Parameter) -> None:
    """Register the bias beside the weight and pass it to the call (third argument)."""
    qualified = f"{layer.weight_attr}_folded_bias"
    owner_path, _, name = qualified.rpartition(".")
    gm.get_submodule(owner_path).register_parameter(name, bias)
    node = layer.node
    with gm.graph.inserting_before(node):
        bias_node = gm.graph.get_attr(qualified)
    if len(node.args) > 2:
        node.update_arg(2, bias_node)
    elif len(node.args) == 2 and "bias" not in node.kwargs:
        node.args = (*node.args, bias_node)
    else:
        node.update_kwarg("bias", bias_node)


def _remove_norm(root: nn.Module, norm: NormSite, paths: list[str]) -> None:
    """Replace the norm under every name it is registered under (``paths``: ``self.bn`` and
    ``self.body[1]`` may be one module), or erase its functional call."""
    if norm.kind == BnKind.FUNCTIONAL:
        erase_norm(root.graph, norm, norm.input)
        return
    replacement = norm.extra if norm.kind == BnKind.SUBCLASS else nn.Identity()
    replacement = _standing_in(replacement, norm.module)
    for path in paths or [norm.name]:
        root.set_submodule(path, replacement)


#: Plain values a forward may read from a batch norm (``self.bn.num_features``) for shapes.
_SETTING_TYPES = (bool, int, float, str, type(None))


def _standing_in(replacement: nn.Module, norm: nn.Module | None) -> nn.Module:
    """``replacement`` carrying what a forward may still read from the norm it replaces: its
    plain settings (``num_features``, ``eps``...) and, as buffers outside the state dict, its
    statistics and affine parameters (a forward that reads them beside the norm's call, as in
    ``self.bn.running_mean.clone()`` or ``self.bn.weight.shape``, computes what it did)."""
    if norm is None:
        return replacement
    for key, value in vars(norm).items():
        plain = isinstance(value, _SETTING_TYPES)
        if plain and not key.startswith("_") and not hasattr(replacement, key):
            setattr(replacement, key, value)
    tensors = (*norm.named_parameters(recurse=False), *norm.named_buffers(recurse=False))
    for key, tensor in tensors:
        if not hasattr(replacement, key):
            replacement.register_buffer(key, tensor.detach(), persistent=False)
    return replacement


def _record(pair: Pair, norm: NormSite, affine: Affine) -> FoldedPair:
    scale = affine.scale.abs()
    max_scale = float(scale.max()) if scale.numel() else 0.0
    notes = list(norm.notes)
    if max_scale > LARGE_SCALE:
        notes.append(
            f"large scale {max_scale:.3g} (tiny running_var): weight rounding error is "
            "amplified by this factor"
        )
    min_var = float(norm.params.running_var.detach().min())
    return FoldedPair(
        pair=pair, max_abs_scale=max_scale, min_running_var=min_var, notes=tuple(notes)
    )
