"""``bnfold fold``: fold every foldable BatchNorm and save a model that loads without bnfold.

The command is a pipeline of small steps over one ``FoldRun``:

    load + check inputs → [recalibrate] → fold → save → [export ONNX] → [verify] → report

A stage is an option on ``fold``, a ``_<stage>_step(run, ...)`` function that reads
``run.model``/``run.inputs`` and appends its record to ``run.sections`` (shown in the text
report through its ``format_text()`` or ``summary()``, and in the JSON under its name), and one
line in ``fold`` (``--data``, ``--onnx`` and ``--verify`` are built this way).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from bnfold_cli.commands.recalibrate import (
    DATA_HELP,
    DataRequest,
    data_options,
    open_data,
    recalibrate_with_progress,
)
from bnfold_cli.main import EPILOG as EXIT_CODES
from bnfold_cli.options import (
    MODEL_HELP,
    ModelRequest,
    Prepared,
    count_bn_kernels,
    emit,
    load,
    model_options,
    plan_paths,
    prepare,
    stage,
    status,
    versions,
    written_before_failure,
)

EPILOG = (
    MODEL_HELP
    + "\n"
    + DATA_HELP
    + """
\b
Output (-o, default MODEL's name + .folded + extension, beside MODEL):
  .pt2      a torch.export program: load with torch.export.load(path).module()
  .pt/.pth  a pickled module, only when MODEL is one (--trust-pickle); add --pt2
            for a .pt2 beside it
No output may be an input (also through a link, a hard link or ..), lie in the
--data folder or be another output; an existing one needs --force (a link is then
replaced, never written through). Every path is checked before any work. Files are
written in a temporary folder beside the output and moved into place at the end,
exclusively unless --force, so a failed or stopped run leaves nothing behind and a
file that appeared meanwhile is never replaced.

\b
Examples:
  bnfold fold model.pt2                       # writes model.folded.pt2
  bnfold fold mypkg.models:resnet50 --input-shape 1x3x224x224 -o resnet50.pt2
  bnfold fold weights.pt --arch mypkg.models:resnet50 --input-shape 1x3x224x224
  bnfold fold model.pt --trust-pickle --pt2   # model.folded.pt + model.folded.pt2
  bnfold fold model.pt2 --dry-run --json report.json
  bnfold fold model.pt2 --onnx model.onnx --verify   # exit 1 if outputs differ
  bnfold fold model.pt2 --data samples.pt     # recalibrate statistics, then fold

"""
    + EXIT_CODES
)


@dataclass
class FoldRun:
    """The state the steps pass along: the model being worked on and what each step did."""

    prepared: Prepared
    model: Any  # the current model: loaded, then recalibrated, then folded
    result: Any = None  # FoldResult
    bn_before: int | None = None
    bn_after: int | None = None
    outputs: list[Any] = field(default_factory=list)  # SavedModel records
    sections: list[tuple[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> tuple[Any, ...]:
        return self.prepared.inputs

    @property
    def loaded(self) -> Any:
        return self.prepared.loaded


@click.command("fold", epilog=EPILOG)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the folded model (.pt2, or .pt/.pth for a pickled MODEL).",
)
@click.option(
    "--pt2",
    "also_pt2",
    is_flag=True,
    help="With a pickled-module output, also write a .pt2 beside it.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace existing output files, reports included (never an input).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Fold in memory and report what would be written; write no file but the reports.",
)
@click.option(
    "--onnx",
    "onnx_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also export the folded model to ONNX at this path (checked: "
    "dynamic batch, no training-mode BatchNormalization).",
)
@click.option(
    "--verify",
    "verify_outputs",
    is_flag=True,
    help="Compare the folded model (and the --onnx file under ONNX Runtime) with the "
    "original; exit 1 if any output differs beyond tolerance.",
)
@data_options(required=False)
@model_options
def fold(
    request: ModelRequest,
    data_request: DataRequest | None,
    output: Path | None,
    also_pt2: bool,
    force: bool,
    dry_run: bool,
    onnx_path: Path | None,
    verify_outputs: bool,
    json_path: str | None,
    markdown_path: str | None,
) -> None:
    """Fold every foldable BatchNorm into its Conv/ConvTranspose/Linear and save the model.

    Prints the table of BatchNorms (folded or kept, and why), the BN kernels one forward runs
    before and after, and where the output was written.
    """
    paths = _FoldPaths(
        request,
        data_request,
        output,
        also_pt2,
        onnx_path,
        json_path,
        markdown_path,
        force=force,
        dry_run=dry_run,
    )
    paths.plan(output or paths.default_before_loading())
    loaded = load(request)
    targets = paths.targets(loaded)
    data = _DataOnce(data_request)
    prepared = prepare(
        request, inputs_from_data=data.example_inputs if data_request else None, loaded=loaded
    )
    run = FoldRun(prepared=prepared, model=prepared.model)
    if data_request is not None:
        _recalibrate_step(run, data, quiet=json_path == "-")
    _fold_step(run)
    if dry_run:
        planned = [path for path, _ in targets] + ([onnx_path] if onnx_path else [])
        run.notes.extend(f"would write {path}" + _exists_note(path, force) for path in planned)
    with written_before_failure(run.outputs):
        if not dry_run:
            _save_step(run, targets, force=force)
        exported = _export_step(run, onnx_path, force) if onnx_path and not dry_run else None
        verification = _verify_step(run, exported) if verify_outputs else None
        with stage("writing the report"):
            emit(
                _report(run, dry_run), json_path=json_path, markdown_path=markdown_path, force=force
            )
    if verification is not None:
        from bnfold import require_passed

        require_passed(verification)  # VerificationFailed: exit code 1, after the report


# ------------------------------------------------------------------ outputs


@dataclass
class _FoldPaths:
    """Every path ``fold`` reads and writes, checked as one plan before any work.

    The default model output's name depends on MODEL's format; it is planned before loading
    whenever the arguments tell the format (``expected_source``), and (re)checked right after
    loading otherwise, before any data is read or anything is folded.
    """

    request: ModelRequest
    data_request: DataRequest | None
    output: Path | None
    also_pt2: bool
    onnx_path: Path | None
    json_path: str | None
    markdown_path: str | None
    force: bool
    dry_run: bool
    planned: Path | None = None

    def default_before_loading(self) -> Path | None:
        from bnfold.io.models import default_output_path, expected_source

        guess = expected_source(
            self.request.spec, arch=self.request.arch, trust_pickle=self.request.trust_pickle
        )
        return default_output_path(guess) if guess is not None else None

    def plan(self, main: Path | None) -> None:
        """Check every input and output (``main``: the model output, when known)."""
        from bnfold.export import external_data_path
        from bnfold.io.models import ModelFormat, output_format

        model: dict[str, Path | None] = {"-o" if self.output else "output": main}
        if main is not None:
            fmt = output_format(main)
            if self.also_pt2 and fmt is not ModelFormat.EXPORTED_PROGRAM:
                model["--pt2"] = main.with_suffix(".pt2")
        onnx = {
            "--onnx": self.onnx_path,
            "--onnx (external data)": self.onnx_path and external_data_path(self.onnx_path),
        }
        plan_paths(
            {"MODEL": self.request.spec, "--data": self.data_request and self.data_request.spec},
            {**model, **onnx, "--json": self.json_path, "--markdown": self.markdown_path},
            force=self.force,
            named_only=[*model, *onnx] if self.dry_run else (),
        )
        self.planned = main

    def targets(self, loaded: Any) -> list[tuple[Path, Any]]:
        """The model files to write, .pt2 first (its export is what can fail), checked."""
        from bnfold.errors import UsageError
        from bnfold.io.models import ModelFormat, default_output_path, output_format

        main = self.output or default_output_path(loaded)
        if main != self.planned:
            self.plan(main)
        fmt = output_format(main)
        if fmt is ModelFormat.PICKLED_MODULE and loaded.format is not ModelFormat.PICKLED_MODULE:
            raise UsageError(
                f"{main}: a .pt/.pth output is a pickled module, written only when MODEL is "
                "one (loaded with --trust-pickle); write a .pt2 instead"
            )
        targets = [(main, fmt)]
        if self.also_pt2 and fmt is not ModelFormat.EXPORTED_PROGRAM:
            targets.insert(0, (main.with_suffix(".pt2"), ModelFormat.EXPORTED_PROGRAM))
        return targets


def _exists_note(path: Path, force: bool) -> str:
    return " (exists: a real run needs --force)" if os.path.lexists(path) and not force else ""


# ------------------------------------------------------------------ steps


class _DataOnce:
    """``--data`` opened once, for the model as loaded: the example inputs (when no
    ``--input-shape`` is given) and the recalibration read the same source."""

    def __init__(self, request: DataRequest | None) -> None:
        self.request = request
        self.source: Any = None

    def open(self, model: Any) -> Any:
        if self.source is None:
            self.source = open_data(self.request, model)
        return self.source

    def example_inputs(self, model: Any) -> tuple[Any, ...]:
        return self.open(model).example_inputs()


def _recalibrate_step(run: FoldRun, data: _DataOnce, *, quiet: bool) -> None:
    """Recalibrate the loaded model in place: it is also the reference ``--verify`` compares
    with, so verification checks the fold of the recalibrated model."""
    with stage("reading --data"):
        source = data.open(run.model)
    with stage("recalibrating"):
        report = recalibrate_with_progress(run.model, source, data.request, quiet=quiet)
    run.sections.append(("recalibration", report))


def _fold_step(run: FoldRun) -> None:
    import bnfold

    with status("Folding"):
        run.bn_before = count_bn_kernels(run.model, run.inputs)
        run.result = bnfold.fold(run.model, run.inputs)
        run.model = run.result.model
        run.bn_after = bnfold.count_bn_kernels(run.model, run.inputs)


def _save_step(run: FoldRun, targets: list[tuple[Path, Any]], *, force: bool) -> None:
    from bnfold.io.models import save_model

    dims = run.loaded.dynamic_dims
    if dims is not None and len(dims) != len(run.inputs):
        dims = None
    for path, fmt in targets:
        with status(f"Writing {path}"):
            saved = save_model(
                run.model,
                path,
                example_inputs=run.inputs,
                format=fmt,
                overwrite=force,
                dynamic_dims=dims,
            )
        run.outputs.append(saved)


def _export_step(run: FoldRun, path: Path, force: bool) -> Any:
    from bnfold import export_onnx

    with status(f"Exporting {path}"):
        exported = export_onnx(run.result, run.inputs, path, overwrite=force)
    run.sections.append(("export", exported))
    return exported


def _verify_step(run: FoldRun, exported: Any) -> Any:
    """The folded model (and the ONNX file) against the original model, as loaded."""
    from bnfold import verify

    candidates = {"folded (torch)": run.result}
    if exported is not None:
        candidates["onnx"] = exported
    with status("Verifying outputs"):
        report = verify(run.prepared.model, candidates, run.inputs)
    run.sections.append(("verification", report))
    return report


def _report(run: FoldRun, dry_run: bool) -> Any:
    from bnfold.io.inputs import describe_inputs
    from bnfold.report import Report

    return Report(
        command="fold",
        versions=versions(),
        model=run.loaded.to_dict(),
        inputs=describe_inputs(run.inputs),
        inputs_from=run.prepared.inputs_from,
        plan=run.result.plan,
        result=run.result,
        bn_kernels_before=run.bn_before,
        bn_kernels_after=run.bn_after,
        outputs=tuple(run.outputs),
        dry_run=dry_run,
        sections=tuple(run.sections),
        notes=tuple(run.notes),
    )
