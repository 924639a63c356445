"""bnfold: fold every BatchNorm that can be folded, explain the rest, recalibrate exactly,
and prove the deployed ONNX model computes the same function."""

from bnfold.calibrate import CalibrationReport, LayerCalibration, LayerStatus, recalibrate
from bnfold.data import DataSource, load_data
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
from bnfold.export import ExportResult, export_onnx
from bnfold.fold import fold
from bnfold.graph import find_pairs
from bnfold.io import LoadedModel, ModelFormat, SavedModel, load_model, save_model
from bnfold.kernels import count_bn_kernels
from bnfold.records import BnKind, FoldedPair, FoldResult, Pair, Plan, Skip, SkipReason
from bnfold.verify import VerificationReport, require_passed, verify

__version__ = "0.1.0"

__all__ = [
    "BnKind",
    "BnfoldError",
    "CalibrationError",
    "CalibrationReport",
    "DataSource",
    "ExportError",
    "ExportResult",
    "FoldResult",
    "FoldedPair",
    "LayerCalibration",
    "LayerStatus",
    "LoadError",
    "LoadedModel",
    "ModelFormat",
    "ModelInputError",
    "Pair",
    "Plan",
    "RuntimeUnavailableError",
    "SaveError",
    "SavedModel",
    "Skip",
    "SkipReason",
    "TraceError",
    "UnsafeFileError",
    "UsageError",
    "VerificationFailed",
    "VerificationReport",
    "__version__",
    "count_bn_kernels",
    "export_onnx",
    "find_pairs",
    "fold",
    "load_data",
    "load_model",
    "recalibrate",
    "require_passed",
    "save_model",
    "verify",
]
