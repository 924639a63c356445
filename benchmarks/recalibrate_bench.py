"""``bnfold.recalibrate`` against ``torch.optim.swa_utils.update_bn``, side by side in one process.

For each model, in a fresh interpreter (``--in-process``: all in this one): the same model and
the same uneven batches (sizes cycle through ``--sizes``, data off zero mean) go through both
tools. Reported:

- **throughput** (samples/s; best of ``--repeat`` interleaved runs after ``WARM_UP`` untimed
  rounds, more for short runs: see ``MIN_SECONDS``) and the ratio bnfold / update_bn (> 1:
  bnfold is faster). update_bn runs as shipped (it is ``torch.no_grad``).
- **a longer run**: the same ratio on ``--long`` times as many batches (the same sizes), where
  each tool's fixed cost per call (set-up, pooling, the report) weighs less.
- **peak memory**: the highest total of live tensor bytes allocated during the call, from the
  torch profiler's memory events (``profile_memory=True``: every allocation and free with its
  time stamp, summed in time order), on a separate profiled run; or
  ``torch.cuda.max_memory_allocated`` on a CUDA device. Ratio bnfold / update_bn (< 1: less).
- **error** of each against the exact statistics: a float64 copy of the model fed the same
  data in float64, its BNs in train mode and everything else in eval, every BN input pooled in
  float64 (per-batch ``var_mean``, merged by Chan's formula). Reported: the worst BN's
  max |mean error| / std and max |var error| / var. The "floor" column is the same pooling
  applied to the float32 model's own BN inputs: the error any float32 forward pass has.

    python benchmarks/recalibrate_bench.py                 # the default models
    python benchmarks/recalibrate_bench.py --repeat 9 --threads 1 --models resnet,mlp
    python benchmarks/recalibrate_bench.py --long 0        # no longer runs (faster)
    python benchmarks/recalibrate_bench.py --smoke         # tiny sizes, one repeat (a test)
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from bnfold import recalibrate, zoo

BN = nn.modules.batchnorm._BatchNorm


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]


CASES = [
    Case("small_cnn (dropout)", lambda: zoo.small_cnn(width=16), (3, 32, 32)),
    Case("resnet18 w32", lambda: zoo.resnet18(num_classes=10, width=32), (3, 64, 64)),
    Case("mobilenet_v2 x0.5 (dropout)", lambda: zoo.mobilenet_v2(10, 0.5), (3, 64, 64)),
    Case("mlp (dropout)", lambda: zoo.mlp(), (64,)),
    Case("resnet18 112x112", lambda: zoo.resnet18(num_classes=10), (3, 112, 112)),
]
SMOKE_CASES = [Case("small_cnn w4 (dropout)", lambda: zoo.small_cnn(width=4), (3, 8, 8))]


@dataclass
class Row:
    model: str
    batches: int
    samples: int
    has_dropout: bool
    bnfold_samples_per_s: float
    update_bn_samples_per_s: float
    throughput_ratio: float
    long_batches: int
    long_throughput_ratio: float | None
    bnfold_peak_mb: float
    update_bn_peak_mb: float
    memory_ratio: float
    memory_source: str
    bnfold_mean_error: float
    bnfold_var_error: float
    update_bn_mean_error: float
    update_bn_var_error: float
    floor_mean_error: float
    floor_var_error: float


# ------------------------------------------------------------------------------ the reference


def exact_statistics(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple]:
    """Per BN: float64 (mean, unbiased var) of every element of its input, BNs in train mode."""
    twin = copy.deepcopy(model)
    pooled: dict[str, list] = {}
    for module in twin.modules():
        module.training = isinstance(module, BN)
    for name, module in twin.named_modules():
        if isinstance(module, BN):
            module.register_forward_pre_hook(_merge_into(pooled, name))
    with torch.no_grad():
        for x in batches:
            twin(x)
    return {name: (mean, m2 / (n - 1)) for name, (n, mean, m2) in pooled.items()}


def _merge_into(pooled: dict[str, list], name: str) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().to(torch.float64)
        dims = [0, *range(2, x.dim())]
        n_b = x.numel() // x.shape[1]
        var_b, mean_b = torch.var_mean(x, dim=dims, correction=0)
        if name not in pooled:
            pooled[name] = [n_b, mean_b, var_b * n_b]
            return
        n_a, mean_a, m2_a = pooled[name]
        n = n_a + n_b
        delta = mean_b - mean_a
        pooled[name] = [
            n,
            mean_a + delta * (n_b / n),
            m2_a + var_b * n_b + delta**2 * (n_a * n_b / n),
        ]

    return hook


def errors(stats: dict[str, tuple], exact: dict[str, tuple]) -> tuple[float, float]:
    """Worst BN's max |mean − exact| / exact std and max |var − exact| / exact var."""
    worst_mean = worst_var = 0.0
    for name, (mean, var) in exact.items():
        got_mean, got_var = (t.to(torch.float64) for t in stats[name])
        std = var.sqrt().clamp(min=1e-12)
        worst_mean = max(worst_mean, float(((got_mean - mean).abs() / std).max()))
        worst_var = max(worst_var, float(((got_var - var).abs() / var.clamp(min=1e-24)).max()))
    return worst_mean, worst_var


def running_statistics(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (m.running_mean, m.running_var)
        for name, m in model.named_modules()
        if isinstance(m, BN) and m.running_mean is not None
    }


# ---------------------------------------------------------------------------- the measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Short runs are repeated until each side has run about this long (at most MAX_REPEAT times):
#: the best of five 2 ms runs still moves by 10 % between processes.
MIN_SECONDS = 1.0
MAX_REPEAT = 400
#: Untimed rounds first: both tools' first runs in a process are slower (up to 25 % on the
#: largest model, more for bnfold) while the allocator settles on the run's buffer sizes.
WARM_UP = 2


def best_time(runs: dict[str, Callable[[], None]], repeat: int, device: torch.device) -> dict:
    """Best wall time of each run, interleaved so machine noise hits all sides alike, after
    ``WARM_UP`` untimed rounds; at least ``repeat`` runs each, more for short runs
    (``MIN_SECONDS``)."""
    for _ in range(WARM_UP - 1):
        for fn in runs.values():
            fn()
    warm_up = {key: _timed(fn, device) for key, fn in runs.items()}
    repeat = max(repeat, min(MAX_REPEAT, int(MIN_SECONDS / max(max(warm_up.values()), 1e-9))))
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for key, fn in runs.items():
            best[key] = min(best[key], _timed(fn, device))
    return best


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def peak_bytes(fn: Callable[[], None], device: torch.device) -> tuple[int, str]:
    """Peak live tensor bytes allocated while ``fn`` runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, "torch profiler memory events"


def make_batches(sizes: list[int], count: int, shape: tuple[int, ...], device: torch.device,
                 seed: int) -> list[torch.Tensor]:  # fmt: skip
    """``count`` batches, sizes cycling through ``sizes``, data off zero mean (mean 1, std 2)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn((sizes[i % len(sizes)], *shape), generator=gen) * 2 + 1).to(device)
        for i in range(count)
    ]


def measure(case: Case, sizes: list[int], n_batches: int, repeat: int, device: torch.device,
            long: int = 0, seed: int = 0) -> Row:  # fmt: skip
    torch.manual_seed(seed)
    model = zoo.randomize_bn(case.build(), seed=seed).to(device)
    longer = make_batches(sizes, max(long, 1) * n_batches, case.sample_shape, device, seed)
    batches = longer[:n_batches]  # the same generator: the longer run's first batches
    samples = sum(len(x) for x in batches)
    exact = exact_statistics(model.double(), [x.double() for x in batches])
    model.float()
    floor = errors(exact_statistics(model, batches), exact)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    runs: dict[str, Callable[[list[torch.Tensor]], None]] = {
        "bnfold": lambda data: recalibrate(ours, data),
        "update_bn": lambda data: update_bn(data, theirs),
    }
    times = best_time({key: lambda fn=fn: fn(batches) for key, fn in runs.items()}, repeat, device)
    ours_peak, source = peak_bytes(lambda: runs["bnfold"](batches), device)
    theirs_peak, _ = peak_bytes(lambda: runs["update_bn"](batches), device)
    ours_err = errors(running_statistics(ours), exact)
    theirs_err = errors(running_statistics(theirs), exact)
    long_ratio = None
    if long > 1:
        on_long = {key: lambda fn=fn: fn(longer) for key, fn in runs.items()}
        long_times = best_time(on_long, repeat, device)
        long_ratio = long_times["update_bn"] / long_times["bnfold"]
    return Row(
        model=case.name,
        batches=n_batches,
        samples=samples,
        has_dropout=any(isinstance(m, nn.Dropout) for m in model.modules()),
        bnfold_samples_per_s=samples / times["bnfold"],
        update_bn_samples_per_s=samples / times["update_bn"],
        throughput_ratio=times["update_bn"] / times["bnfold"],
        long_batches=len(longer) if long > 1 else 0,
        long_throughput_ratio=long_ratio,
        bnfold_peak_mb=ours_peak / 2**20,
        update_bn_peak_mb=theirs_peak / 2**20,
        memory_ratio=ours_peak / max(theirs_peak, 1),
        memory_source=source,
        bnfold_mean_error=ours_err[0],
        bnfold_var_error=ours_err[1],
        update_bn_mean_error=theirs_err[0],
        update_bn_var_error=theirs_err[1],
        floor_mean_error=floor[0],
        floor_var_error=floor[1],
    )


# ----------------------------------------------------------------------------------- the table


def markdown(rows: list[Row], sizes: list[int], device: torch.device, threads: int) -> str:
    head = [
        f"bnfold.recalibrate vs torch.optim.swa_utils.update_bn on {device} "
        f"({threads} threads), batch sizes cycling {sizes}; peak memory from "
        f"{rows[0].memory_source if rows else '-'}.",
        "",
        "| model | batches (samples) | bnfold samples/s | update_bn samples/s | throughput "
        "ratio | throughput ratio, longer run | peak MB bnfold / update_bn | memory ratio | "
        "bnfold error mean / var | update_bn error mean / var | floor (fp32 forward) mean / var |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        longer = "-"
        if r.long_throughput_ratio is not None:
            longer = f"**{r.long_throughput_ratio:.2f}** ({r.long_batches} batches)"
        head.append(
            f"| {r.model} | {r.batches} ({r.samples}) | {r.bnfold_samples_per_s:,.0f} | "
            f"{r.update_bn_samples_per_s:,.0f} | **{r.throughput_ratio:.2f}** | {longer} | "
            f"{r.bnfold_peak_mb:.1f} / {r.update_bn_peak_mb:.1f} | **{r.memory_ratio:.2f}** | "
            f"{r.bnfold_mean_error:.1e} / {r.bnfold_var_error:.1e} | "
            f"{r.update_bn_mean_error:.1e} / {r.update_bn_var_error:.1e} | "
            f"{r.floor_mean_error:.1e} / {r.floor_var_error:.1e} |"
        )
    head.append("")
    head.append(
        "Throughput ratio = bnfold / update_bn samples per second (> 1: bnfold faster). "
        "The longer run: the same on more batches of the same sizes, where each tool's fixed "
        "cost per call (set-up, pooling, the report) weighs less. Memory "
        "ratio = bnfold / update_bn peak (< 1: bnfold smaller). Errors: worst BN, max over "
        "channels, |mean error| / std and |var error| / var against float64 statistics of "
        "every BN input of a float64 copy of the model (train-mode BN semantics); the floor is "
        "what exact pooling of the float32 model's own BN inputs gets."
    )
    return "\n".join(head) + "\n"


def in_fresh_process(index: int, args: argparse.Namespace) -> Row:
    """Case ``index`` measured by this script in a new interpreter: what ran before in this
    process (other models' runs leave its heap and caches in another state) does not move
    the numbers, and each model is measured as one ``bnfold recalibrate`` run would be."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "row.json"
        command = [sys.executable, __file__, "--case", str(index), "--json", str(out)]
        command += ["--repeat", str(args.repeat), "--batches", str(args.batches)]
        command += ["--long", str(args.long), "--sizes", args.sizes, "--device", args.device]
        command += ["--threads", str(args.threads)] if args.threads else []
        command += ["--smoke"] if args.smoke else []
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        (row,) = json.loads(out.read_text(encoding="utf-8"))
    return Row(**row)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="interleaved timed runs (best)")
    parser.add_argument("--batches", type=int, default=12, help="batches per recalibration")
    parser.add_argument(
        "--long", type=int, default=4, help="also run on this many times the batches (0: skip)"
    )
    parser.add_argument("--sizes", default="32,7,64,19,48", help="batch sizes, cycled")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument(
        "--models",
        default=None,
        help="only cases whose name contains one of these comma-separated words",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repeat")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure every model in this process (default: each model in a fresh one)",
    )
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)  # child runs
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    all_cases = SMOKE_CASES if args.smoke else CASES
    cases, repeat, n_batches, long = all_cases, args.repeat, args.batches, args.long
    if args.models:
        words = args.models.split(",")
        cases = [case for case in cases if any(word in case.name for word in words)]
    if args.case is not None:
        cases = [all_cases[args.case]]
    if args.smoke:
        repeat, n_batches, sizes, long = 1, 3, [4, 3], 2
    device = torch.device(args.device)
    if args.in_process or len(cases) == 1:
        rows = [measure(case, sizes, n_batches, repeat, device, long) for case in cases]
    else:
        rows = [in_fresh_process(all_cases.index(case), args) for case in cases]
    print(markdown(rows, sizes, device, torch.get_num_threads()), end="")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([asdict(row) for row in rows], handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
