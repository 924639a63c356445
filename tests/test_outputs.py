"""No file is ever lost or silently replaced: every command's outputs are checked against its
inputs and each other before any work, existing files need --force (never for an input), a
file that appears meanwhile is kept, and archives carry their final name."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from bnfold_cli.main import main
from onnx_models import ConvNet, image, mlp_bn_first, ready
from PIL import Image

import bnfold
from bnfold.errors import UsageError
from bnfold.export import onnx_export as export_mod
from bnfold.io.models import ModelFormat, atomic_write, save_model

# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt2, samples.pt, model.onnx + .data (a real export), images/: never modified."""
    root = tmp_path_factory.mktemp("outputs-base")
    model = ready(ConvNet())
    dims = ({0: torch.export.Dim.AUTO},)
    torch.export.save(
        torch.export.export(model, (image(),), dynamic_shapes=dims), root / "model.pt2"
    )
    torch.save(
        torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(3)), root / "samples.pt"
    )
    folded = bnfold.fold(model, image())  # weights in model.onnx.data: an input of verify too
    bnfold.export_onnx(folded, image(), root / "model.onnx", external_data_threshold=1)
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"img{index}.png")
    return root


@pytest.fixture
def work(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of ``base``, as the current directory."""
    root = tmp_path / "work"
    shutil.copytree(base, root)
    monkeypatch.chdir(root)
    return root


def run(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as caught:
        main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return caught.value.code, out, err


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's hash, a link's target, a folder, a pipe."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "link -> " + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            elif path.is_fifo():
                found[key] = "fifo"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_refused(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def another_name(target: Path, variant: str) -> Path:
    """``target`` under another name: itself, a symlink, a hard link or a relative a/../b."""
    if variant == "same":
        return target
    if variant == "symlink":
        link = target.with_name(f"link-to-{target.name}")
        link.symlink_to(target)
        return link
    if variant == "hardlink":
        link = target.with_name(f"hard-{target.name}")
        os.link(target, link)
        return link
    (target.parent / "sub").mkdir(exist_ok=True)
    return Path(os.path.relpath(target.parent / "sub", Path.cwd())) / ".." / target.name


# ------------------------------------------------------------------ reports never replace inputs

# (what would be replaced, the command line with X for the output path); every command line
# here succeeds and writes X on code that does not check every output against every path.
REPORT_CASES = {
    "fold --json MODEL": ("model.pt2", ["fold", "model.pt2", "-o", "f.pt2", "--json", "X"]),
    "fold --dry-run --json MODEL": ("model.pt2", ["fold", "model.pt2", "--dry-run", "--json", "X"]),
    "fold --markdown --data": (
        "samples.pt",
        ["fold", "model.pt2", "--data", "samples.pt", "-o", "f.pt2", "--markdown", "X"],
    ),
    "fold --json -o": ("out.pt2", ["fold", "model.pt2", "-o", "out.pt2", "--json", "X"]),
    "inspect --json MODEL": ("model.pt2", ["inspect", "model.pt2", "--json", "X"]),
    "recalibrate --json --data": (
        "samples.pt",
        ["recalibrate", "model.pt2", "--data", "samples.pt", "-o", "r.pt2", "--json", "X"],
    ),
    "recalibrate --json MODEL": (
        "model.pt2",
        ["recalibrate", "model.pt2", "--data", "samples.pt", "-o", "r.pt2", "--json", "X"],
    ),
    "export --markdown MODEL": (
        "model.pt2",
        ["export", "model.pt2", "--onnx", "e.onnx", "--markdown", "X"],
    ),
    "export --json --onnx": (
        "out.onnx",
        ["export", "model.pt2", "--onnx", "out.onnx", "--json", "X"],
    ),
    "verify --json OUT.onnx": (
        "model.onnx",
        ["verify", "model.onnx", "--reference", "model.pt2", "--json", "X"],
    ),
    "verify --json OUT.onnx.data": (
        "model.onnx.data",
        ["verify", "model.onnx", "--reference", "model.pt2", "--json", "X"],
    ),
    "verify --json --reference": (
        "model.pt2",
        ["verify", "model.onnx", "--reference", "model.pt2", "--json", "X"],
    ),
    "recalibrate -o --data": (
        "samples.pt",
        ["recalibrate", "model.pt2", "--data", "samples.pt", "-o", "X"],
    ),
    "export --onnx --data": (
        "samples.pt",
        ["export", "model.pt2", "--onnx", "X", "--data", "samples.pt"],
    ),
}


@pytest.mark.parametrize("variant", ["same", "symlink", "hardlink", "dotdot"])
@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_a_report_never_replaces_an_input_or_another_output(work, capsys, case, variant):
    victim, args = REPORT_CASES[case]
    if not (work / victim).exists():  # an output of the same command, from an earlier run
        (work / victim).write_bytes(b"the previous output")
    report = another_name(work / victim, variant)
    before = snapshot(work)
    results = []
    for force in ([], ["--force"]):
        code, _, err = run(capsys, *[report if arg == "X" else arg for arg in args], *force)
        results.append((force, code, err, snapshot(work) == before))
    for force, _, err, unchanged in results:
        assert unchanged, f"{case} {force} changed files: {err}"
    for _, code, err, _ in results:
        assert_refused(code, err, "same file")


def test_an_output_inside_the_data_folder_is_refused(work, capsys):
    before = snapshot(work)
    for extra in (["--plot", "images/img0.png"], ["--json", "images/report.json"]):
        code, _, err = run(
            capsys,
            "recalibrate",
            "model.pt2",
            "--data",
            "images",
            "--image-size",
            "8",
            "-o",
            "r.pt2",
            *extra,
            "--force",
        )
        assert_refused(code, err, "inside the input folder", "--data")
    code, _, err = run(
        capsys,
        "fold",
        "model.pt2",
        "--data",
        "images/",
        "--image-size",
        "8",
        "-o",
        "images/../images/folded.pt2",
    )
    assert_refused(code, err, "inside the input folder")
    assert snapshot(work) == before


def test_outputs_that_do_not_exist_yet_but_are_one_file_are_refused(work, capsys):
    (work / "real").mkdir()
    (work / "linked").symlink_to(work / "real")
    (work / "sub").mkdir()
    pairs = [
        ("sub/../r.json", "r.json"),
        ("linked/r.json", "real/r.json"),
        ("linked/r.json", str(work / "real" / "sub" / ".." / "r.json")),
    ]
    (work / "real" / "sub").mkdir()
    before = snapshot(work)
    for json_path, markdown_path in pairs:
        code, _, err = run(
            capsys,
            "fold",
            "model.pt2",
            "-o",
            "f.pt2",
            "--json",
            json_path,
            "--markdown",
            markdown_path,
            "--force",
        )
        assert_refused(code, err, "are the same file")
    code, _, err = run(
        capsys, "fold", "model.pt2", "-o", "linked/m.pt2", "--onnx", "real/m.pt2", "--force"
    )
    assert_refused(code, err, "are the same file")
    assert snapshot(work) == before


# ------------------------------------------------------------------ existing files need --force

EXISTING_REPORT_CASES = {
    "inspect --json": ["inspect", "model.pt2", "--json", "X"],
    "inspect --markdown": ["inspect", "model.pt2", "--markdown", "X"],
    "fold --dry-run --json": ["fold", "model.pt2", "--dry-run", "--json", "X"],
    "recalibrate --plot": [
        "recalibrate",
        "model.pt2",
        "--data",
        "samples.pt",
        "-o",
        "r.pt2",
        "--plot",
        "X.png",
    ],
    "verify --json": ["verify", "model.onnx", "--reference", "model.pt2", "--json", "X"],
    "export --json": ["export", "model.pt2", "--onnx", "e.onnx", "--json", "X"],
    "demo --json": ["demo", "--out", "demo", "--json", "X"],
}


@pytest.mark.parametrize("case", sorted(EXISTING_REPORT_CASES))
def test_an_existing_report_needs_force(work, capsys, case):
    args = [arg.replace("X", "old-report") for arg in EXISTING_REPORT_CASES[case]]
    existing = work / next(arg for arg in args if arg.startswith("old-report"))
    existing.write_bytes(b"last week's report")
    before = snapshot(work)
    code, _, err = run(capsys, *args)
    assert_refused(code, err, "already exists", "--force")
    assert snapshot(work) == before


def test_force_replaces_an_existing_report(work, capsys):
    (work / "plan.json").write_text("old")
    code, _, err = run(capsys, "inspect", "model.pt2", "--json", "plan.json", "--force")
    assert code == 0, err
    assert '"command": "inspect"' in (work / "plan.json").read_text()


def test_demo_refuses_an_existing_demo_onnx_before_training(work, capsys):
    (work / "demo").mkdir()
    (work / "demo" / "demo.onnx").write_bytes(b"an earlier demo")
    before = snapshot(work)
    code, _, err = run(capsys, "demo", "--out", "demo")
    assert_refused(code, err, "demo.onnx", "already exists")
    code, _, err = run(
        capsys, "demo", "--out", "demo", "--json", "demo/../demo/demo.onnx", "--force"
    )
    assert_refused(code, err, "are the same file")
    assert snapshot(work) == before


# ------------------------------------------------------------------ links and special files


def test_a_dangling_symlink_output_is_refused_and_never_followed(work, capsys):
    (work / "elsewhere").mkdir()
    target = work / "elsewhere" / "not-yet.pt2"
    (work / "out.pt2").symlink_to(target)
    (work / "report.json").symlink_to(work / "elsewhere" / "not-yet.json")
    before = snapshot(work)
    code, _, err = run(capsys, "fold", "model.pt2", "-o", "out.pt2")
    assert_refused(code, err, "symbolic link to", str(target), "--force")
    code, _, err = run(capsys, "inspect", "model.pt2", "--json", "report.json")
    assert_refused(code, err, "symbolic link to", "not-yet.json")
    assert snapshot(work) == before
    code, _, err = run(
        capsys, "fold", "model.pt2", "-o", "out.pt2", "--json", "report.json", "--force"
    )
    assert code == 0, err
    for name in ("out.pt2", "report.json"):  # the links were replaced, not followed
        assert (work / name).is_file() and not (work / name).is_symlink()
    assert os.listdir(work / "elsewhere") == []
    torch.export.load(work / "out.pt2")


def test_force_replaces_a_link_to_an_existing_file_not_its_target(work, capsys):
    (work / "keep.json").write_text("someone else's file")
    (work / "report.json").symlink_to(work / "keep.json")
    code, _, err = run(capsys, "inspect", "model.pt2", "--json", "report.json")
    assert_refused(code, err, "symbolic link to", "keep.json")
    code, _, err = run(capsys, "inspect", "model.pt2", "--json", "report.json", "--force")
    assert code == 0, err
    assert (work / "keep.json").read_text() == "someone else's file"
    assert not (work / "report.json").is_symlink()


def test_a_pipe_or_device_is_never_replaced_even_with_force(work, capsys):
    os.mkfifo(work / "pipe.json")
    before = snapshot(work)
    code, _, err = run(capsys, "fold", "model.pt2", "-o", "f.pt2", "--json", "pipe.json", "--force")
    assert_refused(code, err, "named pipe", "not a regular file")
    assert snapshot(work) == before


# ------------------------------------------------------------------ planned before loading


def test_paths_are_checked_before_the_model_is_loaded(work, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the paths were checked")

    monkeypatch.setattr("bnfold.pipeline.load_model", no_loading)
    before = snapshot(work)
    # the default model output (model.folded.pt2 / model.recalibrated.pt2) is a report too
    code, _, err = run(capsys, "fold", "model.pt2", "--json", "model.folded.pt2")
    assert_refused(code, err, "same file")
    code, _, err = run(
        capsys,
        "recalibrate",
        "model.pt2",
        "--data",
        "samples.pt",
        "--json",
        "model.recalibrated.pt2",
        "--force",
    )
    assert_refused(code, err, "same file")
    code, _, err = run(capsys, "fold", "model.pt2", "--onnx", "model.pt2", "--force")
    assert_refused(code, err, "same file", "MODEL")
    assert snapshot(work) == before


def test_a_default_name_known_only_after_loading_is_still_checked(work, capsys):
    torch.save(ready(ConvNet()), work / "net.pth")
    before = snapshot(work)
    code, _, err = run(
        capsys,
        "fold",
        "net.pth",
        "--trust-pickle",
        "--input-shape",
        "2x3x8x8",
        "--json",
        "net.folded.pth",
    )
    assert_refused(code, err, "same file")
    assert snapshot(work) == before


# ------------------------------------------------------------------ a file that appears meanwhile


def test_a_model_output_that_appears_during_the_run_is_kept(work, capsys, monkeypatch):
    real_save = torch.export.save

    def someone_else_writes_first(program, path, *args, **kwargs):
        real_save(program, path, *args, **kwargs)
        (work / "out.pt2").write_bytes(b"written by another run")

    monkeypatch.setattr(torch.export, "save", someone_else_writes_first)
    code, out, err = run(capsys, "fold", "model.pt2", "-o", "out.pt2")
    assert_refused(code, err, "appeared while bnfold ran", "nothing was replaced", "--force")
    assert "Wrote" not in out
    assert (work / "out.pt2").read_bytes() == b"written by another run"
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]
    code, out, err = run(capsys, "fold", "model.pt2", "-o", "out.pt2", "--force")
    assert code == 0 and "Wrote" in out, err
    torch.export.load(work / "out.pt2")


def test_two_writers_to_one_new_path_exactly_one_wins(tmp_path):
    target = tmp_path / "report.json"
    both_written = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def writer(name: str) -> None:
        def write(tmp: str) -> None:
            Path(tmp).write_text(f"from {name}")
            both_written.wait(timeout=30)  # both temp files are complete: publish together

        try:
            atomic_write(target, write)
            outcomes[name] = "wrote"
        except UsageError as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [name for name, outcome in outcomes.items() if outcome == "wrote"]
    losers = [outcome for outcome in outcomes.values() if outcome != "wrote"]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert "appeared while bnfold ran" in str(losers[0])
    assert target.read_text() == f"from {winners[0]}"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_without_hard_links_the_name_is_still_taken_exclusively(tmp_path, monkeypatch):
    def no_hard_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("first"))
    assert (tmp_path / "a.txt").read_text() == "first"

    def late(tmp: str) -> None:
        Path(tmp).write_text("second")
        (tmp_path / "a.txt").write_text("appeared")

    (tmp_path / "a.txt").unlink()
    with pytest.raises(UsageError, match="appeared while bnfold ran"):
        atomic_write(tmp_path / "a.txt", late)
    assert (tmp_path / "a.txt").read_text() == "appeared"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_an_onnx_file_that_appears_during_export_is_kept(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    real_prove = export_mod.prove_batch

    def appear(*args, **kwargs):
        target.write_bytes(b"another export")
        return real_prove(*args, **kwargs)

    monkeypatch.setattr(export_mod, "prove_batch", appear)
    model = ready(mlp_bn_first())
    inputs = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UsageError, match="appeared while bnfold ran"):
        bnfold.export_onnx(model, inputs, target, external_data_threshold=1)
    assert target.read_bytes() == b"another export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no data file, no temp


def test_library_writers_refuse_an_existing_file_unless_overwrite(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    model = ready(mlp_bn_first())
    with pytest.raises(UsageError, match="already exists"):
        bnfold.export_onnx(model, torch.randn(2, 12), target)
    with pytest.raises(UsageError, match="already exists"):
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"keep me"
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"), overwrite=True)
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# ------------------------------------------------------------------ archives carry the final name


def _top_folders(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        return {name.split("/")[0] for name in archive.namelist()}


def test_archives_carry_their_final_name(work, capsys):
    model = ready(ConvNet())
    save_model(model, work / "model.folded.pt2", example_inputs=image())
    assert _top_folders(work / "model.folded.pt2") == {"model.folded"}
    save_model(model, work / "net.pth", example_inputs=image(), format=ModelFormat.PICKLED_MODULE)
    assert _top_folders(work / "net.pth") == {"net"}
    torch.save(model.state_dict(), work / "weights.pt")
    code, _, err = run(
        capsys,
        "recalibrate",
        "weights.pt",
        "--arch",
        "onnx_models:ConvNet",
        "--data",
        "samples.pt",
        "-o",
        "recal.pt",
        "-q",
    )
    assert code == 0, err
    assert _top_folders(work / "recal.pt") == {"recal"}


@pytest.mark.parametrize("fmt", [ModelFormat.STATE_DICT, ModelFormat.SAFETENSORS])
def test_save_model_writes_a_state_dict_when_asked(tmp_path: Path, fmt: ModelFormat) -> None:
    from safetensors.torch import load_file

    model = ConvNet().eval()
    path = tmp_path / ("w.safetensors" if fmt is ModelFormat.SAFETENSORS else "w.pt")
    saved = save_model(model, path, example_inputs=image(), format=fmt)
    assert saved.format is fmt and saved.bytes == path.stat().st_size and saved.notes
    state = load_file(path) if fmt is ModelFormat.SAFETENSORS else torch.load(path)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    with pytest.raises(UsageError, match="already exists"):
        save_model(model, path, example_inputs=image(), format=fmt)
