"""Constant per-channel affine modules: FrozenBatchNorm2d-style norms and user scale/shift layers.

A *candidate* is a user module (not from torch) with no children whose floating-point tensors are
all per-channel vectors of one length ``C`` (or scalars): detection backbones'
``FrozenBatchNorm2d`` (buffers ``weight``, ``bias``, ``running_mean``, ``running_var``), or a
learnt per-channel scale. A candidate with ``running_mean`` and ``running_var`` buffers is a
*frozen norm* (``BnKind.FROZEN``, reported like any batch norm); any other is ``BnKind.AFFINE``
(folded when proven, otherwise only a plan note).

Nothing is assumed from names: ``prove_affine`` traces the module's forward on the real input and
interprets the graph abstractly. Every value is a constant (computed from the module's tensors in
float64), a metadata value of the input (shape, dtype), or ``s * x + t`` with constant ``s``,
``t``; only ``+ - * /`` with constants, ``neg``, ``F.batch_norm(training=False)`` with constant
statistics, and dtype/layout no-ops keep the affine form. The output must be ``s*x + t`` with
``s``, ``t`` varying along dim 1 only. A constant computed from the input's sizes other than its
channel count (``x.shape[-1] / 8``) refuses the proof: the map would hold at one size. Branches on
the input's *values* refuse the proof; branches on its metadata (``x.requires_grad``, ``x.dim()``)
are noted. Finally the module is run on the example and compared with ``s*x + t`` (``CHECK_RTOL``),
a guard against interpreter bugs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from bnfold.find.functional import NORM_ARGS
from bnfold.find.guards import describe, size_read, trace_guarded, value_dependent_nodes
from bnfold.find.patterns import Refusal
from bnfold.find.sites import NormSite, is_frozen_norm, module_site
from bnfold.folding.math import Affine, BnParams, bn_affine
from bnfold.modes import inference
from bnfold.records import BnKind, SkipReason

#: Relative tolerance (max abs diff / max abs output) of the final numerical check of a proof,
#: by the module's dtype. The proof itself is exact; this only catches interpreter bugs.
CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

_NO_OP_METHODS = frozenset(
    {
        "to",
        "type",
        "type_as",
        "float",
        "double",
        "half",
        "bfloat16",
        "contiguous",
        "clone",
        "detach",
    }
)
_ADD = {operator.add, operator.iadd, torch.add, "add"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul"}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "true_divide"}
_NEG = {operator.neg, torch.neg, "neg"}
_BATCH_NORMS = (F.batch_norm, torch.batch_norm)


@dataclass(frozen=True)
class Proof:
    """A proven per-channel affine map ``y = scale[c] * x + shift[c]`` (float64 vectors)."""

    affine: Affine
    notes: tuple[str, ...]


def affine_site(
    node: fx.Node, name: str, module: nn.Module, example_args: tuple[Any, ...]
) -> NormSite:
    """The norm site of a candidate module call: params hold the proven map (as an exact
    ``BnParams`` with mean 0, variance 1, eps 0), or ``problem`` says why it is not one."""
    kind = BnKind.FROZEN if is_frozen_norm(module) else BnKind.AFFINE
    site = module_site(node, name, module, kind)
    outcome = prove_affine(module, example_args)
    if isinstance(outcome, Refusal):
        site.problem = outcome
        return site
    scale, shift = outcome.affine.scale, outcome.affine.shift
    site.params = BnParams(torch.zeros_like(scale), torch.ones_like(scale), scale, shift, 0.0)
    site.notes = outcome.notes
    return site


def prove_affine(module: nn.Module, example_args: tuple[Any, ...]) -> Proof | Refusal:
    """Prove that ``module(x)`` is a constant per-channel affine map of ``x`` (see module doc)."""
    tensors = [a for a in example_args if isinstance(a, Tensor)]
    if len(example_args) != 1 or len(tensors) != 1:
        return _refuse(f"it is called with {len(example_args)} arguments, expected one tensor")
    x = tensors[0]
    if x.dim() < 2 or not x.is_floating_point():
        return _refuse(
            f"its input has shape {tuple(x.shape)} and dtype {x.dtype}; a per-channel "
            "map needs a floating (N, C, ...) input"
        )
    traced = trace_guarded(module, (x,))
    if isinstance(traced, str):
        return _refuse(traced)
    result = _interpret(traced.module, value_dependent_nodes(traced.module))
    if not isinstance(result, _Lin):
        detail = result.reason if isinstance(result, _Unknown) else "its output is a constant"
        return _refuse(detail)
    affine = _per_channel(result, x)
    if isinstance(affine, Refusal):
        return affine
    mismatch = _check_numerically(module, x, affine)
    if mismatch is not None:
        return _refuse(mismatch)
    return Proof(affine, traced.notes)


@dataclass(frozen=True)
class _Lin:
    """``scale * x + shift`` with float64 tensors broadcastable against ``x``."""

    scale: Tensor
    shift: Tensor


@dataclass(frozen=True)
class _Const:
    value: Any


@dataclass(frozen=True)
class _Unknown:
    reason: str


def _interpret(gm: fx.GraphModule, dependent: set[fx.Node]) -> Any:
    env: dict[fx.Node, Any] = {}
    x = _Lin(torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    for node in gm.graph.nodes:
        if node.op == "placeholder":  # the input, then any further (default) arguments
            env[node] = _Const(node.meta.get("concrete")) if env else x
        elif node.op == "get_attr":
            env[node] = _Const(_fp64(node.meta["concrete"]))
        elif node.op == "output":
            if isinstance(node.args[0], fx.Node):
                return env[node.args[0]]
            return _Unknown("its output is not a single tensor")
        elif node not in dependent:
            env[node] = _constant_node(node, env)
        else:
            env[node] = _affine_node(node, env)
    return _Unknown("its graph has no output")


def _fp64(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    return value


def _abstract_args(node: fx.Node, env: dict[fx.Node, Any]) -> tuple[tuple, dict]:
    def get(arg: Any) -> Any:
        return env[arg] if isinstance(arg, fx.Node) else _Const(arg)

    return tuple(map(get, node.args)), {k: get(v) for k, v in node.kwargs.items()}


def _constant_node(node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    """A node independent of the input's values: metadata of x (concrete), or computed from the
    module's tensors and literals in float64."""
    if any(isinstance(env.get(a), _Lin) for a in node.all_input_nodes):
        return _Const(node.meta.get("concrete"))  # x.shape, x.dtype, x.requires_grad, ...
    if any(isinstance(env.get(a), _Unknown) for a in node.all_input_nodes):
        return _Unknown(f"'{node.name}' depends on an op that was not understood")

    def value(arg: Any) -> Any:
        return env[arg].value if isinstance(arg, fx.Node) else arg

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    try:
        with torch.no_grad():
            if (
                node.op == "call_method"
                and node.target in _NO_OP_METHODS
                and _floating([*args[1:], *kwargs.values()])
            ):
                return _Const(args[0])  # keep float64: the fold is more precise, not different
            if node.op == "call_function":
                return _Const(node.target(*args, **kwargs))
            if node.op == "call_method":
                return _Const(getattr(args[0], node.target)(*args[1:], **kwargs))
    except Exception as exc:
        return _Unknown(f"evaluating '{node.name}' failed: {type(exc).__name__}")
    return _Unknown(f"'{node.name}' ({node.op}) is not understood")


def _floating(values: list[Any]) -> bool:
    """True when a dtype conversion's target (among ``values``, the arguments after the
    tensor) is floating point, or there is none."""
    dtypes = [v for v in values if isinstance(v, torch.dtype)]
    dtypes += [v.dtype for v in values if isinstance(v, Tensor)]
    return all(d.is_floating_point for d in dtypes)


def _affine_node(node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    args, kwargs = _abstract_args(node, env)
    for value in (*args, *kwargs.values()):
        if isinstance(value, _Unknown):
            return value
    key = node.target
    if node.op not in ("call_function", "call_method"):
        return _Unknown(f"'{node.name}' ({node.op}) is applied to the input")
    if node.op == "call_method" and key.endswith("_") and not key.startswith("__"):
        return _Unknown(f"in-place '{key}' on the input")
    if node.op == "call_method" and key in _NO_OP_METHODS:
        rest = [a.value for a in (*args[1:], *kwargs.values()) if isinstance(a, _Const)]
        if _floating(rest):
            return args[0]
        return _Unknown(f"'{key}' converts the input to a non-floating dtype")
    sized = size_read(node)
    if sized is not None:
        return _Unknown(
            f"'{node.name}' combines the input with a value computed from {describe(sized)}: "
            "the map would hold at this input size only"
        )
    if key in _BATCH_NORMS:
        return _batch_norm(node, dict(zip(NORM_ARGS[key], args, strict=False)) | kwargs)
    return _arithmetic(node, key, args, kwargs)


def _arithmetic(node: fx.Node, key: Any, args: tuple, kwargs: dict) -> Any:
    name = getattr(key, "__name__", str(key))
    if key in _NEG and len(args) == 1:
        lin = args[0]
        return _Lin(-lin.scale, -lin.shift)
    if len(args) != 2:
        return _Unknown(f"'{name}' is applied to the input")
    a, b = args
    extra = {k: v.value for k, v in kwargs.items() if isinstance(v, _Const)}
    if set(extra) - {"alpha"} or (extra and key not in _ADD | _SUB):
        return _Unknown(f"'{name}' with arguments {sorted(kwargs)} is applied to the input")
    alpha = extra.get("alpha", 1)
    if key in _ADD or key in _SUB:
        sign = 1 if key in _ADD else -1
        return _combine(a, b, alpha * sign)
    if key in _MUL:
        return _multiply(a, b, name)
    if key in _DIV and isinstance(a, _Lin) and isinstance(b, _Const) and _numeric(b.value):
        return _Lin(a.scale / _tensor(b.value), a.shift / _tensor(b.value))
    return _Unknown(
        f"'{name}' is applied to the input (only + - * / by constants keep a "
        "per-channel affine map)"
    )


def _combine(a: Any, b: Any, sign_b: float) -> Any:
    """``a + sign_b * b`` where at least one side is affine in x."""
    if isinstance(a, _Lin) and isinstance(b, _Lin):
        return _Lin(a.scale + sign_b * b.scale, a.shift + sign_b * b.shift)
    if isinstance(a, _Lin) and _numeric(b.value):
        return _Lin(a.scale, a.shift + sign_b * _tensor(b.value))
    if isinstance(b, _Lin) and _numeric(a.value):
        return _Lin(sign_b * b.scale, _tensor(a.value) + sign_b * b.shift)
    return _Unknown("an add/sub mixes the input with a non-numeric value")


def _multiply(a: Any, b: Any, name: str) -> Any:
    lin, const = (a, b) if isinstance(a, _Lin) else (b, a)
    if isinstance(const, _Lin):
        return _Unknown(f"'{name}' multiplies the input by itself (not affine)")
    if not _numeric(const.value):
        return _Unknown(f"'{name}' multiplies the input by a non-numeric value")
    c = _tensor(const.value)
    return _Lin(lin.scale * c, lin.shift * c)


def _numeric(value: Any) -> bool:
    if isinstance(value, Tensor):
        return not value.is_complex()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64)
    return torch.tensor(float(value), dtype=torch.float64)


def _batch_norm(node: fx.Node, bound: dict[str, Any]) -> Any:
    """An eval-mode batch norm with constant statistics applied to ``bound["input"]``."""
    if any(isinstance(v, _Lin) for k, v in bound.items() if k != "input"):
        return _Unknown("a batch norm's statistics depend on the input")
    values = {k: v.value for k, v in bound.items() if k != "input"}
    if values.get("training", False) is not False:
        return _Unknown("a batch norm in its forward uses batch statistics (training=True)")
    mean, var = values.get("running_mean"), values.get("running_var")
    if not isinstance(mean, Tensor) or not isinstance(var, Tensor):
        return _Unknown("a batch norm in its forward has no running statistics")
    params = BnParams(
        mean, var, values.get("weight"), values.get("bias"), float(values.get("eps", 1e-5))
    )
    affine = bn_affine(params)
    concrete = node.meta.get("concrete")
    rank = concrete.dim() if isinstance(concrete, Tensor) else 2
    shape = (-1,) + (1,) * max(rank - 2, 0)
    scale, shift = affine.scale.reshape(shape), affine.shift.reshape(shape)
    lin = bound["input"]
    return _Lin(lin.scale * scale, lin.shift * scale + shift)


def _per_channel(lin: _Lin, x: Tensor) -> Affine | Refusal:
    """The per-channel vectors of ``lin``, or a refusal when it varies along another dim."""
    rank, channels = x.dim(), x.shape[1]
    vectors = []
    for name, value in (("scale", lin.scale), ("shift", lin.shift)):
        if value.dim() > rank:
            return _refuse(f"its {name} has more dims ({value.dim()}) than the input ({rank})")
        aligned = value.reshape((1,) * (rank - value.dim()) + tuple(value.shape))
        for dim, size in enumerate(aligned.shape):
            if size != 1 and (dim != 1 or size != channels):
                return _refuse(
                    f"its {name} has shape {tuple(value.shape)}: it varies along dim "
                    f"{dim} of the {rank}-D input, not only along the channel dim 1"
                )
        full = aligned.expand((1, channels) + (1,) * (rank - 2))
        vectors.append(full.reshape(channels).to(torch.float64).clone())
    return Affine(scale=vectors[0], shift=vectors[1])


def _check_numerically(module: nn.Module, x: Tensor, affine: Affine) -> str | None:
    if not (torch.isfinite(affine.scale).all() and torch.isfinite(affine.shift).all()):
        return None  # NaN/inf statistics: the graph pass refuses it as non-finite
    with inference(module):
        out = module(x)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        return "its output is not a tensor of the input's shape"
    shape = (1, -1) + (1,) * (x.dim() - 2)
    expected = x.to(torch.float64) * affine.scale.reshape(shape) + affine.shift.reshape(shape)
    diff = (out.to(torch.float64) - expected).abs().max()
    ref = expected.abs().max().clamp_min(1e-30)
    rtol = CHECK_RTOL.get(out.dtype, 1e-4)
    if not bool(torch.isfinite(diff)) or float(diff / ref) > rtol:
        return (
            f"the proven map differs from its output by {float(diff / ref):.3g} relative "
            f"(tolerance {rtol:g})"
        )
    return None


def _refuse(detail: str) -> Refusal:
    return Refusal(SkipReason.NOT_AFFINE, detail)
