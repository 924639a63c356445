"""bnfold: fold every BatchNorm that can be folded, explain the rest, recalibrate exactly,
and prove the deployed ONNX model computes the same function."""

from bnfold.errors import (
    BnfoldError,
    CalibrationError,
    ExportError,
    LoadError,
    ModelInputError,
    RuntimeUnavailableError,
    SaveError,
    TraceError,
    UnsafeFileError,
    UsageError,
    VerificationFailed,
)
from bnfold.fold import fold
from bnfold.graph import find_pairs
from bnfold.kernels import count_bn_kernels
from bnfold.records import BnKind, FoldedPair, FoldResult, Pair, Plan, Skip, SkipReason

__version__ = "0.1.0"

__all__ = [
    "BnKind",
    "BnfoldError",
    "CalibrationError",
    "ExportError",
    "FoldResult",
    "FoldedPair",
    "LoadError",
    "ModelInputError",
    "Pair",
    "Plan",
    "RuntimeUnavailableError",
    "SaveError",
    "Skip",
    "SkipReason",
    "TraceError",
    "UnsafeFileError",
    "UsageError",
    "VerificationFailed",
    "__version__",
    "count_bn_kernels",
    "find_pairs",
    "fold",
]
