"""Checking an fx trace in about one forward: kept leaf calls, reused only when provably equal."""

from __future__ import annotations

import torch
from torch import nn

import bnfold
from bnfold.find.leafcalls import LeafCalls
from bnfold.modes import eval_mode


def _conv() -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 3)


def _run(conv: nn.Conv2d, x: torch.Tensor, **kwargs) -> tuple[LeafCalls, torch.Tensor]:
    with torch.no_grad(), LeafCalls([conv], [conv], **kwargs) as calls:
        y = conv(x)
    return calls, y


def test_equal_arguments_reuse_the_result_and_calls_are_counted() -> None:
    conv, x = _conv(), torch.randn(1, 3, 8, 8)
    calls, y = _run(conv, x)
    assert calls.counts[id(conv)] == 1
    reused, result = calls.reuse(conv, (x.clone(),), {})
    assert reused and result is y
    assert calls.reuse(conv, (x,), {}) == (False, None)  # each kept call is taken once


def test_different_arguments_are_not_reused() -> None:
    conv, x = _conv(), torch.randn(1, 3, 8, 8)
    changed = x.clone()
    changed[0, 0, 0, 0] += 1e-6
    assert not _run(conv, x)[0].reuse(conv, (changed,), {})[0]
    assert not _run(conv, x)[0].reuse(conv, (x.double(),), {})[0]
    assert not _run(conv, x)[0].reuse(conv, (x,), {"extra": 1})[0]
    nan = torch.full_like(x, float("nan"))
    assert not _run(conv, nan)[0].reuse(conv, (nan,), {})[0]  # NaN never compares equal


def test_a_result_changed_in_place_afterwards_is_not_reused() -> None:
    conv, x = _conv(), torch.randn(1, 3, 8, 8)
    calls, y = _run(conv, x)
    y.relu_()
    assert calls.reuse(conv, (x,), {}) == (False, None)


def test_nothing_is_kept_beyond_the_budget_but_calls_are_still_counted() -> None:
    conv, x = _conv(), torch.randn(1, 3, 8, 8)
    calls, _ = _run(conv, x, keep_bytes=x.nbytes)
    assert calls.counts[id(conv)] == 1
    assert calls.reuse(conv, (x,), {}) == (False, None)


def test_a_leaf_with_its_own_hooks_is_counted_not_reused() -> None:
    conv, x = _conv(), torch.randn(1, 3, 8, 8)
    conv.register_forward_hook(lambda module, args, out: out * 2)
    calls, _ = _run(conv, x)
    assert calls.counts[id(conv)] == 1
    assert calls.reuse(conv, (x,), {}) == (False, None)


def test_forward_is_restored_including_an_instance_override() -> None:
    conv, x = _conv(), torch.randn(1, 3, 8, 8)
    _run(conv, x)
    assert "forward" not in conv.__dict__
    own = conv.forward
    conv.forward = lambda t: own(t) + 1  # the user's own instance attribute
    patched = conv.forward
    _, y = _run(conv, x)
    assert conv.forward is patched
    assert torch.equal(y, own(x) + 1)


def test_only_outermost_leaf_calls_are_counted() -> None:
    class Outer(nn.Conv2d):  # a leaf that calls another leaf
        def __init__(self) -> None:
            super().__init__(3, 3, 1)
            self.inner = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(super().forward(x))

    outer = Outer()
    with torch.no_grad(), LeafCalls([outer, outer.inner]) as calls:
        outer(torch.randn(1, 3, 4, 4))
    assert calls.counts == {id(outer): 1}


def test_an_unfaithful_in_place_op_on_a_reused_output_is_caught() -> None:
    """fx takes the isinstance branch the model does not, and scales the conv's output in place.
    The traced run reuses that very tensor (it is also the model's output): the check must
    compare against a copy, or both would change together."""

    class Trap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(self.bn(x))
            if not isinstance(y, torch.Tensor):  # fx: true for its proxies
                y.mul_(2)
            return y

    x = torch.randn(2, 3, 4, 4)
    result = bnfold.fold(Trap().eval(), x)
    assert result.plan.method == "recorded"
    assert any("does not reproduce the model" in note for note in result.plan.notes)


def test_eval_mode_restores_flags_a_forward_changed() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    model[0].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        model[0].train()  # a forward that flips a flag
    assert [m.training for m in model.modules()] == [True, False, True]
