"""Comparison primitives: the tolerances and the element-wise comparison of a candidate's
output with the reference's (``|c - r| <= atol * max|r| + rtol * |r|``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bnfold.records import Record


@dataclass(frozen=True)
class Tolerance(Record):
    """Allowed error: ``|c - r| <= atol * max|r| + rtol * |r|`` element-wise; ``why`` says why."""

    atol: float
    rtol: float
    why: str

    def describe(self) -> str:
        return f"atol {self.atol:.0e}·max|ref| + rtol {self.rtol:.0e}·|ref|"


#: Float32 on CPU (folded PyTorch, ORT CPU with and without graph optimizations).
CPU_FP32 = Tolerance(
    atol=1e-5,
    rtol=1e-4,
    why=(
        "float32 on CPU. A correct fold changes only rounding: folded weights are rounded once "
        "from float64 and conv/GEMM kernels sum in another order, so each layer adds errors of "
        "order 1e-7 relative, which depth amplifies. Measured on the bnfold.zoo models with "
        "realistic BN statistics (3 seeds, batches 1-3), the worst element uses under 0.09 of "
        "this tolerance (ResNet-50: max abs diff ~4e-6 of the output's peak), so there is more "
        "than 10x headroom, while a real mistake (a wrong channel axis, a lost bias, a dropped "
        "BN, one conv weight off by 0.1%) exceeds it."
    ),
)


#: Float32 on CUDA with TF32 off (torch flags off, ORT ``use_tf32=0``).
CUDA_FP32 = Tolerance(
    atol=1e-4,
    rtol=1e-3,
    why=(
        "float32 on CUDA, TF32 off, 10x the CPU tolerance. cuDNN and cuBLAS pick other "
        "algorithms than the CPU (Winograd and FFT convolutions, split-K reductions) whose "
        "float32 error can be several times that of a CPU sum, and ORT's CUDA provider may pick "
        "yet another; the reference stays on CPU, so their whole difference counts. TF32 (a "
        "10-bit mantissa, ~1e-3 relative drift) is switched off rather than tolerated: left on, "
        "it would exceed atol 1e-4 of the peak."
    ),
)


#: Machine epsilon (spacing of the floats at 1.0) of the half-precision dtypes.
HALF_EPS: dict[torch.dtype, float] = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


#: Half-precision tolerance in units of eps (atol of the peak and rtol alike), by device.
HALF_EPS_FACTOR: dict[str, float] = {"cpu": 4.0, "cuda": 8.0}


def half_tolerance(dtype: torch.dtype, device: str = "cpu") -> Tolerance:
    """``atol = rtol = k * eps(dtype)``, k = ``HALF_EPS_FACTOR[device]``, for a float16 or
    bfloat16 original model (candidates compared with it and with its float32 copy)."""
    eps = HALF_EPS[dtype]
    factor = HALF_EPS_FACTOR[device]
    name = str(dtype).removeprefix("torch.")
    return Tolerance(
        atol=factor * eps,
        rtol=factor * eps,
        why=(
            f"{name} on {device.upper()}: {factor:g}·eps with eps = {eps:.2g}, the {name} machine "
            "epsilon. Each half-precision op rounds its result to within eps/2 relative (CPU "
            "kernels and cuBLAS with reduced-precision reductions off sum in float32), so a "
            "folded model differs from the original by a few roundings of each output. "
            "Measured on the bnfold.zoo models (6 models, 2 seeds, batches 1-3, CPU; folded "
            "PyTorch and ONNX Runtime in float16): folded vs original and original vs its "
            "float32 copy use at most 0.4 of this tolerance (1.6·eps of the peak); CUDA (not "
            "measured here) gets twice as much. A mistake smaller than about 4·eps of the "
            "output's peak (0.4% in float16, 3% in bfloat16) cannot be told from rounding at "
            "this precision."
        ),
    )


#: Tolerance per candidate kind (the runner name without any label prefix).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "torch-cpu": CPU_FP32,
    "ort-cpu": CPU_FP32,
    "ort-cpu-noopt": CPU_FP32,
    "torch-cuda": CUDA_FP32,
    "ort-cuda": CUDA_FP32,
}


#: Relative errors are reported only where ``|ref| >= REL_FLOOR * max|ref|`` (elsewhere the
#: ratio of two near-zero numbers says nothing).
REL_FLOOR = 1e-3


@dataclass
class Stats:
    """Metrics of one output on one input batch."""

    max_abs: float
    sum_abs: float
    count: int
    max_rel: float
    cosine: float
    top1: tuple[int, int] | None  # (agreeing rows, rows)
    ratio: float
    worst_index: tuple[int, ...]
    worst_ref: float
    worst_cand: float
    detail: str | None = None


def compare_arrays(reference: np.ndarray, candidate: np.ndarray, tol: Tolerance) -> Stats:
    """Metrics of ``candidate`` against ``reference`` (float64 arithmetic)."""
    if tuple(reference.shape) != tuple(candidate.shape):
        return _mismatch(f"shape {tuple(candidate.shape)} vs reference {tuple(reference.shape)}")
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.size == 0:
        return Stats(0.0, 0.0, 0, 0.0, 1.0, None, 0.0, (), 0.0, 0.0)
    if not np.all(np.isfinite(ref)) or not np.all(np.isfinite(cand)):
        where = "reference" if not np.all(np.isfinite(ref)) else "candidate"
        return _mismatch(f"non-finite values (NaN/inf) in the {where} output")
    diff = np.abs(cand - ref)
    mag = np.abs(ref)
    peak = float(mag.max()) or 1.0
    ratios = diff / (tol.atol * peak + tol.rtol * mag)
    flat = int(np.argmax(ratios))
    worst = tuple(int(i) for i in np.unravel_index(flat, ref.shape))
    significant = mag >= REL_FLOOR * peak
    max_rel = float((diff[significant] / mag[significant]).max()) if significant.any() else 0.0
    return Stats(
        max_abs=float(diff.max()),
        sum_abs=float(diff.sum()),
        count=int(diff.size),
        max_rel=max_rel,
        cosine=_cosine(ref, cand),
        top1=_top1(ref, cand),
        ratio=float(ratios.reshape(-1)[flat]),
        worst_index=worst,
        worst_ref=float(ref[worst]),
        worst_cand=float(cand[worst]),
    )


def _mismatch(detail: str) -> Stats:
    inf = float("inf")
    return Stats(inf, inf, 1, inf, float("nan"), None, inf, (), float("nan"), float("nan"), detail)


def _cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    a, b = ref.reshape(-1), cand.reshape(-1)
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norms)


def _top1(ref: np.ndarray, cand: np.ndarray) -> tuple[int, int] | None:
    if ref.ndim != 2 or ref.shape[1] < 2:
        return None
    agree = int((ref.argmax(axis=1) == cand.argmax(axis=1)).sum())
    return agree, int(ref.shape[0])
