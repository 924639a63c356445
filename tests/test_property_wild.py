"""Property on random networks with real-world patterns (``wild_nets``): frozen and custom
norms, BN subclasses, control flow fx cannot trace, escaping tensors, keyword calls, in-place
ops, value reads. The fold is exact on every recorded input (and on any input when the forward
reads no values), the caller is untouched, and every norm has a verdict with a reason."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wild_nets import check_wild, wild_net


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_wild_random_networks_fold_exactly_or_skip_with_reason(rng: random.Random) -> None:
    check_wild(wild_net(rng), rng)
