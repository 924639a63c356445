"""The model files a run writes (their names, formats and atomic writing: ``bnfold.io.save``).
When a later stage fails, ``written_before_failure`` names the files already written (they are
complete).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bnfold.errors import BnfoldError
from bnfold.io.models import ModelFormat


@dataclass(frozen=True)
class Target:
    """One model file to write."""

    path: Path
    format: ModelFormat


@contextlib.contextmanager
def written_before_failure(paths: Sequence[str]) -> Iterator[None]:
    """A ``BnfoldError`` leaving the block after files were written (``paths``, appended as
    they are) names them: the same class, with ``(already written, complete: ...)``. An
    interrupt gets the same words as a note (``add_note``), for whoever reports it."""
    try:
        yield
    except BnfoldError as exc:
        if not paths:
            raise
        raise type(exc)(f"{exc} (already written, complete: {', '.join(paths)})") from exc
    except KeyboardInterrupt as exc:
        note = f"already written, complete: {', '.join(paths)}"
        if paths and note not in getattr(exc, "__notes__", ()):
            exc.add_note(note)
        raise


def would_write(path: Path, force: bool) -> str:
    """The dry run's note for an output it names."""
    exists = os.path.lexists(path) and not force
    return f"would write {path}" + (" (exists: a real run needs --force)" if exists else "")
