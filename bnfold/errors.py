"""The one exception hierarchy of bnfold.

Every error a user can cause or meet is a ``BnfoldError``; its message names what failed and says
what to do. The CLI maps these classes to exit codes in one place (``bnfold_cli.main``).
"""

from __future__ import annotations


class BnfoldError(Exception):
    """Base class: bnfold could not do the job (CLI exit code 3)."""


class UsageError(BnfoldError):
    """The request itself is wrong (missing input shape, bad option value): CLI exit code 2."""


class TraceError(BnfoldError):
    """The model's dataflow could not be analysed (tracing failed)."""


class ModelInputError(BnfoldError):
    """The model rejected the example inputs or a data batch; the message names the layer."""


class LoadError(BnfoldError):
    """A model or data file could not be loaded (missing, truncated, not a model, mismatched)."""


class UnsafeFileError(LoadError):
    """Loading the file would execute code from it, and that was not explicitly allowed."""


class UnsafePickleError(UnsafeFileError):
    """A pickle in the file calls Python objects a weights-only load refuses.

    ``references`` names them (``module.name``), read from the pickle's opcodes, never by
    running it.
    """

    def __init__(self, message: str, references: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.references = references


class SaveError(BnfoldError):
    """An output could not be written; nothing was left half-written."""


class CalibrationError(BnfoldError):
    """Recalibration could not finish; the model's statistics were restored."""


class ExportError(BnfoldError):
    """ONNX export failed or produced a graph bnfold refuses to write."""


class RuntimeUnavailableError(BnfoldError):
    """A requested runtime (e.g. ONNX Runtime's CUDA provider) cannot be used here."""


class VerificationFailed(BnfoldError):
    """At least one candidate's outputs differ from the reference beyond tolerance (exit 1)."""


class UnexpectedError(BnfoldError):
    """An exception bnfold did not anticipate (from torch, the user's code, or a resource limit
    such as memory) while a named stage ran; the message names the stage and the original
    exception, which is the ``__cause__`` (CLI exit code 3)."""


def first_line(exc: BaseException, *, with_type: bool = True, lines: int = 1) -> str:
    """An exception in one line: ``TypeError: its first message line`` (``lines`` lines joined),
    or the message alone when not ``with_type``; the type's name when the message is empty."""
    parts = [part.strip() for part in str(exc).strip().splitlines()[:lines] if part.strip()]
    text = " ".join(parts)
    if not with_type:
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
