"""Batch norms inside the subgraphs of higher-order ops (``torch.cond`` branches, loop bodies)
of a traced or exported graph.

The pairing reads the top-level graph; a subgraph runs when, and as often as, its op decides at
run time. Each batch norm in one stays, with ``SkipReason.INPUT_DEPENDENT``, so that every batch
norm of the model is in the plan. Reads the graph, never changes it.
"""

from __future__ import annotations

import torch.fx as fx

from bnfold.find.calls import op_name
from bnfold.find.functional import fetch_attr
from bnfold.find.kernels import BATCH_NORM_KERNELS, COMPOSITE_BATCH_NORMS
from bnfold.records import BnKind, Skip, SkipReason

_NORM_OPS = (*BATCH_NORM_KERNELS, *COMPOSITE_BATCH_NORMS)


def nested_norm_skips(gm: fx.GraphModule) -> tuple[Skip, ...]:
    """A skip for every batch norm in a subgraph that an op of ``gm``'s graph runs."""
    skips: list[Skip] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for name, subgraph in _subgraphs(gm, node):
            skips.extend(_norms_in(subgraph, f"{name} of {node.name}", _operand_names(node)))
    return tuple(skips)


def _subgraphs(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, fx.GraphModule]]:
    """The GraphModules an op takes as arguments (``torch.cond``'s two branches)."""
    found = []
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = fetch_attr(gm, str(arg.target))
            if isinstance(value, fx.GraphModule):
                found.append((str(arg.target), value))
    return found


def _operand_names(node: fx.Node) -> list[str | None]:
    """For each operand the op passes to its subgraphs, the attribute it reads, if any (the
    operands are the last argument: ``cond(pred, true_fn, false_fn, operands)``)."""
    operands = node.args[-1] if node.args else ()
    if not isinstance(operands, (list, tuple)):
        return []
    return [
        str(o.target) if isinstance(o, fx.Node) and o.op == "get_attr" else None for o in operands
    ]


def _norms_in(subgraph: fx.GraphModule, where: str, operands: list[str | None]) -> list[Skip]:
    placeholders = [n for n in subgraph.graph.nodes if n.op == "placeholder"]
    skips = []
    for node in subgraph.graph.nodes:
        if node.op != "call_function":
            continue
        if op_name(node) in _NORM_OPS:
            skips.append(_skip(node, where, _norm_name(node, placeholders, operands)))
        for name, inner in _subgraphs(subgraph, node):  # a cond inside a branch
            skips.extend(_norms_in(inner, f"{name} of {node.name}", []))
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


def _skip(node: fx.Node, where: str, name: str) -> Skip:
    return Skip(
        bn=name,
        bn_type=op_name(node),
        reason=SkipReason.INPUT_DEPENDENT,
        detail=(
            f"{name} runs inside {where} (a higher-order op such as torch.cond): whether, and "
            "how often, it runs is decided by the input at run time; batch norms inside "
            "control flow are not folded"
        ),
        bn_kind=BnKind.FUNCTIONAL,
    )
