"""The find stage's entry: read the model's dataflow and pair every batch norm with a layer, or
say why not.

The dataflow is a torch.fx trace (``LeafTracer``) checked against the model (``trace_checked``):
one eval forward of the model itself, then one of the traced graph (shapes, subclass inputs), and
the traced graph's outputs must equal the model's own on the example (``FAITHFUL_RTOL``) and it
must call the same layers and norms as often. fx silently takes the wrong branch of checks like
``isinstance(x, torch.Tensor)`` (false for its proxies), so a trace that runs is not yet a trace
that is right. The graph's run takes a layer's result from the model's own run when the layer
gets equal arguments (``bnfold.find.leafcalls``), so the check costs about one forward; under
``count_find_forward`` that forward also counts the model's batch norms. When tracing or the
check fails (``TraceError``), the dataflow is recorded from real forwards instead
(``bnfold.find.recorded``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from bnfold.errors import ModelInputError, TraceError, UsageError
from bnfold.find.branches import decide_branches
from bnfold.find.control import nested_norm_skips
from bnfold.find.idle import idle_norms, idle_note, refuse_beside_idle
from bnfold.find.kernels import counted_when_asked
from bnfold.find.leafcalls import LeafCalls
from bnfold.find.pairing import Analysis, decide, plan_notes
from bnfold.find.recorded import analyse_recorded
from bnfold.find.sites import LAYER_TYPES, needs_example_input
from bnfold.find.trace import HigherOrderOpError, is_leaf, propagate, trace_model
from bnfold.find.unwrap import unwrap
from bnfold.io.inputs import as_args
from bnfold.modes import inference
from bnfold.records import Plan

#: Max abs diff over max abs output allowed between the traced graph and the model itself, by
#: output dtype. Both run the same ops in the same order, so they normally agree bit for bit.
FAITHFUL_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


#: Why the branches of a block are not merged into one conv when folding in place.
IN_PLACE = (
    "merging parallel branches into one conv rewrites the forward, which cannot be done in place "
    "on a module that is not a GraphModule; fold with inplace=False"
)


def find_pairs(
    model: nn.Module,
    example_inputs: Any,
    *,
    extra_inputs: Sequence[Any] = (),
    merge_branches: bool = True,
) -> Plan:
    """Find every batch norm in ``model``'s dataflow and decide whether it can be folded.

    ``example_inputs`` is a tensor or a tuple of positional inputs; eval-mode forwards are run
    (flags restored, no autograd). The model is not changed. Every batch norm ends up in
    exactly one of ``plan.pairs`` or ``plan.skipped`` (with a reason). Wrappers
    (``torch.compile``, ``DataParallel``, ``DistributedDataParallel``) are looked through.
    When torch.fx cannot trace the model, its dataflow is recorded from real forwards instead
    (``plan.method == "recorded"``, see ``bnfold.find.recorded``); ``extra_inputs`` (more example
    inputs, same form) are then recorded too, so pairs behind data-dependent branches can be
    checked on each.

    Parallel branches summed on one input (Conv -> BN, Conv, BN(x), x; see
    ``bnfold.find.branches``) that align are planned to merge into one conv (``plan.merges``;
    their norms are pairs with pattern "branches→conv"); ``merge_branches=False`` keeps them
    apart (Conv -> BN branches still fold, an identity BN is skipped with
    ``SkipReason.BRANCH_MERGE_OFF``). A recorded dataflow never merges.
    """
    return analyse(
        model, example_inputs, extra_inputs=extra_inputs, merge_branches=merge_branches
    ).plan


def analyse(
    model: nn.Module,
    example_inputs: Any,
    *,
    allow_graph_rewrite: bool = True,
    extra_inputs: Sequence[Any] = (),
    merge_branches: bool = True,
) -> Analysis:
    """Trace (or record), propagate shapes and pair batch norms with layers (see
    ``find_pairs``)."""
    model, wrapper_notes = unwrap(model)
    _check_extra_inputs(extra_inputs)
    try:
        gm, kept = trace_checked(model, example_inputs)
    except HigherOrderOpError:
        raise
    except TraceError as exc:
        return analyse_recorded(
            model,
            example_inputs,
            extra_inputs,
            allow_graph_rewrite,
            exc,
            wrapper_notes,
            merge_branches=merge_branches,
        )
    decisions = decide(gm, kept, allow_graph_rewrite)
    idle = idle_norms(model, _ran(gm))
    decisions = replace(decisions, outcomes=refuse_beside_idle(model, decisions.outcomes, idle))
    cannot_rewrite = None if allow_graph_rewrite else IN_PLACE
    branches = decide_branches(gm, decisions, merge=merge_branches, cannot_rewrite=cannot_rewrite)
    plan = Plan(
        pairs=branches.records,
        skipped=(*branches.skips, *nested_norm_skips(gm)),
        method="graph-module" if gm is model else "fx",
        model_was_training=model.training,
        notes=(
            *wrapper_notes,
            *plan_notes(model, decisions.pairs),
            *filter(None, [idle_note(idle)]),
            *branches.notes,
        ),
        merges=tuple(merge.record for merge in branches.merges),
    )
    return Analysis(plan=plan, module=gm, pairs=branches.pairs, merges=branches.merges)


def _check_extra_inputs(extra_inputs: Sequence[Any]) -> None:
    """``extra_inputs`` is a list of example inputs: a tensor, a dict or a string given in its
    place would be walked as if each row or key were one."""
    if isinstance(extra_inputs, (torch.Tensor, dict, str, bytes)):
        raise UsageError(
            f"extra_inputs is a sequence of example inputs, each like example_inputs; got a "
            f"{type(extra_inputs).__name__}: pass [x] for one more input"
        )


def _ran(gm: fx.GraphModule) -> set[str]:
    """The modules the traced graph runs: those it calls, and those whose tensors it reads."""
    ran = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    return ran | {str(n.target).rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}


def trace_checked(model: nn.Module, example_inputs: Any) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The fx trace of ``model`` with its shapes, checked as the module doc says, and the inputs
    of the module calls the graph pass needs (``needs_example_input``). Raises ``TraceError``
    when fx fails, the traced graph rejects the example, or it does not reproduce the model."""
    gm = trace_model(model)
    called = {n: gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    keep = {node.name for node, module in called.items() if needs_example_input(module)}
    if gm is model:  # a GraphModule is its own graph: nothing to check
        with counted_when_asked():
            return gm, propagate(gm, example_inputs, keep)[0]
    expected, calls = _run_model(model, example_inputs)
    try:
        kept, output = propagate(gm, example_inputs, keep, reuse=calls)
    except ModelInputError as exc:
        raise TraceError(
            f"the fx trace of {type(model).__name__} fails on the example input ({exc})"
        ) from exc
    problem = _difference(expected, output) or _call_difference(model, called, calls.counts)
    if problem is not None:
        raise TraceError(
            f"torch.fx's trace of {type(model).__name__} does not reproduce the model on the "
            f"example input ({problem}); typically a check such as isinstance(x, torch.Tensor) "
            "that is false for fx's proxies"
        )
    return gm, kept


def _run_model(model: nn.Module, example_inputs: Any) -> tuple[Any, LeafCalls]:
    """The model's own eval output (copied: the traced run may reuse its tensors) and its leaf
    calls."""
    leaves = [m for m in model.modules() if is_leaf(m)]
    try:
        layers = [m for m in leaves if isinstance(m, LAYER_TYPES)]
        with inference(model), LeafCalls(leaves, layers) as calls, counted_when_asked():
            output = model(*as_args(example_inputs))
    except Exception as exc:
        raise TraceError(
            f"{type(model).__name__} fails on the example input: {type(exc).__name__}: {exc}"
        ) from exc
    expected = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, output)
    return expected, calls


def _call_difference(
    model: nn.Module, called: dict[fx.Node, nn.Module], calls: Counter
) -> str | None:
    """Outputs can agree by accident (a ReLU that zeroes everything): the leaf calls must too.
    ``called`` maps the graph's module calls to their modules."""
    in_graph = Counter(id(module) for module in called.values() if is_leaf(module))
    if in_graph == calls:
        return None
    names = {id(m): name for name, m in model.named_modules()}
    for key in (*calls, *in_graph):
        if calls[key] != in_graph[key]:
            return (
                f"{names.get(key) or 'a layer'} runs {calls[key]} time(s) in the model and "
                f"{in_graph[key]} in the trace"
            )
    return None


def _difference(expected: Any, got: Any) -> str | None:
    want, have = pytree.tree_leaves(expected), pytree.tree_leaves(got)
    if len(want) != len(have):  # containers may differ (a traced OrderedDict returns a dict)
        return f"it returns {len(have)} values instead of {len(want)}"
    for index, (a, b) in enumerate(zip(want, have, strict=True)):
        if not isinstance(a, torch.Tensor):
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return f"output {index} differs in type or shape"
        if torch.equal(a, b) or a.numel() == 0:
            continue
        a, b = a.detach(), b.detach()
        finite = torch.isfinite(a)
        if not finite.all():  # NaN/inf from the model itself (e.g. NaN running statistics)
            if not torch.equal(finite, torch.isfinite(b)) or not _same_non_finite(a, b, finite):
                return f"output {index} holds NaN/inf that the trace does not reproduce"
            a, b = a[finite], b[finite]
            if a.numel() == 0:
                continue
        ref = a.abs().max().double().clamp_min(1e-30)
        rel = float((a.double() - b.double()).abs().max() / ref)
        if not rel <= FAITHFUL_RTOL.get(a.dtype, 1e-5):
            return f"output {index} differs by {rel:.3g} relative"
    return None


def _same_non_finite(a: torch.Tensor, b: torch.Tensor, finite: torch.Tensor) -> bool:
    """NaN where ``a`` has NaN, the same infinities where it has them."""
    bad_a, bad_b = a[~finite], b[~finite]
    nan = torch.isnan(bad_a)
    return torch.equal(nan, torch.isnan(bad_b)) and torch.equal(bad_a[~nan], bad_b[~nan])
