"""Small context managers and input normalisation shared by the stages."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def set_eval(model: nn.Module) -> nn.Module:
    """``model.eval()`` by setting each module's flag: ``torch.export``'s ``.module()`` refuses
    ``eval()`` calls, but its flags mean the same."""
    for module in model.modules():
        if module.training:  # Module.__setattr__ is slow: write only what changes
            module.training = False
    return model


@contextmanager
def eval_mode(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> Iterator[nn.Module]:
    """Put every module in eval mode and restore each module's own flag afterwards (a flag is
    written only where it differs: ``Module.__setattr__`` is slow). ``modules``: the model's
    modules, when the caller already has them."""
    modules = model.modules() if modules is None else modules
    flags = [(module, module.training) for module in modules]
    try:
        for module, training in flags:
            if training:
                module.training = False
        yield model
    finally:
        for module, training in flags:
            if module.training != training:
                module.training = training


@contextmanager
def inference(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd, restored afterwards."""
    with eval_mode(model), torch.no_grad():
        yield model
