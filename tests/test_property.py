"""Property: on random networks the fold is exact in float64, and every BN is either folded or
skipped with a reason."""

from __future__ import annotations

from fold_checks import fold_fp64
from hypothesis import HealthCheck, given, settings
from random_nets import RandomNet, example, random_nets
from torch import nn

from bnfold.records import SkipReason


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets())
def test_random_networks_fold_exactly_or_skip_with_reason(net: RandomNet) -> None:
    result = fold_fp64(net, example())
    bn_modules = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    called = {name for name, m in net.named_modules() if m in bn_modules}
    recorded = {f.pair.bn for f in result.folded} | {s.bn for s in result.skipped}
    assert recorded == called  # every generated BN runs, so every BN has a verdict
    for skip in result.skipped:
        assert isinstance(skip.reason, SkipReason) and skip.detail
