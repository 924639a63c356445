"""Verification: compare every candidate with the original model, and say which stage broke.

Star topology: the reference is the original (unfolded) model in eval mode, float32, on CPU;
every candidate (folded PyTorch, the ONNX file on ONNX Runtime CPU with default optimizations
and with ORT_DISABLE_ALL, on ORT CUDA, folded PyTorch on CUDA) is compared with that reference
alone. So a failure points at a stage: folded PyTorch differs -> the fold; ORT CPU differs ->
the export (or, when only the optimized session differs, ORT's optimizer); only CUDA differs ->
runtime numerics.

The pass criterion, per output element i, with S = max |reference| over that output tensor:

    |candidate_i - reference_i| <= atol * S + rtol * |reference_i|

``atol`` is relative to the output's peak magnitude so the test does not depend on the units of
the output. The report gives, per candidate and output, the worst ratio of error to allowed
error (<= 1 passes), the (atol, rtol) that would just have passed, and the worst element.

Half precision: when the original model is float16 or bfloat16, there are two references, the
original as it is (on CPU) and a float32 copy of it, and every candidate must pass against both.
Each candidate runs on inputs in its own dtype (the inputs are rounded to the model's dtype
once, so every model sees the same values). The tolerance is then ``atol = rtol = k * eps``
with eps the dtype's machine epsilon (float16 2^-10 ~ 9.8e-4, bfloat16 2^-7 ~ 7.8e-3: the
relative rounding of one operation is at most eps / 2) and k = 4 on CPU, 8 on CUDA (see
``half_tolerance``).

This module only compares. Runners come from ``bnfold.runtime``; nothing here prints.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold import runtime
from bnfold.errors import (
    ModelInputError,
    RuntimeUnavailableError,
    UsageError,
    VerificationFailed,
    first_line,
)
from bnfold.export import ExportResult
from bnfold.io.inputs import as_args
from bnfold.records import FoldResult, Record
from bnfold.runtime import TorchRunner, float_dtype, ort_version, tf32_disabled
from bnfold.verification.compare import (
    DEFAULT_TOLERANCES,
    HALF_EPS,
    Stats,
    Tolerance,
    compare_arrays,
    half_tolerance,
)
from bnfold.verification.locate import LayerDivergence, locate_divergence

# --------------------------------------------------------------------------------- tolerances


DEFAULT_PROVIDERS = ("cpu", "cuda")
DEFAULT_RANDOM_BATCH_SIZES = (1, 3)


class Status(str, enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    NOT_RUN = "not run"


# ------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class InputInfo(Record):
    """One input batch the models were run on."""

    source: str  # "sample" (given by the caller) or "random" (seeded standard normal)
    batch_size: int
    shapes: tuple[tuple[int, ...], ...]
    seed: int | None = None


@dataclass(frozen=True)
class OutputComparison(Record):
    """One output of one candidate against the reference, over every input batch."""

    output: str
    index: int
    shape: tuple[int, ...]  # the output's shape for the first input batch
    max_abs_diff: float
    mean_abs_diff: float
    max_rel_diff: float  # over elements with |ref| >= REL_FLOOR * max|ref|
    cosine_similarity: float  # the lowest over input batches
    top1_agreement: float | None  # fraction of rows with the same argmax, for (N, classes)
    ratio: float  # worst |c - r| / (atol*S + rtol*|r|): <= 1 passes
    needed_atol: float  # ratio * atol: with needed_rtol, the tolerance that would just pass
    needed_rtol: float
    worst_input: int  # index into VerificationReport.inputs
    worst_index: tuple[int, ...]  # index of the worst element in that output
    worst_reference: float
    worst_candidate: float
    passed: bool
    detail: str | None = None  # e.g. a shape mismatch or non-finite values


@dataclass(frozen=True)
class CandidateReport(Record):
    """One candidate: where it ran, under what settings, and how it compares."""

    name: str
    engine: str  # "torch" or "onnxruntime"
    device: str  # "cpu" or "cuda": where it verifiably ran (or was meant to run)
    status: Status
    tolerance: Tolerance
    outputs: tuple[OutputComparison, ...] = ()
    reason: str | None = None  # why it failed or was not run
    providers: tuple[str, ...] = ()  # ORT session providers actually in use
    settings: dict[str, str] = field(default_factory=dict)
    divergence: LayerDivergence | None = None
    hint: str | None = None  # which stage the failure points at

    @property
    def passed(self) -> bool:
        return self.status is Status.PASSED

    @property
    def worst_ratio(self) -> float:
        return max((out.ratio for out in self.outputs), default=float("nan"))


@dataclass(frozen=True)
class VerificationReport(Record):
    """Every candidate against the one reference, with the inputs and settings used."""

    reference: str
    candidates: tuple[CandidateReport, ...]
    inputs: tuple[InputInfo, ...]
    settings: dict[str, str]
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """True when no candidate failed and at least one ran ("not run" is never a pass)."""
        statuses = [c.status for c in self.candidates]
        return Status.FAILED not in statuses and Status.PASSED in statuses

    @property
    def failed(self) -> tuple[CandidateReport, ...]:
        return tuple(c for c in self.candidates if c.status is Status.FAILED)

    def summary(self) -> str:
        counts = {s: sum(c.status is s for c in self.candidates) for s in Status}
        parts = [f"{n} {s.value}" for s, n in counts.items() if n]
        verdict = "PASSED" if self.passed else "FAILED"
        failed = ", ".join(c.name for c in self.failed)
        tail = f" ({failed})" if failed else ""
        return f"verification {verdict}: {', '.join(parts)}{tail}"

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["passed"] = self.passed
        data["summary"] = self.summary()
        return data

    def format_text(self) -> str:
        """A plain-text report for a terminal: one row per candidate and output."""
        return _format_report(self)


def require_passed(report: VerificationReport) -> VerificationReport:
    """Return ``report`` if it passed, else raise VerificationFailed naming each failure.

    The library's ``verify`` never raises for a numerical failure; the CLI calls this to turn a
    failed report into exit code 1.
    """
    if report.passed:
        return report
    if not report.failed:
        raise VerificationFailed("no candidate could be run, so nothing was verified")
    lines = []
    for cand in report.failed:
        text = f"{cand.name}: {cand.reason or 'outputs differ'}"
        if cand.divergence is not None:
            text += f"; {cand.divergence.describe()}"
        lines.append(text)
    raise VerificationFailed("verification failed: " + "; ".join(lines))


# ------------------------------------------------------------------------------- the metrics


def _aggregate(
    name: str, index: int, per_batch: list[tuple[int, np.ndarray, Stats]], tol: Tolerance
) -> OutputComparison:
    """Fold the per-batch metrics of one output into one comparison (worst case over batches)."""
    worst_input, _, worst = max(per_batch, key=lambda item: item[2].ratio)
    stats = [item[2] for item in per_batch]
    count = sum(s.count for s in stats)
    tops = [s.top1 for s in stats if s.top1 is not None]
    detail = next((s.detail for s in stats if s.detail), None)
    return OutputComparison(
        output=name,
        index=index,
        shape=tuple(int(d) for d in per_batch[0][1].shape),
        max_abs_diff=max(s.max_abs for s in stats),
        mean_abs_diff=sum(s.sum_abs for s in stats) / count if count else 0.0,
        max_rel_diff=max(s.max_rel for s in stats),
        cosine_similarity=min(s.cosine for s in stats),
        top1_agreement=sum(a for a, _ in tops) / sum(n for _, n in tops) if tops else None,
        ratio=worst.ratio,
        needed_atol=worst.ratio * tol.atol,
        needed_rtol=worst.ratio * tol.rtol,
        worst_input=worst_input,
        worst_index=worst.worst_index,
        worst_reference=worst.worst_ref,
        worst_candidate=worst.worst_cand,
        passed=worst.ratio <= 1.0 and detail is None,
        detail=detail,
    )


# ------------------------------------------------------------------------------------ inputs


def _sample_batches(inputs: Any, precision: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """A list means several batches; a tensor or a tuple of tensors is one batch. Floating
    inputs are rounded to ``precision`` and kept as float32 (see ``_as_cpu_fp32``)."""
    batches = list(inputs) if isinstance(inputs, list) else [inputs]
    if not batches:
        raise UsageError("verify needs at least one input batch to learn the input shapes")
    result = []
    for number, batch in enumerate(batches):
        args = as_args(batch)
        for index, arg in enumerate(args):
            if not isinstance(arg, torch.Tensor) or arg.dim() == 0:
                raise UsageError(
                    f"input batch {number}, argument {index}: expected a tensor with a batch "
                    f"dimension, got {type(arg).__name__}"
                )
        result.append(tuple(_as_cpu_fp32(arg, precision) for arg in args))
    return result


def _as_cpu_fp32(tensor: torch.Tensor, precision: torch.dtype = torch.float32) -> torch.Tensor:
    """A float32 CPU copy of a floating tensor whose values are all representable in
    ``precision`` (rounded to it first when it is a half type), so that a half-precision model
    and its float32 copy are fed the very same values."""
    tensor = tensor.detach().to("cpu")
    if not tensor.is_floating_point():
        return tensor
    if precision in HALF_EPS:
        tensor = tensor.to(precision)
    return tensor.float()


def _random_batch(
    like: tuple[torch.Tensor, ...], batch: int, seed: int, precision: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal float inputs shaped like ``like`` with ``batch`` rows (rounded
    to ``precision``); non-float inputs (e.g. token ids) repeat the sample's rows instead."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for arg in like:
        if arg.is_floating_point():
            values = torch.randn((batch, *arg.shape[1:]), generator=gen, dtype=torch.float32)
            out.append(_as_cpu_fp32(values, precision))
        else:
            out.append(arg[torch.arange(batch) % arg.shape[0]])
    return tuple(out)


def _input_plan(
    inputs: Any, random_batch_sizes: Sequence[int], seed: int, precision: torch.dtype
) -> tuple[list[tuple[torch.Tensor, ...]], list[InputInfo]]:
    samples = _sample_batches(inputs, precision)
    batches, infos = [], []
    for batch in samples:
        batches.append(batch)
        infos.append(InputInfo("sample", int(batch[0].shape[0]), _shapes(batch)))
    for number, size in enumerate(random_batch_sizes):
        if size < 1:
            raise UsageError(f"random batch sizes must be >= 1, got {size}")
        batch = _random_batch(samples[0], size, seed + number, precision)
        batches.append(batch)
        infos.append(InputInfo("random", size, _shapes(batch), seed + number))
    return batches, infos


def _shapes(batch: tuple[torch.Tensor, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in arg.shape) for arg in batch)


# -------------------------------------------------------------------------------- candidates


@dataclass
class _Spec:
    """One runner to build: what, where, and how to name it."""

    kind: str  # "torch-cpu", "ort-cpu", "ort-cpu-noopt", "torch-cuda", "ort-cuda"
    name: str
    target: Any  # nn.Module or Path
    fold_result: FoldResult | None


def _candidate_items(candidates: Any) -> list[tuple[str | None, Any]]:
    if isinstance(candidates, Mapping):
        return [(str(key), value) for key, value in candidates.items()]
    if isinstance(candidates, (list, tuple)):
        return [(None, value) for value in candidates]
    return [(None, candidates)]


def _specs(candidates: Any, providers: Sequence[str]) -> list[_Spec]:

    specs: list[_Spec] = []
    for label, value in _candidate_items(candidates):
        fold_result = value if isinstance(value, FoldResult) else None
        if fold_result is not None:
            value = fold_result.model
        if isinstance(value, ExportResult):
            value = value.path
        if isinstance(value, nn.Module):
            kinds = [k for k, p in (("torch-cpu", "cpu"), ("torch-cuda", "cuda")) if p in providers]
            target = value
        elif isinstance(value, (str, os.PathLike)):
            kinds = [
                k
                for k, p in (("ort-cpu", "cpu"), ("ort-cpu-noopt", "cpu"), ("ort-cuda", "cuda"))
                if p in providers
            ]
            target = Path(value)
        else:
            raise UsageError(
                f"cannot verify a {type(value).__name__}: a candidate is an nn.Module, a "
                "FoldResult, an ONNX file path or an ExportResult"
            )
        specs.extend(_Spec(k, f"{label}:{k}" if label else k, target, fold_result) for k in kinds)
    names = [spec.name for spec in specs]
    duplicated = {name for name in names if names.count(name) > 1}
    if duplicated:
        raise UsageError(
            f"several candidates would be named {', '.join(sorted(duplicated))}; pass candidates "
            "as a mapping {label: candidate} to tell them apart"
        )
    return specs


def _build_runner(spec: _Spec) -> Any:

    if spec.kind.startswith("torch-"):
        return runtime.torch_runner(spec.target, spec.kind.removeprefix("torch-"), name=spec.name)
    device = runtime.CUDA if spec.kind == "ort-cuda" else runtime.CPU
    optimization = runtime.OPT_DISABLE_ALL if spec.kind.endswith("-noopt") else runtime.OPT_DEFAULT
    return runtime.ort_runner(spec.target, device, optimization=optimization, name=spec.name)


# ----------------------------------------------------------------------------------- verify


def verify(
    reference: nn.Module,
    candidates: Any,
    inputs: Any,
    providers: Sequence[str] | None = None,
    *,
    random_batch_sizes: Sequence[int] = DEFAULT_RANDOM_BATCH_SIZES,
    seed: int = 0,
    tolerances: Mapping[str, Tolerance] | None = None,
    locate: bool = True,
) -> VerificationReport:
    """Compare each candidate with ``reference`` (the original, unfolded model) on ``inputs``.

    ``candidates``: one candidate, a list, or a mapping ``{label: candidate}``; a candidate is an
    nn.Module or FoldResult (run by PyTorch) or an ONNX path or ExportResult (run by ORT).
    ``inputs``: one batch (a tensor or a tuple of positional tensors) or a list of batches; seeded
    random batches of ``random_batch_sizes`` rows are added (seed ``seed``).
    ``providers``: which devices to verify on, from "cpu" and "cuda". Left as None it means
    ("cpu", "cuda") with CUDA optional: a CUDA candidate that cannot run is reported "not run:
    <why>". Naming "cuda" explicitly makes an unusable ORT CUDA provider (or, when only PyTorch
    candidates are given, unusable PyTorch CUDA) raise RuntimeUnavailableError with the reason.
    ``tolerances`` overrides entries of DEFAULT_TOLERANCES by candidate kind. With ``locate``,
    a failing PyTorch candidate is traced layer by layer to name the first diverging layer.
    Every candidate runs on inputs in its own dtype. A float16 or bfloat16 ``reference`` is
    also run as a float32 copy, each candidate must pass against both, and the tolerance is
    ``half_tolerance`` (``atol = rtol = 4 * eps`` on CPU, eps = 2^-10 for float16, 2^-7 for
    bfloat16) unless ``tolerances`` overrides it.

    Never raises for a numerical failure: check ``report.passed`` (or ``require_passed``).
    Neither the reference nor any candidate is mutated (eval flags are restored).
    """
    explicit_cuda = providers is not None and "cuda" in providers
    providers = tuple(DEFAULT_PROVIDERS if providers is None else providers)
    unknown = [p for p in providers if p not in DEFAULT_PROVIDERS]
    if unknown or not providers:
        raise UsageError(f"unknown providers {unknown or providers}; choose from cpu, cuda")
    specs = _specs(candidates, providers)
    if not specs:
        raise UsageError("no candidate to verify for the requested providers")
    precision = _precision(reference)
    tols = _tolerances(precision, tolerances)
    references, notes = _references(reference, precision)
    batches, infos = _input_plan(inputs, random_batch_sizes, seed, precision)
    if len({info.batch_size for info in infos}) < 2:
        notes.append("only one batch size was run; a batch-dependent export would go unnoticed")

    with tf32_disabled() as tf32:
        for ref in references:
            ref.outputs = _reference_outputs(ref.module, batches, infos)
        has_onnx = any(spec.kind.startswith("ort-") for spec in specs)
        reports = []
        for spec in specs:
            must_run = (
                explicit_cuda
                and spec.kind.endswith("cuda")
                and (spec.kind == "ort-cuda" or not has_onnx)
            )
            reports.append(_check_candidate(spec, references, batches, tols, must_run, locate))
    settings = {
        "reference": _reference_setting(precision),
        "torch": torch.__version__,
        "onnxruntime": ort_version() if has_onnx else "not used",
        **tf32,
        "ort.cuda.use_tf32": "0",
        "torch.num_threads": str(torch.get_num_threads()),
    }
    return VerificationReport(
        reference=type(references[0].module).__name__,
        candidates=_with_hints(reports),
        inputs=tuple(infos),
        settings=settings,
        notes=tuple(notes),
    )


def _reference_outputs(
    reference: nn.Module, batches: list[tuple[torch.Tensor, ...]], infos: list[InputInfo]
) -> list[list[np.ndarray]]:

    runner = TorchRunner(reference)
    outputs = []
    for number, (batch, info) in enumerate(zip(batches, infos, strict=True)):
        try:
            outputs.append(runner(batch))
        except Exception as exc:
            hint = (
                "; if it only accepts a fixed batch size, leave out the random batches "
                "(random_batch_sizes=())"
                if info.source == "random"
                else ""
            )
            raise ModelInputError(
                f"the reference model failed on input #{number} ({info.source} batch of "
                f"{info.batch_size}, shapes {list(info.shapes)}): {type(exc).__name__}: "
                f"{first_line(exc, with_type=False)}{hint}"
            ) from exc
    return outputs


@dataclass
class _Reference:
    """One model every candidate is compared with, and its outputs on each input batch."""

    label: str | None  # None for the original as it is; "float32" for the copy of a half model
    module: nn.Module
    outputs: list[list[np.ndarray]] = field(default_factory=list)


def _precision(model: nn.Module) -> torch.dtype:
    """The original model's floating dtype (float32 when it has no floating tensor)."""

    if not isinstance(model, nn.Module):
        raise UsageError(f"the reference must be an nn.Module, got {type(model).__name__}")
    return float_dtype(model)


def _tolerances(
    precision: torch.dtype, overrides: Mapping[str, Tolerance] | None
) -> dict[str, Tolerance]:
    """Per candidate kind: ``DEFAULT_TOLERANCES``, or ``half_tolerance`` for a half-precision
    original, then the caller's ``overrides``."""
    if precision in HALF_EPS:
        base = {
            kind: half_tolerance(precision, "cuda" if kind.endswith("cuda") else "cpu")
            for kind in DEFAULT_TOLERANCES
        }
    else:
        base = dict(DEFAULT_TOLERANCES)
    return {**base, **(overrides or {})}


def _references(model: nn.Module, precision: torch.dtype) -> tuple[list[_Reference], list[str]]:
    """The references: a float32 CPU model, or for a float16/bfloat16 original the original on
    CPU and a float32 copy of it. The caller's model is never converted in place."""
    if precision not in HALF_EPS:
        module, notes = _cpu_fp32_reference(model)
        return [_Reference(None, module)], notes
    on_cpu = all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    original = model if on_cpu else copy.deepcopy(model).to("cpu")
    copied = copy.deepcopy(original).float()
    name = str(precision).removeprefix("torch.")
    note = (
        f"half precision: every candidate runs on inputs in its own dtype (rounded to {name} "
        f"once) and is compared with the {name} original and with a float32 copy of it"
    )
    return [_Reference(None, original), _Reference("float32", copied)], [note]


def _reference_setting(precision: torch.dtype) -> str:
    if precision not in HALF_EPS:
        return "original model, eval mode, float32, CPU"
    name = str(precision).removeprefix("torch.")
    return f"original model, eval mode, {name}, CPU; and its float32 copy"


def _cpu_fp32_reference(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The reference as a float32 CPU module: the model itself when it already is one, else a
    converted copy (the caller's model is never converted in place)."""
    tensors = [*model.parameters(), *model.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    if all(t.device.type == "cpu" for t in tensors) and all(
        t.dtype == torch.float32 for t in floats
    ):
        return model, []
    converted = copy.deepcopy(model).to("cpu").float()
    return converted, ["the reference was converted to a float32 CPU copy for verification"]


def _check_candidate(
    spec: _Spec,
    references: list[_Reference],
    batches: list[tuple[torch.Tensor, ...]],
    tols: Mapping[str, Tolerance],
    must_run: bool,
    locate: bool,
) -> CandidateReport:
    tol = tols[spec.kind]
    engine = "torch" if spec.kind.startswith("torch") else "onnxruntime"
    device = "cuda" if spec.kind.endswith("cuda") else "cpu"
    try:
        runner = _build_runner(spec)
    except RuntimeUnavailableError as exc:
        if must_run:
            raise
        return CandidateReport(spec.name, engine, device, Status.NOT_RUN, tol, reason=str(exc))
    info = runner.info
    base = {
        "name": spec.name,
        "engine": engine,
        "device": info.device,
        "tolerance": tol,
        "providers": info.providers,
        "settings": info.settings,
    }
    names = getattr(runner, "output_names", None)
    per_output: dict[tuple[int, int], list[tuple[int, np.ndarray, Stats]]] = {}
    for number, batch in enumerate(batches):
        try:
            got = runner(batch)
        except Exception as exc:  # any engine error is a failure of this candidate
            reason = (
                f"raised {type(exc).__name__} on input #{number} (batch "
                f"{batch[0].shape[0]}): {first_line(exc, with_type=False)}"
            )
            return CandidateReport(**base, status=Status.FAILED, reason=reason)
        expected = references[0].outputs[number]
        if len(got) != len(expected):
            reason = f"returned {len(got)} outputs, the reference {len(expected)}"
            return CandidateReport(**base, status=Status.FAILED, reason=reason)
        for which, ref in enumerate(references):
            for index, (want, cand) in enumerate(zip(ref.outputs[number], got, strict=True)):
                stats = compare_arrays(want, cand, tol)
                per_output.setdefault((which, index), []).append((number, want, stats))
    count = len(references[0].outputs[0])
    outputs = tuple(
        _aggregate(_output_name(names, index, count, references[which].label), index, items, tol)
        for (which, index), items in per_output.items()
    )
    if all(out.passed for out in outputs):
        return CandidateReport(**base, status=Status.PASSED, outputs=outputs)
    failing = [out for out in outputs if not out.passed]
    reason = "; ".join(
        f"{out.output}: {out.detail}"
        if out.detail
        else f"{out.output}: max abs diff {out.max_abs_diff:.3g} is {out.ratio:.3g}x the tolerance"
        for out in failing
    )
    divergence = None
    if locate and spec.kind == "torch-cpu":
        worst = max(failing, key=lambda out: out.ratio).worst_input
        pairs = _fold_pairs(spec.fold_result)
        original = references[0].module
        divergence = locate_divergence(original, spec.target, batches[worst], tol, pairs)
        divergence = divergence and _with_input(divergence, worst)
    return CandidateReport(
        **base, status=Status.FAILED, outputs=outputs, reason=reason, divergence=divergence
    )


def _output_name(
    names: Sequence[str] | None, index: int, count: int, reference: str | None = None
) -> str:
    if names and index < len(names):
        name = names[index]
    else:
        name = "output" if count == 1 else f"output_{index}"
    return name if reference is None else f"{name} vs {reference}"


def _with_hints(reports: list[CandidateReport]) -> tuple[CandidateReport, ...]:
    """Say which stage each failure points at, from which candidates passed."""
    status = {r.name.split(":")[-1]: r.status for r in reports}
    out = []
    for r in reports:
        kind = r.name.split(":")[-1]
        hint = None
        if r.status is Status.FAILED:
            if kind == "torch-cpu":
                hint = "folded PyTorch differs from the original: the fold is wrong"
            elif kind.startswith("ort-cpu") and status.get("torch-cpu") is Status.PASSED:
                hint = "folded PyTorch passed: the difference comes from the ONNX export"
                if kind == "ort-cpu" and status.get("ort-cpu-noopt") is Status.PASSED:
                    hint = (
                        "ORT_DISABLE_ALL passed: ONNX Runtime's graph optimizer introduced "
                        "the difference"
                    )
            elif kind.endswith("cuda") and status.get(kind.replace("cuda", "cpu")) is Status.PASSED:
                hint = "the CPU run passed: the difference comes from CUDA runtime numerics"
        out.append(r if hint is None else _replace(r, hint=hint))
    return tuple(out)


def _replace(record: Any, **changes: Any) -> Any:
    return dataclasses.replace(record, **changes)


def _with_input(divergence: LayerDivergence, index: int) -> LayerDivergence:
    return _replace(divergence, input_index=index)


def _fold_pairs(fold_result: FoldResult | None) -> list[tuple[str, str]] | None:
    if fold_result is None:
        return None
    return [(fp.pair.producer, fp.pair.bn) for fp in fold_result.folded]


# ---------------------------------------------------------------------------------- rendering

_COLUMNS = (
    "candidate",
    "status",
    "max abs",
    "mean abs",
    "max rel",
    "cosine",
    "top-1",
    "err/tol",
    "worst at",
)


def _format_report(report: VerificationReport) -> str:
    """Fits in 100 columns: one row per candidate (and output, when there are several)."""
    lines = [report.summary(), f"reference: {report.reference} ({report.settings['reference']})"]
    lines.append(
        "inputs: "
        + ", ".join(
            f"#{n} {info.source} batch of {info.batch_size}"
            + (f" (seed {info.seed})" if info.seed is not None else "")
            for n, info in enumerate(report.inputs)
        )
    )
    tf32 = [f"{k}={v}" for k, v in report.settings.items() if "tf32" in k]
    lines.append("TF32 off: " + ", ".join(tf32))
    rows = [list(_COLUMNS)]
    for cand in report.candidates:
        if not cand.outputs:
            rows.append([cand.name, cand.status.value, *[""] * 7])
        for out in cand.outputs:
            label = cand.name if len(cand.outputs) == 1 else f"{cand.name} {out.output}"
            rows.append([label, cand.status.value, *_metric_cells(out)])
    lines.extend(_table(rows))
    for cand in report.candidates:
        if cand.status is Status.PASSED:
            continue
        lines.append(f"{cand.name} {cand.status.value}: {cand.reason}")
        for out in cand.outputs:
            if not out.passed and out.detail is None:
                lines.append(
                    f"  worst element of {out.output}: input #{out.worst_input} "
                    f"[{', '.join(map(str, out.worst_index))}], reference "
                    f"{out.worst_reference:.7g}, candidate {out.worst_candidate:.7g}; would "
                    f"pass at atol {out.needed_atol:.2g}, rtol {out.needed_rtol:.2g}"
                )
        if cand.divergence is not None:
            lines.append(f"  {cand.divergence.describe()}")
        if cand.hint:
            lines.append(f"  {cand.hint}")
    by_tol: dict[str, list[str]] = {}
    for cand in report.candidates:
        by_tol.setdefault(cand.tolerance.describe(), []).append(cand.name)
    for text, names in by_tol.items():
        lines.append(f"tolerance for {', '.join(names)}: {text}")
    lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)


def _metric_cells(out: OutputComparison) -> list[str]:
    top1 = "-" if out.top1_agreement is None else f"{100 * out.top1_agreement:.1f}%"
    if out.detail:
        return ["", "", "", "", top1, "inf", out.detail]
    return [
        f"{out.max_abs_diff:.2e}",
        f"{out.mean_abs_diff:.2e}",
        f"{out.max_rel_diff:.2e}",
        f"{out.cosine_similarity:.6f}",
        top1,
        f"{out.ratio:.3g}",
        f"#{out.worst_input}[{','.join(map(str, out.worst_index))}]",
    ]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
