"""Wall time of the ``bnfold`` command: ``bnfold --help`` and ``bnfold fold`` on a ResNet-50 .pt2.

Each command runs as a fresh process, as a user would run it, ``--repeat`` times (median
reported). Baselines run in the same session so the ratios mean something on a shared machine:
``python -c pass`` for ``--help`` (interpreter start-up); for ``fold``, ``python -c "import
torch"`` (the floor any torch tool pays) and a plain script that does the least a fold command
must: import torch, load the program, run one forward, export it again and save it
(``PLAIN_SCRIPT``). The in-process stage breakdown shows where fold's time goes.

    python benchmarks/cli_bench.py                       # ResNet-50, 2x3x64x64 example input
    python benchmarks/cli_bench.py --shape 1x3x224x224 --repeat 5
    python benchmarks/cli_bench.py --smoke               # tiny model, one repeat (a test)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bnfold import zoo

# The least ``bnfold fold model.pt2 -o out.pt2`` must do, written as a user would without bnfold.
PLAIN_SCRIPT = """
import sys
import torch

program = torch.export.load(sys.argv[1])
model = program.module()
args, kwargs = program.example_inputs
with torch.no_grad():
    model(*args, **kwargs)
dims = tuple({0: torch.export.Dim.AUTO} for _ in args)
torch.export.save(torch.export.export(model, args, dynamic_shapes=dims), sys.argv[2])
"""


def wall(cmd: list[str], repeat: int) -> float:
    """Median wall seconds of ``cmd`` run ``repeat`` times (must exit 0)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(commands: list[list[str]], repeat: int) -> list[float]:
    """Median wall seconds of each command, the commands run in turn ``repeat`` times (so slow
    and fast moments of a shared machine fall on every side alike)."""
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(repeat):
        for command, column in zip(commands, times, strict=True):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            column.append(time.perf_counter() - start)
    return [statistics.median(column) for column in times]


def stages(pt2: Path, out: Path) -> dict[str, float]:
    """In-process seconds of each step ``bnfold fold`` takes."""
    import bnfold
    from bnfold.io.models import load_model, save_model

    times: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(pt2)
    times["load + check .pt2"] = time.perf_counter() - start
    start = time.perf_counter()
    bnfold.count_bn_kernels(loaded.model, loaded.example_inputs)
    times["count BN kernels (one forward)"] = time.perf_counter() - start
    start = time.perf_counter()
    result = bnfold.fold(loaded.model, loaded.example_inputs)
    times["fold"] = time.perf_counter() - start
    start = time.perf_counter()
    save_model(
        result.model,
        out,
        example_inputs=loaded.example_inputs,
        overwrite=True,
        dynamic_dims=loaded.dynamic_dims,
    )
    times["export + save .pt2"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, help="example input, e.g. 1x3x224x224")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repeat")
    args = parser.parse_args()
    repeat = 1 if args.smoke else args.repeat
    name = "small_cnn" if args.smoke else "resnet50"
    model = zoo.randomize_bn(zoo.BUILDERS[name]()).eval()
    if args.shape:
        x = torch.randn(*(int(s) for s in args.shape.split("x")))
    else:
        x = zoo.example_input(name)
    script = shutil.which("bnfold") or ""
    bnfold_cmd = [script] if script else [sys.executable, "-m", "bnfold_cli.main"]
    with tempfile.TemporaryDirectory() as tmp:
        pt2 = Path(tmp) / f"{name}.pt2"
        dims = ({0: torch.export.Dim.AUTO},)
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=dims), pt2)
        out = Path(tmp) / "out.pt2"
        fold_cmd = [*bnfold_cmd, "fold", str(pt2), "-o", str(out), "--force"]
        plain_cmd = [sys.executable, "-c", PLAIN_SCRIPT, str(pt2), str(Path(tmp) / "plain.pt2")]
        fold_seconds, plain_seconds = interleaved([fold_cmd, plain_cmd], repeat)
        rows = [
            (
                "bnfold --help",
                wall([*bnfold_cmd, "--help"], repeat),
                "python -c pass",
                wall([sys.executable, "-c", "pass"], repeat),
            ),
            (
                f"bnfold fold {name}.pt2",
                fold_seconds,
                "python -c 'import torch'",
                wall([sys.executable, "-c", "import torch"], repeat),
            ),
            (
                f"bnfold fold {name}.pt2",
                fold_seconds,
                "plain script: load, one forward, export, save",
                plain_seconds,
            ),
        ]
        breakdown = stages(pt2, out)
    shape = "x".join(map(str, x.shape))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nModel: {name}, example input {shape} float32, {torch.get_num_threads()} threads, "
        f"median of {repeat}, load average {load:.1f}\n"
    )
    print("| command | wall (s) | baseline | baseline (s) | ratio |")
    print("|---|---|---|---|---|")
    for command, seconds, base, base_seconds in rows:
        print(
            f"| `{command}` | {seconds:.2f} | `{base}` | {base_seconds:.2f} | "
            f"{seconds / base_seconds:.2f}x |"
        )
    print("\n| fold stage (in process) | seconds |\n|---|---|")
    for stage, seconds in breakdown.items():
        print(f"| {stage} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
