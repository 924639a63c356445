"""clone_model must be copy.deepcopy, only faster."""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from bnfold.folding.clone import clone_model


class _Tagged(nn.Parameter):
    pass


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 4), nn.Linear(4, 4))
    model[3].weight = model[2].weight  # tied
    model[0].bias.requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)  # left to deepcopy
    model[2].register_buffer("window", torch.arange(12.0)[2:8])  # a view: left to deepcopy
    model[2].register_buffer("head", model[2].window[:3])  # shares the view's storage
    model[1].tag = _Tagged(torch.ones(2))  # a parameter subclass: left to deepcopy
    model[1].running_mean.note = "kept"  # a tensor attribute: left to deepcopy
    return model


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]


def test_same_tensors_as_deepcopy_and_none_shared_with_the_model() -> None:
    model = _model()
    ours, reference = clone_model(model), copy.deepcopy(model)
    originals = {t.untyped_storage().data_ptr() for _, t in _tensors(model)}
    for (name, a), (_, b) in zip(_tensors(ours), _tensors(reference), strict=True):
        assert type(a) is type(b), name
        assert a.requires_grad == b.requires_grad, name
        assert a.stride() == b.stride() and torch.equal(a, b), name
        assert (a.grad is None) == (b.grad is None), name
        assert a.untyped_storage().data_ptr() not in originals, name
    assert ours[3].weight is ours[2].weight  # aliasing kept
    assert ours[2].head.untyped_storage().data_ptr() == ours[2].window.untyped_storage().data_ptr()
    assert ours[1].running_mean.note == "kept"
    assert isinstance(ours[1].tag, _Tagged)


def test_plain_tensors_take_the_fast_path() -> None:
    from bnfold.folding.clone import plain_copies

    model = _model()
    fast = plain_copies(model)
    assert id(model[1].weight) in fast and id(model[1].running_var) in fast
    assert id(model[2].weight) in fast  # tied: copied once, deepcopy's memo shares it
    assert id(model[1]._forward_hooks) in fast  # an empty hook registry: a new empty one
    assert id(model[1]._parameters) not in fast  # not empty: deepcopy's
    for left in (
        model[0].weight,
        model[2].window,
        model[2].head,
        model[1].tag,
        model[1].running_mean,
    ):
        assert id(left) not in fast


class _Registry(OrderedDict):
    pass


def test_empty_dicts_are_new_and_keep_their_type_aliasing_and_attributes() -> None:
    """Each module's empty dicts (hook registries, a user's cache) come out new and empty;
    one dict shared by two modules stays shared in the copy; dict subclasses and dicts with
    attributes of their own are deepcopy's (and come out the same)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    shared: dict = {}
    model[0].cache, model[1].cache = shared, shared
    model[0].registry = _Registry()
    tagged = OrderedDict()
    tagged.note = "kept"
    model[1].tagged = tagged
    model[1].filled = {"a": [1]}
    ours = clone_model(model)
    assert ours[0].cache is ours[1].cache and ours[0].cache is not shared
    assert type(ours[0].registry) is _Registry and ours[0].registry is not model[0].registry
    assert ours[1].tagged.note == "kept" and ours[1].tagged is not tagged
    assert ours[1].filled == {"a": [1]} and ours[1].filled["a"] is not model[1].filled["a"]
    ours[0].register_forward_hook(lambda *args: None)
    ours[0].cache["x"] = 1
    assert not model[0]._forward_hooks and shared == {}  # nothing reaches the original
    assert ours[0]._forward_hooks is not model[0]._forward_hooks
