"""`bnfold fold MODEL --data DATA`: recalibrate, then fold; verification against the
recalibrated model; example inputs from the first batch when no --input-shape is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bnfold_cli.main import main

from bnfold import zoo


def _run(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as caught:
        main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return caught.value.code, out, err


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    model = zoo.randomize_bn(zoo.small_cnn())
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(
        torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 3 + 1,
        tmp_path / "samples.pt",
    )
    return tmp_path


def test_fold_with_data_folds_the_recalibrated_model(files: Path, capsys) -> None:
    code, _, err = _run(
        capsys,
        "fold",
        files / "weights.pt",
        "--arch",
        "bnfold.zoo:small_cnn",
        "--data",
        files / "samples.pt",
        "--batch-size",
        40,
        "-o",
        files / "out.pt2",
        "--verify",
        "--json",
        files / "report.json",
    )
    assert code == 0, err
    report = json.loads((files / "report.json").read_text())
    recal = report["recalibration"]
    assert len(recal["layers"]) == 5 and recal["samples"] == 40
    assert report["plan"]["summary"] == "5 of 5 BatchNorms foldable"
    assert report["verification"]["candidates"][0]["status"] == "passed"

    # The saved model computes the recalibrated model, not the stale one.
    stale = zoo.small_cnn()
    stale.load_state_dict(torch.load(files / "weights.pt", weights_only=True))
    recalibrated = zoo.small_cnn()
    recalibrated.load_state_dict(stale.state_dict())
    import bnfold

    samples = torch.load(files / "samples.pt", weights_only=True)
    # one batch of all samples, as --batch-size 40 gives: downstream BNs see batch-normalised
    # inputs during recalibration, so the statistics depend on how samples are batched
    bnfold.recalibrate(recalibrated, [samples])
    folded = torch.export.load(files / "out.pt2").module()
    x = samples[:2]
    with torch.no_grad():
        got = folded(x)
        assert torch.allclose(got, recalibrated.eval()(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, stale.eval()(x), atol=1e-2)


def test_first_batch_gives_the_example_input(files: Path, capsys) -> None:
    code, _, err = _run(
        capsys, "fold", files / "weights.pt", "--arch", "bnfold.zoo:small_cnn", "--dry-run"
    )
    assert code == 2 and "--input-shape" in err and "--data" in err
    code, out, err = _run(
        capsys,
        "fold",
        files / "weights.pt",
        "--arch",
        "bnfold.zoo:small_cnn",
        "--data",
        files / "samples.pt",
        "--dry-run",
        "--json",
        "-",
    )
    assert code == 0, err
    assert json.loads(out)["plan"]["summary"] == "5 of 5 BatchNorms foldable"
