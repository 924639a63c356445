"""The use counts the aliasing rules read: module calls, parameter slots, direct reads."""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
from torch import nn

from bnfold.find.sharing import graph_sharing, has_hooks, is_parametrized


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.twin = nn.Conv2d(3, 3, 1)
        self.twin.weight = self.conv.weight  # one tensor in two parameter slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.conv(x))  # called twice
        return self.twin(y) * self.conv.bias.sum()  # the bias read outside its module


def test_use_counts() -> None:
    model = _Shared()
    gm = fx.symbolic_trace(model)
    sharing = graph_sharing(gm, Counter({id(model.twin.bias): 2}))
    assert sharing.module_calls["conv"] == 2 and sharing.module_calls["twin"] == 1
    assert sharing.tensor_slots[id(model.conv.weight)] == 2
    assert sharing.tensor_slots[id(model.conv.bias)] == 1
    assert sharing.outside_reads[id(model.conv.bias)] == 1
    assert sharing.outside_reads[id(model.twin.bias)] == 2  # the extra reads of a recording
    assert sharing.attr_users["conv.bias"] == 1


def test_hooks_and_parametrizations_are_seen() -> None:
    conv = nn.Conv2d(3, 3, 1)
    assert not has_hooks(conv) and not is_parametrized(conv)
    conv.register_forward_pre_hook(lambda module, args: None)
    assert has_hooks(conv)
    normed = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 1))
    assert is_parametrized(normed)
