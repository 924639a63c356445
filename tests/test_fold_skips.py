"""Every skip reason: the batch norm stays, the reason is right, and outputs still match."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from fold_checks import fold_fp64, randomize, rel_error, run
from torch import nn
from torch.nn.utils import parametrize

import bnfold
from bnfold import SkipReason


class Residual(nn.Module):
    """conv output feeds the BN and the residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    """One conv called twice, each call under its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


class TiedWeights(nn.Module):
    """Two conv modules holding the same weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.b(x)


class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 4, 1)
        self.conv_b = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_a(x)) + self.bn(self.conv_b(x))


class BNFanOut(nn.Module):
    """BN output feeds the conv and the identity path."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return self.conv(y) + y


class LinearOn3D(nn.Module):
    """Linear acts on the last dim; BatchNorm1d normalises dim 1 of the same size."""

    def __init__(self, out_features: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(8, out_features)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class FunctionalTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), None, None, training=True)


class Int8WeightConv(nn.Conv2d):
    """Weight-only quantized conv: int8 weights dequantized in forward."""

    def __init__(self) -> None:
        super().__init__(3, 4, 3)
        self.scale = 0.01
        q = torch.randint(-100, 100, self.weight.shape, dtype=torch.int8)
        self.weight = nn.Parameter(q, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype) * self.scale, self.bias)


class StdConv(nn.Conv2d):
    """Weight-standardised conv (as in BiT/timm): folding a scale into W would be undone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias)


class DoubleNorm(nn.BatchNorm2d):
    """A subclass whose forward runs batch norm twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(super().forward(x))


class ScaledInput(nn.BatchNorm2d):
    """A subclass that changes the input before normalising it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * 2)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d shape: batch norm, then an activation, in one module."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class FunctionalAct(nn.Module):
    """BN -> F.relu -> conv, with the activation called as a function."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.bn(x)))


class Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 1.5


class AfterAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + x)


class WrittenInput(nn.Module):
    """bn(h), then an in-place ReLU on h before conv reads bn's output: folded, bn is an
    identity and conv would read relu(h)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)
        self.side = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        y = self.bn(h)
        side = self.side(F.relu(h, inplace=True))
        return self.conv(y) + side


def _hooked_pool() -> nn.Module:
    """BN -> AvgPool2d -> Conv, the pool hooked with a ReLU on its output."""
    model = _seq(nn.BatchNorm2d(3), nn.AvgPool2d(2), nn.Conv2d(3, 4, 1))
    model[1].register_forward_hook(lambda module, args, output: F.relu(output))
    return model


class StatisticsReadElsewhere(nn.Module):
    """The forward reads the BN's running mean itself (fx makes that buffer a constant of its
    own: another tensor object on the same memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) - self.bn.running_mean.view(1, -1, 1, 1)


class ActivatedAtSize(nn.BatchNorm2d):
    """Runs its activation only on inputs wider than 5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out.relu() if x.shape[-1] > 5 else out


def _seq(*layers: nn.Module) -> nn.Module:
    return randomize(nn.Sequential(*layers).eval())


def _parametrized() -> nn.Module:
    model = _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    parametrize.register_parametrization(model[0], "weight", Scale())
    return model


def _weight_normed() -> nn.Module:
    model = _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0] = nn.utils.parametrizations.weight_norm(model[0])
    return model


def _hooked() -> nn.Module:
    model = _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].register_forward_hook(lambda module, args, out: None)
    return model


def _nan_stats() -> nn.Module:
    model = _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].running_var[0] = -1.0
    return model


X4 = (2, 4, 6, 6)
X3 = (2, 3, 6, 6)

CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], SkipReason]] = {
    "residual_fan_out": (lambda: randomize(Residual()), X4, SkipReason.PRODUCER_FANOUT),
    "conv_called_twice": (lambda: randomize(SharedConv()), X4, SkipReason.PRODUCER_SHARED),
    "tied_weights": (lambda: randomize(TiedWeights()), X4, SkipReason.PRODUCER_SHARED),
    "bn_called_twice": (lambda: randomize(SharedBN()), X4, SkipReason.BN_SHARED),
    "bn_statistics_read_elsewhere": (
        lambda: randomize(StatisticsReadElsewhere()),
        X4,
        SkipReason.BN_SHARED,
    ),
    "bn_output_fan_out": (lambda: randomize(BNFanOut()), X4, SkipReason.BN_FANOUT),
    "zero_padded_bn_conv": (
        lambda: _seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)),
        X3,
        SkipReason.ZERO_PADDING,
    ),
    "linear_on_3d_same_size": (lambda: randomize(LinearOn3D()), (2, 8, 8), SkipReason.LINEAR_AXIS),
    "linear_on_3d_other_size": (
        lambda: randomize(LinearOn3D(6)),
        (2, 8, 8),
        SkipReason.CHANNEL_MISMATCH,
    ),
    "bn_3d_then_linear": (
        lambda: _seq(nn.BatchNorm1d(8), nn.Linear(5, 4)),
        (2, 8, 5),
        SkipReason.CHANNEL_MISMATCH,
    ),
    "no_running_stats": (
        lambda: _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
        X3,
        SkipReason.NO_RUNNING_STATS,
    ),
    "functional_training": (lambda: FunctionalTraining(), X3, SkipReason.FUNCTIONAL_TRAINING),
    "int8_weights": (lambda: _seq(Int8WeightConv(), nn.BatchNorm2d(4)), X3, SkipReason.NON_FLOAT),
    "weight_standardised_conv": (
        lambda: _seq(StdConv(3, 4, 3), nn.BatchNorm2d(4)),
        X3,
        SkipReason.UNSUPPORTED_FORWARD,
    ),
    "parametrized": (_parametrized, X3, SkipReason.PARAMETRIZED),
    "weight_norm": (_weight_normed, X3, SkipReason.PARAMETRIZED),
    "hooks": (_hooked, X3, SkipReason.HOOKS),
    "negative_variance": (_nan_stats, X3, SkipReason.NON_FINITE),
    "subclass_two_norms": (
        lambda: _seq(nn.Conv2d(3, 4, 3), DoubleNorm(4)),
        X3,
        SkipReason.UNSUPPORTED_FORWARD,
    ),
    "subclass_changes_input": (
        lambda: _seq(nn.Conv2d(3, 4, 3), ScaledInput(4)),
        X3,
        SkipReason.UNSUPPORTED_FORWARD,
    ),
    "bn_before_conv_transpose": (
        lambda: _seq(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3)),
        X4,
        SkipReason.UNSUPPORTED_PATTERN,
    ),
    "bn_after_add": (lambda: randomize(AfterAdd()), X4, SkipReason.NO_PRODUCER),
    "bn_first_layer": (
        lambda: _seq(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3)),
        X3,
        SkipReason.NON_AFFINE_BETWEEN,
    ),
    "bn_act_subclass_first_layer": (
        lambda: _seq(BatchNormAct(3), nn.Conv2d(3, 4, 3)),
        X3,
        SkipReason.NON_AFFINE_BETWEEN,
    ),
    "conv_act_bn_last_layer": (
        lambda: _seq(nn.Conv2d(3, 4, 3), nn.GELU(), nn.BatchNorm2d(4)),
        X3,
        SkipReason.NON_AFFINE_BETWEEN,
    ),
    "bn_functional_act_conv": (
        lambda: randomize(FunctionalAct()),
        X4,
        SkipReason.NON_AFFINE_BETWEEN,
    ),
    "bn_input_written_in_place": (
        lambda: randomize(WrittenInput()),
        X4,
        SkipReason.IN_PLACE_WRITE,
    ),
    "hooked_op_between": (_hooked_pool, X3, SkipReason.HOOKS),
    "subclass_chooses_by_size": (
        lambda: _seq(nn.Conv2d(3, 4, 3), ActivatedAtSize(4)),
        (2, 3, 8, 8),
        SkipReason.UNSUPPORTED_FORWARD,
    ),
    "bn_after_bn": (
        lambda: _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)),
        X3,
        SkipReason.NO_PRODUCER,
    ),
    "channels_spread_by_pixel_unshuffle": (
        lambda: _seq(nn.Conv2d(3, 4, 3), nn.PixelUnshuffle(2), nn.BatchNorm2d(16)),
        X3,
        SkipReason.NO_PRODUCER,
    ),
}

# What blocks the fold (the module, op or tensor), as the skip's detail must name it.
BLOCKING_OP = {
    "residual_fan_out": "conv output also feeds add",
    "conv_called_twice": "conv is called 2 times",
    "tied_weights": "a's weight tensor",
    "bn_called_twice": "bn is called 2 times",
    "bn_statistics_read_elsewhere": "bn's parameters or buffers are also read elsewhere",
    "bn_output_fan_out": "bn output also feeds add",
    "zero_padded_bn_conv": "1 (Conv2d): it zero-pads",
    "linear_on_3d_same_size": "fc (Linear)",
    "linear_on_3d_other_size": "fc has 6 output channels",
    "bn_3d_then_linear": "1 has 5 input channels",
    "no_running_stats": "1 has track_running_stats=False",
    "functional_training": "F.batch_norm is called with training=True",
    "int8_weights": "0 weight is torch.int8",
    "weight_standardised_conv": "0 (StdConv)",
    "parametrized": "0 has a parametrized",
    "weight_norm": "0 has a parametrized",
    "hooks": "1 has forward hooks",
    "negative_variance": "running_var is negative",
    "subclass_two_norms": "1 (DoubleNorm): its forward runs 2 batch norms",
    "subclass_changes_input": "1 (ScaledInput): its batch norm reads mul",
    "bn_before_conv_transpose": "1 (ConvTranspose2d)",
    "bn_after_add": "x in add is not produced by",
    "bn_first_layer": "0 feeds 1 (ReLU), which feeds 2 (Conv2d)",
    "bn_act_subclass_first_layer": "runs act (ReLU) after its batch norm, between the norm and 1",
    "conv_act_bn_last_layer": "0 (Conv2d) feeds 1 (GELU), which feeds 2",
    "bn_functional_act_conv": "feeds relu, which feeds conv (Conv2d)",
    "bn_input_written_in_place": "relu writes in place into bn's input before conv (Conv2d)",
    "hooked_op_between": "0 feeds 1 (AvgPool2d), which feeds 2 (Conv2d); that module has hooks",
    "bn_after_bn": "1 (BatchNorm2d), which feeds 2; a batch norm folds into a layer, not into",
    "channels_spread_by_pixel_unshuffle": "(PixelUnshuffle) turns (2, 4, 4, 4) into (2, 16, 2, 2)",
    "subclass_chooses_by_size": "decides from the input's size what runs around its batch norm",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_skip_reason_and_outputs_still_match(name: str) -> None:
    build, shape, reason = CASES[name]
    model = build().eval()
    x = torch.randn(shape)
    if reason == SkipReason.NON_FINITE:
        result = bnfold.fold(model, x)
        assert torch.equal(run(model, x).isnan(), run(result.model, x).isnan())
        assert bnfold.count_bn_kernels(result.model, x) == 1
    else:
        result = fold_fp64(model, x)
    reasons = {skip.reason for skip in result.skipped}
    assert reason in reasons, result.skipped
    skip = next(s for s in result.skipped if s.reason == reason)
    assert skip.detail and skip.bn
    assert reason.label and reason.advice()


def test_every_skip_detail_names_what_blocks_the_fold() -> None:
    assert BLOCKING_OP.keys() == CASES.keys()
    for name, (build, shape, reason) in CASES.items():
        plan = bnfold.find_pairs(build().eval(), torch.randn(shape))
        details = [skip.detail for skip in plan.skipped if skip.reason == reason]
        assert any(BLOCKING_OP[name] in detail for detail in details), (name, details)


def test_summary_counts_non_affine_between_by_reason() -> None:
    model = _seq(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.Tanh(), nn.BatchNorm2d(4))
    plan = bnfold.find_pairs(model, torch.randn(*X3))
    assert [skip.reason for skip in plan.skipped] == [SkipReason.NON_AFFINE_BETWEEN] * 2
    assert "2 non-affine op between" in plan.summary()


def test_inplace_cannot_rewrite_functional_norm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4) * 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(self.body(x), self.mean, self.var)

    net = Functional().eval()
    x = torch.randn(*X3)
    expected = run(net, x)
    result = bnfold.fold(net, x, inplace=True)
    assert [s.reason for s in result.skipped] == [SkipReason.NEEDS_GRAPH_REWRITE]
    assert result.model is net
    assert rel_error(expected, run(net, x)) == 0.0


def test_residual_network_folds_everything_except_fan_out() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)

    model = randomize(nn.Sequential(Residual(), Block()))
    result = fold_fp64(model, torch.randn(*X4), folded=2, skipped=1)
    assert {f.pair.bn for f in result.folded} == {"1.bn1", "1.bn2"}
    assert result.skipped[0].bn == "0.bn"


class Writes(nn.Module):
    """bn(h), then ``write`` changes h (or a view of it) before conv reads bn's output."""

    def __init__(self, write: Callable[[torch.Tensor], None], module: nn.Module | None = None):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)
        self.write = write
        self.act = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        y = self.bn(h)
        if self.act is not None:
            self.act(h)
        else:
            self.write(h)
        return self.conv(y)


def _add_into(h: torch.Tensor) -> None:
    h += 1.0


def _set_item(h: torch.Tensor) -> None:
    h[:, 0] = 3.0


WRITES = {
    "method": (lambda h: h.mul_(3.0), None),
    "operator": (_add_into, None),
    "view": (lambda h: h.view(2, -1).clamp_(min=0.0), None),
    "positional_inplace": (lambda h: F.relu(h, True), None),
    "setitem": (_set_item, None),
    "out": (lambda h: torch.mul(h, 2.0, out=h), None),
    "module": (None, nn.ReLU(inplace=True)),
}


@pytest.mark.parametrize("name", WRITES)
def test_a_write_into_the_bn_input_keeps_the_bn(name: str) -> None:
    """Every form of in-place write, directly or through a view, between the BN and the layer
    reading its output keeps the BN (folded, the layer would read the written values)."""
    write, module = WRITES[name]
    model = randomize(Writes(write, module))
    result = fold_fp64(model, torch.randn(*X4), folded=0, skipped=1)
    assert result.skipped[0].reason == SkipReason.IN_PLACE_WRITE


def test_a_write_after_the_layer_read_does_not_block_the_fold() -> None:
    class After(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x * 2
            out = self.conv(self.bn(h))
            h.relu_()
            return out + h

    fold_fp64(randomize(After()), torch.randn(*X4), folded=1, skipped=0)


def test_a_hook_for_every_module_keeps_every_norm() -> None:
    """A global hook that clamps BN outputs would stop firing on a folded BN."""
    model = _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def clamp(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        return out.clamp(-0.5, 0.5) if isinstance(module, nn.BatchNorm2d) else None

    handle = torch.nn.modules.module.register_module_forward_hook(clamp)
    try:
        result = fold_fp64(model, torch.randn(*X3), folded=0, skipped=1)
    finally:
        handle.remove()
    (skip,) = result.skipped
    assert skip.reason == SkipReason.HOOKS and "global module hook" in skip.detail
    fold_fp64(model, torch.randn(*X3), folded=1, skipped=0)  # removed: it folds


@pytest.mark.parametrize("norm_first", [False, True])
def test_folded_weights_a_float16_layer_cannot_hold_keep_the_norm(norm_first: bool) -> None:
    """A zero variance and eps 1e-9 give a scale near 3e4: float16 weights of 10 pass 65504."""
    conv = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        conv.weight.uniform_(-10, 10)
    bn = nn.BatchNorm2d(4, eps=1e-9)
    bn.running_var.zero_()
    model = (nn.Sequential(bn, conv) if norm_first else nn.Sequential(conv, bn)).half().eval()
    x = torch.randn(2, 4, 8, 8).half()
    result = bnfold.fold(model, x)
    (skip,) = result.skipped
    assert skip.reason == SkipReason.WEIGHT_OVERFLOW and "65504" not in skip.detail
    assert "weights would reach" in skip.detail and "float16" in skip.detail
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    same = {"rtol": 0, "atol": 0, "equal_nan": True}
    torch.testing.assert_close(run(model, x), run(result.model, x), **same)
    fold_fp64(model, x, folded=1, skipped=0)  # in float64 the same fold fits


class FlatStatistics(nn.Module):
    """Two BNs whose running statistics are views of one flat storage; the forward reads the
    first one's variance: only that BN stays."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        flat = torch.rand(16) + 0.5
        for index, norm in enumerate((self.b1, self.b2)):
            norm.running_mean = flat[8 * index : 8 * index + 4]
            norm.running_var = flat[8 * index + 4 : 8 * index + 8]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b1(self.c1(x)) + self.b2(self.c2(x))
        return y * self.b1.running_var.view(1, -1, 1, 1)


def test_a_read_of_one_view_of_a_flat_storage_keeps_only_its_norm() -> None:
    model = FlatStatistics().eval()  # float32 as built: a float64 copy would split the storage
    plan = bnfold.find_pairs(model, torch.randn(*X3))
    assert [p.bn for p in plan.pairs] == ["b2"]
    assert [(s.bn, s.reason) for s in plan.skipped] == [("b1", SkipReason.BN_SHARED)]
    shared = model.b1.running_var.untyped_storage().data_ptr()
    assert shared == model.b2.running_var.untyped_storage().data_ptr()  # one flat storage
