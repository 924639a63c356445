"""Export to ONNX: ``export_onnx`` (``bnfold.export.onnx_export``), the only caller of
``torch.onnx.export`` (``exporter``), the checks on the written graph (``graph``), the
batch-dimension proof (``batch``), metadata and external data (``files``)."""

from bnfold.export.batch import DynamicBatchCheck
from bnfold.export.files import external_data_path
from bnfold.export.graph import BatchNormNode, batchnorm_nodes, training_batchnorms
from bnfold.export.onnx_export import ExportResult, export_onnx, refuse_bfloat16

__all__ = [
    "BatchNormNode",
    "DynamicBatchCheck",
    "ExportResult",
    "batchnorm_nodes",
    "export_onnx",
    "external_data_path",
    "refuse_bfloat16",
    "training_batchnorms",
]
