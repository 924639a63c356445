"""``bnfold recalibrate`` end to end: model forms in, model forms out, reports, errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bnfold_cli.console import hooks
from bnfold_cli.main import main

import bnfold
from bnfold.calibrate.data import load_data
from bnfold.jobs import DataRequest, Job
from bnfold.pipeline import process

USER = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)
        self.bn1d = nn.BatchNorm1d(3)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.bn1d(self.fc(self.drop(y.mean((2, 3)))))


def build():
    torch.manual_seed(0)
    return Net().eval()


def batches():
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(n, 3, 8, 8, generator=gen) * 3 + 2 for n in (4, 7, 5)]
"""


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "recal_user.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("recal_user", None)
    torch.save(
        torch.randn(50, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 + 1,
        tmp_path / "data.pt",
    )
    yield tmp_path
    sys.modules.pop("recal_user", None)


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as caught:
        main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return caught.value.code, out, err


def expected_buffers(data: str, **kwargs: object) -> dict[str, torch.Tensor]:
    """What the Python API gives on the same batches."""
    import recal_user

    model = recal_user.build()
    bnfold.recalibrate(model, load_data(data, **kwargs))
    return dict(model.named_buffers())


def assert_buffers(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-6, atol=1e-7), name


def test_pt2_in_pt2_out_with_json_and_plot(work: Path, capsys: pytest.CaptureFixture) -> None:
    import recal_user

    x = torch.randn(2, 3, 8, 8)
    batch = {0: torch.export.Dim.AUTO}
    program = torch.export.export(recal_user.build(), (x,), dynamic_shapes=(batch,))
    torch.export.save(program, work / "model.pt2")
    code, out, err = run(
        capsys,
        "recalibrate",
        "model.pt2",
        "--data",
        "data.pt",
        "--batch-size",
        16,
        "--json",
        "r.json",
        "--plot",
        "shift.png",
    )
    assert code == 0, err
    assert "recalibrated 2 of 2 BatchNorms from 4 batches (50 samples)" in out
    assert "wrote " in out and (work / "model.recalibrated.pt2").exists()
    loaded = bnfold.load_model(work / "model.recalibrated.pt2").model
    expected = expected_buffers("data.pt", batch_size=16)
    assert_buffers(dict(loaded.named_buffers()), expected)
    report = json.loads((work / "r.json").read_text())
    assert report["command"] == "recalibrate" and report["data"]["batch_size"] == 16
    assert [layer["status"] for layer in report["recalibration"]["layers"]] == ["recalibrated"] * 2
    assert (work / "shift.png").read_bytes()[:4] == b"\x89PNG"


def test_state_dict_in_state_dict_out(work: Path, capsys: pytest.CaptureFixture) -> None:
    import recal_user

    torch.save(recal_user.build().state_dict(), work / "weights.pt")
    np.save(work / "data.npy", torch.load(work / "data.pt").double().numpy())
    code, _, err = run(
        capsys,
        "recalibrate",
        "weights.pt",
        "--arch",
        "recal_user:build",
        "--data",
        "data.npy",
        "--seed",
        3,
        "-q",
    )
    assert code == 0, err
    state = torch.load(work / "weights.recalibrated.pt", weights_only=True)
    model = recal_user.build()
    model.load_state_dict(state, strict=True)  # same keys: loads into the architecture
    expected = expected_buffers("data.npy", seed=3, dtype=torch.float32)
    assert_buffers(dict(model.named_buffers()), expected)


def test_factory_callable_data_safetensors_out(work: Path, capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file

    code, out, _ = run(
        capsys,
        "recalibrate",
        "recal_user:build",
        "--data",
        "recal_user:batches",
        "-o",
        "out.safetensors",
        "--json",
        "-",
    )
    assert code == 0
    report = json.loads(out)  # JSON alone on stdout
    assert report["recalibration"]["samples"] == 16
    state = load_file(work / "out.safetensors")
    import recal_user

    model = recal_user.build()
    bnfold.recalibrate(model, recal_user.batches())
    assert_buffers(
        {k: v for k, v in state.items() if "running" in k or "tracked" in k},
        {k: v for k, v in model.named_buffers()},
    )


def test_quiet_prints_nothing(work: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "recalibrate", "recal_user:build", "--data", "data.pt", "-q")
    assert code == 0 and out == "" and err == ""
    assert (work / "build.recalibrated.pt2").exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["recal_user:build"], 2, "--data"),
        (["recal_user:build", "--data", "data.pt", "-o", "out.onnx"], 2, "output format"),
        (["recal_user:build", "--data", "missing.pt"], 3, "no such file"),
        (["recal_user:build", "--data", "bad.pt"], 3, "batch 0"),
        (["recal_user:build", "--data", "data.pt", "--batch-size", 0], 2, "batch-size"),
        (["recal_user:build", "--data", "data.pt", "--mean", "a,b"], 2, "numbers"),
    ],
    ids=["no-data", "bad-suffix", "missing-data", "rejected-batch", "batch-size", "mean"],
)
def test_errors(
    work: Path, capsys: pytest.CaptureFixture, args: list, code: int, message: str
) -> None:
    torch.save(torch.randn(6, 5, 8, 8), work / "bad.pt")  # 5 channels: the conv refuses
    got, out, err = run(capsys, "recalibrate", *args)
    assert got == code and message in out + err
    assert not list(work.glob("*.recalibrated.*")) and not (work / "out.onnx").exists()


def test_existing_output_needs_force(work: Path, capsys: pytest.CaptureFixture) -> None:
    (work / "out.pt2").write_text("keep me")
    code, _, err = run(
        capsys, "recalibrate", "recal_user:build", "--data", "data.pt", "-o", "out.pt2"
    )
    assert code == 2 and "--force" in err and (work / "out.pt2").read_text() == "keep me"
    code, _, _ = run(
        capsys,
        "recalibrate",
        "recal_user:build",
        "--data",
        "data.pt",
        "-o",
        "out.pt2",
        "--force",
        "-q",
    )
    assert code == 0 and (work / "out.pt2").read_bytes()[:2] == b"PK"


def test_plot_without_matplotlib(
    work: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run(
        capsys, "recalibrate", "recal_user:build", "--data", "data.pt", "--plot", "p.png", "-q"
    )
    assert code == 2 and "pip install 'bnfold[plot]'" in err


def test_progress_bar_only_on_a_terminal(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import recal_user

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    job = Job("recalibrate", data=DataRequest("data.pt", batch_size=16), find=False)
    for quiet, stream in [(False, Terminal()), (True, Terminal()), (False, io.StringIO())]:
        monkeypatch.setattr(sys, "stderr", stream)
        data = load_data("data.pt", batch_size=16)
        process(recal_user.build(), (), job, hooks(quiet=quiet), data=data)
        shown = stream.getvalue()
        if isinstance(stream, Terminal) and not quiet:
            assert "Recalibrating" in shown and "sample/s" in shown and "/50" in shown
        else:
            assert shown == ""


def test_help_does_not_import_torch() -> None:
    probe = (
        "import sys\nfrom bnfold_cli.main import main\n"
        "try:\n    main(['recalibrate', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torchrun --standalone --nproc-per-node" in result.stdout


@pytest.fixture
def labelled_npz(work: Path) -> Path:
    """An .npz saved as datasets often are: images and labels, by name."""
    images = torch.load(work / "data.pt").numpy()
    np.savez(work / "set.npz", images=images, labels=np.arange(len(images)))
    return work / "set.npz"


def test_npz_name_picks_the_input(labelled_npz: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(
        capsys,
        "recalibrate",
        "recal_user:build",
        "--data",
        "set.npz:images",
        "--batch-size",
        16,
        "-o",
        "out.pt2",
        "-q",
    )
    assert code == 0, err
    got = dict(bnfold.load_model(labelled_npz.parent / "out.pt2").model.named_buffers())
    assert_buffers(got, expected_buffers("data.pt", batch_size=16))  # the same samples


def test_fold_data_npz_name(labelled_npz: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(
        capsys,
        "fold",
        "recal_user:build",
        "--data",
        "set.npz:images",
        "--batch-size",
        16,
        "--dry-run",
        "--json",
        "-",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["recalibration"]["samples"] == 50


@pytest.mark.parametrize("command", ["recalibrate", "fold"])
@pytest.mark.parametrize(
    ("data", "code", "messages"),
    [
        ("set.npz", 2, ["holds 2 arrays (images, labels)", "pick the input with set.npz:NAME"]),
        ("set.npz:image", 3, ["no array named 'image'", "its arrays: images, labels"]),
    ],
    ids=["several-arrays", "unknown-name"],
)
def test_npz_errors_name_the_arrays(
    labelled_npz: Path,
    capsys: pytest.CaptureFixture,
    command: str,
    data: str,
    code: int,
    messages: list[str],
) -> None:
    quiet = "--dry-run" if command == "fold" else "-q"
    got, out, err = run(capsys, command, "recal_user:build", "--data", data, quiet)
    assert got == code, out + err
    assert err.startswith("error: ") and all(message in err for message in messages), err
    assert not list(labelled_npz.parent.glob("*.recalibrated.*"))
