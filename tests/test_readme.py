"""Every command shown in README.md is exercised, so the README cannot drift from the code.

The README's fenced code blocks are parsed:

- ```bash (or sh/shell) blocks: each command line (``\\`` continuations joined, a leading ``$ ``
  prompt dropped, ``&&``/``;`` split into separate commands) is classified:
  ``bnfold ...`` runs, in README order, in one shared workspace (so a file one command writes,
  such as ``model.folded.pt2``, is there for the next). ``torchrun ... bnfold ...`` is parsed
  (torchrun's own argument parser, then bnfold's), never spawned. ``python examples/X.py`` and
  ``python benchmarks/X.py`` must name an existing script (tests/test_examples.py runs the
  examples; benchmarks have their own smoke tests). The few commands not run are listed in
  ``NOT_RUN`` and ``PARSE_ONLY`` with the reason; anything else fails the test, so a new kind of
  README command needs a line here.
- ```python blocks run as scripts in a subprocess, each in a fresh copy of the workspace (with
  the workspace on ``PYTHONPATH``). Each block must run on its own: imports and data included.

The workspace holds the file names the README uses (see ``workspace``): ``model.pt2`` (a
torch.export program of ``bnfold.zoo.small_cnn``, input 2x3x32x32, dynamic batch), ``model.pt``
(the same module pickled whole), ``weights.pt`` / ``weights.safetensors`` (its state dict, which
fits ``mypkg.models:small_cnn``), ``mypkg/models.py`` (re-exports the zoo builders),
``mypkg/data.py`` (``shard``: this rank's batches of ``samples.pt``, for ``--data``),
``samples.pt`` (a 32x3x32x32 tensor), ``images/`` (a few PNGs), ``model.onnx`` (the folded model
exported), ``model.folded.pt2`` (the folded model). While a bnfold command runs, the outputs it
names (``-o``, ``--onnx`` of fold/export, ``--json``, ``--markdown``, ``--out``) and the default
output of ``bnfold fold`` are moved aside, as if the user ran it in a fresh folder (and put back
afterwards unless the command rewrote them).

A bnfold command must exit 0, with two exceptions: a command naming CUDA may exit 3 when the
message says CUDA is not usable here; and a line whose comment says ``# exit N`` must exit N
(for README examples of refusals). bnfold commands run in this process (``bnfold_cli.main.main``
with the README's argv, in the workspace folder): the same code path as the ``bnfold`` script
without a torch start-up per command.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

SHELL_LANGS = {"bash", "sh", "shell"}
PYTHON_LANGS = {"python", "py"}

# Commands shown in the README that this file does not run, with the reason. Keep it short.
NOT_RUN = {
    ("pip", "install"): "set-up: CI installs the package itself (.ci/run)",
    ("python", "-m", "pip"): "set-up: CI installs the package itself (.ci/run)",
    ("ruff", "check"): "CI runs it (.ci/run)",
    ("ruff", "format"): "CI runs it (.ci/run)",
    ("lint-imports",): "CI runs it (.ci/run)",
    ("pytest",): "CI runs it (.ci/run); this file is part of that run",
    (".ci/run",): "the CI entry point",
}
# bnfold subcommands shown in the README that are only parsed here, with the reason.
PARSE_ONLY = {
    "demo": "tests/test_demo.py runs it end to end (it trains a model for most of a minute)",
}
# Click options whose value is a file or folder the command writes.
OUTPUT_PARAMS = {"output", "onnx_path", "json_path", "markdown_path", "out_dir", "out"}
# Values with these endings are treated as files the command reads (they must be prepared).
PATH_SUFFIXES = {
    ".pt2",
    ".pt",
    ".pth",
    ".safetensors",
    ".onnx",
    ".npy",
    ".npz",
    ".png",
    ".jpg",
    ".json",
    ".md",
}
CUDA_UNUSABLE = re.compile(
    r"CUDA\b.*\b(not usable|not available|unavailable)|no CUDA|not compiled with CUDA",
    re.IGNORECASE,
)
EXPECTED_EXIT = re.compile(r"#.*\bexit(?: code)?\s+(\d)\b", re.IGNORECASE)
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


# ------------------------------------------------------------------------------ README parsing


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # README line of the block's first content line (1-based)
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Step:
    """One command of a shell block."""

    line: int
    text: str  # the command line as written (continuations joined)
    argv: tuple[str, ...]
    kind: str  # "bnfold", "parse-only", "torchrun", "script", "not-run", "placeholder", "unknown"
    why: str = ""
    expected_exit: int | None = None

    @property
    def id(self) -> str:
        words = re.sub(r"[^\w.:/=-]+", "_", " ".join(self.argv))[:60]
        return f"L{self.line}-{words}"


def fenced_blocks(text: str) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*(```|~~~)\s*([\w+-]*)", line)
        if fence and lang is None:
            lang, start, body = fence.group(2).lower() or "text", number + 1, []
        elif fence and line.strip() in ("```", "~~~"):
            blocks.append(Block(lang, start, tuple(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def shell_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(README line, command text): continuations joined, prompts and blank lines dropped."""
    pending, first = "", 0
    for offset, raw in enumerate(block.lines):
        line = raw.strip()
        if not pending:
            first = block.line + offset
            line = line.removeprefix("$ ")
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = (pending + line).strip(), ""
        if text and not text.startswith("#"):
            yield first, text


def split_commands(text: str) -> list[list[str]]:
    """``a && b; c`` -> [[a...], [b...], [c...]] (comments dropped)."""
    commands: list[list[str]] = [[]]
    for token in shlex.split(text, comments=True):
        if token in ("&&", ";", "||"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [argv for argv in commands if argv]


def classify(argv: list[str]) -> tuple[str, str]:
    for prefix, why in NOT_RUN.items():
        if tuple(argv[: len(prefix)]) == prefix:
            return "not-run", why
    if any(char in token for token in argv for char in "|<>"):
        return "unknown", "pipes and redirections are not supported by this harness"
    if argv[0] == "bnfold":
        sub = next((a for a in argv[1:] if not a.startswith("-")), None)
        if sub in PARSE_ONLY:
            return "parse-only", PARSE_ONLY[sub]
        return "bnfold", ""
    if argv[0] == "torchrun":
        return "torchrun", "parsed only: not spawned in the default test suite"
    if (
        argv[0] in ("python", "python3")
        and len(argv) > 1
        and argv[1].startswith(("examples/", "benchmarks/"))
    ):
        return "script", "tests/test_examples.py runs examples; benchmarks have smoke tests"
    return "unknown", "this harness does not know how to run it; teach tests/test_readme.py"


def readme_steps(text: str) -> list[Step]:
    steps = []
    for block in fenced_blocks(text):
        if block.lang not in SHELL_LANGS:
            continue
        for line, command in shell_lines(block):
            expected = EXPECTED_EXIT.search(command)
            for argv in split_commands(command):
                if "..." in command:
                    kind, why = "placeholder", "the line holds a '...' placeholder"
                else:
                    kind, why = classify(argv)
                steps.append(
                    Step(
                        line,
                        command,
                        tuple(argv),
                        kind,
                        why,
                        int(expected.group(1)) if expected else None,
                    )
                )
    return steps


def python_blocks(text: str) -> list[Block]:
    return [block for block in fenced_blocks(text) if block.lang in PYTHON_LANGS]


README_TEXT = README.read_text(encoding="utf-8") if README.is_file() else ""
STEPS = readme_steps(README_TEXT)
PYTHON_BLOCKS = python_blocks(README_TEXT)


# -------------------------------------------------------------------------------- workspace


MYPKG_MODELS = '''"""The README's example user package: bnfold's built-in model builders."""

from bnfold.zoo import mlp, mobilenet_v2, resnet18, resnet50, small_cnn, unet3d

__all__ = ["mlp", "mobilenet_v2", "resnet18", "resnet50", "small_cnn", "unet3d"]
'''

MYPKG_DATA = '''"""The README's data callable: this rank's share of samples.pt, in batches of 8."""

from pathlib import Path

import torch
import torch.distributed as dist


def shard():
    samples = torch.load(Path(__file__).resolve().parents[1] / "samples.pt", weights_only=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return [samples[i : i + 8] for i in range(8 * rank, len(samples), 8 * world)]
'''


def _prepare(base: Path) -> None:
    """Write every file name the README uses as an input into ``base``."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    import bnfold
    from bnfold import zoo

    (base / "mypkg").mkdir()
    (base / "mypkg" / "__init__.py").write_text("")
    (base / "mypkg" / "models.py").write_text(MYPKG_MODELS)
    (base / "mypkg" / "data.py").write_text(MYPKG_DATA)
    torch.manual_seed(0)
    model = zoo.randomize_bn(zoo.small_cnn()).eval()
    x = zoo.example_input("small_cnn")  # 2x3x32x32
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, base / "model.pt2")
    torch.save(model, base / "model.pt")
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    torch.save(state, base / "weights.pt")
    save_file(state, str(base / "weights.safetensors"))
    torch.save(
        torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1)), base / "samples.pt"
    )
    (base / "images").mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(base / "images" / f"img{index}.png")
    result = bnfold.fold(model, x)
    bnfold.export_onnx(result, x, base / "model.onnx")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared inputs, never modified (python blocks run in copies)."""
    path = tmp_path_factory.mktemp("readme-base")
    _prepare(path)
    return path


@pytest.fixture(scope="module")
def shell_dir(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The one folder the README's shell commands run in, in order."""
    import torch

    import bnfold

    path = tmp_path_factory.mktemp("readme-shell") / "work"
    shutil.copytree(base, path)
    model = torch.export.load(path / "model.pt2").module()
    x = torch.randn(2, 3, 32, 32)
    bnfold.save_model(bnfold.fold(model, x).model, path / "model.folded.pt2", example_inputs=x)
    yield path
    for name in [n for n in sys.modules if n == "mypkg" or n.startswith("mypkg.")]:
        del sys.modules[name]


# ------------------------------------------------------------------------------- running bnfold


def _parse(argv: tuple[str, ...]) -> tuple[Any, dict[str, Any]] | None:
    """bnfold's own parser on ``argv`` (without 'bnfold'): (command, params), or None when no
    subcommand is given (``bnfold --help``). Fails the test when the README's options are wrong."""
    import click
    from bnfold_cli.main import cli, register_commands

    register_commands()
    args = list(argv)
    while args and args[0] == "--debug":
        args.pop(0)
    if not args or args[0].startswith("-"):
        return None
    command = cli.commands.get(args[0])
    assert command is not None, f"README uses 'bnfold {args[0]}', which is not a bnfold command"
    try:
        ctx = command.make_context(args[0], args[1:])
    except click.exceptions.Exit:  # --help
        return command, {}
    except click.ClickException as exc:
        pytest.fail(
            f"README command 'bnfold {' '.join(argv)}' does not parse: {exc.format_message()}"
        )
    return command, ctx.params


def _paths(command: Any, params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(files read, files written) named by a parsed command's parameters."""
    import click

    reads, writes = [], []
    for param in command.params:
        value = params.get(param.name)
        values = value if isinstance(value, (tuple, list)) else [value]
        for item in values:
            if item is None or not isinstance(item, (str, os.PathLike)) or str(item) == "-":
                continue
            text = str(item)
            if isinstance(param, click.Option) and param.name in OUTPUT_PARAMS:
                writes.append(text)
            elif not FACTORY.match(text) and (
                Path(text).suffix.lower() in PATH_SUFFIXES or text.endswith("/")
            ):
                reads.append(text)
    return reads, writes


def _default_outputs(command: Any, params: dict[str, Any]) -> list[str]:
    """What ``bnfold fold MODEL`` writes without ``-o``: ``<name>.folded.<ext>``."""
    from bnfold.io.models import LoadedModel, ModelFormat, default_output_path

    if command.name != "fold" or params.get("output"):
        return []
    spec = str(params["spec"])
    if FACTORY.match(spec) and not Path(spec).exists():
        fmt = ModelFormat.FACTORY
    elif Path(spec).suffix in (".pt", ".pth") and not params.get("arch"):
        fmt = ModelFormat.PICKLED_MODULE
    else:
        fmt = ModelFormat.EXPORTED_PROGRAM
    main = default_output_path(LoadedModel(model=None, format=fmt, source=spec), cwd=Path("."))
    also = [main.with_suffix(".pt2")] if params.get("also_pt2") else []
    return [str(path) for path in (main, *also)]


def _check_inputs(step: Step, parsed: tuple[Any, dict] | None, cwd: Path) -> None:
    """Fail, naming the file, when the command reads a file the workspace does not have."""
    reads = _paths(*parsed)[0] if parsed else []
    missing = [path for path in reads if not (cwd / path).exists()]
    assert not missing, (
        f"README line {step.line} reads {', '.join(missing)}, which the harness does not "
        f"prepare (it has: {', '.join(sorted(p.name for p in cwd.iterdir()))}); add it to "
        "_prepare in tests/test_readme.py or use one of those names"
    )


@contextlib.contextmanager
def _fresh_outputs(parsed: tuple[Any, dict] | None, cwd: Path) -> Iterator[None]:
    """While the command runs, what it will write is moved aside (as if it ran in a fresh
    folder); afterwards what it did not rewrite is put back, so later README commands still
    find the files earlier ones made."""
    if parsed is None:
        yield
        return
    reads, writes = _paths(*parsed)
    stash = cwd.parent / "stash"
    moved = []
    for name in dict.fromkeys([*writes, *_default_outputs(*parsed)]):
        if (cwd / name).exists() and name not in reads:
            target = stash / str(len(moved))
            target.parent.mkdir(exist_ok=True)
            shutil.move(cwd / name, target)
            moved.append((cwd / name, target))
    try:
        yield
    finally:
        for path, target in moved:
            if path.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            else:
                shutil.move(target, path)


def _run_bnfold(
    argv: tuple[str, ...], cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    from bnfold_cli.main import main

    monkeypatch.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def _check_exit(step: Step, code: int, out: str, err: str) -> None:
    where = f"README line {step.line}: {step.text}\n--- stdout\n{out}\n--- stderr\n{err}"
    if step.expected_exit is not None:
        assert code == step.expected_exit, (
            f"expected exit {step.expected_exit}, got {code}\n" + where
        )
        return
    if code == 3 and "cuda" in step.text.lower():
        assert CUDA_UNUSABLE.search(err), "exit 3 without a 'CUDA is not usable' message\n" + where
        return
    assert code == 0, f"exit {code}\n{where}"


def _torchrun_bnfold_args(step: Step) -> tuple[str, ...]:
    from torch.distributed.run import get_args_parser

    try:
        args = get_args_parser().parse_args(list(step.argv[1:]))
    except SystemExit:
        pytest.fail(f"README line {step.line}: torchrun does not accept: {step.text}")
    if args.no_python and args.training_script == "bnfold":
        return tuple(args.training_script_args)
    if args.module and args.training_script == "bnfold_cli.main":
        return tuple(args.training_script_args)
    pytest.fail(
        f"README line {step.line}: torchrun must run bnfold as '--no-python bnfold ...'"
        f" or '-m bnfold_cli.main ...' for this harness to check it: {step.text}"
    )


# ------------------------------------------------------------------------------------ tests


def test_readme_has_commands_and_python() -> None:
    assert README_TEXT, "README.md is missing"
    assert any(step.argv[0] == "bnfold" for step in STEPS), "no bnfold command in README.md"
    assert PYTHON_BLOCKS, "no python block found in README.md"


def test_every_bnfold_command_is_shown_in_the_readme() -> None:
    from bnfold_cli.commands import COMMANDS

    shown = {
        next((a for a in s.argv[1:] if not a.startswith("-")), None)
        for s in STEPS
        if s.argv[0] == "bnfold"
    }
    shown |= {
        next((a for a in s.argv if a in {c.name for c in COMMANDS}), None)
        for s in STEPS
        if s.kind == "torchrun"
    }
    missing = sorted(c.name for c in COMMANDS if c.name not in shown)
    assert not missing, f"README.md shows no example of: {', '.join(missing)}"


@pytest.mark.parametrize("step", STEPS, ids=[step.id for step in STEPS])
def test_readme_command(step: Step, shell_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if step.kind == "unknown":
        pytest.fail(f"README line {step.line}: '{step.text}': {step.why}")
    if step.kind in ("not-run", "placeholder"):
        pytest.skip(step.why)
    if step.kind == "script":
        script = ROOT / step.argv[1]
        assert script.is_file(), f"README line {step.line} runs {step.argv[1]}, which is missing"
        return
    argv = _torchrun_bnfold_args(step) if step.kind == "torchrun" else step.argv[1:]
    parsed = _parse(argv)
    _check_inputs(step, parsed, shell_dir)
    if step.kind in ("torchrun", "parse-only"):
        return
    with _fresh_outputs(parsed, shell_dir):
        result = _run_bnfold(argv, shell_dir, monkeypatch)
    _check_exit(step, *result)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"L{b.line}" for b in PYTHON_BLOCKS])
def test_readme_python_block(block: Block, base: Path, tmp_path: Path) -> None:
    source = "\n".join(block.lines) + "\n"
    if re.search(r"^\s*[^#\n]*\.\.\.", source, re.MULTILINE):
        pytest.skip("the block holds a '...' placeholder")
    work = tmp_path / "work"
    shutil.copytree(base, work)
    (work / "readme_block.py").write_text(source)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "readme_block.py"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"README python block at line {block.line} failed (exit {proc.returncode})\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )


def test_every_skip_reason_has_a_row_in_the_readme_table() -> None:
    from bnfold import SkipReason

    text = README.read_text()
    missing = [reason.value for reason in SkipReason if f"| `{reason.value}` |" not in text]
    assert not missing, missing
