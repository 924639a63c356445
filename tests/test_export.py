"""Tests for bnfold.export: checks, dynamic-batch proof, BN refusal, metadata, external data,
atomic writes, exporter fallback. Exports are shared through module-scoped fixtures (a dynamo
export costs about a second)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx_models import (
    ConvNet,
    DataDependent,
    HardCodedBatch,
    TrainingBatchNorm,
    TwoInTwoOut,
    bn_before_conv,
    image,
    mlp_bn_first,
    ready,
    vector,
)
from torch import nn

import bnfold
from bnfold.errors import ExportError, SaveError, UsageError
from bnfold.export import ExportResult, export_onnx, training_batchnorms
from bnfold.export import onnx_export as export_mod
from bnfold.runtime import ort_runner


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def convnet_export(tmp_path_factory):
    """ConvNet folded by bnfold and exported from a batch-1 example."""
    model = ready(ConvNet())
    folded = bnfold.fold(model, image())
    path = tmp_path_factory.mktemp("convnet") / "convnet.onnx"
    result = export_onnx(folded, image(batch=1), path)
    return model, folded, result


def test_export_result_describes_the_file(convnet_export) -> None:
    _, folded, result = convnet_export
    assert isinstance(result, ExportResult)
    assert result.exporter == "dynamo" and result.warnings == ()
    assert Path(result.path).is_file() and result.external_data is None
    assert result.file_size == Path(result.path).stat().st_size
    assert result.input_names == ("x",) and result.output_names == ("output",)
    proto = onnx.load(result.path)
    assert result.opset == proto.opset_import[0].version >= 17
    assert result.node_count == len(proto.graph.node) == sum(result.op_counts.values())
    onnx.checker.check_model(proto, full_check=True)
    assert result.to_dict()["dynamic_batch"]["proven"] is True
    assert "convnet.onnx" in result.format_text()
    assert not _leftovers(Path(result.path).parent)
    assert len(folded.folded) == 3 and len(folded.skipped) == 1


def test_batch1_example_is_exported_with_batch_2_and_proven_dynamic(convnet_export) -> None:
    _, _, result = convnet_export
    assert result.example_batch == 2
    proof = result.dynamic_batch
    assert proof.requested and proof.proven
    assert proof.symbolic_inputs == ("x",) and proof.symbolic_outputs == ("output",)
    assert proof.batch_sizes_run == (1, 2, 3)
    runner = ort_runner(result.path)
    for batch in (1, 5):
        assert runner((image(batch=batch),))[0].shape == (batch, 5)


def test_metadata_records_versions_and_fold_counts(convnet_export) -> None:
    _, _, result = convnet_export
    props = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert props["bnfold.version"] == bnfold.__version__
    assert props["torch.version"] == torch.__version__
    assert props["bnfold.folded"] == "3" and props["bnfold.skipped"] == "1"
    assert props["bnfold.exporter"] == "dynamo"
    assert result.metadata == {k: props[k] for k in result.metadata}


def test_batchnorm_left_is_reported_with_the_fold_reason(convnet_export) -> None:
    _, folded, result = convnet_export
    assert result.op_counts.get("BatchNormalization") == 1
    (left,) = result.batchnorm_nodes
    assert left.module == "post"
    skip = folded.skipped[0]
    assert skip.bn == "post" and skip.reason.label in left.reason


def test_metadata_mapping_and_fixed_batch(tmp_path) -> None:
    model = ready(mlp_bn_first())
    result = export_onnx(
        model, vector(batch=4), tmp_path / "m.onnx", dynamic_batch=False, metadata={"run": 7}
    )
    props = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert props["run"] == "7" and "bnfold.folded" not in props
    proof = result.dynamic_batch
    assert not proof.requested and not proof.proven and proof.batch_sizes_run == (4,)
    assert proof.symbolic_inputs == ()
    dims = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 4


def test_two_inputs_two_outputs(tmp_path) -> None:
    model = ready(TwoInTwoOut())
    inputs = (image(batch=3), vector(batch=3, features=6))
    result = export_onnx(bnfold.fold(model, inputs), inputs, tmp_path / "two.onnx")
    assert result.input_names == ("image", "vector")
    assert result.output_names == ("output_0", "output_1")
    assert result.dynamic_batch.batch_sizes_run == (1, 3)
    assert set(result.dynamic_batch.symbolic_outputs) == {"output_0", "output_1"}


def test_export_keeps_the_callers_training_flags(tmp_path) -> None:
    model = ready(bn_before_conv()).train()
    model[2].eval()
    export_onnx(model, image(), tmp_path / "flags.onnx")
    assert [m.training for m in model] == [True, True, False, True, True]


# ----------------------------------------------------------------------- failures and refusal


def test_specialised_batch_is_caught_and_nothing_is_written(tmp_path) -> None:
    target = tmp_path / "bad.onnx"
    target.write_bytes(b"previous file")
    with pytest.raises(ExportError, match=r"specialised the batch.*fixed to 2"):
        export_onnx(HardCodedBatch(), image(), target, overwrite=True)
    assert target.read_bytes() == b"previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_specialised_batch_caught_by_running_ort(tmp_path) -> None:
    """TorchScript declares the batch symbolic but the graph is not: ORT at batch 3 exposes it."""
    with pytest.raises(ExportError, match=r"specialised the batch|could not run"):
        export_onnx(HardCodedBatch(), image(), tmp_path / "ts.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def _crafted_batchnorm(training: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 4, 4])
    params = [
        helper.make_tensor(name, TensorProto.FLOAT, [2], [1.0, 1.0])
        for name in ("scale", "bias", "mean", "var")
    ]
    outputs = ["y", "running_mean", "running_var"] if training else ["y"]
    node = helper.make_node(
        "BatchNormalization",
        ["x", "scale", "bias", "mean", "var"],
        outputs,
        name="bn",
        training_mode=training,
    )
    graph = helper.make_graph([node], "g", [x], [y], initializer=params)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_training_mode_batchnorm_is_detected() -> None:
    assert training_batchnorms(_crafted_batchnorm(training=1)) == ["bn"]
    assert training_batchnorms(_crafted_batchnorm(training=0)) == []


def test_training_mode_batchnorm_is_refused(tmp_path, monkeypatch) -> None:
    crafted = _crafted_batchnorm(training=1)
    monkeypatch.setattr(export_mod, "run_exporter", lambda *a: (crafted, "dynamo", []))
    with pytest.raises(ExportError, match="training mode"):
        export_onnx(nn.Identity(), torch.randn(2, 2, 4, 4), tmp_path / "t.onnx")
    assert list(tmp_path.iterdir()) == []


def test_functional_training_batchnorm_from_torchscript_is_refused(tmp_path) -> None:
    with pytest.raises(ExportError, match="training mode"):
        export_onnx(TrainingBatchNorm(), image(), tmp_path / "t.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_dynamo_failure_falls_back_to_torchscript_with_a_warning(tmp_path) -> None:
    result = export_onnx(DataDependent(), image(), tmp_path / "dd.onnx")
    assert result.exporter == "torchscript"
    assert "dynamo exporter failed" in result.warnings[0]
    assert any("TracerWarning" in w for w in result.warnings)
    assert result.dynamic_batch.proven


def test_dynamo_only_raises_instead_of_falling_back(tmp_path) -> None:
    with pytest.raises(ExportError, match="dynamo exporter"):
        export_onnx(DataDependent(), image(), tmp_path / "dd.onnx", exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- external data, atomicity


@pytest.fixture
def reuse_export(convnet_export, monkeypatch):
    """Skip the exporter: hand export_onnx a copy of the ConvNet graph."""
    _, folded, result = convnet_export
    proto = onnx.load(result.path)

    def fake(*args):
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        return copy, "dynamo", []

    monkeypatch.setattr(export_mod, "run_exporter", fake)
    return folded


def test_external_data_above_threshold(tmp_path, reuse_export) -> None:
    target = tmp_path / "ext.onnx"
    result = export_onnx(reuse_export, image(), target, external_data_threshold=1)
    data = tmp_path / "ext.onnx.data"
    assert result.external_data == str(data) and data.is_file()
    assert result.file_size == target.stat().st_size + data.stat().st_size
    assert data.stat().st_mode == target.stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    onnx.checker.check_model(str(target), full_check=True)
    reference = ready(ConvNet())
    with torch.no_grad():
        expected = reference(image()).numpy()
    np.testing.assert_allclose(ort_runner(target)((image(),))[0], expected, rtol=1e-4, atol=1e-5)


def test_failure_after_writing_leaves_nothing(tmp_path, reuse_export, monkeypatch) -> None:
    def broken_check(staged: Path) -> None:
        assert staged.is_file() and (staged.parent / "x.onnx.data").is_file()
        raise ExportError("checker said no")

    monkeypatch.setattr(export_mod, "check_graph", broken_check)
    (tmp_path / "x.onnx").write_text("old")
    with pytest.raises(ExportError, match="checker said no"):
        export_onnx(
            reuse_export, image(), tmp_path / "x.onnx", external_data_threshold=1, overwrite=True
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]
    assert (tmp_path / "x.onnx").read_text() == "old"


def test_bad_targets_and_arguments(tmp_path) -> None:
    model = ready(mlp_bn_first())
    with pytest.raises(SaveError, match="does not exist"):
        export_onnx(model, vector(), tmp_path / "missing" / "m.onnx")
    with pytest.raises(SaveError, match="directory"):
        export_onnx(model, vector(), tmp_path)
    with pytest.raises(UsageError, match="exporter"):
        export_onnx(model, vector(), tmp_path / "m.onnx", exporter="magic")
    with pytest.raises(UsageError, match="different sizes"):
        export_onnx(
            TwoInTwoOut(), (image(batch=2), vector(batch=3, features=6)), tmp_path / "m.onnx"
        )
    assert os.listdir(tmp_path) == []


def test_onnx_benchmark_smoke(tmp_path) -> None:
    """benchmarks/onnx_bench.py runs end to end on the smallest zoo model."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "onnx_bench.py"
    spec = importlib.util.spec_from_file_location("onnx_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.bench_model("mlp", tmp_path, repeat=1, threads=1)
    assert row["plain"]["batchnorm_nodes"] == 1 and row["bnfold"]["batchnorm_nodes"] == 0
    assert row["bnfold"]["max_rel_error"] < 1e-5
    assert "| mlp | 3/3 |" in bench.markdown([row], threads=1, repeat=1)


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(28, "No space left")])
@pytest.mark.parametrize("old_data", [True, False], ids=["old-data", "old-inline"])
def test_an_onnx_file_that_cannot_follow_its_data_leaves_the_old_pair(
    tmp_path, reuse_export, monkeypatch, failure, old_data: bool
) -> None:
    """With overwrite, the data file goes into place first: when the .onnx file then cannot
    follow (a stop, a full disk), the data file at its name is put back as it was, so the old
    graph never meets new weights."""
    import bnfold.export.files as files

    target = tmp_path / "ext.onnx"
    export_onnx(reuse_export, image(), target, external_data_threshold=1 if old_data else 1 << 40)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    changed = onnx.load(str(target))
    weight = max(changed.graph.initializer, key=lambda tensor: tensor.ByteSize())  # external
    weight.CopyFrom(
        onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 2, weight.name)
    )
    monkeypatch.setattr(export_mod, "run_exporter", lambda *args: (changed, "dynamo", []))
    real, calls = files.publish, []

    def second_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(files, "publish", second_fails)
    expected = KeyboardInterrupt if isinstance(failure, KeyboardInterrupt) else SaveError
    with pytest.raises(expected):
        export_onnx(reuse_export, image(), target, external_data_threshold=1, overwrite=True)
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
