"""From a batch norm to the layers it can fold into, beyond adjacency.

Backward (layer -> ... -> norm): from the norm's input through channel-preserving ops
(``bnfold.find.passthrough``), into every input of a ``cat`` (each takes its slice of the
channels, or all of them when the cat is along another dim) and every addend of a sum (each takes
the scale; the first one also the shift, so the shift is added once). Forward (norm -> ... ->
layer): from the norm's output through channel-preserving ops and into every piece of a
``split``/``chunk``. Every value on the way must feed only the next op towards the norm (or from
it): the first place where it does not is a fan-out refusal.

A walk *reaches* when every path ends at a Conv/ConvTranspose/Linear call; it is then refused or
not by what it met on the way. The pattern table and the layer conditions are checked afterwards
on each target (``bnfold.find.pairing``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from bnfold.find.calls import call_arguments, op_name, shape_of
from bnfold.find.channels import Channels, start
from bnfold.find.passthrough import Step, step
from bnfold.find.patterns import Refusal
from bnfold.find.recording import recorded_op
from bnfold.find.sites import LayerSite, NormSite, input_of, nodes_in
from bnfold.find.skip_details import describe_node
from bnfold.find.writes import first_write
from bnfold.records import SkipReason

MAX_STEPS = 512  # nodes one walk visits at most


@dataclass(frozen=True)
class Target:
    """One layer a norm folds into: its channels there, and whether it takes the shift."""

    layer: LayerSite
    channels: Channels
    takes_shift: bool = True


@dataclass(frozen=True)
class Reach:
    """What a walk found: the layers, the ops passed, the channels that must have a scale
    ``>= 0`` (max pooling on the way), and the first refusal met."""

    targets: tuple[Target, ...]
    via: tuple[str, ...]
    nonnegative: tuple[torch.Tensor, ...]
    refusal: Refusal | None
    notes: tuple[str, ...] = ()  # what the fold across the ops passed assumes


@dataclass
class _Walk:
    gm: fx.GraphModule
    layers: dict[fx.Node, LayerSite]
    targets: list[Target] = field(default_factory=list)
    via: list[str] = field(default_factory=list)
    nonnegative: list[torch.Tensor] = field(default_factory=list)
    refusal: Refusal | None = None
    notes: list[str] = field(default_factory=list)
    steps: int = 0

    def refuse(self, refusal: Refusal) -> None:
        self.refusal = self.refusal or refusal

    def result(self, reached: bool, backward: bool) -> Reach | None:
        """The walk's findings, the ops in dataflow order."""
        if not reached:
            return None
        via = tuple(reversed(self.via)) if backward else tuple(self.via)
        notes = tuple(dict.fromkeys(self.notes))
        return Reach(tuple(self.targets), via, tuple(self.nonnegative), self.refusal, notes)

    def passed(self, label: str) -> None:
        if label not in self.via:
            self.via.append(label)

    def visit(self) -> bool:
        """Count a node visited; False once the walk has visited ``MAX_STEPS`` (a graph whose
        paths multiply is not followed further: what was not reached is not folded)."""
        self.steps += 1
        return self.steps <= MAX_STEPS

    def back(self, node: fx.Node, reader: fx.Node, channels: Channels, shift: bool) -> bool:
        """Walk from ``node`` (read by ``reader``) towards the layers that produce it."""
        reached = self._back(node, reader, channels, shift)
        if reached:
            self._single_use(node, reader, SkipReason.PRODUCER_FANOUT)
        return reached

    def _back(self, node: fx.Node, reader: fx.Node, channels: Channels, shift: bool) -> bool:
        if not self.visit():
            return False
        if node in self.layers:
            self.targets.append(Target(self.layers[node], channels, shift))
            return True
        parts = _cat_inputs(node, channels) or _addends(node, channels)
        if parts is not None:
            self.passed(parts.label)
            reached = [self.back(n, node, ch, shift and s) for n, ch, s in parts.items]
            return self._merge(reached, parts)
        passed = step(self.gm, node, channels, toward_input=True)
        if passed is None:
            return False
        self._note(passed)
        return self.back(passed.input, node, passed.channels, shift)

    def forward(self, node: fx.Node, channels: Channels) -> bool:
        """Walk from ``node`` towards the layers that read it."""
        if not self.visit():
            return False
        users = [u for u in node.users if _reads_value(u, node)]
        layer_users = [u for u in users if u in self.layers and input_of(u) is node]
        if len(users) != 1 or _uses(users[0], node) != 1:
            if layer_users:  # it feeds a layer, and something else too
                self.targets.append(Target(self.layers[layer_users[0]], channels))
                self._single_use(node, layer_users[0], SkipReason.BN_FANOUT)
                return True
            return False
        user = users[0]
        if user in self.layers:
            if input_of(user) is not node:
                return False
            self.targets.append(Target(self.layers[user], channels))
            return True
        if _cat_of(user, node, channels):
            self.passed("cat")
            return self.forward(user, channels)
        parts = _split_pieces(user, channels)
        if parts is not None:
            self.passed(parts.label)
            return self._merge([self.forward(n, ch) for n, ch, _ in parts.items], parts)
        passed = step(self.gm, user, channels, toward_input=False)
        if passed is None or passed.input is not node:
            return False
        self._note(passed)
        return self.forward(user, passed.channels)

    def _note(self, passed: Step) -> None:
        if passed.refusal is not None:
            self.refuse(passed.refusal)
        if passed.needs_nonnegative:
            self.nonnegative.append(passed.channels.index)
        if passed.note is not None:
            self.notes.append(passed.note)
        self.passed(passed.label)

    def _single_use(self, node: fx.Node, reader: fx.Node, reason: SkipReason) -> None:
        others = [u.name for u in node.users if u is not reader and _reads_value(u, node)]
        if others or _uses(reader, node) > 1:
            feeds = ", ".join(others) or f"{reader.name} twice"
            owner = node.target if node.op == "call_module" else node.name
            self.refuse(Refusal(reason, f"{owner} output also feeds {feeds}"))

    def _merge(self, reached: list[bool], parts: _Parts) -> bool:
        """Every part must reach a layer; a part that does not refuses the whole."""
        if all(reached):
            return True
        if not any(reached):
            return False
        missing = ", ".join(
            n.name for (n, _, _), ok in zip(parts.items, reached, strict=True) if not ok
        )
        self.refuse(
            Refusal(
                SkipReason.NO_PRODUCER,
                f"{missing} in {parts.label} is not produced by (or fed to) a Conv, "
                "ConvTranspose or Linear through per-channel ops; every part must be",
            )
        )
        return True


def producers(gm: fx.GraphModule, layers: dict[fx.Node, LayerSite], norm: NormSite) -> Reach | None:
    """The layers ``norm`` folds into from after them, or None when no walk reaches one."""
    if norm.input is None:
        return None
    walk = _Walk(gm, layers)
    channels = start(norm.params.num_features)
    return walk.result(walk.back(norm.input, norm.node, channels, True), backward=True)


def consumers(gm: fx.GraphModule, layers: dict[fx.Node, LayerSite], norm: NormSite) -> Reach | None:
    """The layers ``norm`` folds into from before them, or None when no walk reaches one."""
    walk = _Walk(gm, layers)
    reached = walk.forward(norm.out, start(norm.params.num_features))
    if reached and norm.input is not None:
        _refuse_writes(gm, walk, norm)
    return walk.result(reached, backward=False)


def _refuse_writes(gm: fx.GraphModule, walk: _Walk, norm: NormSite) -> None:
    """Folded, the norm is an identity: the layers read its input, which no op before the
    last of them may write into (``bnfold.find.writes``)."""
    layers = {target.layer.node: target.layer for target in walk.targets}
    writer = first_write(gm, norm.input, norm.node, layers)
    if writer is not None:
        walk.refuse(
            Refusal(
                SkipReason.IN_PLACE_WRITE,
                f"{describe_node(gm, writer)} writes in place into {norm.name}'s input before "
                f"{', '.join(layer.label for layer in layers.values())} reads {norm.name}'s "
                "output; folded, the layer would read the changed values",
            )
        )


@dataclass(frozen=True)
class _Parts:
    label: str
    items: tuple[tuple[fx.Node, Channels, bool], ...]  # node, its channels, takes the shift


_ADDS = {operator.add, operator.iadd, torch.add}
_CATS = ("cat", "concat", "concatenate")
_SPLITS = ("split", "chunk", "split_with_sizes")


def _cat_inputs(node: fx.Node, channels: Channels) -> _Parts | None:
    """The inputs of a ``cat`` with the channels each holds."""
    if op_name(node) not in _CATS:
        return None
    if node.target is recorded_op:  # the recorded node's inputs are its distinct tensors
        tensors, dim = node.args, _arg(node, 1, "dim", 0)
        if len(_arg(node, 0, "tensors", ())) != len(tensors):
            return None
    else:
        tensors, dim = _arg(node, 0, "tensors", None), _arg(node, 1, "dim", 0)
    shape = shape_of(node)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or shape is None:
        return None
    if not all(isinstance(t, fx.Node) and shape_of(t) is not None for t in tensors):
        return None
    dim %= len(shape)
    items, offset = [], 0
    for tensor in tensors:
        if dim != channels.axis:  # a cat along another dim: every input holds every channel
            items.append((tensor, channels, True))
            continue
        size = shape_of(tensor)[dim]
        items.append((tensor, Channels(dim, channels.index[offset : offset + size]), True))
        offset += size
    if dim == channels.axis and offset != channels.size:
        return None
    return _Parts("cat", tuple(items))


def _cat_of(node: fx.Node, tensor: fx.Node, channels: Channels) -> bool:
    """Whether ``node`` is a ``cat`` of ``tensor`` alone (an identity)."""
    parts = _cat_inputs(node, channels)
    return parts is not None and [n for n, _, _ in parts.items] == [tensor]


def is_sum(node: fx.Node) -> bool:
    """A plain sum of two tensors: ``a + b``, ``torch.add``, ``Tensor.add`` or ATen ``add``,
    with no ``alpha`` other than 1 and no ``out``."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target not in _ADDS and op_name(node) not in ("add", "add_"):
        return False
    kwargs = call_arguments(node)[1]
    if set(kwargs) - {"alpha"} or kwargs.get("alpha", 1) != 1:
        return False
    return len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)


def _addends(node: fx.Node, channels: Channels) -> _Parts | None:
    """The two addends of a sum of equal-shaped tensors; the first takes the shift."""
    shape = shape_of(node)
    if not is_sum(node) or shape is None or any(shape_of(a) != shape for a in node.args):
        return None
    first, second = node.args
    return _Parts("add", ((first, channels, True), (second, channels, False)))


def _split_pieces(node: fx.Node, channels: Channels) -> _Parts | None:
    """The pieces of a ``split``/``chunk`` (read through ``getitem``) with their channels."""
    if op_name(node) not in _SPLITS or node.target is recorded_op:
        return None
    users = list(node.users)
    if not users or not all(
        u.target is operator.getitem and isinstance(u.args[1], int) for u in users
    ):
        return None
    sizes = _piece_sizes(node, channels)
    if sizes is None:
        items = [(u, channels, True) for u in users]  # split along another dim
        return _Parts("split", tuple(items)) if _split_dim(node) is not None else None
    items = []
    for user in users:
        piece = user.args[1]
        if not -len(sizes) <= piece < len(sizes):
            return None
        piece %= len(sizes)
        offset = sum(sizes[:piece])
        index = channels.index[offset : offset + sizes[piece]]
        items.append((user, Channels(channels.axis, index), True))
    return _Parts("split", tuple(items))


def _split_dim(node: fx.Node) -> int | None:
    dim = _arg(node, 2, "dim", 0)
    shape = shape_of(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if not isinstance(dim, int) or shape is None:
        return None
    return dim % len(shape)


def _piece_sizes(node: fx.Node, channels: Channels) -> list[int] | None:
    """The sizes of the pieces when the split is along the channel axis, else None."""
    if _split_dim(node) != channels.axis:
        return None
    name, arg, total = op_name(node), _arg(node, 1, "split_size_or_sections", None), channels.size
    if arg is None:
        arg = node.kwargs.get("chunks", node.kwargs.get("split_size"))
    if name == "chunk" and isinstance(arg, int) and arg > 0:
        sizes = _even(total, -(-total // arg))
    elif name == "split" and isinstance(arg, int) and arg > 0:
        sizes = _even(total, arg)
    elif name in ("split", "split_with_sizes") and isinstance(arg, (list, tuple)):
        sizes = [int(s) for s in arg]
    else:
        return None
    return sizes if sum(sizes) == total else None


def _even(total: int, size: int) -> list[int]:
    return [min(size, total - first) for first in range(0, total, size)]


def _arg(node: fx.Node, position: int, name: str, default: object) -> object:
    """Argument ``position`` (0: the first) or keyword ``name`` of a call."""
    args, kwargs = call_arguments(node)
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _uses(user: fx.Node, node: fx.Node) -> int:
    """How many times ``user`` reads ``node`` among its arguments."""
    return sum(1 for arg in nodes_in((user.args, user.kwargs)) if arg is node)


_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "sym_size", "sym_numel"}
_SHAPE_OF_ARGUMENT = {"view_as", "reshape_as", "expand_as", "type_as"}  # of their 2nd argument
_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}


def _reads_value(user: fx.Node, node: fx.Node) -> bool:
    """False when ``user`` reads only ``node``'s shape, dtype or device, which a fold keeps."""
    args, name = user.args, op_name(user)
    if name in _SHAPE_METHODS and args[0] is node:
        return node in args[1:]
    if name in _SHAPE_OF_ARGUMENT:
        return args[0] is node
    if user.op == "call_function" and user.target is getattr and args[0] is node:
        return args[1] not in _SHAPE_ATTRIBUTES
    return True
