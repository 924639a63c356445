"""Recalibrate BatchNorm statistics after fine-tuning with tiny batches, then fold.

    python examples/recalibrate_after_finetuning.py [--out DIR]

The story: a small CNN is trained on images from one camera, then fine-tuned on a few images
from a new, low-contrast camera with batch size 2 (all that fits, say). The weights adapt, but
each BatchNorm's running statistics are an average of noisy 2-image batches: eval accuracy drops.
``bnfold.recalibrate`` recomputes the statistics exactly over the new camera's images (no
gradient, no weight change) and accuracy comes back. Then the model is folded and saved. The
folded model is written to DIR (default: a new temporary folder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import bnfold
from bnfold import zoo

# The synthetic task and the plain training loop of `bnfold demo`: each class is a fixed 3x8x8
# pattern under noise; `contrast` scales the images (a new camera, different pixel statistics).
from bnfold.demo import accuracy, train
from bnfold.demo import synthetic_task as camera_images

CLASSES = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: temp)")
    args = parser.parse_args(argv)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="bnfold-recalibrate-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny convolutions: one thread beats two contending ones

    old_x, old_y = camera_images(1024, seed=1, contrast=1.0)
    new_x, new_y = camera_images(256, seed=3, contrast=0.2)  # the new camera's images
    test_x, test_y = camera_images(512, seed=2, contrast=0.2)  # held out, new camera

    model = zoo.small_cnn(num_classes=CLASSES, width=8)
    train(model, old_x, old_y, batch=32, steps=150, lr=0.05, seed=0)
    old_test_x, old_test_y = camera_images(512, seed=2, contrast=1.0)
    print(
        f"trained on the old camera (batch 32): old-camera test accuracy "
        f"{accuracy(model, old_test_x, old_test_y):.1%}"
    )

    # Fine-tune on the new camera with batch size 2: the weights adapt (with the test batch's
    # own statistics the model scores well), but the running statistics are stale and noisy.
    train(model, new_x, new_y, batch=2, steps=10, lr=0.002, seed=0)
    stale = accuracy(model, test_x, test_y)
    print(
        f"fine-tuned on the new camera (batch 2): new-camera test accuracy {stale:.1%} "
        f"in eval mode, {accuracy(model, test_x, test_y, bn_batch_stats=True):.1%} with batch "
        "statistics: the running statistics are stale"
    )

    # Recalibrate on the new camera's images, in batches of any size (the statistics are
    # pooled exactly over every image, so the batch size does not matter). Only the
    # BatchNorm running statistics change; Dropout stays off; no gradients.
    batches = [new_x[i : i + 32] for i in range(0, len(new_x), 32)]
    report = bnfold.recalibrate(model, batches)
    recovered = accuracy(model, test_x, test_y)
    print(report.format_text())
    print(f"after bnfold.recalibrate: new-camera test accuracy {recovered:.1%} in eval mode")

    # Fold the recalibrated model: same function, no BatchNorm kernels left.
    example = new_x[:2]
    result = bnfold.fold(model, example)
    folded = accuracy(result.model, test_x, test_y)
    print(f"fold: {result.summary()}; folded model accuracy {folded:.1%}")
    saved = bnfold.save_model(
        result.model, out_dir / "recalibrated.folded.pt2", example_inputs=example, overwrite=True
    )
    print(f"saved {saved.path}")

    if recovered < stale + 0.10 or abs(folded - recovered) > 0.005:
        print(
            "FAILED: recalibration did not recover the accuracy, or the fold changed it",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
