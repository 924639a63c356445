"""Tests for bnfold.runtime: torch and ORT runners, TF32 flags, honest CUDA detection."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from bnfold import runtime
from bnfold.errors import LoadError, ModelInputError, RuntimeUnavailableError, UsageError
from bnfold.runtime import (
    CUDA,
    OPT_DISABLE_ALL,
    ORT_CPU_PROVIDER,
    ORT_CUDA_PROVIDER,
    TorchRunner,
    flatten_outputs,
    ort_cuda_unavailable_reason,
    ort_runner,
    tf32_disabled,
    torch_cuda_unavailable_reason,
)

NO_ORT_CUDA = ort_cuda_unavailable_reason()
NO_TORCH_CUDA = torch_cuda_unavailable_reason()


@pytest.fixture(scope="module")
def relu_onnx(tmp_path_factory):
    """A one-node ONNX file (y = relu(x)) with a symbolic batch dimension."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path_factory.mktemp("rt") / "relu.onnx"
    onnx.save(model, str(path))
    return path


class DictOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, object]:
        return {"a": x + 1, "b": (x * 2, "not a tensor")}


def test_tf32_disabled_restores_flags_even_on_error() -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError), tf32_disabled() as settings:
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            assert settings["torch.backends.cudnn.allow_tf32"] == "False"
            raise RuntimeError("boom")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_flatten_outputs_keeps_tensors_in_pytree_order() -> None:
    x = torch.ones(2)
    leaves = flatten_outputs(DictOut()(x))
    assert [float(t[0]) for t in leaves] == [2.0, 2.0] and len(leaves) == 2


def test_torch_runner_cpu_eval_and_flags_restored() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.9)).train()
    runner = TorchRunner(model)
    x = torch.randn(4, 3)
    first, second = runner((x,))[0], runner(x)[0]
    np.testing.assert_array_equal(first, second)  # dropout off: eval mode
    assert model.training and model[1].training
    assert runner.info.engine == "torch" and runner.info.device == "cpu"
    assert isinstance(first, np.ndarray) and first.dtype == np.float32


def test_ort_runner_cpu_default_and_disable_all(relu_onnx) -> None:
    default = ort_runner(relu_onnx)
    noopt = ort_runner(relu_onnx, optimization=OPT_DISABLE_ALL)
    assert default.info.name == "ort-cpu" and noopt.info.name == "ort-cpu-noopt"
    assert default.info.providers[0] == ORT_CPU_PROVIDER
    assert default.info.settings["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert noopt.info.settings["graph_optimization_level"] == "ORT_DISABLE_ALL"
    x = torch.tensor([[-1.0, 0.5, 2.0]])
    np.testing.assert_array_equal(default(x)[0], [[0.0, 0.5, 2.0]])
    assert default.output_names == ("y",)
    with pytest.raises(ModelInputError, match="takes 1 inputs"):
        default((x, x))
    with pytest.raises(UsageError, match="only tensor inputs"):
        default((3,))


def test_ort_runner_bad_arguments(tmp_path, relu_onnx) -> None:
    with pytest.raises(UsageError, match="no ONNX file"):
        ort_runner(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(LoadError, match="could not load"):
        ort_runner(tmp_path / "junk.onnx")
    with pytest.raises(UsageError, match="device"):
        ort_runner(relu_onnx, "tpu")
    with pytest.raises(UsageError, match="optimization"):
        ort_runner(relu_onnx, optimization="O3")


@pytest.mark.skipif(NO_ORT_CUDA is None, reason="ORT CUDA is usable here")
def test_ort_cuda_unavailable_says_why(relu_onnx) -> None:
    with pytest.raises(RuntimeUnavailableError, match="ONNX Runtime CUDA is not usable") as err:
        ort_runner(relu_onnx, CUDA)
    assert NO_ORT_CUDA in str(err.value)
    assert "onnxruntime-gpu" in NO_ORT_CUDA or "device" in NO_ORT_CUDA


@pytest.mark.skipif(NO_TORCH_CUDA is None, reason="torch CUDA is usable here")
def test_torch_cuda_unavailable_says_why() -> None:
    with pytest.raises(RuntimeUnavailableError, match=re.escape(NO_TORCH_CUDA)):
        TorchRunner(nn.Linear(2, 2), CUDA)


class _FallbackSession:
    """What ORT returns when the CUDA libraries cannot be loaded: a CPU-only session."""

    def get_providers(self) -> list[str]:
        return [ORT_CPU_PROVIDER]


def test_silent_cpu_fallback_is_not_counted_as_cuda(relu_onnx, monkeypatch) -> None:
    monkeypatch.setattr(runtime, "ort_cuda_unavailable_reason", lambda: None)
    seen = {}

    def fake_session(ort, path, options, providers, cuda):
        seen["providers"] = providers
        return _FallbackSession()

    monkeypatch.setattr(runtime, "_session", fake_session)
    with pytest.raises(RuntimeUnavailableError, match=r"libraries missing.*fell back to CPU"):
        ort_runner(relu_onnx, CUDA)
    name, options = seen["providers"][0]
    assert name == ORT_CUDA_PROVIDER and options["use_tf32"] == "0"


@pytest.mark.cuda
@pytest.mark.skipif(NO_ORT_CUDA is not None, reason=f"ORT CUDA not usable: {NO_ORT_CUDA}")
def test_ort_cuda_runner_really_runs_on_cuda(relu_onnx) -> None:
    runner = ort_runner(relu_onnx, CUDA)
    assert runner.info.device == "cuda" and runner.info.providers[0] == ORT_CUDA_PROVIDER
    assert runner.info.settings["cuda.use_tf32"] == "0"
    np.testing.assert_array_equal(runner(torch.tensor([[-1.0, 1.0, 2.0]]))[0], [[0, 1, 2]])


@pytest.mark.cuda
@pytest.mark.skipif(NO_TORCH_CUDA is not None, reason=f"PyTorch CUDA not usable: {NO_TORCH_CUDA}")
def test_torch_cuda_runner_leaves_the_model_on_cpu() -> None:
    model = nn.Linear(3, 2)
    runner = TorchRunner(model, CUDA)
    out = runner(torch.randn(4, 3))[0]
    assert out.shape == (4, 2) and next(model.parameters()).device.type == "cpu"
    assert runner.info.settings["torch.backends.cudnn.allow_tf32"] == "False"
