"""bnfold: fold every BatchNorm that can be folded, explain the rest, recalibrate exactly,
and prove the deployed ONNX model computes the same function."""

from bnfold.calibrate.data import DataSource, load_data
from bnfold.calibrate.recalibrate import recalibrate
from bnfold.calibrate.report import CalibrationReport, LayerCalibration, LayerStatus
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
from bnfold.find.analyse import find_pairs
from bnfold.find.kernels import count_bn_kernels
from bnfold.folding.surgery import fold
from bnfold.io.models import LoadedModel, ModelFormat, SavedModel, load_model, save_model
from bnfold.records import BnKind, FoldedPair, FoldResult, Pair, Plan, Skip, SkipReason
from bnfold.verification.records import VerificationReport, require_passed
from bnfold.verification.verifier import verify
from bnfold.version import __version__

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
