"""Functional and ATen calls read by argument name: the tables match the ops, and a functional
layer's view carries its real padding."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnfold.find.functional import LAYER_ARGS, NORM_ARGS, functional_layer, functional_norm
from bnfold.find.patterns import LayerKind
from bnfold.records import SkipReason

ATEN_TARGETS = [t for t in (*NORM_ARGS, *LAYER_ARGS) if isinstance(t, torch._ops.OpOverload)]


@pytest.mark.parametrize("op", ATEN_TARGETS, ids=str)
def test_aten_argument_names_are_the_schema_names(op) -> None:
    names = NORM_ARGS[op] if op in NORM_ARGS else LAYER_ARGS[op][1]
    assert names == tuple(argument.name for argument in op._schema.arguments)


def test_batch_norm_names_follow_the_python_signature() -> None:
    assert NORM_ARGS[F.batch_norm][:5] == ("input", "running_mean", "running_var", "weight", "bias")


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.wt = nn.Parameter(torch.randn(4, 3, 2, 2))
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("var", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w, None, 1, "same", 2)  # dilation 2 pads 2 on each side
        z = F.conv_transpose2d(y, self.wt, groups=2)
        return F.batch_norm(z, self.mean, self.var, training=True)


def _traced() -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    gm = fx.symbolic_trace(_Functional())
    return gm, {str(n.target.__name__): n for n in gm.graph.nodes if n.op == "call_function"}


def test_functional_layers_read_weight_padding_and_groups() -> None:
    gm, calls = _traced()
    conv = functional_layer(gm, calls["conv2d"])
    assert conv.kind == LayerKind.CONV and conv.weight_attr == "w" and conv.bias is None
    assert (conv.view.in_channels, conv.view.out_channels, conv.view.padding) == (3, 4, (4, 4))
    transposed = functional_layer(gm, calls["conv_transpose2d"])
    assert transposed.kind == LayerKind.CONV_TRANSPOSE and transposed.layout.transposed
    assert (transposed.view.in_channels, transposed.view.out_channels) == (4, 6)


def test_functional_norm_in_training_mode_is_refused() -> None:
    gm, calls = _traced()
    site = functional_norm(gm, calls["batch_norm"])
    assert site.problem.reason == SkipReason.FUNCTIONAL_TRAINING
