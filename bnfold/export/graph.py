"""Checks on the exported ONNX graph: no BatchNormalization in training mode, every one left
listed with its reason, and ``onnx.checker`` with strict shape inference on the written file."""

from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfold.errors import ExportError
from bnfold.export.exporter import root_cause
from bnfold.records import FoldResult, Record

_FOLD_TARGETS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class BatchNormNode(Record):
    """A BatchNormalization node left in the exported graph, and why it was not folded."""

    node: str
    module: str | None  # the module path it came from, when the exporter recorded it
    reason: str


def training_batchnorms(proto: Any) -> list[str]:
    """Names of BatchNormalization nodes in training mode (``training_mode=1`` or the extra
    running-statistics outputs), in the main graph and in local functions."""
    nodes = [*proto.graph.node, *(node for function in proto.functions for node in function.node)]
    found = []
    for node in nodes:
        if node.op_type != "BatchNormalization":
            continue
        training = any(a.name == "training_mode" and a.i == 1 for a in node.attribute)
        if training or any(node.output[1:]):
            found.append(node.name or node.output[0])
    return found


def refuse_training_batchnorm(proto: Any) -> None:
    found = training_batchnorms(proto)
    if found:
        raise ExportError(
            f"the exported graph has {len(found)} BatchNormalization node(s) in training mode "
            f"({', '.join(found[:5])}); eval outputs would use batch statistics and ORT's CUDA "
            "provider rejects them. No ONNX file was written. Put the model in eval mode and "
            "call F.batch_norm with training=False."
        )


def batchnorm_nodes(proto: Any, fold_result: FoldResult | None = None) -> tuple[BatchNormNode, ...]:
    """Every BatchNormalization node in the main graph, with the module it came from and why it
    is still there (bnfold's skip reason when known, else what feeds it)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    consumers = Counter(name for node in proto.graph.node for name in node.input)
    skips = {skip.bn: skip for skip in fold_result.skipped} if fold_result is not None else {}
    left = []
    for node in proto.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        module = _module_path(node)
        skip = skips.get(module) if module else None
        if skip is not None:
            reason = f"not folded by bnfold: {skip.reason.label} ({skip.detail})"
        else:
            reason = _structural_reason(node, producers, consumers)
        left.append(BatchNormNode(node.name or node.output[0], module, reason))
    return tuple(left)


def _module_path(node: Any) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if len(scopes) >= 3 and scopes[-2] else None
    return None


def _structural_reason(node: Any, producers: dict, consumers: Counter) -> str:
    source = producers.get(node.input[0])
    if source is None:
        return "its input is a graph input: there is no layer before it to fold into"
    if source.op_type not in _FOLD_TARGETS:
        return f"follows a {source.op_type} node: there is no Conv/Gemm before it to fold into"
    users = consumers[node.input[0]]
    if users > 1:
        return (
            f"follows a {source.op_type} whose output has {users} consumers; folding "
            "would change the other paths"
        )
    return f"follows a {source.op_type} but was not folded (the model was not folded?)"


def default_opset(proto: Any) -> int:
    """The model's default-domain opset."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the exported model declares no default-domain opset")


def check_graph(staged: Path) -> None:
    """``onnx.checker`` with ``full_check`` (strict shape inference) on the written file."""
    import onnx

    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except Exception as exc:  # checker and shape-inference errors have several types
        raise ExportError(
            f"onnx.checker / shape inference rejected the exported graph: {root_cause(exc)}"
        ) from exc
