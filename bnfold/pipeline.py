"""The order of bnfold's stages, written once for every command and the demo:

    load -> example inputs -> [recalibrate] -> fold (or find) -> save -> [export] -> [verify]

``run(job)`` follows it for a ``bnfold.jobs.Job`` and returns the ``Report`` that
``bnfold.report`` renders; ``process`` is the part after loading, for a model in memory (the
demo). Every path is checked before the model is loaded (a default name that needs the loaded
model, right after loading).

Each forward runs once: the find stage's own forward counts the original model's batch norms
(``count_find_forward``) and is the first to try the example inputs (only when it fails does
``check_inputs`` run the model again, to name the layer); the count after folding checks the
fold. Stages are named through ``Hooks``; nothing here prints. Under ``torch.distributed`` only
rank 0 writes files.
"""

from __future__ import annotations

import functools
import itertools
import platform
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from bnfold.calibrate.data import DataSource, load_data
from bnfold.calibrate.recalibrate import recalibrate
from bnfold.errors import UsageError
from bnfold.export import export_onnx, external_data_path, refuse_bfloat16
from bnfold.find.analyse import find_pairs
from bnfold.find.kernels import count_bn_kernels, count_find_forward
from bnfold.folding.surgery import fold
from bnfold.io.inputs import (
    check_inputs,
    describe_inputs,
    make_example_inputs,
    model_dtype,
    parse_dtype,
)
from bnfold.io.models import (
    LoadedModel,
    ModelFormat,
    default_output_path,
    expected_source,
    load_model,
    output_format,
    save_model,
)
from bnfold.io.paths import NamedPath, plan_paths, refuse_special_file, spec_path
from bnfold.io.save import STATE_DICT_FORMATS
from bnfold.jobs import (
    NO_HOOKS,
    DataRequest,
    Hooks,
    Job,
    ModelRequest,
    Report,
    VerifyRequest,
)
from bnfold.modes import set_eval
from bnfold.outputs import (
    Target,
    would_write,
    written_before_failure,
)
from bnfold.verification.verifier import verify
from bnfold.version import __version__

T = TypeVar("T")
PROGRAM = ModelFormat.EXPORTED_PROGRAM


def run(job: Job, hooks: Hooks = NO_HOOKS) -> Report:
    """Every stage ``job`` asks for, in order; see the module docstring."""
    request = job.model
    guess = expected_source(request.spec, arch=request.arch, trust_pickle=request.trust_pickle)
    output = job.output or (default_output_path(guess, folded=job.fold) if guess else None)
    planned = output if job.save else None
    check_paths(job, planned)
    files = [c for _, c in job.candidates if isinstance(c, Path)]
    for candidate in files:
        refuse_special_file(candidate, "ONNX models")
    missing = [c for c in files if not c.is_file()]
    if missing:
        raise UsageError(f"no ONNX file at {missing[0]}")
    loaded = _load(request, hooks)
    targets = model_targets(job, loaded, planned)
    model = loaded.model if job.device is None else loaded.model.to(job.device)
    data = open_data(job.data, model, hooks) if job.data else None
    needs_inputs = job.find or (job.verify is not None and job.verify.data is None)
    needs_inputs = needs_inputs or any(t.format not in STATE_DICT_FORMATS for t in targets)
    inputs, inputs_from = example_inputs(request, loaded, data, hooks) if needs_inputs else ((), "")
    given = {
        label: _load(c, hooks).model if isinstance(c, ModelRequest) else c
        for label, c in job.candidates
    }
    dims = loaded.dynamic_dims
    report = process(
        model,
        inputs,
        job,
        hooks,
        data=data,
        targets=targets,
        dynamic_dims=dims if dims is not None and len(dims) == len(inputs) else None,
        candidates=given,
    )
    planned = [t.path for t in targets] + ([job.onnx] if job.onnx else [])
    return replace(
        report,
        command=job.command,
        versions=versions(),
        model=loaded.to_dict(),
        inputs=tuple(describe_inputs(inputs)),
        inputs_from=inputs_from,
        data=_data_record(job.data, data) if data is not None else None,
        onnx=next((str(c) for _, c in job.candidates if isinstance(c, Path)), None),
        dry_run=job.dry_run,
        notes=tuple(would_write(path, job.force) for path in planned if job.dry_run),
    )


def process(
    model: nn.Module,
    inputs: tuple[Any, ...],
    job: Job,
    hooks: Hooks = NO_HOOKS,
    *,
    data: Any = None,
    targets: tuple[Target, ...] = (),
    dynamic_dims: tuple[tuple[int, ...], ...] | None = None,
    candidates: dict[str, Any] | None = None,
) -> Report:
    """The stages after loading, on ``model`` in memory, as ``job`` asks: recalibrate it in place
    on ``data`` (it is then the original every candidate is compared with), fold or find, write
    ``targets``, export, and verify the results and the given ``candidates``. The report holds
    the stages' records only."""
    if job.onnx and not job.dry_run:
        refuse_bfloat16(model)  # before any stage runs or writes
    report = Report()
    if data is not None:
        batches = job.data.batches if job.data else None
        total = data.num_samples(batches) if isinstance(data, DataSource) else None
        with hooks.recalibrating(total) as progress:
            report = Report(recalibrate(model, data, batches=batches, progress=progress))
    if job.find:
        with hooks.stage("Folding" if job.fold else "Reading the model's dataflow"):
            report = _find_or_fold(model, inputs, job, report)
    if not job.dry_run and rank() == 0:
        report = _write(model, inputs, job, hooks, report, targets, dynamic_dims)
    if job.verify is not None:
        request = job.verify
        results = {job.verify_label: report.result, "onnx": report.export}
        results = {**(candidates or {}), **{k: v for k, v in results.items() if v}}
        with written_before_failure(report.written), hooks.stage("Verifying"):
            verification = verify(
                model,
                results,
                _verification_batches(request, inputs),
                providers=request.providers,
                seed=request.seed,
                random_batch_sizes=request.random_batch_sizes,
            )
        report = replace(report, verification=verification)
    return report


def _find_or_fold(model: nn.Module, inputs: tuple[Any, ...], job: Job, report: Report) -> Report:
    """The plan (and, with ``job.fold``, the folded model) and the BN kernels one forward runs
    before and after folding (without folding: after is before when the model is exported)."""
    folder = functools.partial(fold, merge_branches=job.merge_branches)
    finder = functools.partial(find_pairs, merge_branches=job.merge_branches)
    with count_find_forward() as original:
        result = _first_forward(folder, model, inputs) if job.fold else None
        plan = result.plan if result else _first_forward(finder, model, inputs)
    before = original.count
    if before is None:  # the dataflow was recorded, not read from a checked trace
        before = count_bn_kernels(model, inputs)
    after = count_bn_kernels(result.model, inputs) if result else None
    after = before if result is None and job.onnx else after
    return replace(
        report, plan=plan, result=result, bn_kernels_before=before, bn_kernels_after=after
    )


def _write(
    model: nn.Module,
    inputs: tuple[Any, ...],
    job: Job,
    hooks: Hooks,
    report: Report,
    targets: tuple[Target, ...],
    dynamic_dims: tuple[tuple[int, ...], ...] | None,
) -> Report:
    """Save the (folded) model as ``targets``, then export it to ONNX; a failure names the
    files already written."""
    for target in targets:
        with written_before_failure(report.written), hooks.stage(f"Writing {target.path}"):
            to_save = report.result.model if report.result else set_eval(model)
            saved = save_model(
                to_save,
                target.path,
                example_inputs=inputs,
                format=target.format,
                overwrite=job.force,
                dynamic_dims=dynamic_dims,
            )
        report = replace(report, outputs=(*report.outputs, saved))
    if job.onnx:
        with written_before_failure(report.written), hooks.stage(f"Exporting {job.onnx}"):
            exported = export_onnx(
                report.result or model,
                inputs,
                job.onnx,
                opset=job.opset,
                dynamic_batch=job.dynamic_batch,
                overwrite=job.force,
            )
        report = replace(report, export=exported)
    return report


def _first_forward(stage: Callable[[nn.Module, Any], T], model: nn.Module, inputs: Any) -> T:
    """``stage(model, inputs)``, the first run of the model on ``inputs``: when it fails,
    ``check_inputs`` runs the model again to name the layer that rejected them (a
    ``ModelInputError``); when the model accepts them, the stage's own error stands."""
    try:
        return stage(model, inputs)
    except Exception:
        check_inputs(model, inputs)
        raise


def _load(request: ModelRequest, hooks: Hooks) -> LoadedModel:
    with hooks.stage(f"Loading {request.spec}"):
        return load_model(request.spec, arch=request.arch, trust_pickle=request.trust_pickle)


def open_data(request: DataRequest, model: nn.Module, hooks: Hooks = NO_HOOKS) -> DataSource:
    """``bnfold.load_data`` with ``request``'s options, floating tensors in the model's dtype;
    under ``torch.distributed``, this rank's part (a file split by batch, a callable as given)."""
    dist = torch.distributed
    shard = (dist.get_rank(), dist.get_world_size()) if _distributed() else None
    options = {k: v for k, v in asdict(request).items() if k not in ("spec", "batches")}
    with hooks.stage("Reading --data"):
        return load_data(request.spec, **options, dtype=model_dtype(model), shard=shard)


def example_inputs(
    request: ModelRequest, loaded: LoadedModel, data: DataSource | None, hooks: Hooks = NO_HOOKS
) -> tuple[tuple[Any, ...], str]:
    """The example inputs and where they come from: ``request.shapes``, else the program's own
    (cast to ``request.dtype`` when given), else the first batch of ``data``."""
    if request.shapes:
        dtype = parse_dtype(request.dtype) if request.dtype else model_dtype(loaded.model)
        with hooks.stage("Building the --input-shape example inputs"):
            return make_example_inputs(request.shapes, default_dtype=dtype), "--input-shape"
    if loaded.example_inputs is not None:
        inputs = loaded.example_inputs
        if request.dtype:
            inputs = tuple(t.to(parse_dtype(request.dtype)) for t in inputs)
        return inputs, "the program's example inputs"
    if data is not None:
        with hooks.stage("Reading the first batch of --data"):
            return data.example_inputs(), "the first batch of --data"
    raise UsageError(
        f"{request.spec} carries no example inputs: pass --input-shape, e.g. "
        "--input-shape 1x3x224x224 (repeat it for each positional input), or --data"
    )


def _verification_batches(request: VerifyRequest, inputs: Any) -> list[Any]:
    """The batches to verify on: the first ``request.batches`` of DATA, else the inputs."""
    if request.data is None:
        return [inputs]
    if not isinstance(request.data, str):
        return list(request.data)
    data = load_data(request.data, batch_size=request.batch_size, seed=request.seed)
    batches = list(itertools.islice(data, request.batches))
    if any(isinstance(batch, dict) for batch in batches):
        raise UsageError(f"{request.data} yields dict batches; verify feeds positional inputs")
    return batches


def _data_record(request: DataRequest | None, data: DataSource) -> dict[str, Any]:
    return {
        "source": data.description,
        "batch_size": request.batch_size,
        "seed": request.seed,
        "batches_limit": request.batches,
        "split": data.split,
        "samples": data.total_samples(),
    }


def check_paths(job: Job, model_output: Path | None) -> None:
    """Check every path ``job`` reads and writes before any work (``plan_paths``), each under
    the option that named it, so an error says which option to change; ``model_output`` is the
    model file to write, when known. A dry run names its model and ONNX outputs without writing
    them, so they may exist."""
    outputs: dict[str, Any] = {}
    if model_output is not None:
        outputs["-o" if job.output else "output"] = model_output
        if job.also_pt2 and output_format(model_output, folded=job.fold) is not PROGRAM:
            outputs["--pt2"] = model_output.with_suffix(".pt2")
    if job.onnx is not None:
        outputs |= {"--onnx": job.onnx, "--onnx (external data)": external_data_path(job.onnx)}
    reads = {
        job.model_role: job.model.spec,
        "--data": job.data and job.data.spec,
        **dict(job.reads),
    }
    sources = [NamedPath(role, path) for role, spec in reads.items() if (path := spec_path(spec))]
    targets = [NamedPath(role, path, written=not job.dry_run) for role, path in outputs.items()]
    for role, path in job.reports:
        if path is not None and not (role in ("--json", "--markdown") and path == "-"):  # stdout
            targets.append(NamedPath(role, Path(path)))
    plan_paths(sources, targets, overwrite=job.force)


def model_targets(job: Job, loaded: LoadedModel, planned: Path | None) -> tuple[Target, ...]:
    """The model files to write, a .pt2 first (its export is what can fail); the paths are
    checked again when the default name needed the loaded model."""
    if not job.save:
        return ()
    main = job.output or default_output_path(loaded, folded=job.fold)
    if main != planned:
        check_paths(job, main)
    pickled = loaded.format is ModelFormat.PICKLED_MODULE
    fmt = output_format(main, folded=job.fold, pickled_input=pickled)
    if job.also_pt2 and fmt is not PROGRAM:
        return Target(main.with_suffix(".pt2"), PROGRAM), Target(main, fmt)
    return (Target(main, fmt),)


def versions() -> dict[str, str]:
    return {"bnfold": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank under ``torch.distributed`` (0 outside it)."""
    return torch.distributed.get_rank() if _distributed() else 0
