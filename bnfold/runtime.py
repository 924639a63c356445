"""Runners: one callable per (engine, device) that turns input tensors into output arrays.

The only module that imports onnxruntime. A runner is built once and called on each input
batch; it returns the model's outputs flattened to a list of numpy arrays, so the comparison
code (``bnfold.verification``) never sees torch or onnxruntime objects. CUDA is reported
honestly: an ORT session counts as CUDA only if ``session.get_providers()[0]`` is the CUDA
provider (ORT silently falls back to CPU when its CUDA libraries cannot be loaded), TF32 is off
(ORT's ``use_tf32=0``, torch's flags while a runner runs), and a CUDA runner that cannot be
built raises ``RuntimeUnavailableError`` saying why (no CUDA build or device, an onnxruntime
package without the CUDA provider, or CUDA libraries ORT could not load).
"""

from __future__ import annotations

import copy
import ctypes
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold.errors import (
    LoadError,
    ModelInputError,
    RuntimeUnavailableError,
    UsageError,
    first_line,
)
from bnfold.io.inputs import as_args
from bnfold.io.inputs import model_dtype as float_dtype
from bnfold.io.paths import refuse_special_file
from bnfold.modes import inference
from bnfold.records import Record

CPU = "cpu"
CUDA = "cuda"
DEVICES = (CPU, CUDA)

ORT_CPU_PROVIDER = "CPUExecutionProvider"
ORT_CUDA_PROVIDER = "CUDAExecutionProvider"

#: ORT graph optimization levels a runner can be asked for.
OPT_DEFAULT = "default"  # ORT_ENABLE_ALL, what a deployment gets without configuration
OPT_DISABLE_ALL = "disable_all"  # ORT_DISABLE_ALL: runs the graph as written in the file
OPTIMIZATIONS = (OPT_DEFAULT, OPT_DISABLE_ALL)


@dataclass(frozen=True)
class RunnerInfo(Record):
    """What a runner really runs on, as checked after it was built."""

    name: str  # e.g. "torch-cpu", "ort-cpu", "ort-cpu-noopt", "ort-cuda", "torch-cuda"
    engine: str  # "torch" or "onnxruntime"
    device: str  # "cpu" or "cuda": the device that was *verified* to run the model
    providers: tuple[str, ...] = ()  # ORT session providers in priority order (empty for torch)
    settings: dict[str, str] = field(default_factory=dict)


@contextmanager
def tf32_disabled() -> Iterator[dict[str, str]]:
    """Switch torch's TF32 paths off (matmul and cuDNN) and restore the previous flags after.

    Yields the settings in force, for the report. Harmless on a CPU-only build.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with _flags_off(matmul, "allow_tf32"), _flags_off(cudnn, "allow_tf32"):
        yield {
            "torch.backends.cuda.matmul.allow_tf32": str(matmul.allow_tf32),
            "torch.backends.cudnn.allow_tf32": str(cudnn.allow_tf32),
        }


def full_precision_reductions() -> AbstractContextManager[None]:
    """Switch off cuBLAS's reduced-precision reductions for float16/bfloat16 matmuls (on by
    default: partial sums in the half type) and restore the flags after."""
    return _flags_off(
        torch.backends.cuda.matmul,
        "allow_fp16_reduced_precision_reduction",
        "allow_bf16_reduced_precision_reduction",
    )


@contextmanager
def _flags_off(owner: Any, *names: str) -> Iterator[None]:
    """Set the flags ``names`` of ``owner`` to False, and back to what they were after."""
    before = [getattr(owner, name) for name in names]
    try:
        for name in names:
            setattr(owner, name, False)
        yield
    finally:
        for name, value in zip(names, before, strict=True):
            setattr(owner, name, value)


def torch_cuda_unavailable_reason() -> str | None:
    """Why folded PyTorch cannot run on CUDA here, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return "torch sees no CUDA device"
    return None


def ort_cuda_unavailable_reason() -> str | None:
    """Why ORT's CUDA provider cannot be used, as far as can be told without a session.

    None means "worth trying": the session itself decides (see ``ort_runner``).
    """
    import onnxruntime as ort

    if ORT_CUDA_PROVIDER not in ort.get_available_providers():
        return (
            f"the installed onnxruntime {ort.__version__} package lacks the CUDA execution "
            "provider (install onnxruntime-gpu instead of onnxruntime)"
        )
    if cuda_device_count() == 0:
        return "no CUDA device (no NVIDIA driver or GPU visible)"
    return None


def cuda_device_count() -> int:
    """Number of CUDA devices the NVIDIA driver reports (0 without a driver), torch or not."""
    if torch.version.cuda is not None:
        return torch.cuda.device_count()
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (tensor, tuple, list, dict, nested) in pytree order."""
    leaves, _ = torch.utils._pytree.tree_flatten(outputs)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy; bfloat16 (which numpy lacks) becomes float32, exactly."""
    tensor = tensor.detach().to("cpu")
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _as_dtype(tensor: Any, dtype: torch.dtype | None) -> Any:
    """A floating tensor cast to ``dtype`` (None: unchanged); anything else unchanged."""
    if dtype is None or not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")


class TorchRunner:
    """Runs a module in eval mode, no grad, TF32 off, on CPU or a CUDA copy of the module.

    Floating inputs are cast to the module's own dtype (``float_dtype``), so a float16 or
    bfloat16 model runs on inputs in its dtype; on CUDA, half-precision matmuls sum in float32
    (``full_precision_reductions``). The caller's module is never moved or mutated: the CUDA
    runner runs a deep copy. Raises RuntimeUnavailableError for unusable CUDA.
    """

    def __init__(self, model: nn.Module, device: str = CPU, *, name: str | None = None) -> None:
        _check_device(device)
        if device == CUDA:
            reason = torch_cuda_unavailable_reason()
            if reason is not None:
                raise RuntimeUnavailableError(f"PyTorch on CUDA is not usable: {reason}")
            model = copy.deepcopy(model).to("cuda")
        self.model = model
        self.device = device
        self.dtype = float_dtype(model)
        settings = {"dtype": str(self.dtype).removeprefix("torch."), "mode": "eval, no_grad"}
        if device == CUDA:
            settings["torch.backends.cuda.matmul.allow_tf32"] = "False"
            settings["torch.backends.cudnn.allow_tf32"] = "False"
            if self.dtype in (torch.float16, torch.bfloat16):
                settings["reduced_precision_reduction"] = "False"
            settings["cuda_device"] = torch.cuda.get_device_name(0)
        self.info = RunnerInfo(name or f"torch-{device}", "torch", device, (), settings)

    def __call__(self, args: Any) -> list[np.ndarray]:
        tensors = [
            _as_dtype(t, self.dtype).to(self.device) if isinstance(t, torch.Tensor) else t
            for t in as_args(args)
        ]
        with inference(self.model), tf32_disabled(), full_precision_reductions():
            outputs = self.model(*tensors)
            if self.device == CUDA:
                torch.cuda.synchronize()
        return [_to_numpy(out) for out in flatten_outputs(outputs)]


class OrtRunner:
    """Runs an ONNX file with an ONNX Runtime session on the CPU or CUDA execution provider.

    Floating inputs are cast to each ONNX input's own element type (float32, float64, float16).
    """

    def __init__(self, session: Any, info: RunnerInfo) -> None:
        self.session = session
        self.info = info
        self.input_names = tuple(item.name for item in session.get_inputs())
        self.input_dtypes = tuple(_ORT_FLOATS.get(item.type) for item in session.get_inputs())
        self.output_names = tuple(item.name for item in session.get_outputs())

    def __call__(self, args: Any) -> list[np.ndarray]:
        tensors = as_args(args)
        for index, arg in enumerate(tensors):
            if not isinstance(arg, torch.Tensor):
                raise UsageError(
                    f"model input {index} is a {type(arg).__name__}; only tensor inputs can be "
                    "run on ONNX Runtime"
                )
        if len(tensors) != len(self.input_names):
            raise ModelInputError(
                f"the ONNX model takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(tensors)}"
            )
        feed = {
            name: _to_numpy(_as_dtype(t, dtype))
            for name, dtype, t in zip(self.input_names, self.input_dtypes, tensors, strict=True)
        }
        return list(self.session.run(None, feed))


#: ONNX input element types a floating input is cast to (the file's own dtype).
_ORT_FLOATS = {
    "tensor(float)": torch.float32,
    "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16,
}


def ort_runner(
    path: str | os.PathLike[str],
    device: str = CPU,
    *,
    optimization: str = OPT_DEFAULT,
    name: str | None = None,
    intra_op_threads: int | None = None,
) -> OrtRunner:
    """An ORT session for the ONNX file at ``path`` on ``device`` (CUDA: device 0, checked as the
    module doc says) with ``optimization``. ``intra_op_threads`` caps ORT's thread pool (None:
    ORT's default, one thread per core)."""
    import onnxruntime as ort

    _check_device(device)
    if optimization not in OPTIMIZATIONS:
        raise UsageError(f"unknown optimization {optimization!r}; choose one of {OPTIMIZATIONS}")
    options = ort.SessionOptions()
    # fatal only: a run's error reaches the report from its exception, and the CUDA fallback is
    # detected below; ORT's own error log lines would repeat them on stderr
    options.log_severity_level = 4
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = (
        level.ORT_ENABLE_ALL if optimization == OPT_DEFAULT else level.ORT_DISABLE_ALL
    )
    settings = {"graph_optimization_level": str(options.graph_optimization_level).split(".")[-1]}
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
        settings["intra_op_num_threads"] = str(intra_op_threads)
    providers: list[Any] = [ORT_CPU_PROVIDER]
    if device == CUDA:
        reason = ort_cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeUnavailableError(f"ONNX Runtime CUDA is not usable: {reason}")
        cuda_options = {"device_id": "0", "use_tf32": "0"}
        providers.insert(0, (ORT_CUDA_PROVIDER, cuda_options))
        settings.update({f"cuda.{key}": value for key, value in cuda_options.items()})
    session = _session(ort, Path(path), options, providers, cuda=device == CUDA)
    used = tuple(session.get_providers())
    if device == CUDA and (not used or used[0] != ORT_CUDA_PROVIDER):
        raise RuntimeUnavailableError(
            "ONNX Runtime CUDA is not usable: CUDA libraries missing or incompatible (the session "
            f"fell back to {', '.join(used) or 'nothing'}; check the CUDA/cuDNN versions "
            f"onnxruntime {ort.__version__} needs)"
        )
    default_name = f"ort-{device}" + ("-noopt" if optimization == OPT_DISABLE_ALL else "")
    info = RunnerInfo(name or default_name, "onnxruntime", device, used, settings)
    return OrtRunner(session, info)


def _session(ort: Any, path: Path, options: Any, providers: list[Any], cuda: bool) -> Any:
    refuse_special_file(path, "ONNX models")
    if not path.is_file():
        raise UsageError(f"no ONNX file at {path}")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for bad files
        if cuda:
            raise RuntimeUnavailableError(
                f"ONNX Runtime could not create a CUDA session for {path}: {first_line(exc)}"
            ) from exc
        raise LoadError(f"ONNX Runtime could not load {path}: {first_line(exc)}") from exc


def ort_version() -> str:
    """The installed onnxruntime version (for reports)."""
    import onnxruntime as ort

    return ort.__version__
