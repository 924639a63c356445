"""Batch norms inside the subgraphs of higher-order ops (``torch.cond`` branches, loop bodies)
of a traced or exported graph.

The pairing reads the top-level graph, so every batch norm in a subgraph stays, with a skip that
keeps it in the plan: ``SkipReason.INPUT_DEPENDENT`` inside control flow (a subgraph runs when,
and as often as, its op decides at run time), ``UNSUPPORTED_PATTERN`` inside a wrapper (the
``torch.no_grad`` or ``autocast`` regions of an exported forward). Reads the graph, never
changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from bnfold.find.calls import op_name
from bnfold.find.functional import fetch_attr
from bnfold.find.kernels import BATCH_NORM_KERNELS, COMPOSITE_BATCH_NORMS, higher_order_name
from bnfold.records import BnKind, Skip, SkipReason

_NORM_OPS = (*BATCH_NORM_KERNELS, *COMPOSITE_BATCH_NORMS)


#: Higher-order ops whose subgraphs run as many times as the input decides.
CONTROL_FLOW = {"cond", "while_loop", "map", "map_impl", "scan", "associative_scan"}


def nested_norm_skips(gm: fx.GraphModule) -> tuple[Skip, ...]:
    """A skip for every batch norm in a subgraph that an op of ``gm``'s graph runs."""
    skips: list[Skip] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for name, subgraph in _subgraphs(gm, node):
            where = _Where(name, higher_order_name(node.target))
            skips.extend(_norms_in(subgraph, where, _operand_names(gm, node)))
    return tuple(skips)


@dataclass(frozen=True)
class _Where:
    subgraph: str
    op: str  # the higher-order op's name: "cond", "wrap_with_set_grad_enabled"

    def __str__(self) -> str:
        return f"{self.subgraph} of {self.op}"


def _subgraphs(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, fx.GraphModule]]:
    """The GraphModules an op takes as arguments (``torch.cond``'s two branches)."""
    found = [(arg, _subgraph(gm, arg)) for arg in node.args]
    return [(str(arg.target), graph) for arg, graph in found if graph is not None]


def _subgraph(gm: fx.GraphModule, arg: object) -> fx.GraphModule | None:
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    value = fetch_attr(gm, str(arg.target))
    return value if isinstance(value, fx.GraphModule) else None


def _operand_names(gm: fx.GraphModule, node: fx.Node) -> list[str | None]:
    """For each operand the op passes to its subgraphs (the arguments after the last subgraph,
    a tuple of them flattened: ``cond(pred, true_fn, false_fn, operands)``,
    ``wrap_with_set_grad_enabled(enabled, body, *operands)``), the attribute it reads, if any."""
    graphs = [i for i, a in enumerate(node.args) if _subgraph(gm, a) is not None]
    after = node.args[graphs[-1] + 1 :] if graphs else ()
    flat = [o for a in after for o in (a if isinstance(a, (list, tuple)) else (a,))]
    return [str(o.target) if isinstance(o, fx.Node) and o.op == "get_attr" else None for o in flat]


def _norms_in(subgraph: fx.GraphModule, where: _Where, operands: list[str | None]) -> list[Skip]:
    placeholders = [n for n in subgraph.graph.nodes if n.op == "placeholder"]
    skips = []
    for node in subgraph.graph.nodes:
        if node.op != "call_function":
            continue
        if op_name(node) in _NORM_OPS:
            skips.append(_skip(node, where, _norm_name(node, placeholders, operands)))
        for name, inner in _subgraphs(subgraph, node):  # a cond inside a branch
            skips.extend(_norms_in(inner, _Where(name, higher_order_name(node.target)), []))
    return skips


def _norm_name(node: fx.Node, placeholders: list[fx.Node], operands: list[str | None]) -> str:
    """The module whose weight the batch norm reads (``bn_a`` for ``bn_a.weight``), else the
    node's own name."""
    weight = node.args[1] if len(node.args) > 1 else None
    if isinstance(weight, fx.Node) and weight in placeholders:
        index = placeholders.index(weight)
        attribute = operands[index] if index < len(operands) else None
        if attribute and "." in attribute:
            return attribute.rpartition(".")[0]
    return node.name


def _skip(node: fx.Node, where: _Where, name: str) -> Skip:
    if where.op in CONTROL_FLOW:
        reason = SkipReason.INPUT_DEPENDENT
        detail = (
            f"{name} runs inside {where} (control flow such as torch.cond): whether, and how "
            "often, it runs is decided by the input at run time; batch norms inside control "
            "flow are not folded"
        )
    else:
        reason = SkipReason.UNSUPPORTED_PATTERN
        detail = (
            f"{name} runs inside {where}, a wrapper of the exported program (torch.no_grad or "
            "autocast in the forward): bnfold folds in the program's top-level graph only; "
            "fold the eager model, or export it without that context manager"
        )
    return Skip(
        bn=name, bn_type=op_name(node), reason=reason, detail=detail, bn_kind=BnKind.FUNCTIONAL
    )
