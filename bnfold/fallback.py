"""How a model's dataflow is read: a checked fx trace, or recorded real forwards.

1. ``trace_checked``: torch.fx symbolic trace (``LeafTracer``), one eval forward of the model
   itself, then one of the traced graph (shapes, subclass inputs), and a faithfulness check: the
   traced graph's outputs must equal the model's own on the example (``FAITHFUL_RTOL``), and it
   must call the same layers and norms as often. fx silently takes the wrong branch of checks
   like ``isinstance(x, torch.Tensor)`` (false for its proxies), so a trace that runs is not yet
   a trace that is right. The graph's run takes a layer's result from the model's own run when
   the layer gets equal arguments (``bnfold.leafcalls``), so the check costs about one forward.
   Any failure raises ``TraceError``.
2. ``analyse_recorded``: when fx fails, the dataflow is recorded from real eval forwards
   (``bnfold.record``) on the example input and on each of ``extra_inputs``, and the graph pass's
   own rules decide every norm in each recording. Norms are folded at module level in the user's
   own model (``Plan.method == "recorded"``); the forward is never replaced.

Input-dependent routing: until the forward first reads a tensor value into Python (``item``,
``bool``, ``tolist``...), what runs depends only on input shapes and module state. Once it has,
any later code may call any module on any tensor for another input, including the modules of a
pair recorded before the read. So in a forward that reads values, every pair is folded only when
every recorded input (the example plus ``extra_inputs``: at least two) pairs it identically, and
a plan note says so; otherwise it is skipped with ``SkipReason.INPUT_DEPENDENT``. Routing on input
*shapes* is assumed to stay the same at other shapes (the plan notes the recorded shapes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from bnfold.affine import affine_skips_to_notes, is_frozen_norm
from bnfold.errors import ModelInputError, TraceError
from bnfold.leafcalls import LeafCalls
from bnfold.modes import as_args, inference
from bnfold.record import Recording, record
from bnfold.records import BnKind, Plan, Skip, SkipReason
from bnfold.trace import LAYER_TYPES, Traced, is_leaf, propagate, trace_model

if TYPE_CHECKING:
    from bnfold.graph import Analysis, PlannedPair

#: Max abs diff over max abs output allowed between the traced graph and the model itself, by
#: output dtype. Both run the same ops in the same order, so they normally agree bit for bit.
FAITHFUL_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2,
                 torch.bfloat16: 1e-2}


# ------------------------------------------------------------------------------ fx, checked


def trace_checked(model: nn.Module, example_inputs: Any,
                  needs_input: Callable[[nn.Module], bool]
                  ) -> tuple[Traced, dict[str, Any]]:
    """Trace ``model`` with fx, propagate shapes, and check the trace reproduces the model.

    Returns the trace and the inputs of the module calls ``needs_input`` selects. Raises
    ``TraceError`` when fx fails, the traced graph rejects the example, or its outputs differ.
    """
    traced = trace_model(model, example_inputs)
    gm = traced.module
    called = {n: gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    keep = {node.name for node, module in called.items() if needs_input(module)}
    if traced.method == "graph-module":  # the model is its own graph: nothing to check
        return traced, propagate(traced, example_inputs, keep)
    expected, calls = _run_model(model, example_inputs)
    outputs: list[Any] = []
    try:
        kept = propagate(traced, example_inputs, keep, outputs=outputs, reuse=calls)
    except ModelInputError as exc:
        raise TraceError(f"the fx trace of {type(model).__name__} fails on the example input "
                         f"({exc})") from exc
    problem = _difference(expected, outputs[0]) or _call_difference(model, called, calls.counts)
    if problem is not None:
        raise TraceError(
            f"torch.fx's trace of {type(model).__name__} does not reproduce the model on the "
            f"example input ({problem}); typically a check such as isinstance(x, torch.Tensor) "
            "that is false for fx's proxies"
        )
    return traced, kept


def _run_model(model: nn.Module, example_inputs: Any) -> tuple[Any, LeafCalls]:
    """The model's own eval output (copied: the traced run may reuse its tensors) and its leaf
    calls."""
    leaves = [m for m in model.modules() if is_leaf(m)]
    try:
        layers = [m for m in leaves if isinstance(m, LAYER_TYPES)]
        with inference(model), LeafCalls(leaves, layers) as calls:
            output = model(*as_args(example_inputs))
    except Exception as exc:
        raise TraceError(f"{type(model).__name__} fails on the example input: "
                         f"{type(exc).__name__}: {exc}") from exc
    expected = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, output)
    return expected, calls


def _call_difference(model: nn.Module, called: dict[fx.Node, nn.Module], calls: Counter
                     ) -> str | None:
    """Outputs can agree by accident (a ReLU that zeroes everything): the leaf calls must too.
    ``called`` maps the graph's module calls to their modules."""
    in_graph = Counter(id(module) for module in called.values() if is_leaf(module))
    if in_graph == calls:
        return None
    names = {id(m): name for name, m in model.named_modules()}
    for key in (*calls, *in_graph):
        if calls[key] != in_graph[key]:
            return (f"{names.get(key) or 'a layer'} runs {calls[key]} time(s) in the model and "
                    f"{in_graph[key]} in the trace")
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


# ------------------------------------------------------------------------------ recorded


@dataclass
class _Run:
    recording: Recording
    outcomes: dict[str, PlannedPair | Skip]  # norm key -> decision, in execution order
    dependent: set[str]  # keys of pairs whose routing may depend on the input's values
    called: Counter  # module path -> calls in this run
    notes: list[str]


def analyse_recorded(model: nn.Module, example_inputs: Any, extra_inputs: Sequence[Any],
                     allow_graph_rewrite: bool, fx_error: TraceError,
                     notes: Sequence[str] = ()) -> Analysis:
    """Pair norms from recorded forwards (see the module doc). Raises ``ModelInputError``
    when the model itself rejects an input, ``TraceError`` when recording is impossible."""
    from bnfold.graph import Analysis, _plan_notes

    inputs = [example_inputs, *extra_inputs]
    try:
        runs = [_run(record(model, inputs_), allow_graph_rewrite) for inputs_ in inputs]
    except ModelInputError:
        raise
    except Exception as exc:  # a model neither fx nor recording can read
        raise TraceError(
            f"cannot analyse {type(model).__name__}: {fx_error} Recording a real forward failed "
            f"too: {type(exc).__name__}: {exc}. Pass a torch.export program (.pt2) of the model, "
            "or report this model to bnfold."
        ) from exc
    pairs, skips, merge_notes = _merge(runs)
    skips, affine_notes = affine_skips_to_notes(skips)
    first = runs[0].recording
    plan = Plan(
        pairs=tuple(p.record for p in pairs),
        skipped=tuple(skips),
        method="recorded",
        model_was_training=model.training,
        notes=(*notes, *_recorded_notes(model, runs, fx_error), *_plan_notes(model, pairs),
               *merge_notes, *affine_notes,
               *dict.fromkeys(n for run in runs for n in run.notes)),
    )
    traced = Traced(module=first.module, method="recorded")
    return Analysis(plan=plan, traced=traced, pairs=tuple(pairs))


def _run(recording: Recording, allow_graph_rewrite: bool) -> _Run:
    from bnfold.graph import decide

    pairs, skips, notes = decide(recording.module, recording.kept, allow_graph_rewrite,
                                 extra_uses=recording.outside_uses)
    by_node = {p.norm.node: p for p in pairs}
    skip_nodes = _skip_nodes(recording.module, skips)
    outcomes: dict[str, PlannedPair | Skip] = {}
    occurrences: Counter = Counter()
    dependent: set[str] = set()
    for node in recording.module.graph.nodes:
        outcome = by_node.get(node) or skip_nodes.get(node)
        if outcome is None:
            continue
        name = outcome.record.bn if not isinstance(outcome, Skip) else outcome.bn
        key = f"{name}#{occurrences[name]}"
        occurrences[name] += 1
        outcomes[key] = outcome
        if not isinstance(outcome, Skip) and recording.first_read is not None:
            dependent.add(key)  # after a read of values any module may be called anywhere
    for loose in recording.loose_norms:
        name = f"{loose.where or 'forward'}:{loose.op}"
        key = f"{name}#{occurrences[name]}"
        occurrences[name] += 1
        outcomes[key] = Skip(bn=name, bn_type=loose.op, reason=SkipReason.NOT_TRACEABLE,
                             detail=f"{loose.op} runs in {loose.where or 'the model forward'} "
                             "outside a registered BatchNorm module", bn_kind=BnKind.FUNCTIONAL)
    called = Counter(n.target for n in recording.module.graph.nodes if n.op == "call_module")
    return _Run(recording, outcomes, dependent, called, list(notes))


def _skip_nodes(gm: fx.GraphModule, skips: list[Skip]) -> dict[fx.Node, Skip]:
    """Skips are emitted in node order, one per norm call: match them back to their nodes."""
    remaining: dict[str, list[Skip]] = {}
    for skip in skips:
        remaining.setdefault(skip.bn, []).append(skip)
    matched = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and remaining.get(str(node.target)):
            matched[node] = remaining[str(node.target)].pop(0)
    return matched


def _merge(runs: list[_Run]) -> tuple[list[PlannedPair], list[Skip], list[str]]:
    keys = list(dict.fromkeys(key for run in runs for key in run.outcomes))
    pairs: list[PlannedPair] = []
    skips: list[Skip] = []
    notes: list[str] = []
    layer_runs: dict[str, int] = {}
    for key in keys:
        outcome, note = _merged_outcome(key, runs)
        if not isinstance(outcome, Skip):
            run_index = next(i for i, run in enumerate(runs) if key in run.outcomes)
            layer = outcome.record.producer
            if layer_runs.setdefault(layer, run_index) != run_index:
                outcome = _dependent_skip(outcome, "its layer's other norm pairs on another "
                                          "recorded input")
        (pairs if not isinstance(outcome, Skip) else skips).append(outcome)
        if note and not isinstance(outcome, Skip):
            notes.append(note)
    return pairs, skips, notes


def _merged_outcome(key: str, runs: list[_Run]) -> tuple[PlannedPair | Skip, str | None]:
    present = [(i, run.outcomes[key]) for i, run in enumerate(runs) if key in run.outcomes]
    first = present[0][1]
    if isinstance(first, Skip):
        return first, None
    signature = _signature(first)
    for index, outcome in present[1:]:
        if isinstance(outcome, Skip) or _signature(outcome) != signature:
            what = (f"skipped ({outcome.reason.label})" if isinstance(outcome, Skip)
                    else f"paired with {outcome.record.producer}")
            return _dependent_skip(first, f"paired with {first.record.producer} on input 0 but "
                                   f"{what} on input {index}"), None
    for index, run in enumerate(runs):
        if key in run.outcomes:
            continue
        if run.called[first.record.producer] or run.called[first.record.bn]:
            return _dependent_skip(first, f"{first.record.producer} and {first.record.bn} do "
                                   f"not run as a pair on input {index}"), None
    if not any(key in runs[i].dependent for i, _ in present):
        return first, None
    read = next(run.recording.read_detail for run in runs if run.recording.first_read is not None)
    if len(runs) == 1:
        return _dependent_skip(first, f"the forward reads tensor values ({read}), so another "
                               "input may route it differently; one example input cannot show "
                               "otherwise"), None
    return first, (f"{first.record.bn}: the forward reads tensor values ({read}); paired with "
                   f"{first.record.producer} identically on all {len(runs)} recorded inputs, "
                   "and folded on that evidence")


def _signature(pair: PlannedPair) -> tuple:
    return (pair.record.producer, pair.record.pattern, pair.position)


def _dependent_skip(pair: PlannedPair, detail: str) -> Skip:
    return Skip(bn=pair.record.bn, bn_type=pair.record.bn_type,
                reason=SkipReason.INPUT_DEPENDENT, detail=detail,
                producer=pair.record.producer, pattern=pair.record.pattern,
                bn_kind=pair.norm.kind)


def _recorded_notes(model: nn.Module, runs: list[_Run], fx_error: TraceError) -> list[str]:
    shapes = "; ".join(", ".join(str(list(s)) for s in run.recording.input_shapes)
                       for run in runs)
    notes = [
        f"torch.fx could not read the model ({_first_sentence(fx_error)}); the dataflow was "
        f"recorded from {len(runs)} eval forward(s) and norms fold at module level in the "
        "model itself",
        f"recorded at input shapes {shapes}: control flow on input shapes is assumed to route "
        "layers the same way at other shapes",
    ]
    reads = [run.recording.read_detail for run in runs if run.recording.first_read is not None]
    if reads:
        notes.append(f"the forward reads tensor values ({reads[0]}): a pair folds only when "
                     "every recorded input pairs it identically")
    called = {path for run in runs for path in run.called}
    idle = [name for name, m in model.named_modules()
            if name and name not in called and (isinstance(m, _BatchNorm) or is_frozen_norm(m))]
    if idle:
        notes.append(f"{len(idle)} batch norm module(s) never ran on the recorded inputs and are "
                     f"left as they are: {', '.join(idle[:5])}{' ...' if len(idle) > 5 else ''}")
    return notes


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0]
