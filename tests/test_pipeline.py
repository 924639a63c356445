"""``bnfold.pipeline``: the stage order every command and the demo run, each forward once, the
outputs it names and writes (``bnfold.outputs``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bnfold
from bnfold import pipeline, zoo
from bnfold.errors import SaveError, UsageError
from bnfold.io.models import (
    LoadedModel,
    ModelFormat,
    ModelSource,
    default_output_path,
    output_format,
)
from bnfold.jobs import DataRequest, Job, ModelRequest, VerifyRequest
from bnfold.outputs import written_before_failure

SHAPE = (((2, 3, 32, 32), None),)


def _count_forwards(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Forwards of the loaded model and of its copies (``fold`` works on a copy), run on real
    tensors or traced by ``torch.export``."""
    forwards = {"run": 0, "traced by export": 0}
    real_load = pipeline.load_model

    def load(*args, **kwargs) -> LoadedModel:
        loaded = real_load(*args, **kwargs)

        def count(module: nn.Module, args: tuple) -> None:
            forwards["traced by export" if torch.compiler.is_exporting() else "run"] += 1

        loaded.model.register_forward_pre_hook(count)  # copies of the model keep the hook
        return loaded

    monkeypatch.setattr(pipeline, "load_model", load)
    return forwards


def test_a_fold_runs_the_model_once_before_folding_and_once_after(monkeypatch, tmp_path) -> None:
    forwards = _count_forwards(monkeypatch)
    job = Job(
        "fold",
        ModelRequest("bnfold.zoo:small_cnn", shapes=SHAPE),
        save=True,
        output=tmp_path / "out.pt2",
    )
    report = pipeline.run(job)
    # the find stage's checked trace (which also counts the BN kernels), then the count after
    # folding (which checks the fold); saving the .pt2 traces the folded model
    assert forwards == {"run": 2, "traced by export": 1}
    assert (report.bn_kernels_before, report.bn_kernels_after) == (5, 0)
    assert [Path(o.path) for o in report.outputs] == [tmp_path / "out.pt2"]


def test_inspect_runs_the_model_once(monkeypatch) -> None:
    forwards = _count_forwards(monkeypatch)
    job = Job("inspect", ModelRequest("bnfold.zoo:small_cnn", shapes=SHAPE), fold=False)
    report = pipeline.run(job)
    assert forwards == {"run": 1, "traced by export": 0} and report.bn_kernels_before == 5
    assert report.plan.bn_total == 5 and report.bn_kernels_after is None


def test_a_model_in_memory_goes_through_every_stage(tmp_path) -> None:
    model = zoo.small_cnn().eval()
    x = torch.randn(2, 3, 32, 32)
    batches = [torch.randn(8, 3, 32, 32) * 2 + 1 for _ in range(3)]
    job = Job("api", onnx=tmp_path / "m.onnx", verify=VerifyRequest())
    report = pipeline.process(model, x, job, data=batches)
    assert report.calibration.batches == 3 and report.calibration.samples == 24
    assert len(report.result.folded) == 5 and report.bn_kernels_after == 0
    assert report.export.path == str(tmp_path / "m.onnx")
    assert report.verification.passed
    names = {c.name.split(":")[0] for c in report.verification.candidates}
    assert names == {"folded", "onnx"}
    assert report.written == (str(tmp_path / "m.onnx"),)


def test_a_recalibrated_state_dict_keeps_its_format_and_loads_strictly(tmp_path) -> None:
    torch.save(zoo.small_cnn().state_dict(), tmp_path / "w.pt")
    torch.save(torch.randn(16, 3, 32, 32), tmp_path / "samples.pt")
    job = Job(
        "recalibrate",
        ModelRequest(str(tmp_path / "w.pt"), arch="bnfold.zoo:small_cnn"),
        data=DataRequest(str(tmp_path / "samples.pt"), batch_size=8),
        find=False,
        fold=False,
        save=True,
    )
    report = pipeline.run(job)
    (saved,) = report.outputs
    assert Path(saved.path) == tmp_path / "w.recalibrated.pt" and report.inputs == ()
    assert saved.format is ModelFormat.STATE_DICT and report.data["samples"] == 16
    model = zoo.small_cnn()
    model.load_state_dict(torch.load(saved.path, weights_only=True))  # strict
    assert float(model.state_dict()["block1.1.num_batches_tracked"]) == 2


def test_a_dry_run_names_what_it_would_write_and_writes_nothing(tmp_path) -> None:
    (tmp_path / "out.pt2").write_bytes(b"older")
    job = Job(
        "fold",
        ModelRequest("bnfold.zoo:small_cnn", shapes=SHAPE),
        save=True,
        output=tmp_path / "out.pt2",
        onnx=tmp_path / "out.onnx",
        dry_run=True,
    )
    report = pipeline.run(job)
    assert report.notes == (
        f"would write {tmp_path / 'out.pt2'} (exists: a real run needs --force)",
        f"would write {tmp_path / 'out.onnx'}",
    )
    assert report.outputs == () and report.export is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt2"]


@pytest.mark.parametrize(
    "source, folded, expected",
    [
        (ModelSource(ModelFormat.EXPORTED_PROGRAM, "m/net.pt2"), True, "m/net.folded.pt2"),
        (ModelSource(ModelFormat.STATE_DICT, "m/w.safetensors"), True, "m/w.folded.pt2"),
        (
            ModelSource(ModelFormat.STATE_DICT, "m/w.safetensors"),
            False,
            "m/w.recalibrated.safetensors",
        ),
        (ModelSource(ModelFormat.PICKLED_MODULE, "m/net.pth"), True, "m/net.folded.pth"),
        (ModelSource(ModelFormat.PICKLED_MODULE, "m/net"), False, "m/net.recalibrated.pt"),
        (ModelSource(ModelFormat.EXPORTED_PROGRAM, "m/net.pt2"), False, "m/net.recalibrated.pt2"),
    ],
)
def test_default_output_names(source: ModelSource, folded: bool, expected: str) -> None:
    assert default_output_path(source, folded=folded) == Path(expected)


def test_a_factory_output_goes_to_the_current_directory() -> None:
    source = ModelSource(ModelFormat.FACTORY, "mypkg.models:resnet50")
    assert default_output_path(source, folded=True) == Path.cwd() / "resnet50.folded.pt2"


def test_output_formats_a_folded_model_is_never_a_bare_state_dict() -> None:
    assert output_format(Path("a.pt"), folded=True) is ModelFormat.PICKLED_MODULE
    assert output_format(Path("a.pt"), folded=False, pickled_input=False) is ModelFormat.STATE_DICT
    assert output_format(Path("a.safetensors"), folded=False) is ModelFormat.SAFETENSORS
    for path, pickled in [("a.pt", False), ("a.safetensors", True), ("a.onnx", True)]:
        with pytest.raises(UsageError, match="not an output format for the folded model"):
            output_format(Path(path), folded=True, pickled_input=pickled)


def test_a_failure_after_writing_names_the_files_written() -> None:
    written: list[str] = []
    with pytest.raises(SaveError, match=r"disk full \(already written, complete: a.pt2\)"):
        with written_before_failure(written):
            written.append("a.pt2")
            raise SaveError("disk full")
    with pytest.raises(KeyError), written_before_failure(["a.pt2"]):
        raise KeyError("not a bnfold error: as it is")


def test_a_rejected_input_names_the_layer() -> None:
    job = Job("inspect", ModelRequest("bnfold.zoo:small_cnn", shapes=(((2, 5, 32, 32), None),)))
    with pytest.raises(bnfold.ModelInputError, match=r"layer 'block1\.0'"):
        pipeline.run(job)
