"""Helpers for the model-file tests: a user model package, hostile files, a bnfold-free python."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

USER_MODULE = "bnfold_usermodels"
USER_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    """conv→bn→relu, conv→bn with a residual add, pooling, linear→bn1d."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)
        self.bn3 = nn.BatchNorm1d(classes)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.bn3(self.fc(y.mean((2, 3))))


def build():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def build_wide():
    return Net(width=16)


def broken():
    raise RuntimeError("the factory failed on purpose")


def not_a_module():
    return 42
'''


def install_user_module(directory: Path) -> str:
    """Write the user model module into ``directory`` (caller puts it on sys.path)."""
    (directory / f"{USER_MODULE}.py").write_text(USER_SOURCE)
    return USER_MODULE


class MarkerOnLoad:
    """Unpickling this object creates ``path``: proof that a loader executed the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickled_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rewrite_pt2(
    src: Path,
    dst: Path,
    *,
    program: Callable[[dict], None] | None = None,
    members: Callable[[str, bytes], bytes] | None = None,
) -> Path:
    """Copy a .pt2 archive, editing its program JSON and/or any member's bytes."""
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(dst, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if program is not None and "/models/" in info.filename:
                document = json.loads(data)
                program(document)
                data = json.dumps(document).encode()
            if members is not None:
                data = members(info.filename, data)
            target.writestr(info, data)
    return dst


def run_without_bnfold(code: str, *, paths: tuple[Path, ...] = (), cwd: Path) -> str:
    """Run ``code`` in a python that cannot import bnfold (no site, no .pth files, no cwd);
    only torch's site-packages and ``paths`` are importable. Returns stdout; fails on error."""
    site = sysconfig.get_paths()["purelib"]
    prelude = textwrap.dedent(f"""
        import sys, importlib.util
        sys.path.append({site!r})
        sys.path[:0] = {[str(p) for p in paths]!r}
        assert importlib.util.find_spec("bnfold") is None, "bnfold must not be importable"
        assert importlib.util.find_spec("bnfold_cli") is None, "bnfold_cli must not be importable"
    """)
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
