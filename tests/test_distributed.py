"""Recalibration under torch.distributed, launched with torchrun (gloo, CPU) at 2 and 3 ranks.

The sharding contract (README "Distributed"): ``bnfold.recalibrate`` feeds each rank's data as
given; ``bnfold recalibrate --data`` splits a file or folder by batch (rank r of W feeds batches
r, r+W, ... of the batches one process makes) and feeds a callable's iterable whole (the
callable reads the rank, or returns a DataLoader with a DistributedSampler). Every source kind
is run with uneven batch counts per rank (and a rank with none), and the statistics every rank
holds must equal the statistics one process computes over exactly the union of the samples the
ranks fed, in the same batches, to float64 rounding; the report's per-rank counts must add up.

One torchrun launch per world size runs every case (the CLI through its entry point, in each
rank's process, inside the process group torchrun set up); the README's own torchrun command is
launched as written (``--no-python bnfold recalibrate``), on its own.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from calibrate_models import mixed, two_inputs, uneven_batches

import bnfold
from bnfold import load_data, recalibrate
from bnfold.calibrate.distributed import fingerprint

pytestmark = pytest.mark.distributed

TESTS = Path(__file__).resolve().parent
README = TESTS.parent / "README.md"
WORLDS = (2, 3)
SIZES = (3, 8, 5, 2, 11, 4, 7)  # the API cases: ready-made batches of uneven sizes
SAMPLES = 26  # the CLI cases' files: batches of 4 -> 4 x 6 + 2, seven batches
CHUNKS = (3, 5, 4, 2, 6, 3, 3)  # the callable's batches (26 samples), dealt out by rank
BATCH = 4
IMAGES = 11
LIMIT_S = 120

#: Every source kind the CLI is run on in each rank: case -> (DATA, extra options).
FILE_CASES = {
    "pt-tensor": ("x.pt", ()),
    "pt-tuple": ("tuple.pt", ()),
    "pt-dict": ("dict.pt", ()),
    "pt-list": ("list.pt", ()),
    "npy": ("x.npy", ()),
    "npz": ("pair.npz", ()),
    "npz-name": ("named.npz:images", ()),
    "images": ("images", ("--image-size", "8", "--resize", "8")),
    "few-batches": ("x.pt", ("--batch-size", "13")),  # 2 batches: at 3 ranks, one has none
}
CALLABLE_CASES = {
    "callable-rank": "dist_user:shard",
    "sampler": "dist_user:sampled",
    "sampler-padded": "dist_user:padded",
    "subset-loader": "dist_user:subset",
}
REFUSED_CASES = {
    "same-everywhere": ("dist_user:everything", "identical first batches"),
    "wrong-sampler": ("dist_user:wrong", "splits the data for rank 0 of"),
}

DIST_USER = '''
"""Model and data callables for the distributed tests (this workspace's files)."""

from pathlib import Path

import torch
import torch.distributed as dist
from calibrate_models import two_inputs
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

HERE = Path(__file__).resolve().parent
X = torch.load(HERE / "x.pt", weights_only=True)
CHUNKS = @CHUNKS@


def build():
    return two_inputs()


def _rank():
    return dist.get_rank(), dist.get_world_size()


def part(rank, world):
    """Rank's batches: uneven chunks of X, dealt out by rank (every sample on one rank)."""
    return list(X.split(CHUNKS))[rank::world]


def shard():
    return part(*_rank())


def sampled_loader(size, shuffle, **where):
    """A DataLoader over X[:size] with a DistributedSampler (of the process group, or of
    ``num_replicas`` and ``rank`` when given)."""
    data = TensorDataset(X[:size])
    sampler = DistributedSampler(data, shuffle=shuffle, seed=3, **where)
    return DataLoader(data, batch_size=5, sampler=sampler)


def sampled():
    return sampled_loader(24, True)


def padded():
    return sampled_loader(25, False)


def subset_loader(rank, world):
    return DataLoader(Subset(TensorDataset(X), range(rank, len(X), world)), batch_size=5)


def subset():
    return subset_loader(*_rank())


def everything():
    return list(X.split(4))


def fails_on_rank1():
    if _rank()[0] == 1:
        raise RuntimeError("no data for rank 1")
    return everything()


def wrong():
    rank, world = _rank()
    data = TensorDataset(X)
    return DataLoader(data, sampler=DistributedSampler(data, num_replicas=world + 1, rank=0))
'''.replace("@CHUNKS@", repr(CHUNKS))

WORKER = textwrap.dedent(
    """
    import ast
    import contextlib
    import io
    import sys

    import torch
    import torch.distributed as dist
    from bnfold_cli.main import main
    from calibrate_models import all_state, assert_same, mixed, uneven_batches

    from bnfold import load_data, recalibrate

    out = sys.argv[1]
    cases = ast.literal_eval(sys.argv[2])  # {case: [DATA, options...]}
    sizes = ast.literal_eval(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}

    for case, (spec, *options) in cases.items():
        err = io.StringIO()
        argv = ["recalibrate", "dist_user:build", "--data", spec, "--batch-size", "4", "-q",
                "-o", f"{out}/{case}.safetensors", "--json", f"{out}/{case}.json", *options]
        with contextlib.redirect_stderr(err):
            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code
        results[case] = {"code": code, "stderr": err.getvalue()}

    def feed(model, batch):
        return model(batch[0], extra=batch[1])

    def api(case, dtype, data, **kwargs):
        model = mixed(dtype=dtype)
        before = all_state(model)
        try:
            report = recalibrate(model, data, **kwargs)
        except Exception as exc:
            try:
                assert_same(before, all_state(model))
                unchanged = True
            except AssertionError:
                unchanged = False
            results[case] = {"error": f"{type(exc).__name__}: {exc}", "unchanged": unchanged}
            return
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        results[case] = {"error": None, "buffers": buffers, "report": report.to_dict()}

    def uneven_part(dtype):
        # every rank but the last deals out the batches; the last rank gets none
        batches = [(x, i % 3 == 0) for i, x in enumerate(uneven_batches(sizes, dtype=dtype))]
        return [] if rank == world - 1 else batches[rank :: world - 1]

    api("api-fp64", torch.float64, uneven_part(torch.float64), forward=feed)
    api("api-fp32", torch.float32, uneven_part(torch.float32), forward=feed)
    nan = [(x, False) for x in uneven_batches(sizes)][rank::world]
    if rank == 1:
        nan[0][0][0, 0, 0, 0] = float("nan")
    api("api-failure", torch.float32, nan, forward=feed)
    same = [(x, False) for x in uneven_batches(sizes[:3])]
    api("api-same-everywhere", torch.float32, same, forward=feed)
    api("api-unsplit", torch.float32, load_data("mixed.pt", batch_size=4))
    api("api-other-world", torch.float32,
        load_data("mixed.pt", batch_size=4, shard=(rank, world + 1)))
    api("api-load-data-shard", torch.float64,
        load_data("mixed.pt", batch_size=4, shard=(rank, world), dtype=torch.float64))
    api("api-callable-source", torch.float64, load_data("dist_user:shard"))
    api("api-constant-split", torch.float32,
        load_data("constant.pt", batch_size=4, shard=(rank, world)))
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    """
)


# ------------------------------------------------------------------------------- launching


def _launcher() -> list[str]:
    """``torchrun``, as this Python runs it; skips when gloo or torchrun is missing."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed with the gloo backend")
    try:
        import torch.distributed.run  # noqa: F401  (what the torchrun command runs)
    except ImportError as exc:
        pytest.skip(f"torchrun (torch.distributed.run) is not available: {exc}")
    return [sys.executable, "-m", "torch.distributed.run"]


def _environment(*paths: Path) -> dict[str, str]:
    """This Python's scripts first on PATH (the ``bnfold`` torchrun starts), ``paths`` on
    PYTHONPATH."""
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")]),
    }


def _launch(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run torchrun in its own process group; on a hang, end that group (torchrun and the
    ranks it started) and fail."""
    if shutil.which("bnfold", path=env["PATH"]) is None:
        pytest.skip("the bnfold command is not on PATH")
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {LIMIT_S} s (a hang?)\n{out}\n{err}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


# ------------------------------------------------------------------------------- workspace


def _x() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(SAMPLES, 3, 6, 6, generator=gen, dtype=torch.float64) * 3 + 4


def _prepare(base: Path) -> None:
    """Every file source (each holding 26 samples), the image folder and ``dist_user``."""
    from PIL import Image

    x = _x()
    y = torch.randn(SAMPLES, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    torch.save(x, base / "x.pt")
    torch.save((x, y), base / "tuple.pt")
    torch.save({"x": x, "y": y}, base / "dict.pt")
    torch.save(list(x.split(CHUNKS)), base / "list.pt")
    np.save(base / "x.npy", x.numpy())
    np.savez(base / "pair.npz", x.numpy(), y.numpy())
    np.savez(base / "named.npz", images=x.numpy(), labels=np.arange(SAMPLES))
    torch.save(torch.cat(uneven_batches(SIZES)), base / "mixed.pt")
    torch.save(torch.full((12, 3, 8, 8), 2.0), base / "constant.pt")  # identical batches
    (base / "images").mkdir()
    rng = np.random.default_rng(0)
    for index in range(IMAGES):
        pixels = rng.integers(0, 256, (10 + index % 3, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(base / "images" / f"img{index:02d}.png")
    (base / "dist_user.py").write_text(DIST_USER)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("dist-data")
    _prepare(base)
    return base


@pytest.fixture(scope="module")
def dist_user(workspace: Path) -> Any:
    """The workspace's ``dist_user`` module, imported here for the references."""
    sys.path.insert(0, str(workspace))
    try:
        import dist_user

        yield dist_user
    finally:
        sys.path.remove(str(workspace))
        sys.modules.pop("dist_user", None)


@pytest.fixture(scope="module", params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def run(request: pytest.FixtureRequest, workspace: Path, tmp_path_factory: Any) -> dict:
    """One torchrun launch of ``WORLD`` ranks running every case; what each rank recorded."""
    world = request.param
    launcher = _launcher()
    out = tmp_path_factory.mktemp(f"dist-out{world}")
    (out / "worker.py").write_text(WORKER)
    cases = {case: [spec, *options] for case, (spec, options) in FILE_CASES.items()}
    cases |= {case: [spec] for case, spec in CALLABLE_CASES.items()}
    cases |= {case: [spec] for case, (spec, _) in REFUSED_CASES.items()}
    command = [*launcher, "--standalone", "--nproc-per-node", str(world), str(out / "worker.py"),
               str(out), repr(cases), repr(SIZES)]  # fmt: skip
    result = _launch(command, workspace, _environment(TESTS, workspace))
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
    return {"world": world, "out": out, "ranks": ranks}


# ------------------------------------------------------------------------------- references


def _one_process(batches: list, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The statistics one process computes on exactly these batches, in float64."""
    model = two_inputs() if model is None else model
    recalibrate(model, batches)
    return {k: v for k, v in model.named_buffers()}


def _file_batches(spec: str, workspace: Path, options: tuple[str, ...]) -> list:
    """The batches one process makes from a file (what the ranks split by batch)."""
    kwargs: dict[str, Any] = {"batch_size": BATCH, "dtype": torch.float64}
    if "--batch-size" in options:
        kwargs["batch_size"] = int(options[options.index("--batch-size") + 1])
    if "--image-size" in options:
        kwargs |= {"image_size": 8, "resize": 8}
    return list(load_data(str(workspace / spec), **kwargs))


def _callable_batches(case: str, world: int, user: Any) -> list[list]:
    """Each rank's batches from a callable, rebuilt here for (rank, world)."""
    if case == "callable-rank":
        return [user.part(rank, world) for rank in range(world)]
    if case == "subset-loader":
        return [list(user.subset_loader(rank, world)) for rank in range(world)]
    size, shuffle = (24, True) if case == "sampler" else (25, False)
    return [
        list(user.sampled_loader(size, shuffle, num_replicas=world, rank=rank))
        for rank in range(world)
    ]


def _assert_statistics(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal to float64 rounding: relative error below 1e-12 for every buffer."""
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(got[name], value), name
            continue
        assert got[name].dtype == torch.float64, name
        error = float((got[name] - value).abs().max() / value.abs().max())
        assert error < 1e-12, f"{name}: relative error {error:.2e}"


def _saved(run: dict, case: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The statistics rank 0 wrote for ``case``, and its JSON report."""
    from safetensors.torch import load_file

    state = load_file(run["out"] / f"{case}.safetensors")
    stats = {k: v for k, v in state.items() if "running" in k or "num_batches" in k}
    return stats, json.loads((run["out"] / f"{case}.json").read_text())


def _assert_per_rank(report: dict, world: int, batches: list[int], samples: list[int]) -> None:
    assert report["world_size"] == world
    assert report["per_rank"] == [
        {"rank": r, "batches": b, "samples": s}
        for r, (b, s) in enumerate(zip(batches, samples, strict=True))
    ]
    assert report["batches"] == sum(batches) and report["samples"] == sum(samples)


def _items(batch: Any) -> int:
    return len(batch[0]) if isinstance(batch, (tuple, list, dict)) else len(batch)


def _sizes(batches: list) -> list[int]:
    return [len(next(iter(b.values()))) if isinstance(b, dict) else _items(b) for b in batches]


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_file_source_split_by_batch_equals_one_process(
    run: dict, workspace: Path, case: str
) -> None:
    """A file or folder: rank r feeds batches r, r+W, ...; the statistics are those of one
    process on the same file (the same batches), every sample fed exactly once."""
    world = run["world"]
    assert all(rank[case]["code"] == 0 for rank in run["ranks"]), run["ranks"][0][case]
    spec, options = FILE_CASES[case]
    whole = _file_batches(spec, workspace, options)
    got, document = _saved(run, case)
    _assert_statistics(got, _one_process(whole))
    sizes = _sizes(whole)
    _assert_per_rank(
        document["recalibration"],
        world,
        [len(sizes[r::world]) for r in range(world)],
        [sum(sizes[r::world]) for r in range(world)],
    )
    total = IMAGES if case == "images" else SAMPLES
    assert document["data"]["split"] == "by_batch" and document["data"]["samples"] == total
    assert document["recalibration"]["samples"] == total  # the union is the whole file


@pytest.mark.parametrize("case", list(CALLABLE_CASES))
def test_callable_is_each_ranks_part_and_equals_one_process(
    run: dict, dist_user: Any, case: str
) -> None:
    """A callable that reads the rank (or returns a DataLoader sharded by rank) is fed whole
    on each rank: the statistics are those of one process on the union of the ranks' batches.
    (Before the contract, bnfold took every world-th of these batches again.)"""
    world = run["world"]
    assert all(rank[case]["code"] == 0 for rank in run["ranks"]), run["ranks"][0][case]
    parts = _callable_batches(case, world, dist_user)
    got, document = _saved(run, case)
    _assert_statistics(got, _one_process([batch for part in parts for batch in part]))
    report = document["recalibration"]
    _assert_per_rank(report, world, [len(p) for p in parts], [sum(_sizes(p)) for p in parts])
    assert document["data"]["split"] == "as_given" and document["data"]["samples"] is None
    if case == "sampler-padded":
        repeated = -25 % world  # DistributedSampler pads 25 samples to a multiple of W
        assert report["samples"] == 25 + repeated
        assert any(f"repeats {repeated} of the 25 samples" in note for note in report["notes"])
    elif case == "subset-loader":
        assert any("without a DistributedSampler" in note for note in report["notes"])
    else:
        assert report["samples"] == (24 if case == "sampler" else SAMPLES)
        assert not report["notes"]


@pytest.mark.parametrize("case", list(REFUSED_CASES))
def test_data_not_split_by_rank_is_refused_on_every_rank(run: dict, case: str) -> None:
    """The same data on every rank (a callable that ignores the rank), or a DistributedSampler
    built for another world size: every rank exits 3 with the reason; nothing is written."""
    message = REFUSED_CASES[case][1]
    for rank in run["ranks"]:
        assert rank[case]["code"] == 3, rank[case]
        assert message in rank[case]["stderr"], rank[case]["stderr"]
        assert rank[case]["stderr"].startswith("error: ")
    assert not (run["out"] / f"{case}.safetensors").exists()


@pytest.mark.parametrize(
    ("case", "dtype", "tolerance"),
    [("api-fp64", torch.float64, 1e-12), ("api-fp32", torch.float32, 1e-6)],
)
def test_api_per_rank_iterables_equal_one_process(
    run: dict, case: str, dtype: torch.dtype, tolerance: float
) -> None:
    """``bnfold.recalibrate`` with each rank's own uneven batches (the last rank has none):
    identical statistics on every rank, those of one process fed every rank's batches."""
    world = run["world"]
    batches = [(x, i % 3 == 0) for i, x in enumerate(uneven_batches(SIZES, dtype=dtype))]
    parts = [batches[r :: world - 1] for r in range(world - 1)] + [[]]
    model = mixed(dtype=dtype)
    recalibrate(
        model, [b for part in parts for b in part], forward=lambda m, b: m(b[0], extra=b[1])
    )
    expected = dict(model.named_buffers())
    first = run["ranks"][0][case]["buffers"]
    for other in run["ranks"][1:]:
        for name, value in other[case]["buffers"].items():
            assert torch.equal(value, first[name]), name  # identical on every rank
    for name, value in first.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(value, expected[name]), name
        else:
            scale = expected[name].abs().max()
            assert float((value - expected[name]).abs().max() / scale) < tolerance, name
    _assert_per_rank(
        run["ranks"][0][case]["report"],
        world,
        [len(p) for p in parts],
        [sum(len(b[0]) for b in p) for p in parts],
    )


def test_api_load_data_shard_equals_one_process(run: dict, workspace: Path) -> None:
    expected = mixed(dtype=torch.float64)
    recalibrate(expected, load_data(workspace / "mixed.pt", batch_size=4, dtype=torch.float64))
    for rank in run["ranks"]:
        got = rank["api-load-data-shard"]
        assert got["error"] is None, got["error"]
        _assert_statistics(got["buffers"], dict(expected.named_buffers()))


def test_api_callable_data_source_is_each_ranks_part(run: dict, dist_user: Any) -> None:
    """``load_data("pkg.module:callable")`` needs no ``shard=``: its iterable is this rank's
    part, fed whole."""
    world = run["world"]
    expected = mixed(dtype=torch.float64)
    recalibrate(expected, [batch for r in range(world) for batch in dist_user.part(r, world)])
    for rank in run["ranks"]:
        got = rank["api-callable-source"]
        assert got["error"] is None, got["error"]
        _assert_statistics(got["buffers"], dict(expected.named_buffers()))


def test_identical_batches_of_a_file_bnfold_split_are_not_refused(run: dict) -> None:
    """The identical-first-batch check is for data bnfold did not split: a file of constant
    samples split by batch gives every rank the same bytes, and that is not a mistake."""
    for rank in run["ranks"]:
        assert rank["api-constant-split"]["error"] is None, rank["api-constant-split"]["error"]
        report = rank["api-constant-split"]["report"]
        assert [share["batches"] for share in report["per_rank"]] == [
            len(range(r, 3, run["world"])) for r in range(run["world"])
        ]


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("api-failure", "CalibrationError"),
        ("api-same-everywhere", "CalibrationError: ranks 0 and 1 fed identical first batches"),
        ("api-unsplit", "UsageError"),
        ("api-other-world", "UsageError"),
    ],
)
def test_api_refusals_fail_every_rank_and_restore(run: dict, case: str, error: str) -> None:
    """A rank that fails (NaN), the same data on every rank, a DataSource not split for this
    process group: every rank raises (none waits forever), every model is left as it was."""
    world = run["world"]
    for rank, result in enumerate(run["ranks"]):
        assert result[case]["error"] is not None and result[case]["unchanged"], result[case]
        if case == "api-failure":
            own = "NaN" if rank == 1 else "1 other rank(s) failed"
            assert own in result[case]["error"], result[case]["error"]
        elif case == "api-unsplit":
            assert f"not split, but this process is rank {rank} of {world}" in result[case]["error"]
        elif case == "api-other-world":
            split = f"split for rank {rank} of {world + 1}"
            assert split in result[case]["error"], result[case]["error"]
        assert result[case]["error"].startswith(error)


def test_single_process_reference_sees_the_unused_branch() -> None:
    """The API scenario is not trivial: the conditional branch's BN gets data."""
    batches = [(x, i % 3 == 0) for i, x in enumerate(uneven_batches(SIZES, dtype=torch.float64))]
    model = mixed(dtype=torch.float64)
    report = recalibrate(model, batches, forward=lambda m, b: m(b[0], extra=b[1]))
    unused = next(layer for layer in report.layers if layer.name == "unused")
    assert unused.status.value == "recalibrated" and unused.calls == 3


def test_a_rank_failing_before_recalibration_stops_every_rank(workspace: Path) -> None:
    """A rank whose data cannot be opened exits 3 with its error while the other waits in the
    first collective: torchrun stops the other rank, nothing is written, nothing hangs."""
    command = [*_launcher(), "--standalone", "--nproc-per-node", "2", "--no-python", "bnfold",
               "recalibrate", "dist_user:build", "--data", "dist_user:fails_on_rank1", "-q",
               "-o", "failed.safetensors"]  # fmt: skip
    result = _launch(command, workspace, _environment(TESTS, workspace))
    assert result.returncode != 0
    assert "error: calling dist_user:fails_on_rank1() raised RuntimeError: no data for rank 1" in (
        result.stderr
    )
    assert re.search(r"exitcode\s*:\s*3\b", result.stderr)  # bnfold's exit code, per torchrun
    assert not (workspace / "failed.safetensors").exists()


# ------------------------------------------------------------------------- the README example


def _readme_example() -> tuple[list[str], str]:
    """The README's torchrun command and its ``mypkg/data.py`` block."""
    text = README.read_text(encoding="utf-8")
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("torchrun ")]
    assert len(commands) == 1, commands
    block = re.search(r"```python\n(# mypkg/data\.py.*?)```", text, re.DOTALL)
    assert block is not None, "README shows no mypkg/data.py block"
    return shlex.split(commands[0]), block.group(1)


def test_readme_torchrun_example(tmp_path: Path) -> None:
    """The README's own command, as written: ``mypkg.data:shard`` reads the rank, so every
    rank feeds its batches whole and the statistics are one process's on all of them. (Before
    the contract, each rank used a quarter of its batches and the run exited 0.)"""
    launcher = _launcher()
    argv, source = _readme_example()
    assert argv[0] == "torchrun" and "--no-python" in argv
    world = int(argv[argv.index("--nproc-per-node") + 1])
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "data.py").write_text(source)
    model = two_inputs()
    x = _x()[:2]
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, tmp_path / "model.pt2")
    samples = torch.cat([_x(), _x()[:18] - 1])  # 44 samples: batches of 8 -> 8 x 5 + 4
    torch.save(samples, tmp_path / "samples.pt")
    result = _launch([*launcher, *argv[1:]], tmp_path, _environment())
    assert result.returncode == 0, result.stdout + result.stderr
    chunks = list(samples.split(8))
    parts = [chunks[r::world] for r in range(world)]
    output = argv[argv.index("-o") + 1]
    got = dict(bnfold.load_model(tmp_path / output).model.named_buffers())
    reference = bnfold.load_model(tmp_path / "model.pt2").model
    _assert_statistics(got, _one_process([c for part in parts for c in part], reference))
    assert result.stdout.count("BatchNorms from 6 batches (44 samples") == 1  # rank 0 prints
    per_rank = ", ".join(str(sum(len(c) for c in part)) for part in parts)
    assert f"per rank (rank 0 first): samples {per_rank};" in result.stdout


def test_a_fingerprint_reads_every_byte_and_skips_empty_batches() -> None:
    """Two first batches that share their first 64 KiB (letterboxed, zero-padded data) differ;
    an empty batch is no evidence of anything."""
    padded = torch.zeros(4, 3, 64, 64)
    other = padded.clone()
    other[-1, -1, -1, -1] = 1.0
    assert fingerprint(padded) != fingerprint(other)
    assert fingerprint(torch.zeros(0, 3, 8, 8)) == 0
    assert fingerprint((torch.zeros(0, 3), torch.zeros(0))) == 0
