"""BatchNorm subclasses whose forward does more than batch norm (an activation, a dropout, a
guard): find the one batch norm inside, and build the forward without it.

The subclass forward is traced with real example values (``trace_guarded``), so shape checks
and guards such as ``if x.numel() > 0`` are decided by the example and recorded in the notes.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from bnfold.find.functional import (
    erase_dead_code,
    erase_norm,
    functional_norm,
    is_norm_call,
)
from bnfold.find.guards import describe, reads_sizes, trace_guarded
from bnfold.find.patterns import Refusal
from bnfold.find.sites import NormSite
from bnfold.records import SkipReason


def strip_norm(site: NormSite, example_args: tuple[Any, ...]) -> None:
    """Fill ``site.params``, ``site.extra`` (the forward without its batch norm: an
    ``nn.Identity`` or a GraphModule) and ``site.notes``; or set ``site.problem``."""
    module = site.module
    traced = trace_guarded(module, tuple(example_args))
    if isinstance(traced, str):
        site.problem = _unsupported(site, traced)
        return
    gm = traced.module
    calls = [n for n in gm.graph.nodes if is_norm_call(n)]
    if len(calls) != 1:
        site.problem = _unsupported(site, f"its forward runs {len(calls)} batch norms, expected 1")
        return
    inner = functional_norm(gm, calls[0])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if inner.problem is not None:
        inner.problem = Refusal(inner.problem.reason, f"{site.name}: {inner.problem.detail}")
    problem = inner.problem or _check_inner(site, inner, placeholders)
    if problem is not None:
        site.problem = problem
        return
    site.notes = traced.notes  # read before the graph changes
    on_size = [describe(guard) for guard in traced.guards if reads_sizes(guard)]
    erase_norm(gm.graph, inner, placeholders[0])
    erase_dead_code(gm.graph)
    gm.recompile()
    plain = _returns_its_input(gm.graph, placeholders[0])
    if on_size and not plain:  # the ops kept around the norm were chosen for this size
        site.problem = _unsupported(
            site,
            f"its forward decides from the input's size what runs around its batch norm "
            f"({on_size[0]}); folded, this size's choice would hold at every size",
        )
        return
    site.params = inner.params
    site.extra = nn.Identity() if plain else gm


def _returns_its_input(graph: fx.Graph, placeholder: fx.Node) -> bool:
    """Nothing is left but the input returned as it is (no call, in place or not)."""
    output = next(n for n in graph.nodes if n.op == "output")
    calls = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    return output.args[0] is placeholder and not calls


def _check_inner(site: NormSite, inner: NormSite, placeholders: list[fx.Node]) -> Refusal | None:
    if not placeholders or inner.input is not placeholders[0]:
        reads = f"{inner.input.name}" if inner.input is not None else "no tensor"
        return _unsupported(site, f"its batch norm reads {reads}, not the forward's input")
    params, module = inner.params, site.module
    if (
        params.running_mean is not module.running_mean
        or params.running_var is not module.running_var
    ):
        return _unsupported(site, "its batch norm does not use the module's own statistics")
    return None


def _unsupported(site: NormSite, detail: str) -> Refusal:
    """The refusal of a subclass forward, its detail led by the subclass."""
    return Refusal(SkipReason.UNSUPPORTED_FORWARD, f"{site.name} ({site.type_name}): {detail}")
