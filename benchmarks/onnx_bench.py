"""bnfold's ONNX (fold + export_onnx) vs a plain torch.onnx.export of the unfolded model.

Both files are made in the same process from the same model. For each model: ONNX node count,
BatchNormalization nodes left, file size, ONNX Runtime CPU latency at batch 1 and 8 (default
graph optimizations; medians of interleaved repetitions, ratio bnfold / plain), the same at
batch 8 with ORT_DISABLE_ALL (what a runtime without ORT's Conv+BN fusion would pay), and each
file's max error against the original eager model relative to the output's peak.

The plain export uses torch's defaults (dynamo exporter with its optimizer, which already folds
Conv/ConvTranspose/Gemm + BN) and the same dynamic batch dimension.

    python benchmarks/onnx_bench.py [--repeat 30] [--threads 1] [--models resnet18,mlp]
                                    [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.export import Dim

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py
from timing import median_times

import bnfold
from bnfold import zoo
from bnfold.runtime import OPT_DISABLE_ALL, ort_runner

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "unet3d", "mlp", "small_cnn")
BATCHES = (1, 8)


def plain_export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """torch.onnx.export with its defaults, a dynamic batch dim, no bnfold involved."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (x,), dynamo=True, dynamic_shapes=({0: Dim.AUTO},), verbose=False
        )
        program.save(str(path))


def describe(path: Path) -> dict[str, Any]:
    proto = onnx.load(str(path))
    ops = [node.op_type for node in proto.graph.node]
    return {
        "nodes": len(ops),
        "ops": ops,
        "batchnorm_nodes": ops.count("BatchNormalization"),
        "bytes": path.stat().st_size,
    }


def max_error(runner: Any, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(runner((x,))[0])
    return float((got - expected).abs().max() / expected.abs().max())


def bench_model(name: str, workdir: Path, repeat: int, threads: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = zoo.randomize_bn(zoo.BUILDERS[name]()).eval()
    x = zoo.example_input(name)
    plain_path, ours_path = workdir / f"{name}.plain.onnx", workdir / f"{name}.bnfold.onnx"
    plain_export(model, x, plain_path)
    folded = bnfold.fold(model, x)
    bnfold.export_onnx(folded, x, ours_path)
    row: dict[str, Any] = {
        "model": name,
        "bn_modules": folded.plan.bn_total,
        "folded": len(folded.folded),
        "plain": describe(plain_path),
        "bnfold": describe(ours_path),
    }
    runners = {
        side: ort_runner(path, intra_op_threads=threads)
        for side, path in (("plain", plain_path), ("bnfold", ours_path))
    }
    for side, runner in runners.items():
        row[side]["max_rel_error"] = max_error(runner, model, zoo.example_input(name, batch=8))
    for batch in BATCHES:
        xb = zoo.example_input(name, batch=batch, seed=1)
        calls = {s: (lambda r=r, xb=xb: r((xb,))) for s, r in runners.items()}
        times = median_times(calls, repeat, warmup=3)
        row[f"ms_b{batch}"] = {side: 1e3 * t for side, t in times.items()}
    noopt = {
        side: ort_runner(path, optimization=OPT_DISABLE_ALL, intra_op_threads=threads)
        for side, path in (("plain", plain_path), ("bnfold", ours_path))
    }
    x8 = zoo.example_input(name, batch=8, seed=1)
    times = median_times({s: (lambda r=r: r((x8,))) for s, r in noopt.items()}, repeat, warmup=3)
    row["ms_b8_noopt"] = {side: 1e3 * t for side, t in times.items()}
    return row


def markdown(rows: list[dict[str, Any]], threads: int, repeat: int) -> str:
    head = (
        "| model | BN folded | nodes plain → bnfold | BN nodes plain → bnfold | size kB plain → "
        "bnfold | ORT b1 ms plain / bnfold (ratio) | ORT b8 ms plain / bnfold (ratio) | "
        "ORT_DISABLE_ALL b8 ratio | max rel err plain / bnfold |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        p, b = r["plain"], r["bnfold"]
        cells = [
            r["model"],
            f"{r['folded']}/{r['bn_modules']}",
            f"{p['nodes']} → {b['nodes']}" + (" (same ops)" if p["ops"] == b["ops"] else ""),
            f"{p['batchnorm_nodes']} → {b['batchnorm_nodes']}",
            f"{p['bytes'] / 1e3:.0f} → {b['bytes'] / 1e3:.0f}",
        ]
        for key in ("ms_b1", "ms_b8"):
            t = r[key]
            cells.append(f"{t['plain']:.3g} / {t['bnfold']:.3g} ({t['bnfold'] / t['plain']:.2f})")
        n = r["ms_b8_noopt"]
        cells.append(f"{n['bnfold'] / n['plain']:.2f}")
        cells.append(f"{p['max_rel_error']:.1e} / {b['max_rel_error']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"ORT CPU, intra-op threads {threads}, median of {repeat} interleaved runs; ratio < 1 "
        "means bnfold's file is faster; with the same ops in both files a ratio shows only the "
        "machine's noise. Errors: max |ORT - eager original| / max |eager| at "
        "batch 8."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(bench_model(name, Path(tmp), args.repeat, args.threads))
    print(markdown(rows, args.threads, args.repeat))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
