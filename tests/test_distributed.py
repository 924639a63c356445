"""recalibrate under torch.distributed (gloo, 2 processes on CPU): every rank ends with the same
statistics, equal to one process fed every rank's batches; a failing rank fails them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from calibrate_models import mixed, uneven_batches

import bnfold
from bnfold import recalibrate

pytestmark = pytest.mark.distributed

WORLD = 2
SIZES = (3, 8, 5, 2, 11, 4, 7)

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from calibrate_models import all_state, assert_same, mixed, uneven_batches
    from bnfold import recalibrate

    rank, world, out, store = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sizes = tuple(int(n) for n in sys.argv[5].split(","))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)

    def feed(model, batch):
        return model(batch[0], extra=batch[1])

    def shard(dtype, everything_on_rank0=False):
        batches = [(x, i % 3 == 0) for i, x in enumerate(uneven_batches(sizes, dtype=dtype))]
        if everything_on_rank0:
            return batches if rank == 0 else []
        return batches[rank::world]

    results = {}
    for name, dtype, rank0_only in [
        ("fp32", torch.float32, False),
        ("fp64", torch.float64, False),
        ("empty-rank", torch.float64, True),
    ]:
        model = mixed(dtype=dtype)
        report = recalibrate(model, shard(dtype, rank0_only), forward=feed)
        results[name] = {
            "buffers": {k: v.clone() for k, v in model.named_buffers()},
            "report": report.to_dict(),
        }

    model = mixed()
    before = all_state(model)
    data = shard(torch.float32)
    if rank == 1:
        data[0][0][0, 0, 0, 0] = float("nan")
    try:
        recalibrate(model, data, forward=feed)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    try:
        assert_same(before, all_state(model))
        same = True
    except AssertionError:
        same = False
    results["failure"] = {"error": error, "unchanged": same}
    torch.save(results, out)
    dist.destroy_process_group()
    """
)


def _single_process(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    batches = [(x, i % 3 == 0) for i, x in enumerate(uneven_batches(SIZES, dtype=dtype))]
    model = mixed(dtype=dtype)
    report = recalibrate(model, batches, forward=lambda m, b: m(b[0], extra=b[1]))
    return dict(model.named_buffers()), report.to_dict()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    tests = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
    }
    sizes = ",".join(map(str, SIZES))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(r),
                str(WORLD),
                str(tmp / f"rank{r}.pt"),
                str(tmp / "store"),
                sizes,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("distributed workers did not finish in 120 s")
        assert proc.returncode == 0, output
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize(("scenario", "dtype", "tolerance"), [
    ("fp32", torch.float32, 1e-6),
    ("fp64", torch.float64, 1e-12),
    ("empty-rank", torch.float64, 1e-12),
])
def test_ranks_agree_with_one_process(
    ranks: list[dict], scenario: str, dtype: torch.dtype, tolerance: float
) -> None:
    expected, expected_report = _single_process(dtype)
    first = ranks[0][scenario]["buffers"]
    for other in ranks[1:]:
        for name, value in other[scenario]["buffers"].items():
            assert torch.equal(value, first[name]), name  # identical on every rank
    for name, value in first.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(value, expected[name]), name
        else:
            scale = expected[name].abs().max().clamp(min=1.0)
            assert float((value - expected[name]).abs().max() / scale) < tolerance, name
    report = ranks[0][scenario]["report"]
    assert report["world_size"] == WORLD
    assert report["batches"] == len(SIZES) and report["samples"] == sum(SIZES)
    statuses = [(layer["name"], layer["status"], layer["samples"]) for layer in report["layers"]]
    assert statuses == [
        (layer["name"], layer["status"], layer["samples"]) for layer in expected_report["layers"]
    ]


def test_a_failing_rank_fails_every_rank_and_restores(ranks: list[dict]) -> None:
    rank0, rank1 = ranks[0]["failure"], ranks[1]["failure"]
    assert rank1["error"].startswith("CalibrationError") and "NaN" in rank1["error"]
    assert rank0["error"].startswith("CalibrationError") and "other rank" in rank0["error"]
    assert rank0["unchanged"] and rank1["unchanged"]


def test_single_process_reference_sees_the_unused_branch() -> None:
    """The scenario above is not trivial: the conditional branch's BN gets data."""
    _, report = _single_process(torch.float64)
    unused = next(layer for layer in report["layers"] if layer["name"] == "unused")
    assert unused["status"] == "recalibrated" and unused["calls"] == 3
    model = mixed()
    assert recalibrate(model, uneven_batches((4,))).unseen


def test_torchrun_cli_rank0_writes_the_same_model(tmp_path: Path) -> None:
    """``torchrun --no-python bnfold recalibrate``: one output, one report, single-process
    statistics."""
    import shutil

    bnfold_exe = shutil.which("bnfold")
    if bnfold_exe is None:
        pytest.skip("the bnfold command is not on PATH")
    (tmp_path / "dist_user.py").write_text(
        "import torch\nfrom calibrate_models import mixed\n"
        "def build():\n    return mixed()\n"
    )
    data = torch.cat(uneven_batches((13, 11, 9, 17)))
    torch.save(data, tmp_path / "data.pt")
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(tests)])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(WORLD), "--no-python", bnfold_exe, "recalibrate", "dist_user:build",
        "--data", "data.pt", "--batch-size", "8", "-o", "out.pt2", "--json", "r.json",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("recalibrated 5 of 6 BatchNorms") == 1  # rank 0 alone prints
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".pt2", ".json")) == [
        "out.pt2",
        "r.json",
    ]
    report = json.loads((tmp_path / "r.json").read_text())["recalibration"]
    assert report["world_size"] == WORLD and report["samples"] == len(data)
    got = dict(bnfold.load_model(tmp_path / "out.pt2").model.named_buffers())
    model = mixed()
    recalibrate(model, bnfold.load_data(tmp_path / "data.pt", batch_size=8))
    expected = dict(model.named_buffers())
    assert got and set(got) <= set(expected)  # (the exported program drops the unused BN)
    for name, value in got.items():
        assert torch.allclose(value, expected[name], rtol=1e-6, atol=1e-6), name
