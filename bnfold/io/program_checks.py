"""The parts of a torch.export program that torch would run as Python, checked before it does.

torch's deserializer evaluates strings from the program document (shape expressions with
``sympy.sympify``, guards with ``exec``) and the module it builds calls what the graph names
(any ``torch.*`` name resolves, ``torch.load`` included). ``check_program_document`` and
``check_graph_targets`` allow only plain expressions and torch operators.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx

from bnfold.errors import LoadError, UnsafeFileError

# Python callables (besides torch operators) a program's graph may call: pure arithmetic.
_SAFE_CALLABLES = frozenset(
    [
        getattr(operator, name)
        for name in """getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge
        and_ or_ xor not_ invert lshift rshift""".split()
    ]
    + [getattr(math, name) for name in "floor ceil trunc sqrt exp log".split()]
    + [
        getattr(torch, name)
        for name in """_assert sym_int sym_float sym_max sym_min sym_not sym_ite sym_sum _check
        _check_is_size""".split()
        if hasattr(torch, name)
    ]
)
# Names a symbolic-shape expression may call or use (sympy and torch's sympy functions).
_SYMPY_CALLS = frozenset(
    """Symbol Integer Float Rational Add Mul Pow Max Min Eq Ne Lt Le Gt Ge And Or Not Mod Abs
    floor ceiling sqrt Piecewise FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt
    FloorToInt CeilDiv
    LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv TruncToFloat TruncToInt
    RoundToInt RoundDecimal ToFloat Identity BitwiseFn_bitwise_and BitwiseFn_bitwise_or
    IsNonOverlappingAndDenseIndicator""".split()
)
_SYMPY_NAMES = frozenset("oo zoo nan pi E true false True False".split())
_SYMBOL_NAME = re.compile(r"^[a-z]{1,4}[0-9]+$")
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_MATH_FUNCTIONS = frozenset({"floor", "ceil", "trunc", "sqrt"})
_ARITHMETIC = tuple(
    getattr(ast, name)
    for name in "Expression BinOp UnaryOp Compare BoolOp Load operator unaryop cmpop boolop".split()
)


def check_graph_targets(path: Path, program: torch.export.ExportedProgram) -> None:
    """Refuse a program whose graph calls anything but torch operators and pure arithmetic."""
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if isinstance(graph, fx.Graph) else ():
            if node.op in ("call_method", "call_module"):
                _refuse_target(path, node, f"a {node.op} node")
            if node.op == "call_function" and not _safe_target(node.target):
                _refuse_target(path, node, f"{node.target!r}")


def _refuse_target(path: Path, node: fx.Node, what: str) -> None:
    raise UnsafeFileError(
        f"{path}: the program's node {node.name!r} calls {what}, which is not a PyTorch "
        "operator; running it could do anything. Refusing it. Re-export the model from "
        "trusted code with torch.export."
    )


def _safe_target(target: Any) -> bool:
    op_types = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
    if isinstance(target, op_types):
        return True
    try:
        return target in _SAFE_CALLABLES
    except TypeError:
        return False


def check_program_document(path: Path, name: str, program: Any) -> None:
    """Refuse a program document (``models/*.json``, parsed) holding a string torch would
    evaluate as code: every shape expression and guard must be a plain one (``UnsafeFileError``).
    """
    if not isinstance(program, dict):
        raise LoadError(f"{path}: damaged torch.export archive ({name} is not an object)")
    try:
        _check_strings(path, program)
    except RecursionError:
        raise LoadError(f"{path}: damaged torch.export archive ({name} nests too deep)") from None


def _check_strings(path: Path, program: dict) -> None:
    for key, value in _walk(program):
        if key == "expr_str" and not _safe_expression(value, _sympy_node_ok):
            _refuse_string(path, "a shape expression", value)
        elif key == "guards_code":
            for guard in value if isinstance(value, list) else [value]:
                if not _safe_expression(guard, _guard_node_ok):
                    _refuse_string(path, "a guard", guard)
        elif key == "as_graph" and not (
            isinstance(value, dict) and str(value.get("name", "")).isidentifier()
        ):
            _refuse_string(path, "a subgraph name", value)


def _refuse_string(path: Path, what: str, value: Any) -> None:
    raise UnsafeFileError(
        f"{path}: {what} in the program is not a plain expression ({str(value)[:80]!r}); "
        "torch would evaluate it as Python code, so it could run anything. Refusing it. "
        "Re-export the model from trusted code with torch.export."
    )


def _walk(value: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def _safe_expression(text: Any, node_ok: Callable[[ast.AST], bool]) -> bool:
    if not isinstance(text, str):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    strings = {
        id(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    # A string is harmless only as a symbol's name or an input's key (``L['x']``): anywhere
    # else sympy would parse it as a new expression, i.e. evaluate it.
    allowed = {id(_string_slot(node)) for node in ast.walk(tree)} - {id(None)}
    return strings <= allowed and all(node_ok(node) for node in ast.walk(tree))


def _string_slot(node: ast.AST) -> ast.AST | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
        return node.args[0] if node.func.id == "Symbol" else None
    if isinstance(node, ast.Subscript):
        root = node.value
        while isinstance(root, ast.Subscript):
            root = root.value
        return node.slice if isinstance(root, ast.Name) and root.id == "L" else None
    return None


def _sympy_node_ok(node: ast.AST) -> bool:
    """Sympy printing: calls of known functions, symbols, numbers, arithmetic, keywords."""
    if isinstance(node, _ARITHMETIC) or isinstance(node, ast.keyword):
        return True
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS
    if isinstance(node, ast.Name):
        return (
            node.id in _SYMPY_CALLS or node.id in _SYMPY_NAMES or bool(_SYMBOL_NAME.match(node.id))
        )
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool))


def _guard_node_ok(node: ast.AST) -> bool:
    """Guards: ``L['x'].size()[0] >= 2`` and sympy-style arithmetic over such terms."""
    if isinstance(node, _ARITHMETIC) or isinstance(node, ast.Subscript):
        return True
    if isinstance(node, ast.Attribute):
        return node.attr in _GUARD_METHODS or (
            isinstance(node.value, ast.Name)
            and node.value.id == "math"
            and node.attr in _MATH_FUNCTIONS
        )
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute):
            return node.func.attr in _GUARD_METHODS | _MATH_FUNCTIONS
        return isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS
    if isinstance(node, ast.Name):
        return node.id in {"L", "math", "inf"} | _SYMPY_CALLS | _SYMPY_NAMES
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool))
