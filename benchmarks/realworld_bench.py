"""Real-world networks: bnfold.fold vs torch.fx.experimental.optimization.fuse, side by side.

For the MONAI networks (``tests/monai_models.py``) and the wild-pattern fixtures
(``tests/wild_models.py``): batch norms run by one forward before folding and left after each
tool (``bnfold.count_bn_kernels``, which counts FrozenBatchNorm-style modules as norms), fold
time (median of interleaved repetitions; fuse only where it runs), how bnfold read the model
(fx or recorded), and whether each result is exact (float64 relative error of folded vs
original outputs). fuse's crashes are caught and reported.

    python benchmarks/realworld_bench.py [--repeat 3] [--models NAME ...] [--quick] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.utils import _pytree as pytree  # noqa: PLC2701 (torch has no public name for it)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py
from timing import median_times

import bnfold
from bnfold.io.inputs import as_args

WRONG = 1e-6  # fp64 relative error above this means the folded model computes something else
QUICK = (
    "resnet18-2d",
    "densenet121-2d",
    "basicunet-3d",
    "highresnet-3d",
    "frozen_backbone",
    "data_dependent",
    "isinstance_trap",
)


def _cases() -> dict[str, Callable[[], tuple[nn.Module, tuple]]]:
    from monai_models import MODELS, build
    from wild_models import WILD

    cases: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {}
    for name in MODELS:
        cases[name] = lambda name=name: (lambda m, x: (m, (x,)))(*build(name))
    cases.update(WILD)
    for name in ("data_dependent", "asserts_and_loops", "head_reads_values"):
        cases[f"{name} +2 inputs"] = lambda name=name: WILD[name]()
    return cases


def _extra_inputs(name: str, args: tuple) -> list[tuple]:
    """For the ``+2 inputs`` cases: two more inputs (scaled and negated), so pairs behind a
    data-dependent branch can be checked on each recorded input."""
    if not name.endswith("+2 inputs"):
        return []
    return [tuple(a * 3 for a in args), tuple(-a for a in args)]


def _double(value: Any) -> Any:
    return pytree.tree_map(
        lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value
    )


def _outputs(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*as_args(args))
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _fp64_error(original: nn.Module, folded: nn.Module, args: tuple) -> float:
    """Max over outputs of max abs diff / max abs output, both models float64."""
    pairs = zip(_outputs(original, args), _outputs(folded, args), strict=True)
    return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-300)) for a, b in pairs)


def _fuse(model: nn.Module) -> nn.Module | str:
    try:
        return fuse(model)
    except Exception as exc:  # report fuse's failure, do not hide it
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:60]}"


def bench(name: str, build: Callable[[], tuple[nn.Module, tuple]], repeat: int) -> dict[str, Any]:
    """Counts and times on the float32 model; exactness of each tool on a float64 copy."""
    torch.manual_seed(0)
    model, args = build()
    model.eval()
    extra = _extra_inputs(name, args)
    ours = bnfold.fold(model, args, extra_inputs=extra)
    model64, args64 = copy.deepcopy(model).double(), _double(args)
    row: dict[str, Any] = {
        "model": name,
        "method": ours.plan.method,
        "bn_before": bnfold.count_bn_kernels(model, args),
        "bn_left_bnfold": bnfold.count_bn_kernels(ours.model, args),
        "skips": len(ours.skipped),
        "bnfold_error": _fp64_error(
            model64, bnfold.fold(model64, args64, extra_inputs=_double(extra)).model, args64
        ),
    }
    fns: dict[str, Callable[[], Any]] = {
        "bnfold": lambda: bnfold.fold(model, args, extra_inputs=extra)
    }
    theirs = _fuse(model)
    if isinstance(theirs, nn.Module):
        try:
            row["bn_left_fuse"] = bnfold.count_bn_kernels(theirs, args)
            row["fuse_error"] = _fp64_error(model64, fuse(model64), args64)
            fns["fuse"] = lambda: fuse(model)
        except Exception as exc:  # a fused graph that does not run
            theirs = f"fused model fails: {type(exc).__name__}"
    if not isinstance(theirs, nn.Module):
        row["fuse_failed"] = theirs
    times = median_times(fns, repeat)
    row["bnfold_ms"] = times["bnfold"] * 1e3
    if "fuse" in times:
        row["fuse_ms"] = times["fuse"] * 1e3
    return row


def _verdict(error: float) -> str:
    return "exact" if error < WRONG else f"WRONG ({error:.1e})"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | read by | BNs | left: bnfold / fuse | fold ms: bnfold / fuse | "
        "result: bnfold / fuse |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "fuse_failed" in r:
            left, ms, ok = "—", "—", f"fuse failed ({r['fuse_failed']})"
        else:
            left, ms, ok = str(r["bn_left_fuse"]), f"{r['fuse_ms']:.0f}", _verdict(r["fuse_error"])
        lines.append(
            f"| {r['model']} | {r['method']} | {r['bn_before']} | "
            f"{r['bn_left_bnfold']} / {left} | {r['bnfold_ms']:.0f} / {ms} | "
            f"{_verdict(r['bnfold_error'])} / {ok} |"
        )
    total = len(rows)
    fuse_ran = [r for r in rows if "fuse_failed" not in r]
    lines.append("")
    lines.append(
        f"{total} models; bnfold exact on {sum(r['bnfold_error'] < WRONG for r in rows)}, "
        f"left {sum(r['bn_left_bnfold'] for r in rows)} of {sum(r['bn_before'] for r in rows)} "
        f"batch norms (each one a reported skip). fuse ran on {len(fuse_ran)}, exact on "
        f"{sum(r['fuse_error'] < WRONG for r in fuse_ran)}, left "
        f"{sum(r['bn_left_fuse'] for r in fuse_ran)} of "
        f"{sum(r['bn_before'] for r in fuse_ran)} on the models it ran on."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    cases = _cases()
    names = args.models or (list(QUICK) if args.quick else list(cases))
    rows = [bench(name, cases[name], args.repeat) for name in names]
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
