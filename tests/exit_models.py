"""A user module for the exit-code and output tests: factories that misbehave on purpose.

``install(directory)`` writes it as ``bnfold_exit_models.py``; the CLI imports it from the
current directory (factories are ``bnfold_exit_models:NAME``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bnfold_cli.main import main

MODULE = "bnfold_exit_models"
SOURCE = '''
import ctypes
import os
import sys

import torch
from torch import nn


def build():
    """conv -> BN -> ReLU -> conv -> BN, with non-trivial statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def prints():
    print("factory: print")
    os.write(1, b"factory: os.write to fd 1\\n")
    ctypes.CDLL(None).printf(b"factory: C printf\\n")  # buffered by C stdio, flushed later
    return build()


class PrintingForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = build()

    def forward(self, x):
        print("forward: print")
        os.write(1, b"forward: os.write to fd 1\\n")
        return self.body(x)


def prints_in_forward():
    return PrintingForward().eval()


def exits_zero():
    sys.exit(0)


def exits_two():
    sys.exit(2)


def on_meta():
    with torch.device("meta"):
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()


def nan_stats():
    model = build()
    model[1].running_var[2] = float("nan")
    return model


def channels_last():
    return build().to(memory_format=torch.channels_last)


def half():
    return build().half()


def bfloat16():
    return build().bfloat16()


class FixedBatch(nn.Module):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch
        self.body = build()
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.head(self.body(x).view(self.batch, -1))  # the batch size, hard-coded


def batch_one_only():
    return FixedBatch(1).eval()


def batch_two_only():
    return FixedBatch(2).eval()


class Deep(nn.Module):
    """Long module paths, as in real encoders."""

    def __init__(self):
        super().__init__()
        self.encoder_stage_three = nn.ModuleDict({
            "residual_block_seven": nn.ModuleDict({
                "convolution_with_a_long_name": nn.Conv2d(3, 8, 3),
                "batch_normalisation_with_a_long_name": nn.BatchNorm2d(8),
            })
        })
        self.decoder_bn = nn.BatchNorm2d(8)  # after an add: kept, with a reason

    def forward(self, x):
        block = self.encoder_stage_three["residual_block_seven"]
        y = block["batch_normalisation_with_a_long_name"](block["convolution_with_a_long_name"](x))
        return self.decoder_bn(y + y)


def deep():
    return Deep().eval()
'''


def install(directory: Path) -> str:
    """Write the module into ``directory``; returns its name."""
    (directory / f"{MODULE}.py").write_text(SOURCE)
    return MODULE


def run(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """Run ``bnfold ARGS`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as caught:
        main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return caught.value.code, out, err
