"""Where a batch norm's channels sit in another tensor of the dataflow.

A walk from a norm to a layer through channel-preserving ops (``bnfold.find.reach``) carries a
``Channels``: the axis that holds the norm's channels in the current tensor, and for each position
on that axis the norm channel found there. Views, permutations and shuffles move or reorder the
channels; ``carry_view`` proves from the recorded shapes alone where a view puts them. A position
holds one norm channel wherever it is on the other axes, or the walk stops: an affine map that
differs along another axis is not per-channel there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Channels:
    """``index[j]`` is the norm channel at position ``j`` of axis ``axis``."""

    axis: int
    index: Tensor  # int64

    @property
    def size(self) -> int:
        return self.index.numel()

    def moved(self, axis: int) -> Channels:
        return Channels(axis, self.index)


def start(channels: int) -> Channels:
    """The norm's own input or output: channels on dim 1, in order."""
    return Channels(1, torch.arange(channels))


def gather(index: Tensor, reads: Tensor) -> Tensor:
    """Position ``j`` of the new axis reads position ``reads[j]`` of the old one."""
    return index[reads]


def scatter_unique(index: Tensor, feeds: Tensor, size: int) -> Tensor | None:
    """Position ``i`` of the old axis feeds position ``feeds[i]`` of the new one (of ``size``):
    the norm channel of each new position, or None when a new position would be fed by two
    different norm channels (or by none)."""
    out = torch.full((size,), -1, dtype=torch.int64)
    out[feeds] = index
    if bool((out < 0).any()) or not torch.equal(out[feeds], index):
        return None
    return out


def inverse(permutation: Tensor) -> Tensor:
    """The inverse of a permutation of ``0..n-1``."""
    result = torch.empty_like(permutation)
    result[permutation] = torch.arange(permutation.numel())
    return result


def carry_view(channels: Channels, known: Sequence[int], other: Sequence[int]) -> Channels | None:
    """Where the channels of a tensor of shape ``known`` sit after a reshape to ``other`` (or
    before it: a reshape keeps the flat order, so the relation is the same both ways).

    Channel ``c`` of axis ``a`` covers the flat positions ``(p * L + c) * post + r`` (``L`` the
    axis size, ``post`` the product of the dims after it). An axis ``b`` of the other shape with
    ``post_b`` dividing ``post`` and a size that is a multiple of ``L * post / post_b`` sees
    channel ``(j // m) % L`` at position ``j`` (``m = post / post_b``: dims merged into the
    channel axis); an axis the other way round sees several channel positions per position,
    which must hold one norm channel (dims split off the channel axis)."""
    axis, size = channels.axis, channels.size
    if math.prod(known) != math.prod(other) or math.prod(known) == 0:
        return None
    post = math.prod(known[axis + 1 :])
    for b in _candidates(other, size):
        post_b = math.prod(other[b + 1 :])
        if post % post_b == 0 and other[b] % (size * (post // post_b)) == 0:
            m = post // post_b
            reads = (torch.arange(other[b]) // m) % size
            return Channels(b, gather(channels.index, reads))
        if post_b % post == 0 and size % (other[b] * (post_b // post)) == 0:
            m = post_b // post
            feeds = (torch.arange(size) // m) % other[b]
            index = scatter_unique(channels.index, feeds, other[b])
            if index is not None:
                return Channels(b, index)
    return None


def _candidates(shape: Sequence[int], size: int) -> list[int]:
    """Axes to try, those of the channels' own size first (a plain move of the axis)."""
    axes = [b for b in range(len(shape)) if shape[b] > 1 or size == 1]
    return sorted(axes, key=lambda b: shape[b] != size)


#: Views to sizes given as numbers: what they do to the channels is read from the sizes alone.
SIZED_VIEWS = {"view", "reshape", "unsafe_view"}


def general_view(
    sizes: Sequence[Any], in_shape: tuple, out_shape: tuple, axes: tuple[int, int]
) -> bool:
    """Whether a view to ``sizes`` (its arguments after the input) does to the channels (at
    input axis ``axes[0]``, output axis ``axes[1]``) what the example shows at any size.
    Without size-1 dims the sizes prove it;
    with them, only a view that keeps the channel axis and every dim before it and infers
    (``-1``) no size before the channel axis: ``x.view(n, -1)`` on ``(n, c, 1, 1)`` merges
    ``c`` with what follows at any size, while ``x.reshape(-1, c)`` on ``(n, c, 1)`` is another
    view once that 1 grows."""
    if 1 not in in_shape and 1 not in out_shape:
        return True
    axis, out_axis = axes
    if axis != out_axis or tuple(in_shape[:axis]) != tuple(out_shape[:axis]):
        return False
    return all(index >= axis for index, size in enumerate(view_sizes(sizes)) if size == -1)


def view_sizes(args: Sequence[Any]) -> Sequence[Any]:
    """The sizes a view is called with, given as ``view(n, -1)`` or ``view((n, -1))``."""
    return args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
