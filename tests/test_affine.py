"""Frozen batch norms and other constant per-channel affine modules: proven from the forward,
folded like BN, left alone with a reason otherwise, counted consistently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from wild_checks import fold_checked, folded, reasons
from wild_models import (
    ChannelScale,
    D2FrozenBatchNorm2d,
    FrozenBatchNorm2d,
    NotAffineFrozen,
    randomise,
)

import bnfold
from bnfold.find.affine import prove_affine
from bnfold.find.patterns import Refusal
from bnfold.find.sites import is_affine_candidate, is_frozen_norm
from bnfold.records import BnKind, SkipReason


class Affine(nn.Module):
    """A per-channel module whose forward is given as a function of (self, x)."""

    def __init__(self, n: int, forward) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.rand(n) + 0.5)
        self.t = nn.Parameter(torch.randn(n))
        self.fn = forward

    def forward(self, x: torch.Tensor):
        return self.fn(self, x)


def _col(v: torch.Tensor, rank: int = 4) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (rank - 2))


def _unpacked(m: Affine, x: torch.Tensor) -> torch.Tensor:
    _, c = x.shape[:2]  # SE-block style
    return x * m.s.view(1, c, 1, 1)


def _of_size(m: Affine, x: torch.Tensor) -> torch.Tensor:
    _, c, _, _ = x.size()
    return x * m.s.view(1, c, 1, 1) + m.t.view(1, c, 1, 1)


AFFINE_FORMS = {
    "scale_shift": lambda m, x: x * _col(m.s) + _col(m.t),
    "divide": lambda m, x: (x - _col(m.t)) / _col(m.s),
    "shift_first": lambda m, x: _col(m.s) * (_col(m.t) + x),
    "add_alpha": lambda m, x: torch.add(_col(m.t), x, alpha=2.0),
    "negate_cast": lambda m, x: (-x).to(x.dtype).contiguous() * _col(m.s),
    "sum_of_two": lambda m, x: x * _col(m.s) + x * 0.5 - _col(m.t),
    "batch_norm_call": lambda m, x: F.batch_norm(x, m.t.detach(), m.s.detach(), training=False),
    "metadata_branch": lambda m, x: x * _col(m.s, x.dim()) if x.dim() == 4 else x,
    "channel_count": lambda m, x: (
        x * m.s.reshape(1, x.shape[1], 1, 1) + m.t.view(1, x.size(1), 1, 1)
    ),
    "channel_count_unpacked": lambda m, x: _unpacked(m, x),
    "channel_count_of_size": lambda m, x: _of_size(m, x),
    "channel_count_negative": lambda m, x: x * m.s.view(1, x.shape[-3], 1, 1) + _col(m.t),
}

NOT_AFFINE_FORMS = {
    "relu": (lambda m, x: F.relu(x * _col(m.s)), "'relu' is applied"),
    "square": (lambda m, x: x * x * _col(m.s), "by itself"),
    "value_branch": (lambda m, x: x * 2 if x.mean() > 0 else x, "branches on the values"),
    "last_dim": (lambda m, x: x * m.s, "varies along dim 3"),
    "in_place": (lambda m, x: x.mul_(2.0), "in-place"),
    "tuple_out": (lambda m, x: (x * _col(m.s), x), "not a single tensor"),
    "constant": (lambda m, x: _col(m.s) + torch.zeros_like(x), "'zeros_like' is applied"),
    "training_bn": (lambda m, x: F.batch_norm(x, None, None, training=True), "batch statistics"),
    "width_factor": (lambda m, x: x * _col(m.s) * (x.shape[-1] / 8), "computed from x.shape"),
    "per_sample": (lambda m, x: x * _col(m.s) / x.size(0) + _col(m.t), "computed from x.size"),
    "per_element": (lambda m, x: (x + _col(m.t)) / x.numel(), "computed from x.numel"),
}


@pytest.mark.parametrize("name", sorted(AFFINE_FORMS))
def test_affine_forms_are_proven_with_exact_vectors(name: str) -> None:
    module = Affine(4, AFFINE_FORMS[name]).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    proof = prove_affine(module, (x,))
    assert not isinstance(proof, Refusal), proof
    expected = x * _col(proof.affine.scale) + _col(proof.affine.shift)
    assert torch.allclose(module(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(NOT_AFFINE_FORMS))
def test_other_forms_are_refused_with_the_reason(name: str) -> None:
    forward, detail = NOT_AFFINE_FORMS[name]
    refusal = prove_affine(Affine(4, forward), (torch.randn(2, 4, 3, 4),))
    assert isinstance(refusal, Refusal) and refusal.reason == SkipReason.NOT_AFFINE
    assert detail in refusal.detail


def test_two_d_input_after_linear() -> None:
    module = Affine(6, lambda m, x: x * m.s + m.t).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    proof = prove_affine(module, (x,))
    assert torch.equal(proof.affine.scale, module.s.detach())


def test_candidates_are_user_modules_with_per_channel_tensors_only() -> None:
    assert is_frozen_norm(FrozenBatchNorm2d(4)) and is_frozen_norm(D2FrozenBatchNorm2d(4))
    assert is_affine_candidate(ChannelScale(4)) and not is_frozen_norm(ChannelScale(4))
    assert not is_affine_candidate(nn.PReLU(4))  # torch modules are known, not guessed
    assert not is_affine_candidate(nn.BatchNorm2d(4))
    assert not is_affine_candidate(nn.Sequential(ChannelScale(4)))  # has children

    class Matrix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, 4))

    assert not is_affine_candidate(Matrix())


def _backbone(norm: type[nn.Module], *, linear: bool = False) -> nn.Module:
    if linear:
        return randomise(nn.Sequential(nn.Linear(5, 4), norm(4), nn.ReLU(), nn.Linear(4, 2)))
    return randomise(nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.ReLU(), nn.Conv2d(4, 2, 1)))


@pytest.mark.parametrize("norm", [FrozenBatchNorm2d, D2FrozenBatchNorm2d, ChannelScale])
def test_frozen_and_affine_modules_fold_like_batch_norm(norm: type[nn.Module]) -> None:
    result = fold_checked(_backbone(norm), (torch.randn(2, 3, 6, 6),), method="fx")
    assert folded(result) == {"1": "0"}
    kind = BnKind.AFFINE if norm is ChannelScale else BnKind.FROZEN
    assert result.folded[0].pair.bn_kind == kind
    assert isinstance(result.model[1], nn.Identity)


def test_linear_then_per_feature_affine_on_2d() -> None:
    class Frozen1d(FrozenBatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            return x * scale + (self.bias - self.running_mean * scale)

    result = fold_checked(_backbone(Frozen1d, linear=True), (torch.randn(3, 5),))
    assert folded(result) == {"1": "0"}


def test_not_affine_frozen_norm_is_a_skip_and_a_refused_scale_is_a_note() -> None:
    class Gelu(ChannelScale):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(super().forward(x))

    model = randomise(
        nn.Sequential(nn.Conv2d(3, 4, 3), NotAffineFrozen(4), nn.Conv2d(4, 4, 1), Gelu(4))
    )
    result = fold_checked(model, (torch.randn(2, 3, 6, 6),))
    assert reasons(result) == {"1": "not_affine"}
    assert len(result.skipped) == 1  # the Gelu scale is no norm: a note, not a skip
    assert any(n.startswith("3 (Gelu) left as it is: 'gelu'") for n in result.plan.notes)


def test_frozen_norm_refusals_follow_the_batch_norm_rules() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_a, self.conv_b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.frozen = FrozenBatchNorm2d(4)
            self.hooked = FrozenBatchNorm2d(4)
            self.conv_c = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (
                self.frozen(self.conv_a(x))
                + self.frozen(self.conv_b(x))
                + self.hooked(self.conv_c(x))
            )

    model = randomise(Twice())
    model.hooked.register_forward_hook(lambda m, i, o: None)
    result = fold_checked(model, (torch.randn(2, 3, 4, 4),))
    assert [s.reason for s in result.skipped] == [SkipReason.BN_SHARED] * 2 + [SkipReason.HOOKS]


def test_frozen_norm_with_negative_variance_is_non_finite() -> None:
    model = _backbone(FrozenBatchNorm2d)
    model[1].running_var[1] = -2.0
    result = bnfold.fold(model, torch.randn(2, 3, 6, 6))
    assert reasons(result) == {"1": "non_finite"}


def test_kernel_counter_counts_norms_not_kernels() -> None:
    x = torch.randn(2, 3, 6, 6)
    assert bnfold.count_bn_kernels(_backbone(D2FrozenBatchNorm2d), x) == 1  # F.batch_norm inside
    assert bnfold.count_bn_kernels(_backbone(FrozenBatchNorm2d), x) == 1  # elementwise inside
    assert bnfold.count_bn_kernels(_backbone(ChannelScale), x) == 0  # not a norm
    with_instance_norm = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4), nn.BatchNorm2d(4)
    ).eval()
    assert bnfold.count_bn_kernels(with_instance_norm, x) == 1


def test_frozen_norm_fp32_folds_in_float64() -> None:
    model = _backbone(FrozenBatchNorm2d)
    x = torch.randn(2, 3, 6, 6)
    result = bnfold.fold(model, x)
    reference = model.double()(x.double())
    folded_error = (result.model(x).double() - reference).abs().max()
    original_error = (model.float()(x).double() - reference).abs().max()
    assert folded_error <= 2 * original_error + 1e-7


class SizeScaled(nn.Module):
    """A FrozenBatchNorm2d-style norm whose output also scales with the input's width."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return (x * _col(scale) + _col(shift)) * (x.shape[-1] / 8)


def test_a_frozen_norm_scaled_by_the_input_size_is_kept_and_exact_at_other_sizes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), SizeScaled(6)).double().eval()
    result = bnfold.fold(model, torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert reasons(result) == {"1": "not_affine"}
    assert "x.shape" in result.skipped[0].detail
    for shape in [(2, 4, 8, 8), (1, 4, 6, 6), (3, 4, 12, 12)]:
        x = torch.randn(shape, dtype=torch.float64)
        assert torch.equal(result.model(x), model(x))
