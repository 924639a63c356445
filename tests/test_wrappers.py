"""Models as users hand them: compiled or data-parallel wrappers, hooks, train mode, half
precision, GPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from wild_checks import folded, reasons
from wild_models import FrozenBatchNorm2d, randomise

import bnfold
from bnfold.runtime import torch_cuda_unavailable_reason


def _net() -> nn.Module:
    return randomise(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            FrozenBatchNorm2d(4),
        )
    )


def _x(dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device, dtype)


def _assert_folds_inner(wrapper: nn.Module, inner: nn.Module, note: str) -> None:
    x = _x()
    result = bnfold.fold(wrapper, x)
    assert type(result.model) is nn.Sequential  # the folded inner module
    assert folded(result) == {"1": "0", "4": "3"}
    assert any(note in n for n in result.plan.notes)
    assert torch.allclose(result.model(x), inner(x), rtol=1e-4, atol=1e-5)
    assert any(note in n for n in bnfold.find_pairs(wrapper, x).notes)


def test_torch_compile_result_is_unwrapped() -> None:
    inner = _net()
    _assert_folds_inner(torch.compile(inner, backend="eager"), inner, "torch.compile")


def test_data_parallel_is_unwrapped_and_inplace_folds_the_wrapped_module() -> None:
    inner = _net()
    reference = inner(_x())
    _assert_folds_inner(nn.DataParallel(inner), inner, "DataParallel")
    wrapper = nn.DataParallel(inner)
    result = bnfold.fold(wrapper, _x(), inplace=True)
    assert result.model is inner and isinstance(wrapper.module[1], nn.Identity)
    assert torch.allclose(wrapper(_x()), reference, rtol=1e-4, atol=1e-5)


def test_distributed_data_parallel_is_unwrapped(tmp_path) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        inner = _net()
        _assert_folds_inner(
            nn.parallel.DistributedDataParallel(inner), inner, "DistributedDataParallel"
        )
    finally:
        dist.destroy_process_group()


def test_hooks_on_a_norm_or_a_layer_are_kept_working_and_the_pair_skipped() -> None:
    model = randomise(
        nn.Sequential(
            nn.Conv2d(3, 4, 1),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 1),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 1),
            nn.BatchNorm2d(4),
        )
    )
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append("bn forward"))
    model[2].register_forward_pre_hook(lambda m, i: seen.append("conv pre"))
    model[5].register_full_backward_hook(lambda m, gi, go: None)
    result = bnfold.fold(model, _x())
    assert reasons(result) == {"1": "hooks", "5": "hooks"}
    assert folded(result) == {"3": "4"}  # not into the hooked conv 2: into conv 4's input
    seen.clear()
    result.model(_x())
    assert seen == ["bn forward", "conv pre"]  # the copies' hooks still fire


def test_train_mode_model_folds_its_eval_function_and_keeps_its_flags() -> None:
    model = _net().train()
    x = _x()
    result = bnfold.fold(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert not result.model.training
    assert any("train mode" in note for note in result.plan.notes)
    assert torch.allclose(result.model(x), copy.deepcopy(model).eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype_and_says_so(dtype: torch.dtype) -> None:
    model = _net().to(dtype)
    result = bnfold.fold(model, _x(dtype))
    assert {p.dtype for p in result.model.parameters()} == {dtype}
    assert any(f"weights are {str(dtype)[6:]} on cpu" in n for n in result.plan.notes)
    reference = copy.deepcopy(model).double()(_x(torch.float64))
    folded_error = (result.model(_x(dtype)).double() - reference).abs().max()
    original_error = (model(_x(dtype)).double() - reference).abs().max()
    assert folded_error <= 2 * original_error + 1e-3


class Untraceable(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 4:  # fx cannot trace this: the recorded path
            raise ValueError("expects NCHW")
        return super().forward(x)


def test_recorded_path_keeps_dtype_and_mode_too() -> None:
    model = Untraceable(*_net()).to(torch.bfloat16).train()
    result = bnfold.fold(model, _x(torch.bfloat16))
    assert result.plan.method == "recorded" and len(result.folded) == 2
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert model.training and not result.model.training
    notes = " ".join(result.plan.notes)
    assert "train mode" in notes and "bfloat16 on cpu" in notes


NO_CUDA = torch_cuda_unavailable_reason()


@pytest.mark.cuda
@pytest.mark.skipif(NO_CUDA is not None, reason=f"PyTorch CUDA not usable: {NO_CUDA}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_model_folds_on_its_device(dtype: torch.dtype) -> None:
    for model in (_net(), Untraceable(*_net())):
        model = model.to("cuda", dtype)
        x = _x(dtype, "cuda")
        result = bnfold.fold(model, x)
        assert len(result.folded) == 2
        assert {p.device.type for p in result.model.parameters()} == {"cuda"}
        assert {p.dtype for p in result.model.parameters()} == {dtype}
        assert any("on cuda:0" in n for n in result.plan.notes)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        with torch.no_grad():
            assert torch.allclose(result.model(x), model.eval()(x), rtol=tolerance, atol=tolerance)
