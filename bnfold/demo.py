"""The built-in end-to-end demo: stale statistics, recalibration, fold, ONNX export, verify.

A small CNN is trained on a synthetic 4-class task, then fine-tuned with batch size 2 on images
from a "new camera" (same task, much lower contrast). Its weights adapt, but the running
statistics (an EMA of 2-image batches) are stale, so eval accuracy drops. ``recalibrate``
brings it back; the model is folded, exported to ONNX and verified on every available runtime,
through ``bnfold.pipeline`` as the commands do.
Runs in seconds on two CPU cores and needs nothing but bnfold.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bnfold.calibrate.report import CalibrationReport
from bnfold.export import ExportResult
from bnfold.io.paths import NamedPath, plan_paths
from bnfold.jobs import Hooks, Job, VerifyRequest
from bnfold.pipeline import process
from bnfold.records import FoldResult, Record, not_serialised
from bnfold.verification.records import VerificationReport

StepFn = Callable[[str], None]
CLASSES = 4
IMAGE = 8


class DemoNet(nn.Module):
    """A small CNN with BatchNorms that fold (after convs, before the classifier) and two that
    cannot: one after a residual add and one in a pre-activation BN -> ReLU -> Conv."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.post_add = nn.BatchNorm2d(width)
        self.pre_act = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.head_bn = nn.BatchNorm1d(2 * width)
        self.fc = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = self.post_add(torch.relu(x + y))
        x = self.conv3(torch.relu(self.pre_act(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.head_bn(x))


@dataclass(frozen=True)
class DemoResult(Record):
    """The numbers of each step and the files written."""

    accuracy_trained: float  # eval accuracy on the original camera after training
    accuracy_train_mode: float  # new camera, BNs using batch statistics: what the weights can do
    accuracy_stale: float  # new camera, eval mode, stale running statistics
    accuracy_recalibrated: float
    accuracy_folded: float
    calibration: CalibrationReport
    fold: FoldResult
    bn_kernels_before: int
    bn_kernels_after: int
    export: ExportResult
    verification: VerificationReport
    out_dir: str
    seconds: float
    model: nn.Module = field(metadata=not_serialised(), repr=False, compare=False)

    @property
    def written(self) -> tuple[str, ...]:
        return (self.export.path,)

    def format_text(self) -> str:
        """The numbers of each step, for a terminal."""
        fold, verification = self.fold, self.verification
        lines = [
            "",
            "Accuracy",
            f"  trained (original camera)                  {_pct(self.accuracy_trained)}",
            f"  new camera, stale running statistics       {_pct(self.accuracy_stale)}"
            "   <- eval accuracy dropped",
            f"  new camera, BatchNorms on batch statistics {_pct(self.accuracy_train_mode)}",
            f"  after bnfold recalibrate                   {_pct(self.accuracy_recalibrated)}",
            f"  after bnfold fold                          {_pct(self.accuracy_folded)}",
            "",
            f"Recalibrate: {self.calibration.summary()}",
            f"Fold: {fold.summary()}",
            *(f"  kept {skip.bn}: {skip.reason.label} ({skip.detail})" for skip in fold.skipped),
            f"  BatchNorm kernels per forward: {self.bn_kernels_before} -> {self.bn_kernels_after}",
            f"Export: {self.export.path} ({self.export.node_count} ONNX nodes, "
            f"{'dynamic' if self.export.dynamic_batch.proven else 'fixed'} batch)",
            f"Verify: {verification.summary()}",
            *(
                f"  {c.name}: {c.status.value}" + (f" ({c.reason})" if c.reason else "")
                for c in verification.candidates
            ),
            "",
            f"Files in {self.out_dir}",
            f"Done in {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{100 * value:5.1f} %"


def synthetic_task(n: int, seed: int, contrast: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of 4 classes, each a fixed 3x8x8 template under unit noise; ``contrast``
    scales the images (a new camera: same task, different input statistics)."""
    templates = torch.randn(CLASSES, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(99))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    images = torch.randn(n, 3, IMAGE, IMAGE, generator=gen) + 0.6 * templates[labels]
    return contrast * images, labels


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch: int,
    steps: int,
    lr: float,
    seed: int,
) -> None:
    """Plain SGD in train mode on random mini-batches; leaves the model in eval mode."""
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


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bn_batch_stats: bool = False
) -> float:
    """Accuracy in eval mode; with ``bn_batch_stats`` the BatchNorms use the batch's own
    statistics (everything else stays in eval). The model is left in eval mode."""
    for module in model.modules():
        module.training = bn_batch_stats and isinstance(module, nn.modules.batchnorm._BatchNorm)
    try:
        with torch.no_grad():
            predicted = model(x).argmax(dim=1)
    finally:
        model.eval()
    return float((predicted == y).float().mean())


def run_demo(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    step: StepFn | None = None,
    overwrite: bool = False,
    report: str | Path | None = None,
) -> DemoResult:
    """Run every step, writing ``demo.onnx`` into ``out_dir`` (created if missing; None: a new
    temporary directory). ``demo.onnx`` and ``report`` (the JSON file the caller will write) are
    checked before any step: an existing one is replaced only with ``overwrite``."""
    say = step or (lambda message: None)
    start = time.perf_counter()
    outputs = [NamedPath("--json", Path(report))] if report else []
    if out_dir is not None:  # a new temporary directory holds nothing yet
        outputs.insert(0, NamedPath("--out", Path(out_dir) / "demo.onnx", makes_parent=True))
    plan_paths([], outputs, overwrite=overwrite)
    out = Path(out_dir or tempfile.mkdtemp(prefix="bnfold-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x_old, y_old = synthetic_task(1024, seed=seed + 1)
    x_new, y_new = synthetic_task(256, seed=seed + 3, contrast=0.2)
    x_test, y_test = synthetic_task(512, seed=seed + 2, contrast=0.2)
    model = DemoNet()

    say("training a small CNN on synthetic images (batch 32)")
    train(model, x_old, y_old, batch=32, steps=150, lr=0.05, seed=seed)
    trained = accuracy(model, *synthetic_task(512, seed=seed + 2))
    say("fine-tuning on a new camera's images with batch size 2")
    train(model, x_new, y_new, batch=2, steps=10, lr=0.002, seed=seed + 1)
    train_mode = accuracy(model, x_test, y_test, bn_batch_stats=True)
    stale = accuracy(model, x_test, y_test)

    stages = process(
        model,
        x_test[:2],
        Job(
            "demo",
            onnx=out / "demo.onnx",
            verify=VerifyRequest(data=[x_test[:8], x_test[8:40]]),
            force=overwrite,
        ),
        _announce(say),
        data=list(x_new.split(32)),
    )
    return DemoResult(
        accuracy_trained=trained,
        accuracy_train_mode=train_mode,
        accuracy_stale=stale,
        accuracy_recalibrated=accuracy(model, x_test, y_test),
        accuracy_folded=accuracy(stages.result.model, x_test, y_test),
        calibration=stages.calibration,
        fold=stages.result,
        bn_kernels_before=stages.bn_kernels_before,
        bn_kernels_after=stages.bn_kernels_after,
        export=stages.export,
        verification=stages.verification,
        out_dir=str(out),
        seconds=time.perf_counter() - start,
        model=stages.result.model,
    )


def _announce(say: StepFn) -> Hooks:
    """Hooks that say the demo's last steps as the pipeline reaches them."""
    steps = {
        "Folding": "folding BatchNorms into the neighbouring layers",
        "Exporting": "exporting to ONNX and verifying on every available runtime",
    }

    def stage(name: str) -> nullcontext[None]:
        if name.split()[0] in steps:
            say(steps[name.split()[0]])
        return nullcontext()

    def recalibrating(total: int | None) -> nullcontext[None]:
        say("recalibrating BatchNorm statistics on 256 new-camera images")
        return nullcontext()

    return Hooks(stage=stage, recalibrating=recalibrating)
