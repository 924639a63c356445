"""SIGINT, SIGTERM and SIGHUP while ``bnfold fold`` / ``bnfold recalibrate`` write their model:
a real process and real signals. No temporary file is left, an existing output is byte-identical,
and the exit code is 128 + the signal number."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from bnfold_cli.main import main
from onnx_models import ConvNet, image, ready

import bnfold

# Runs the real CLI in a fresh interpreter. The model writers write the file, then say so and
# wait (up to a minute, or until RELEASE exists): the signal arrives in the middle of a save.
RUNNER = """
import signal, sys, time
from pathlib import Path

# Signals as in a terminal session, even when the tests run as a background job or under
# nohup (which start every child with SIGINT or SIGHUP ignored; bnfold rightly leaves an ignored
# signal ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)

import safetensors.torch
import torch

marks = Path(sys.argv[1])


def slow(real):
    def write(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        if not isinstance(path, (str, Path)):  # torch.export.save's own in-memory torch.save
            return
        (marks / "WRITING").write_text(str(path))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (marks / "RELEASE").exists():
            time.sleep(0.02)
    return write


torch.export.save = slow(torch.export.save)
torch.save = slow(torch.save)
safetensors.torch.save_file = slow(safetensors.torch.save_file)
from bnfold_cli.main import main

sys.argv = ["bnfold", *sys.argv[2:]]  # as the console script runs it
main()
"""

COMMANDS = {
    "fold": ["fold", "model.pt2", "-o", "out.pt2", "--force"],
    "recalibrate": [
        "recalibrate",
        "model.pt2",
        "--data",
        "samples.pt",
        "-o",
        "out.pt2",
        "--force",
        "-q",
    ],
}
SIGNALS = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("signals-base")
    dims = ({0: torch.export.Dim.AUTO},)
    program = torch.export.export(ready(ConvNet()), (image(),), dynamic_shapes=dims)
    torch.export.save(program, root / "model.pt2")
    torch.save(
        torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)), root / "samples.pt"
    )
    (root / "runner.py").write_text(RUNNER)
    return root


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """The processes a test starts; any still running at the end is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


def start(base: Path, work: Path, args: list[str]) -> subprocess.Popen:
    for name in ("model.pt2", "samples.pt"):
        (work / name).write_bytes((base / name).read_bytes())
    (work / "out.pt2").write_bytes(b"the output of an earlier run")
    marks = work.parent / f"{work.name}-marks"
    marks.mkdir()
    return subprocess.Popen(
        [sys.executable, str(base / "runner.py"), str(marks), *args],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_write(process: subprocess.Popen, marks: Path) -> str:
    deadline = time.monotonic() + 120
    while not (marks / "WRITING").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the save never started"
        time.sleep(0.02)
    return (marks / "WRITING").read_text()


def test_a_signal_during_the_save_leaves_no_temp_file_and_the_old_output(base, tmp_path, processes):
    signal_during_save(
        base,
        tmp_path,
        processes,
        [
            ("fold", "SIGINT"),
            ("fold", "SIGTERM"),
            ("fold", "SIGHUP"),
            ("recalibrate", "SIGTERM"),
        ],
    )


@pytest.mark.slow
def test_the_same_for_recalibrate_with_sigint_and_sighup(base, tmp_path, processes):
    signal_during_save(
        base, tmp_path, processes, [("recalibrate", "SIGINT"), ("recalibrate", "SIGHUP")]
    )


def signal_during_save(
    base: Path, tmp_path: Path, processes: list[subprocess.Popen], cases: list[tuple[str, str]]
) -> None:
    """Start every (command, signal) case as a concurrent process (their torch start-ups
    overlap), send each its signal mid-save, then check exit code, files and message."""
    works = {case: tmp_path / "-".join(case) for case in cases}
    for case, work in works.items():
        work.mkdir()
        processes.append(start(base, work, COMMANDS[case[0]]))
    running = dict(zip(works, processes, strict=True))
    for case, process in running.items():
        temp = wait_for_write(process, works[case].parent / f"{works[case].name}-marks")
        assert (works[case] / temp).exists()  # mid-save: the temporary file is there
        process.send_signal(getattr(signal, case[1]))
    for case, process in running.items():
        _, err = process.communicate(timeout=60)
        work = works[case]
        assert process.returncode == SIGNALS[case[1]], (case, err)
        assert err.strip().splitlines()[-1].startswith(f"Aborted ({case[1]})"), (case, err)
        names = sorted(p.name for p in work.iterdir())
        assert names == ["model.pt2", "out.pt2", "samples.pt"], (case, names)
        assert (work / "out.pt2").read_bytes() == b"the output of an earlier run", case


def test_a_second_stop_signal_while_the_run_ends_changes_nothing(base, tmp_path, processes):
    """SIGTERM mid-save, then SIGINT while the program cleans up and exits: the first signal
    decides the exit code and the last line, the old output stays."""
    work = tmp_path / "twice"
    work.mkdir()
    process = start(base, work, COMMANDS["fold"])
    processes.append(process)
    wait_for_write(process, tmp_path / "twice-marks")
    process.send_signal(signal.SIGTERM)
    for _ in range(10):  # into the cleanup and the interpreter's exit
        time.sleep(0.05)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("Aborted (SIGTERM)"), err
    assert (work / "out.pt2").read_bytes() == b"the output of an earlier run"
    assert sorted(p.name for p in work.iterdir()) == ["model.pt2", "out.pt2", "samples.pt"]


def test_the_cli_restores_the_handlers_it_found_and_keeps_an_ignored_sighup(capsys, monkeypatch):
    """Under nohup SIGHUP is ignored before bnfold starts: it stays ignored while the command
    runs (a hang-up must not stop the run), and every handler is restored afterwards."""
    seen = {}

    def record(*args, **kwargs):
        seen.update(
            {
                name: signal.getsignal(getattr(signal, name))
                for name in ("SIGINT", "SIGTERM", "SIGHUP")
            }
        )
        raise bnfold.LoadError("stop here")

    monkeypatch.setattr("bnfold.pipeline.load_model", record)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        before = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        with pytest.raises(SystemExit) as caught:
            main(["inspect", "model.pt2"])
        after = {n: signal.getsignal(n) for n in before}
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert caught.value.code == 3 and "stop here" in capsys.readouterr().err
    assert seen["SIGHUP"] is signal.SIG_IGN
    assert callable(seen["SIGTERM"]) and seen["SIGTERM"] is not signal.SIG_DFL
    assert after == before


def _dropping(real, signum: int, convert: bool = False):
    """``real``, after a stop signal whose exception it catches and drops (as torch's ONNX
    exporter may), or turns into a RuntimeError (``convert``)."""

    def call(*args, **kwargs):
        assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN)  # bnfold's
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here
        except BaseException as exc:
            if convert:
                raise RuntimeError("converted") from exc
        return real(*args, **kwargs)

    return call


@pytest.mark.parametrize("where", ["writing", "folding", "folding, turned into an error"])
def test_a_stop_signal_whose_exception_is_dropped_still_stops_the_run(
    base, tmp_path, monkeypatch, capsys, where: str
) -> None:
    """The exception is raised again before the output is put in place (dropped while
    writing it) or when the stage ends (dropped while folding); turned into another error, the
    stop still wins over it: the earlier output stays, no temporary file is left, and the exit
    code is 143."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM already has a handler here: bnfold leaves it alone")
    (tmp_path / "model.pt2").write_bytes((base / "model.pt2").read_bytes())
    (tmp_path / "out.pt2").write_bytes(b"the output of an earlier run")
    if where == "writing":
        monkeypatch.setattr(torch.export, "save", _dropping(torch.export.save, signal.SIGTERM))
    else:
        convert = where.endswith("error")
        monkeypatch.setattr("bnfold.pipeline.fold", _dropping(bnfold.fold, signal.SIGTERM, convert))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        main(["fold", "model.pt2", "-o", "out.pt2", "--force"])
    assert caught.value.code == 143
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("Aborted (SIGTERM)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2", "out.pt2"]
    assert (tmp_path / "out.pt2").read_bytes() == b"the output of an earlier run"


def test_a_stop_after_the_model_was_written_names_it(base, tmp_path, monkeypatch, capsys) -> None:
    """SIGTERM while the JSON report is written: the model file is already in place and
    complete, and the Aborted line says so."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM already has a handler here: bnfold leaves it alone")
    import bnfold.io.models as models

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here

    (tmp_path / "model.pt2").write_bytes((base / "model.pt2").read_bytes())
    monkeypatch.setattr(models, "write_text_atomic", stopped)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        main(["fold", "model.pt2", "-o", "out.pt2", "--json", "report.json"])
    assert caught.value.code == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("Aborted (SIGTERM)") and "already written, complete: out.pt2" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2", "out.pt2"]
    bnfold.load_model(tmp_path / "out.pt2")  # complete
