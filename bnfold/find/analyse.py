"""The find stage's entry: read the model's dataflow (a checked fx trace, else recorded
forwards) and pair every batch norm with a layer, or say why not."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from bnfold.errors import TraceError
from bnfold.find.checked import trace_checked
from bnfold.find.pairing import Analysis, decide, plan_notes
from bnfold.find.recorded import analyse_recorded
from bnfold.find.unwrap import unwrap
from bnfold.records import Plan


def find_pairs(model: nn.Module, example_inputs: Any, *, extra_inputs: Sequence[Any] = ()) -> Plan:
    """Find every batch norm in ``model``'s dataflow and decide whether it can be folded.

    ``example_inputs`` is a tensor or a tuple of positional inputs; eval-mode forwards are run
    (flags restored, no autograd). The model is not changed. Every batch norm ends up in
    exactly one of ``plan.pairs`` or ``plan.skipped`` (with a reason). Wrappers
    (``torch.compile``, ``DataParallel``, ``DistributedDataParallel``) are looked through.
    When torch.fx cannot trace the model, its dataflow is recorded from real forwards instead
    (``plan.method == "recorded"``, see ``bnfold.find.recorded``); ``extra_inputs`` (more example
    inputs, same form) are then recorded too, so pairs behind data-dependent branches can be
    checked on each.
    """
    return analyse(model, example_inputs, extra_inputs=extra_inputs).plan


def analyse(
    model: nn.Module,
    example_inputs: Any,
    *,
    allow_graph_rewrite: bool = True,
    extra_inputs: Sequence[Any] = (),
) -> Analysis:
    """Trace (or record), propagate shapes and pair batch norms with layers (see
    ``find_pairs``)."""
    model, wrapper_notes = unwrap(model)
    try:
        gm, kept = trace_checked(model, example_inputs)
    except TraceError as exc:
        return analyse_recorded(
            model, example_inputs, extra_inputs, allow_graph_rewrite, exc, wrapper_notes
        )
    decisions = decide(gm, kept, allow_graph_rewrite)
    plan = Plan(
        pairs=tuple(p.record for p in decisions.pairs),
        skipped=decisions.skips,
        method="graph-module" if gm is model else "fx",
        model_was_training=model.training,
        notes=(*wrapper_notes, *plan_notes(model, decisions.pairs), *decisions.notes),
    )
    return Analysis(plan=plan, module=gm, pairs=decisions.pairs)
