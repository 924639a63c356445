"""The stale-statistics story end to end: fine-tuning with batch size 2 leaves running statistics
stale and eval accuracy drops; recalibrating brings it back to the train-mode accuracy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from bnfold import recalibrate
from bnfold.zoo import small_cnn

TEMPLATES = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(99))


def _task(n: int, seed: int, contrast: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes, each a fixed 3x8x8 template under unit noise; ``contrast`` scales the images
    (a new, low-contrast camera: same task, different input statistics)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    images = torch.randn(n, 3, 8, 8, generator=gen) + 0.6 * TEMPLATES[labels]
    return contrast * images, labels


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch: int,
    steps: int,
    lr: float,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bn_train: bool = False
) -> float:
    """Eval accuracy; with ``bn_train`` BNs use the batch's statistics (the train-mode
    accuracy; everything else stays in eval)."""
    for module in model.modules():
        module.training = bn_train and isinstance(module, nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    model.eval()
    return float((predicted == y).float().mean())


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny convolutions run faster on one thread than on several contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_recalibration_recovers_eval_accuracy_after_small_batch_fine_tuning() -> None:
    torch.manual_seed(0)
    x_old, y_old = _task(1024, seed=1)
    x_new, y_new = _task(256, seed=3, contrast=0.2)
    x_test, y_test = _task(512, seed=2, contrast=0.2)
    model = small_cnn(num_classes=4, width=8)
    _train(model, x_old, y_old, batch=32, steps=150, lr=0.05, seed=0)
    # Fine-tune on the new camera's images with batch size 2: the weights adapt, but the
    # running statistics (an EMA of 2-image batches) are stale and noisy.
    _train(model, x_new, y_new, batch=2, steps=10, lr=0.002, seed=1)
    train_mode = _accuracy(model, x_test, y_test, bn_train=True)
    stale = _accuracy(model, x_test, y_test)
    assert train_mode > 0.95
    assert stale < train_mode - 0.15  # the drop

    recalibrate(model, [x_new[i : i + 32] for i in range(0, len(x_new), 32)])
    recovered = _accuracy(model, x_test, y_test)
    assert recovered > train_mode - 0.03  # the recovery
