"""In-place writes into a value: when a fold may not make a layer read a norm's input.

A folded norm becomes an identity, so the layers after it read the norm's *input* where they read
its output, a new tensor, before. An op between the norm and those layers that writes into that
input in place (``x.relu_()``, ``x += y``, ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``,
``x[i] = v``, ``out=x``), directly or through a view of it, would change what they read. The
same holds for a merged block's input: the merged conv reads it at the sum, where the branches
read it before. Which ops may return a view of their input, or the input itself, is a table
(unknown functions count as views). A Python operator whose left operand is the value counts
as a write: torch.fx traces ``x += y`` as ``x + y``.
"""

from __future__ import annotations

import operator
from collections.abc import Collection

import torch.fx as fx

from bnfold.find.calls import op_name
from bnfold.find.functional import writes_first_input
from bnfold.find.passthrough import DROPOUT_OPS, IDENTITY_OPS, PERMUTE_OPS, VIEW_OPS
from bnfold.find.sites import input_of, nodes_in

#: ``x[i] = v``, and the Python operators an augmented assignment on a tensor (``x += y``) is
#: traced as: torch.fx records ``x += y`` as ``x + y`` bound to ``x`` (its proxies have no
#: ``__iadd__``), while the forward itself adds into ``x`` in place. Either may write into ``x``.
_OPERATORS_OR_AUGMENTED = frozenset(
    {
        operator.setitem,
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.mod,
        operator.pow,
        operator.matmul,
        operator.and_,
        operator.or_,
        operator.xor,
        operator.lshift,
        operator.rshift,
    }
)

#: Ops whose result may share memory with their first input: those a norm's map passes that
#: return a view or the input itself (``bnfold.find.passthrough``), and other views and casts.
ALIASING = (
    (IDENTITY_OPS - {"clone"})
    | DROPOUT_OPS
    | VIEW_OPS
    | PERMUTE_OPS
    | frozenset(
        """movedim moveaxis mT H mH expand expand_as narrow select getitem split
        split_with_sizes tensor_split chunk unbind diagonal unfold as_strided to type type_as
        float double half bfloat16 real imag view_as_real view_as_complex""".split()
    )
)


def first_write(
    gm: fx.GraphModule,
    value: fx.Node,
    after: fx.Node,
    readers: Collection[fx.Node],
    ignore: frozenset[fx.Node] = frozenset(),
) -> fx.Node | None:
    """The first node after ``after`` and before the last of ``readers`` (in graph order, the
    order the forward runs), other than those in ``ignore``, that may write into ``value`` or a
    view of it in place."""
    views = _views_of(gm, value)
    waiting = set(readers)
    node = after.next
    while waiting and node.op != "root":
        if node in waiting:
            waiting.discard(node)
        elif node not in ignore and _writes_into(gm, node, views):
            return node
        node = node.next
    return None


def _views_of(gm: fx.GraphModule, value: fx.Node) -> set[fx.Node]:
    """``value`` and every node that may share its memory, transitively."""
    seen, stack = {value}, [value]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in seen and input_of(user) is node and _may_alias(gm, user):
                seen.add(user)
                stack.append(user)
    return seen


def _name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    return op_name(node)


def _may_alias(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op not in ("call_module", "call_method", "call_function"):
        return False
    if _in_place(gm, node):  # returns the tensor it wrote into
        return True
    name = _name(gm, node)
    return not name or name.lstrip("_") in ALIASING


def _writes_into(gm: fx.GraphModule, node: fx.Node, views: set[fx.Node]) -> bool:
    if node.op == "call_function" and node.target in _OPERATORS_OR_AUGMENTED:
        return node.args[0] in views
    if any(n in views for n in nodes_in(node.kwargs.get("out"))):
        return True
    return _in_place(gm, node) and input_of(node) in views


def _in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A call that writes into its first input (a module with ``inplace=True``, or a call
    ``writes_first_input`` names)."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(str(node.target)), "inplace", False) is True
    return writes_first_input(node)
