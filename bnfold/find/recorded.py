"""Pairing from recorded forwards, for models torch.fx cannot trace: each example input is
recorded (``bnfold.find.recording``), paired by the graph pass's own rules, and the decisions are
merged. Norms fold at module level in the user's own model (``Plan.method == "recorded"``).

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from bnfold.errors import ModelInputError, TraceError, first_line
from bnfold.find.branches import recorded_decisions
from bnfold.find.idle import idle_norms, idle_note, refuse_beside_idle
from bnfold.find.pairing import (
    Analysis,
    Outcome,
    PlannedPair,
    affine_refusals_to_notes,
    decide,
    norm_skip,
    plan_notes,
)
from bnfold.find.patterns import Refusal
from bnfold.find.recording import LooseNorm, Recording, record
from bnfold.find.sites import own_tensors
from bnfold.records import BnKind, Plan, Skip, SkipReason


@dataclass
class _Run:
    recording: Recording
    outcomes: dict[str, Outcome]  # norm key ("name#occurrence") -> decision, in execution order
    called: Counter  # module path -> calls in this run
    notes: list[str]


def analyse_recorded(
    model: nn.Module,
    example_inputs: Any,
    extra_inputs: Sequence[Any],
    allow_graph_rewrite: bool,
    fx_error: TraceError,
    notes: Sequence[str] = (),
    *,
    merge_branches: bool = True,
) -> Analysis:
    """Pair norms from recorded forwards (see the module doc). Raises ``ModelInputError``
    when the model itself rejects an input, ``TraceError`` when recording is impossible."""
    inputs = [example_inputs, *extra_inputs]
    try:
        runs = [
            _run(record(model, inputs_), allow_graph_rewrite, merge_branches) for inputs_ in inputs
        ]
    except ModelInputError:
        raise
    except Exception as exc:  # a model neither fx nor recording can read
        raise TraceError(
            f"cannot analyse {type(model).__name__}: {fx_error} Recording a real forward failed "
            f"too: {first_line(exc)}. Pass a torch.export program (.pt2) of the model, or report "
            "this model to bnfold."
        ) from exc
    pairs, skips, merge_notes = _merge(runs)
    idle = idle_norms(model, _ran(model, runs))
    checked = refuse_beside_idle(model, pairs, idle)
    pairs = [o for o in checked if isinstance(o, PlannedPair)]
    skips += [o for o in checked if isinstance(o, Skip)]
    skips, affine_notes = affine_refusals_to_notes(skips)
    first = runs[0].recording
    plan = Plan(
        pairs=tuple(p.record for p in pairs),
        skipped=tuple(skips),
        method="recorded",
        model_was_training=model.training,
        notes=(
            *notes,
            *_recorded_notes(model, runs, fx_error),
            *filter(None, [idle_note(idle)]),
            *plan_notes(model, pairs),
            *merge_notes,
            *affine_notes,
            *dict.fromkeys(n for run in runs for n in run.notes),
        ),
    )
    return Analysis(plan=plan, module=first.module, pairs=tuple(pairs))


def _run(recording: Recording, allow_graph_rewrite: bool, merge_branches: bool) -> _Run:
    decisions = decide(
        recording.module, recording.kept, allow_graph_rewrite, extra_uses=recording.outside_uses
    )
    decisions = recorded_decisions(recording.module, decisions, merge_branches)
    loose = [_loose_skip(norm) for norm in recording.loose_norms]
    outcomes: dict[str, Outcome] = {}
    occurrences: Counter = Counter()
    for outcome in (*decisions.outcomes, *loose):
        name = outcome.bn if isinstance(outcome, Skip) else outcome.record.bn
        outcomes[f"{name}#{occurrences[name]}"] = outcome
        occurrences[name] += 1
    called = Counter(n.target for n in recording.module.graph.nodes if n.op == "call_module")
    return _Run(recording, outcomes, called, list(decisions.notes))


def _loose_skip(norm: LooseNorm) -> Skip:
    where = norm.where or "the model forward"
    return Skip(
        bn=f"{norm.where or 'forward'}:{norm.op}",
        bn_type=norm.op,
        reason=SkipReason.NOT_TRACEABLE,
        detail=f"{norm.op} runs in {where} outside a registered BatchNorm module",
        bn_kind=BnKind.FUNCTIONAL,
    )


def _merge(runs: list[_Run]) -> tuple[list[PlannedPair], list[Skip], list[str]]:
    """One outcome per norm call over all runs, and the notes of pairs folded on evidence."""
    pairs: list[PlannedPair] = []
    skips: list[Skip] = []
    notes: list[str] = []
    layer_runs: dict[str, int] = {}  # layer -> the first run that pairs it
    for key in dict.fromkeys(key for run in runs for key in run.outcomes):
        outcome, note = _merged_outcome(key, runs)
        if isinstance(outcome, PlannedPair):
            first = next(i for i, run in enumerate(runs) if key in run.outcomes)
            if layer_runs.setdefault(outcome.record.producer, first) != first:
                detail = "its layer's other norm pairs on another recorded input"
                outcome, note = _dependent_skip(outcome, detail), None
        (pairs if isinstance(outcome, PlannedPair) else skips).append(outcome)
        notes.extend([note] if note else [])
    return pairs, skips, notes


def _merged_outcome(key: str, runs: list[_Run]) -> tuple[PlannedPair | Skip, str | None]:
    present = [(i, run.outcomes[key]) for i, run in enumerate(runs) if key in run.outcomes]
    first = present[0][1]
    if isinstance(first, Skip):
        return first, None
    signature = _signature(first)
    for index, outcome in present[1:]:
        if isinstance(outcome, Skip) or _signature(outcome) != signature:
            what = (
                f"skipped ({outcome.reason.label})"
                if isinstance(outcome, Skip)
                else f"paired with {outcome.record.producer}"
            )
            return _dependent_skip(
                first, f"paired with {first.record.producer} on input 0 but {what} on input {index}"
            ), None
    for index, run in enumerate(runs):
        if key in run.outcomes:
            continue
        if run.called[first.record.producer] or run.called[first.record.bn]:
            return _dependent_skip(
                first,
                f"{first.record.producer} and {first.record.bn} do "
                f"not run as a pair on input {index}",
            ), None
    if not any(runs[i].recording.read_detail for i, _ in present):
        return first, None  # after a read of tensor values any module may be called anywhere
    read = next(run.recording.read_detail for run in runs if run.recording.read_detail)
    if len(runs) == 1:
        return _dependent_skip(
            first,
            f"the forward reads tensor values ({read}), so another "
            "input may route it differently; one example input cannot show "
            "otherwise",
        ), None
    return first, (
        f"{first.record.bn}: the forward reads tensor values ({read}); paired with "
        f"{first.record.producer} identically on all {len(runs)} recorded inputs, "
        "and folded on that evidence"
    )


def _signature(pair: PlannedPair) -> tuple:
    return (pair.record.producer, pair.record.pattern, pair.position, pair.record.via)


def _dependent_skip(pair: PlannedPair, detail: str) -> Skip:
    refusal = Refusal(SkipReason.INPUT_DEPENDENT, detail)
    return norm_skip(pair.norm, refusal, pair.record.producer, pair.record.pattern)


def _ran(model: nn.Module, runs: list[_Run]) -> set[str]:
    """The modules the recorded forwards ran: those called, and those whose tensors an op read
    (``bn.forward(y)``, ``F.batch_norm(y, bn.running_mean, ...)``)."""
    read = {key for run in runs for key, count in run.recording.outside_uses.items() if count}
    ran = {path for run in runs for path in run.called}
    for name, module in model.named_modules():
        if name and any(id(t) in read for t in own_tensors(module)):
            ran.add(name)
    return ran


def _recorded_notes(model: nn.Module, runs: list[_Run], fx_error: TraceError) -> list[str]:
    shapes = "; ".join(", ".join(str(list(s)) for s in run.recording.input_shapes) for run in runs)
    reason = first_line(fx_error, with_type=False).split(". ")[0]
    notes = [
        f"torch.fx could not read the model ({reason}); the dataflow was "
        f"recorded from {len(runs)} eval forward(s) and norms fold at module level in the "
        "model itself",
        f"recorded at input shapes {shapes}: control flow on input shapes is assumed to route "
        "layers the same way at other shapes",
    ]
    reads = [run.recording.read_detail for run in runs if run.recording.read_detail]
    if reads:
        notes.append(
            f"the forward reads tensor values ({reads[0]}): a pair folds only when "
            "every recorded input pairs it identically"
        )
    return notes
