"""Run every benchmark in benchmarks/ and rewrite BENCHMARKS.md with their tables.

    python benchmarks/run_all.py                   # full runs; rewrites BENCHMARKS.md
    python benchmarks/run_all.py --quick           # smoke run: prints the document only
    python benchmarks/run_all.py --only fold_bench,onnx_bench --output /tmp/B.md

Each benchmark (``benchmarks/*_bench.py``) runs as its own process, one after the other, with
the arguments in ``ARGS``; its standard output (Markdown tables and notes) goes into the document
under a heading, with the exact command and its wall time. A benchmark not listed in ``ARGS``
runs without arguments (with ``--smoke`` under ``--quick`` when it offers that flag). The
document also records the machine, the versions, the date, the git commit and this command.

The README quotes some benchmarks' first table between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; a full run that writes BENCHMARKS.md refreshes those tables too.

``--quick`` is a smoke run (one or two repetitions, the smallest models): it checks that every
benchmark still runs and prints its table; its numbers mean nothing. So it writes only to
``--output`` when one is given, never over BENCHMARKS.md by default. ``--only`` does the same:
a document of some benchmarks must not replace the one of all of them.

Exit code: 0 when every benchmark ran and printed a Markdown table, 1 otherwise (the document
is still written, with the failure and the end of the benchmark's error output in it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUTPUT = ROOT / "BENCHMARKS.md"
README = ROOT / "README.md"

# Arguments per benchmark: (full run, --quick smoke run).
ARGS: dict[str, tuple[list[str], list[str]]] = {
    "fold_bench": ([], ["--repeat", "1", "--models", "mlp", "traps"]),
    "onnx_bench": ([], ["--repeat", "2", "--models", "mlp,small_cnn"]),
    "recalibrate_bench": ([], ["--smoke"]),
    "cli_bench": ([], ["--smoke"]),
    "realworld_bench": ([], ["--quick", "--repeat", "1"]),
}

#: Scripts in benchmarks/ that run_all does not run (not ``*_bench.py``), documented here so a
#: regenerated BENCHMARKS.md keeps saying how to run them.
OTHER_SCRIPTS = """\
## Not run by run_all: kernels_left

`python benchmarks/kernels_left.py [--all] [--models NAME ...] [--json out.json]` counts the
batch-norm kernels one eval-mode forward runs before folding and after
`bnfold.fold(model, example).model` (`bnfold.count_bn_kernels`), for the MONAI networks of
`tests/monai_models.py` (the default test run's `FAST` subset; every network with `--all`) and
the wild-pattern fixtures of `tests/wild_models.py`, on the inputs those suites use. It prints
the bnfold it imported, one row per model (how bnfold read it, before, left, skip reasons) and
totals per suite; `--all` takes about a minute on 2 cores. To measure another checkout of
bnfold (say the tag `pre-i16`), extract it and put it first on the path, running from outside
the repository so nothing shadows it:

```bash
mkdir /tmp/pre-i16 && git archive pre-i16 bnfold | tar -x -C /tmp/pre-i16
cd /tmp && PYTHONPATH=/tmp/pre-i16 python REPO/benchmarks/kernels_left.py --all --json before.json
```
"""

NOTE = """\
Ratios are measured side by side: both sides run in one process (or, for the CLI, one session),
on the same model and inputs, with interleaved repetitions. They are what to read and quote.
Absolute times come from a shared, noisy machine and mean little on their own."""


@dataclass(frozen=True)
class Result:
    name: str
    title: str
    command: list[str]
    seconds: float
    code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0 and _has_table(self.stdout)


def discover(only: list[str] | None) -> list[Path]:
    scripts = sorted(HERE.glob("*_bench.py"))
    if only:
        names = {path.stem for path in scripts}
        unknown = sorted(set(only) - names)
        if unknown:
            raise SystemExit(
                f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(sorted(names))}"
            )
        scripts = [path for path in scripts if path.stem in only]
    return scripts


def arguments(script: Path, quick: bool) -> list[str]:
    if script.stem in ARGS:
        return ARGS[script.stem][1 if quick else 0]
    return ["--smoke"] if quick and '"--smoke"' in script.read_text(encoding="utf-8") else []


def title(script: Path) -> str:
    """The first line of the benchmark's docstring, or its name."""
    match = re.search(r'^(?:"""|\'\'\')\s*(.+)$', script.read_text(encoding="utf-8"), re.M)
    return match.group(1).strip().replace("``", "`") if match else script.stem


def run(script: Path, args: list[str], timeout: float | None) -> Result:
    command = [sys.executable, str(script), *args]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout = 124, _text(exc.stdout)
        stderr = _text(exc.stderr) + f"\ntimed out after {timeout:.0f} s"
    seconds = time.perf_counter() - started
    shown = ["python", str(script.relative_to(ROOT)), *args]
    return Result(script.stem, title(script), shown, seconds, code, stdout, stderr)


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _has_table(text: str) -> bool:
    return any(re.match(r"^\|.*\|\s*$", line) for line in text.splitlines())


# ------------------------------------------------------------------------------- the machine


def machine() -> dict[str, str]:
    cpu = _cpu_model() or platform.processor() or platform.machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": cpu,
        "cores": f"{usable} usable ({os.cpu_count()} logical)",
        "RAM": _ram(),
        "OS": platform.platform(),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        proc = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        )
        return proc.stdout.strip() or None
    return None


def _ram() -> str:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return "unknown"
    return f"{total / 2**30:.1f} GiB"


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "onnx", "onnxruntime", "onnxscript", "numpy", "bnfold"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (with uncommitted changes)" if dirty else head


# ------------------------------------------------------------------------------- the document


def document(
    results: list[Result],
    argv: list[str],
    quick: bool,
    started: str,
    total: float,
    load_at_start: str,
    commit: str | None = None,
) -> str:
    lines = ["# Benchmarks", ""]
    if quick:
        lines += [
            "> **Smoke run (`--quick`)**: one or two repetitions on the smallest models. "
            "These numbers only show that the benchmarks run.",
            "",
        ]
    commit = commit or git_commit()
    lines += [
        NOTE,
        "",
        f"Generated by `{shlex.join(['python', 'benchmarks/run_all.py', *argv])}`"
        f" on {started}, {total / 60:.1f} min in all, at commit {commit}.",
        "",
    ]
    lines += ["| machine | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in machine().items()]
    lines += [f"| load average (1 min) at start / end | {load_at_start} / {_load()} |", ""]
    lines += ["| package | version |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in versions().items()]
    lines += [""]
    lines += ["| benchmark | status | wall time |", "|---|---|---|"]
    lines += [f"| [{r.name}](#{r.name}) | {_status(r)} | {r.seconds:.0f} s |" for r in results]
    for result in results:
        lines += [
            "",
            f"## {result.name}",
            "",
            result.title,
            "",
            f"`{shlex.join(result.command)}` ({result.seconds:.0f} s)",
            "",
        ]
        lines += [result.stdout.strip()] if result.stdout.strip() else []
        if not result.ok:
            tail = "\n".join(result.stderr.strip().splitlines()[-20:])
            lines += ["", f"**{_status(result)}**", "", "```text", tail, "```"]
    lines += ["", OTHER_SCRIPTS]
    return "\n".join(lines).rstrip() + "\n"


def first_table(text: str) -> str:
    """The first Markdown table in ``text`` (consecutive ``|`` lines)."""
    lines: list[str] = []
    for line in text.splitlines():
        if re.match(r"^\|.*\|\s*$", line):
            lines.append(line.rstrip())
        elif lines:
            break
    return "\n".join(lines)


def refresh_readme(readme: str, results: list[Result], commit: str) -> str:
    """``readme`` with each ``<!-- bench:NAME -->`` block replaced by NAME's first table."""
    for result in results:
        table = first_table(result.stdout) if result.ok else ""
        if not table:
            continue
        pattern = re.compile(
            rf"(<!-- bench:{result.name} -->\n).*?(<!-- /bench:{result.name} -->)", re.S
        )
        block = f"{table}\n\n(`{shlex.join(result.command)}`, commit {commit})\n"
        readme = pattern.sub(lambda m, b=block: m.group(1) + b + m.group(2), readme)
    return readme


def _status(result: Result) -> str:
    if result.code == 124:
        return "timed out"
    if result.code != 0:
        return f"FAILED (exit {result.code})"
    return "ok" if result.ok else "FAILED (no Markdown table)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few repetitions, small models; writes only to --output",
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated benchmark names (e.g. fold_bench,onnx_bench)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"where to write the document (default: {DEFAULT_OUTPUT.name}; "
        "with --quick or --only, stdout only)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds allowed per benchmark (default: no limit)",
    )
    args_list = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(args_list)
    scripts = discover(args.only.split(",") if args.only else None)
    # a smoke run, or a run of some benchmarks only, never replaces the whole document
    output = args.output or (None if args.quick or args.only else DEFAULT_OUTPUT)

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    begin, load_at_start = time.perf_counter(), _load()
    commit = git_commit()  # before anything is written: what the numbers were measured on
    results = []
    for index, script in enumerate(scripts, start=1):
        extra = arguments(script, args.quick)
        print(
            f"[{index}/{len(scripts)}] {shlex.join([script.name, *extra])} ...",
            file=sys.stderr,
            flush=True,
        )
        result = run(script, extra, args.timeout)
        print(f"    {_status(result)} in {result.seconds:.0f} s", file=sys.stderr, flush=True)
        results.append(result)
    text = document(
        results, args_list, args.quick, started, time.perf_counter() - begin, load_at_start, commit
    )
    if output is None:
        print(text, end="")
    else:
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}", file=sys.stderr)
        if output == DEFAULT_OUTPUT and not args.quick:
            before = README.read_text(encoding="utf-8")
            after = refresh_readme(before, results, commit)
            if after != before:
                README.write_text(after, encoding="utf-8")
                print(f"refreshed the benchmark tables in {README.name}", file=sys.stderr)
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
