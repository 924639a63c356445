"""Batch-norm kernels left after bnfold.fold on the MONAI networks and the wild-pattern fixtures.

For every model of the MONAI suite (``tests/monai_models.py``; by default the ``FAST`` subset the
default test run folds, all of them with ``--all``) and of the wild-pattern fixtures
(``tests/wild_models.py``, ``WILD``), on the inputs those suites use: the batch-norm kernels one
eval-mode forward runs before folding and after ``bnfold.fold(model, example).model``
(``bnfold.count_bn_kernels``, which counts FrozenBatchNorm-style modules as norms), how bnfold
read the model (fx or recorded), and the skip reasons it gave, then totals.

    python benchmarks/kernels_left.py [--all] [--models NAME ...] [--json out.json]

The header names the bnfold it imported, so the same script can measure another checkout:
put that checkout first on ``PYTHONPATH`` and run from outside the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# tests/ appended, not prepended: the bnfold first on the path is the one measured.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))

import bnfold

Case = Callable[[], tuple[nn.Module, tuple]]


def cases(everything: bool) -> dict[str, tuple[str, Case]]:
    """name -> (suite, builder of ``(model, example args)``)."""
    from monai_models import FAST, MODELS, build
    from wild_models import WILD

    found: dict[str, tuple[str, Case]] = {}
    for name in MODELS if everything else FAST:
        found[name] = ("monai", lambda name=name: (lambda m, x: (m, (x,)))(*build(name)))
    for name, builder in WILD.items():
        found[name] = ("wild", builder)
    return found


def measure(name: str, suite: str, case: Case) -> dict[str, Any]:
    model, args = case()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bnfold.fold(model, args)
    fold_s = time.perf_counter() - started
    return {
        "model": name,
        "suite": suite,
        "method": result.plan.method,
        "bn_before": bnfold.count_bn_kernels(model, args),
        "bn_left": bnfold.count_bn_kernels(result.model, args),
        "skips": dict(Counter(skip.reason.value for skip in result.skipped)),
        "fold_s": fold_s,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | suite | read by | BN kernels before fold | left after fold | skip reasons |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(r["skips"].items())) or "-"
        lines.append(
            f"| {r['model']} | {r['suite']} | {r['method']} | {r['bn_before']} | "
            f"{r['bn_left']} | {reasons} |"
        )
    for suite in ("monai", "wild", None):
        chosen = [r for r in rows if suite is None or r["suite"] == suite]
        if chosen:
            before = sum(r["bn_before"] for r in chosen)
            left = sum(r["bn_left"] for r in chosen)
            lines.append(
                f"| **total {suite or 'all'}** ({len(chosen)} models) | | | {before} | {left} | |"
            )
    return "\n".join(lines)


def header() -> str:
    return (
        f"bnfold {bnfold.__version__} from {bnfold.__file__}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every MONAI network, slow ones too")
    parser.add_argument("--models", nargs="*", help="only these (names from either suite)")
    parser.add_argument("--json", help="also write the header and rows as JSON to this file")
    args = parser.parse_args(argv)
    found = cases(args.all or bool(args.models))
    names = args.models or list(found)
    unknown = sorted(set(names) - set(found))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(found)}")
    print(header() + "\n")
    rows = [measure(name, *found[name]) for name in names]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"bnfold": header(), "rows": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
