"""Verification: compare every candidate with the original model, and say which stage broke.

Star topology: every candidate (folded PyTorch, the ONNX file on ONNX Runtime CPU with default
optimizations and with ORT_DISABLE_ALL, on ORT CUDA, folded PyTorch on CUDA) is compared with
the original model alone, so a failure points at a stage (``_with_hints``). The tolerances are
``bnfold.verification.compare``'s; runners come from ``bnfold.runtime``; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold import runtime
from bnfold.errors import RuntimeUnavailableError, UsageError, first_line
from bnfold.export import ExportResult
from bnfold.records import FoldResult
from bnfold.runtime import ort_version, tf32_disabled
from bnfold.verification.compare import Stats, Tolerance, compare_arrays
from bnfold.verification.inputs import (
    Batch,
    Reference,
    input_batches,
    precision_of,
    reference_setting,
    references,
    tolerances_for,
)
from bnfold.verification.locate import locate_divergence
from bnfold.verification.records import (
    CandidateReport,
    OutputComparison,
    Status,
    VerificationReport,
)

DEFAULT_PROVIDERS = ("cpu", "cuda")
DEFAULT_RANDOM_BATCH_SIZES = (1, 3)


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
    precision = precision_of(reference)
    tols = tolerances_for(precision, tolerances)
    refs, notes = references(reference, precision)
    batches, infos = input_batches(inputs, random_batch_sizes, seed, precision)
    if len({info.batch_size for info in infos}) < 2:
        notes.append("only one batch size was run; a batch-dependent export would go unnoticed")

    with tf32_disabled() as tf32:
        for ref in refs:
            ref.run(batches, infos)
        has_onnx = any(spec.kind.startswith("ort-") for spec in specs)
        reports = []
        for spec in specs:
            must_run = (
                explicit_cuda
                and spec.kind.endswith("cuda")
                and (spec.kind == "ort-cuda" or not has_onnx)
            )
            reports.append(_check_candidate(spec, refs, batches, tols, must_run, locate))
    settings = {
        "reference": reference_setting(precision),
        "torch": torch.__version__,
        "onnxruntime": ort_version() if has_onnx else "not used",
        **tf32,
        "ort.cuda.use_tf32": "0",
        "torch.num_threads": str(torch.get_num_threads()),
    }
    return VerificationReport(
        reference=type(refs[0].module).__name__,
        candidates=_with_hints(reports),
        inputs=tuple(infos),
        settings=settings,
        notes=tuple(notes),
    )


@dataclass
class _Spec:
    """One runner to build: what, where, and how to name it."""

    kind: str  # "torch-cpu", "ort-cpu", "ort-cpu-noopt", "torch-cuda", "ort-cuda"
    name: str
    target: Any  # nn.Module or Path
    fold_result: FoldResult | None


#: The runners each kind of candidate gets, with the provider each needs.
_RUNNERS = {
    "torch": (("torch-cpu", "cpu"), ("torch-cuda", "cuda")),
    "onnx": (("ort-cpu", "cpu"), ("ort-cpu-noopt", "cpu"), ("ort-cuda", "cuda")),
}


def _specs(candidates: Any, providers: Sequence[str]) -> list[_Spec]:
    if isinstance(candidates, Mapping):
        items = [(str(key), value) for key, value in candidates.items()]
    else:
        listed = candidates if isinstance(candidates, (list, tuple)) else [candidates]
        items = [(None, value) for value in listed]
    specs: list[_Spec] = []
    for label, value in items:
        fold_result = value if isinstance(value, FoldResult) else None
        target = fold_result.model if fold_result else value
        if isinstance(target, ExportResult):
            target = target.path
        if isinstance(target, nn.Module):
            runners = _RUNNERS["torch"]
        elif isinstance(target, (str, os.PathLike)):
            runners, target = _RUNNERS["onnx"], Path(target)
        else:
            raise UsageError(
                f"cannot verify a {type(target).__name__}: a candidate is an nn.Module, a "
                "FoldResult, an ONNX file path or an ExportResult"
            )
        for kind, provider in runners:
            if provider in providers:
                specs.append(_Spec(kind, f"{label}:{kind}" if label else kind, target, fold_result))
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
        return runtime.TorchRunner(spec.target, spec.kind.removeprefix("torch-"), name=spec.name)
    device = runtime.CUDA if spec.kind == "ort-cuda" else runtime.CPU
    optimization = runtime.OPT_DISABLE_ALL if spec.kind.endswith("-noopt") else runtime.OPT_DEFAULT
    return runtime.ort_runner(spec.target, device, optimization=optimization, name=spec.name)


def _check_candidate(
    spec: _Spec,
    references: list[Reference],
    batches: list[Batch],
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
                f"{batch[0].shape[0]}): {first_line(exc, with_type=False, lines=6)}; the "
                "original runs this input, this candidate does not"
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
        folded = spec.fold_result.folded if spec.fold_result else None
        pairs = None if folded is None else [(f.pair.producer, f.pair.bn) for f in folded]
        original = references[0].module
        divergence = locate_divergence(original, spec.target, batches[worst], tol, pairs)
        divergence = divergence and dataclasses.replace(divergence, input_index=worst)
    return CandidateReport(
        **base, status=Status.FAILED, outputs=outputs, reason=reason, divergence=divergence
    )


def _output_name(names: Sequence[str] | None, index: int, count: int, reference: str | None) -> str:
    """The output's name in the ONNX file (else ``output``/``output_<index>``), and which
    reference it was compared with when there are several."""
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
                hint = (
                    "folded PyTorch differs from the original: the fold is wrong, or the "
                    "model's own float32 rounding exceeds the tolerance; compare float64 copies "
                    "(model.double() on float64 inputs) to tell them apart: a wrong fold stays, "
                    "rounding goes"
                )
            elif kind.startswith("ort-cpu") and status.get("torch-cpu") is Status.PASSED:
                hint = "folded PyTorch passed: the difference comes from the ONNX export"
                if kind == "ort-cpu" and status.get("ort-cpu-noopt") is Status.PASSED:
                    hint = (
                        "ORT_DISABLE_ALL passed: ONNX Runtime's graph optimizer introduced "
                        "the difference"
                    )
            elif kind.endswith("cuda") and status.get(kind.replace("cuda", "cpu")) is Status.PASSED:
                hint = "the CPU run passed: the difference comes from CUDA runtime numerics"
        out.append(r if hint is None else dataclasses.replace(r, hint=hint))
    return tuple(out)


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
