"""The records a verification returns, their verdict, and their text.

A ``VerificationReport`` holds one ``CandidateReport`` per candidate run (or not run), each with
one ``OutputComparison`` per output against the reference. ``require_passed`` turns a failed
report into ``VerificationFailed`` (the CLI's exit code 1); ``format_text()`` lays the report
out for a terminal with ``bnfold.text``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from bnfold.errors import VerificationFailed
from bnfold.records import Record
from bnfold.text import table
from bnfold.verification.compare import Tolerance


@dataclass(frozen=True)
class LayerDivergence(Record):
    """The first layer (in the reference's execution order) whose output diverges."""

    layer: str  # module path in the candidate
    reference_layer: str  # the module of the original model it was compared with
    folded_with: str | None  # the BatchNorm folded into it, if any
    max_abs_diff: float
    ratio: float
    input_index: int

    def describe(self) -> str:
        folded = f" (folded with {self.folded_with})" if self.folded_with else ""
        return (
            f"first diverging layer: {self.layer}{folded}: max abs diff "
            f"{self.max_abs_diff:.3g}, {self.ratio:.3g}x the tolerance"
        )


class Status(str, enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    NOT_RUN = "not run"


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
        """Fits in 100 columns: one row per candidate (and output, when there are several),
        then why each failure failed, the tolerances and the notes."""
        inputs = ", ".join(
            f"#{n} {info.source} batch of {info.batch_size}"
            + (f" (seed {info.seed})" if info.seed is not None else "")
            for n, info in enumerate(self.inputs)
        )
        tf32 = ", ".join(f"{k}={v}" for k, v in self.settings.items() if "tf32" in k)
        lines = [
            self.summary(),
            f"reference: {self.reference} ({self.settings['reference']})",
            f"inputs: {inputs}",
            f"TF32 off: {tf32}",
            *table([_COLUMNS, *_metric_rows(self)]),
        ]
        for cand in self.candidates:
            if cand.status is not Status.PASSED:
                lines += _failure_lines(cand)
        by_tol: dict[str, list[str]] = {}
        for cand in self.candidates:
            by_tol.setdefault(cand.tolerance.describe(), []).append(cand.name)
        lines += [f"tolerance for {', '.join(names)}: {text}" for text, names in by_tol.items()]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


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


_COLUMNS = "candidate|status|max abs|mean abs|max rel|cosine|top-1|err/tol|worst at".split("|")


def _metric_rows(report: VerificationReport) -> list[list[str]]:
    rows = []
    for cand in report.candidates:
        if not cand.outputs:
            rows.append([cand.name, cand.status.value, *[""] * 7])
        for out in cand.outputs:
            label = cand.name if len(cand.outputs) == 1 else f"{cand.name} {out.output}"
            rows.append([label, cand.status.value, *_metric_cells(out)])
    return rows


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


def _failure_lines(cand: CandidateReport) -> list[str]:
    lines = [f"{cand.name} {cand.status.value}: {cand.reason}"]
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
    return lines
