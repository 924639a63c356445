"""The stale-statistics story end to end: fine-tuning with batch size 2 leaves running statistics
stale and eval accuracy drops; recalibrating brings it back to the train-mode accuracy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from bnfold import recalibrate
from bnfold.demo import accuracy, synthetic_task, train
from bnfold.zoo import small_cnn


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
    x_old, y_old = synthetic_task(1024, seed=1)
    x_new, y_new = synthetic_task(256, seed=3, contrast=0.2)
    x_test, y_test = synthetic_task(512, seed=2, contrast=0.2)
    model = small_cnn(num_classes=4, width=8)
    train(model, x_old, y_old, batch=32, steps=150, lr=0.05, seed=0)
    # Fine-tune on the new camera's images with batch size 2: the weights adapt, but the
    # running statistics (an EMA of 2-image batches) are stale and noisy.
    train(model, x_new, y_new, batch=2, steps=10, lr=0.002, seed=1)
    train_mode = accuracy(model, x_test, y_test, bn_batch_stats=True)
    stale = accuracy(model, x_test, y_test)
    assert train_mode > 0.95
    assert stale < train_mode - 0.15  # the drop

    recalibrate(model, [x_new[i : i + 32] for i in range(0, len(x_new), 32)])
    recovered = accuracy(model, x_test, y_test)
    assert recovered > train_mode - 0.03  # the recovery
