"""The written ONNX file: its metadata, weights in an external data file when they are large,
and the move into place of a file (and data file) that passed every check."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import SaveError, UsageError
from bnfold.io.paths import publish
from bnfold.records import FoldResult
from bnfold.version import __version__

#: Above this many bytes of weights, they are written to an external data file. Protobuf caps a
#: serialised ONNX file at 2 GiB; 256 MiB of headroom is left for the graph itself.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 256 * 1024**2

#: Tensors smaller than this stay inside the .onnx file even when external data is used (shape
#: inference must read small constants such as axes and shapes).
EXTERNAL_TENSOR_MIN_BYTES = 1024


def set_metadata(
    proto: Any,
    fold_result: FoldResult | None,
    extra: Mapping[str, Any] | None,
    exporter: str,
    dynamic_batch: bool,
) -> dict[str, str]:
    """Record bnfold's and torch's versions, the exporter, the fold counts and ``extra`` in the
    file's ``metadata_props`` (keeping what the exporter put there); returns what was set."""
    props = {
        "bnfold.version": __version__,
        "torch.version": torch.__version__,
        "bnfold.exporter": exporter,
        "bnfold.dynamic_batch": str(dynamic_batch).lower(),
    }
    if fold_result is not None:
        props["bnfold.folded"] = str(len(fold_result.folded))
        props["bnfold.skipped"] = str(len(fold_result.skipped))
    props.update({str(key): str(value) for key, value in (extra or {}).items()})
    merged = {prop.key: prop.value for prop in proto.metadata_props} | props
    del proto.metadata_props[:]
    for key, value in merged.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return props


def external_data_path(path: str | os.PathLike[str]) -> Path:
    """Where ``export_onnx(..., path)`` puts the weights when they go to an external file."""
    target = Path(path)
    return target.with_name(f"{target.name}.data")


def check_target(target: Path, overwrite: bool) -> Path:
    if target.is_dir():
        raise SaveError(f"{target} is a directory; give a file name such as model.onnx")
    if not target.parent.is_dir():
        raise SaveError(f"cannot write {target}: directory {target.parent} does not exist")
    if os.path.lexists(target) and not overwrite:
        raise UsageError(f"{target} already exists; pass --force (overwrite=True) to replace it")
    return target


def write(proto: Any, staged: Path, name: str, threshold: int) -> str | None:
    """Serialise into the staging directory, the weights in an external data file when they
    exceed ``threshold`` bytes; returns that file's name, if one was written."""
    import onnx

    external = sum(tensor.ByteSize() for tensor in proto.graph.initializer) > threshold
    data_name = external_data_path(name).name if external else None
    try:
        onnx.save_model(
            proto,
            str(staged),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=EXTERNAL_TENSOR_MIN_BYTES,
        )
    except (OSError, ValueError) as exc:
        raise SaveError(f"could not write the ONNX file for {name}: {exc}") from exc
    if data_name and not (staged.parent / data_name).exists():
        data_name = None  # every tensor was small enough to stay inline
    return data_name


def publish_export(staged: Path, target: Path, data_name: str | None, overwrite: bool) -> None:
    """Move the staged data file, then the .onnx file, into place (``bnfold.io.paths.publish``).
    When the .onnx file cannot follow, the data file at its name is put back as it was (a copy
    of the one it replaced is kept in the staging folder until then), so an old .onnx file is
    never left beside new weights."""
    data = target.parent / data_name if data_name else None
    previous, moved = None, None
    try:
        if data is not None:  # owner-only as onnx writes it; publish gives it a new file's mode
            previous = _keep(data, staged.parent) if overwrite else None
            publish(staged.parent / data.name, data, overwrite=overwrite)
            moved = data
        publish(staged, target, overwrite=overwrite)
    except BaseException as exc:
        if moved is not None:
            _put_back(moved, previous)
        if isinstance(exc, OSError):
            raise SaveError(
                f"could not move the exported file into place at {target}: {exc}"
            ) from exc
        raise


def _keep(path: Path, folder: Path) -> Path | None:
    """A copy of what is at ``path`` in ``folder`` (the same link, a hard link to the file, or a
    copy of it), or None when there is nothing."""
    kept = folder / f"previous.{path.name}"
    if path.is_symlink():
        os.symlink(os.readlink(path), kept)
    elif path.is_file():
        try:
            os.link(path, kept)
        except OSError:
            shutil.copy2(path, kept)
    else:
        return None
    return kept


def _put_back(path: Path, previous: Path | None) -> None:
    """The file at ``path`` as it was before: ``previous`` moved back, or removed."""
    with contextlib.suppress(OSError):
        if previous is not None:
            os.replace(previous, path)
        else:
            os.unlink(path)
