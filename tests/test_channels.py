"""Where a view and the channel-moving ops put a norm's channels, checked against the ops
themselves: a tensor whose every element holds its channel's id goes through the real op, and
what comes out must be the channels the walk says (one channel id per position of the claimed
axis, whatever the other coordinates)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnfold.find.channels import Channels, carry_view
from bnfold.find.passthrough import step


def _ids(shape: tuple[int, ...], channels: Channels) -> torch.Tensor:
    """A tensor of ``shape`` holding at every element the norm channel of its position."""
    view = [1] * len(shape)
    view[channels.axis] = shape[channels.axis]
    return channels.index.view(view).expand(shape).clone()


def _holds(tensor: torch.Tensor, channels: Channels) -> bool:
    """Every element holds ``channels.index`` at its position on ``channels.axis``."""
    return torch.equal(tensor, _ids(tuple(tensor.shape), channels))


@st.composite
def reshapes(draw: st.DrawFn) -> tuple[tuple[int, ...], int, tuple[int, ...], torch.Tensor]:
    """A shape, a channel axis with a random channel order, and another shape of the same size
    made by merging neighbouring dims and splitting dims into factors."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=5)))
    axis = draw(st.integers(0, len(shape) - 1))
    factors = [f for d in shape for f in _factors(d, draw)]
    other, i = [], 0
    while i < len(factors):
        take = draw(st.integers(1, min(3, len(factors) - i)))
        other.append(math.prod(factors[i : i + take]))
        i += take
    index = torch.tensor(draw(st.permutations(range(shape[axis]))), dtype=torch.int64)
    return shape, axis, tuple(other), index


def _factors(dim: int, draw: st.DrawFn) -> list[int]:
    if dim == 4 and draw(st.booleans()):
        return [2, 2]
    return [dim]


@settings(max_examples=400, deadline=None)
@given(reshapes())
def test_a_view_puts_the_channels_where_carry_view_says(case) -> None:
    shape, axis, other, index = case
    channels = Channels(axis, index)
    moved = carry_view(channels, shape, other)
    if moved is not None:
        assert _holds(_ids(shape, channels).reshape(other), moved)
    back = carry_view(channels, shape, other) and carry_view(moved, other, shape)
    if back:  # the way back proves the same channels
        assert _holds(_ids(shape, channels), back)


def test_plain_moves_of_the_channel_axis_are_followed() -> None:
    channels = Channels(2, torch.tensor([2, 0, 1]))
    assert carry_view(channels, (4, 5, 3), (20, 3)) is not None  # LeViT's flatten(0, 1)
    assert carry_view(channels, (4, 5, 3), (4, 5, 3, 1)) is not None
    spread = Channels(1, torch.arange(3))
    assert carry_view(spread, (2, 3, 4), (2, 12)) is not None  # BN -> flatten -> Linear
    merged = carry_view(spread, (2, 3, 4), (6, 4))  # channels merged into the batch dim
    assert merged.axis == 0 and merged.index.tolist() == [0, 1, 2, 0, 1, 2]
    assert carry_view(spread, (2, 3, 4), (3, 8)) is None  # each row mixes two channels


def _graph_of(module: nn.Module, shape: tuple[int, ...]) -> tuple[fx.GraphModule, fx.Node]:
    """The op as a one-node fx graph, with the shapes the walk reads."""
    gm = fx.symbolic_trace(nn.Sequential(module))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    node.args[0].meta["bnfold_shape"] = shape
    node.meta["bnfold_shape"] = tuple(module(torch.zeros(shape)).shape)
    return gm, node


OPS = {
    "channel_shuffle": (nn.ChannelShuffle(3), (2, 6, 2, 2)),
    "pixel_shuffle": (nn.PixelShuffle(2), (1, 8, 2, 3)),
    "pixel_unshuffle": (nn.PixelUnshuffle(2), (1, 2, 4, 2)),
    "flatten": (nn.Flatten(), (2, 3, 2, 2)),
    "unflatten": (nn.Unflatten(1, (3, 2)), (2, 6, 5)),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_channel_moving_op_is_read_the_way_it_moves_them(name: str) -> None:
    module, shape = OPS[name]
    gm, node = _graph_of(module, shape)
    out_shape = node.meta["bnfold_shape"]
    generator = torch.Generator().manual_seed(0)
    in_channels = Channels(1, torch.randperm(shape[1], generator=generator))
    forward = step(gm, node, in_channels, toward_input=False)
    if forward is not None:  # input channels known: where are they after the op?
        assert _holds(module(_ids(shape, in_channels)), forward.channels)
    out_channels = Channels(1, torch.randperm(out_shape[1], generator=generator))
    backward = step(gm, node, out_channels, toward_input=True)
    if backward is not None:  # output channels known: the input channels must produce them
        assert _holds(module(_ids(shape, backward.channels)), out_channels)
    assert forward is not None or backward is not None, name
