"""Batch norms that did not run on the example inputs, and the folds they make unsafe.

What runs can depend on more than the example: a Python argument, the input's size or a module
setting may route a layer to another norm (a BN per task, domain, resolution or width beside one
conv: ``bn_a``/``bn_b``, ``bns[domain]``). A norm that sat out the analysed forwards is *idle*:
nothing is known of what it would read. Folded, a layer beside it would feed it scaled values
where it runs. So a pair is refused (``SkipReason.INPUT_DEPENDENT``) when an idle norm of the
same channel count is registered beside the pair's norm or one of its layers (in the same
module, looking through ``ModuleList``/``ModuleDict`` storage): it could stand in for the norm.
Idle norms elsewhere (an auxiliary head that runs only in training) leave pairs alone; a plan
note lists the idle norms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.find.pairing import Outcome, PlannedPair, norm_skip
from bnfold.find.patterns import Refusal
from bnfold.find.sites import is_frozen_norm
from bnfold.records import SkipReason

_STORAGE = (nn.ModuleList, nn.ModuleDict)


def idle_norms(model: nn.Module, ran: set[str]) -> list[str]:
    """The batch norms of ``model`` whose path is not in ``ran``, in module order."""
    return [
        name
        for name, module in model.named_modules()
        if name and name not in ran and _is_norm(module)
    ]


def idle_note(idle: Sequence[str]) -> str | None:
    """A note naming the idle batch norms, if any."""
    if not idle:
        return None
    more = " ..." if len(idle) > 5 else ""
    return (
        f"{len(idle)} batch norm module(s) never ran on the example inputs and are left as "
        f"they are: {', '.join(idle[:5])}{more}"
    )


def refuse_beside_idle(
    model: nn.Module, outcomes: Iterable[Outcome], idle: Sequence[str]
) -> tuple[Outcome, ...]:
    """``outcomes`` with every pair that has an idle module beside it turned into a skip."""
    owners: dict[str, list[str]] = {}
    for name in idle:
        owners.setdefault(_owner(model, name), []).append(name)
    return tuple(_checked(model, outcome, owners) for outcome in outcomes)


def _checked(model: nn.Module, outcome: Outcome, owners: dict[str, list[str]]) -> Outcome:
    if not isinstance(outcome, PlannedPair) or not owners:
        return outcome
    width = outcome.record.channels
    members = [(outcome.norm.name, outcome.norm.module)]
    members += [(t.layer.name, t.layer.module) for t in outcome.targets]
    for name, module in members:
        beside = owners.get(_owner(model, name), []) if module is not None else []
        stand_ins = [idle for idle in beside if _width(model.get_submodule(idle)) == width]
        if stand_ins:
            return norm_skip(
                outcome.norm,
                Refusal(SkipReason.INPUT_DEPENDENT, _detail(stand_ins[0], name)),
                outcome.record.producer,
                outcome.record.pattern,
            )
    return outcome


def _detail(idle: str, name: str) -> str:
    return (
        f"{idle}, beside {name}, did not run on the example inputs: another input, argument "
        f"or setting may route {name} to it, where the fold would be wrong; pass example "
        "inputs that run it (extra_inputs), or delete it if the model never uses it"
    )


def _owner(model: nn.Module, path: str) -> str:
    """The module ``path`` is registered in, looking through ModuleList/ModuleDict."""
    parent = path.rpartition(".")[0]
    while parent and isinstance(model.get_submodule(parent), _STORAGE):
        parent = parent.rpartition(".")[0]
    return parent


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) or is_frozen_norm(module)


def _width(module: nn.Module) -> int | None:
    mean = getattr(module, "running_mean", None)
    return mean.numel() if isinstance(mean, torch.Tensor) else None
