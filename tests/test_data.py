"""load_data: every DATA form, seeded batching, sharding, and clear errors."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bnfold import recalibrate
from bnfold.calibrate.data import IMAGENET_MEAN, IMAGENET_STD, load_data
from bnfold.calibrate.sources import batch_items, map_tensors
from bnfold.errors import LoadError, UnsafeFileError, UsageError


def _samples(n: int = 10, features: int = 3) -> torch.Tensor:
    return torch.arange(n * features, dtype=torch.float32).view(n, features)


def _rows(batches: list) -> list[float]:
    return sorted(float(row[0]) for batch in batches for row in batch)


# ----------------------------------------------------------------------------------- tensors


def test_tensor_file_is_batched_with_a_seeded_shuffle(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(_samples(10), path)
    data = load_data(path, batch_size=4, seed=0)
    batches = list(data)
    assert [len(b) for b in batches] == [4, 4, 2] and len(data) == 3
    assert _rows(batches) == _rows([_samples(10)])  # every sample exactly once
    assert all(
        torch.equal(a, b) for a, b in zip(batches, load_data(path, batch_size=4), strict=True)
    )
    other = list(load_data(path, batch_size=4, seed=1))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other, strict=True))


def test_a_last_batch_of_one_joins_the_one_before(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(_samples(9), path)
    assert [len(b) for b in load_data(path, batch_size=4)] == [4, 5]


def test_tuple_and_dict_files(tmp_path: Path) -> None:
    a, b = _samples(6), -_samples(6)
    torch.save((a, b), tmp_path / "pair.pt")
    torch.save({"x": a, "mask": b}, tmp_path / "named.pt")
    first = load_data(tmp_path / "pair.pt", batch_size=4).first_batch()
    assert isinstance(first, tuple) and torch.equal(first[0], -first[1])
    named = load_data(tmp_path / "named.pt", batch_size=4).first_batch()
    assert set(named) == {"x", "mask"} and torch.equal(named["x"], -named["mask"])
    with pytest.raises(UsageError, match="not positional tensors"):
        load_data(tmp_path / "named.pt").example_inputs()


def test_list_file_is_ready_made_batches(tmp_path: Path) -> None:
    batches = [_samples(3), _samples(5)]
    torch.save(batches, tmp_path / "batches.pt")
    data = load_data(tmp_path / "batches.pt", batch_size=100)
    assert [len(b) for b in data] == [3, 5] and len(data) == 2


def test_mismatched_sample_counts(tmp_path: Path) -> None:
    torch.save((_samples(4), _samples(5)), tmp_path / "bad.pt")
    with pytest.raises(LoadError, match="different numbers of samples"):
        load_data(tmp_path / "bad.pt")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"x": _samples(2), "args": argparse.Namespace(a=1)}, tmp_path / "obj.pt")
    with pytest.raises(UnsafeFileError, match="weights_only=True"):
        load_data(tmp_path / "obj.pt")


def test_unsupported_contents(tmp_path: Path) -> None:
    torch.save(7, tmp_path / "seven.pt")
    with pytest.raises(LoadError, match="expected a tensor"):
        load_data(tmp_path / "seven.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(LoadError, match=r"junk\.pt"):
        load_data(tmp_path / "junk.pt")


def test_numpy_files_and_dtype_cast(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(6, 4)))
    data = load_data(tmp_path / "x.npy", batch_size=3, dtype=torch.float32)
    assert all(b.dtype == torch.float32 for b in data)
    np.savez(tmp_path / "pos.npz", np.ones((4, 2)), np.arange(4))
    np.savez(tmp_path / "named.npz", x=np.ones((4, 2)))
    first = load_data(tmp_path / "pos.npz", dtype=torch.float32).first_batch()
    assert isinstance(first, tuple) and first[0].dtype == torch.float32
    assert first[1].dtype == torch.int64  # integer inputs are never cast
    assert torch.equal(load_data(tmp_path / "named.npz").first_batch(), torch.ones(4, 2).double())
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeFileError, match="object arrays"):
        load_data(tmp_path / "obj.npy")


def _labelled_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An .npz as datasets are often saved: images and labels, by name."""
    images = np.random.default_rng(0).normal(size=(6, 3, 2, 2)).astype(np.float32)
    labels = np.arange(6)
    np.savez(path, images=images, labels=labels)
    return images, labels


def test_npz_name_picks_one_array(tmp_path: Path) -> None:
    images, labels = _labelled_npz(tmp_path / "set.npz")
    data = load_data(f"{tmp_path / 'set.npz'}:images", batch_size=6)
    assert torch.equal(_only(data), torch.from_numpy(images)[_order(6)])
    assert data.description.endswith("set.npz:images")
    picked = load_data(f"{tmp_path / 'set.npz'}:labels", batch_size=6)
    assert torch.equal(_only(picked), torch.from_numpy(labels)[_order(6)])


def test_npz_name_reads_only_that_array(tmp_path: Path) -> None:
    """Another member that numpy cannot load without pickle is never read."""
    np.savez(tmp_path / "mixed.npz", x=np.ones((4, 2)), meta=np.array([{"a": 1}], dtype=object))
    assert _only(load_data(f"{tmp_path / 'mixed.npz'}:x", batch_size=4)).shape == (4, 2)
    with pytest.raises(UnsafeFileError, match="object arrays"):
        load_data(f"{tmp_path / 'mixed.npz'}:meta")


def test_npz_of_several_named_arrays_says_how_to_pick_one(tmp_path: Path) -> None:
    _labelled_npz(tmp_path / "set.npz")
    with pytest.raises(UsageError) as caught:
        load_data(tmp_path / "set.npz")
    message = str(caught.value)
    assert "2 arrays (images, labels)" in message
    assert f"{tmp_path / 'set.npz'}:NAME" in message and "set.npz:images" in message


@pytest.mark.parametrize(
    ("suffix", "error", "message"),
    [
        ("set.npz:image", LoadError, "no array named 'image'; its arrays: images, labels"),
        ("set.npz:", LoadError, "no array named ''"),
        ("x.pt:images", LoadError, "not an .npz file"),
        ("missing.npz:images", LoadError, "no such file"),
    ],
    ids=["unknown-name", "empty-name", "not-npz", "missing-file"],
)
def test_npz_name_errors(tmp_path: Path, suffix: str, error: type, message: str) -> None:
    _labelled_npz(tmp_path / "set.npz")
    torch.save(_samples(4), tmp_path / "x.pt")
    with pytest.raises(error, match=re.escape(message)):
        load_data(f"{tmp_path}/{suffix}")


def _only(data: object) -> torch.Tensor:
    (batch,) = list(data)
    return batch


def _order(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ images


def _image(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder(tmp_path: Path) -> None:
    _image(tmp_path / "a" / "one.png", (40, 30), (255, 0, 128))
    _image(tmp_path / "b" / "two.jpg", (30, 50), (10, 20, 30))
    _image(tmp_path / "b" / "three.PNG", (64, 64), (255, 0, 128))
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_data(tmp_path, batch_size=2, image_size=16)
    batches = list(data)
    assert [tuple(b.shape) for b in batches] == [(3, 3, 16, 16)]  # 2 + a last 1 merged
    expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    pixels = batches[0][:, :, 8, 8]
    assert any(torch.allclose(row, expected, atol=1e-6) for row in pixels)
    assert "3 images" in data.description


def test_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no images"):
        load_data(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(LoadError, match=r"broken\.png"):
        list(load_data(tmp_path / "bad"))
    with pytest.raises(UsageError, match="1 or 3 values"):
        load_data(tmp_path / "bad", mean=(0.5, 0.5))
    with pytest.raises(UsageError, match="resize"):
        load_data(tmp_path / "bad", image_size=32, resize=16)


# --------------------------------------------------------------------------------- callables


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "userdata.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    return [torch.ones(2, 3), torch.zeros(4, 3)]\n"
        "def stream():\n"
        "    yield torch.ones(2, 3)\n"
        "    yield torch.zeros(3, 3)\n"
        "def number():\n"
        "    return 3\n"
    )
    monkeypatch.chdir(tmp_path)
    yield "userdata"
    sys.modules.pop("userdata", None)


def test_callable(user_module: str) -> None:
    data = load_data(f"{user_module}:batches")
    assert [len(b) for b in data] == [2, 4] and len(data) == 2


def test_generator_is_peeked_then_read_once(user_module: str) -> None:
    data = load_data(f"{user_module}:stream")
    assert tuple(data.example_inputs()[0].shape) == (2, 3)
    assert [len(b) for b in data] == [2, 3]
    with pytest.raises(LoadError, match="one-shot"):
        list(data)


def test_callable_errors(user_module: str) -> None:
    with pytest.raises(LoadError, match="iterable of batches"):
        load_data(f"{user_module}:number")
    with pytest.raises(LoadError, match="no attribute"):
        load_data(f"{user_module}:missing")
    with pytest.raises(LoadError, match="cannot import"):
        load_data("no_such_module_here:data")


# ---------------------------------------------------------------------------------- sharding


def test_shards_split_the_batches(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(_samples(20), path)
    whole = list(load_data(path, batch_size=3))
    shards = [list(load_data(path, batch_size=3, shard=(rank, 3))) for rank in range(3)]
    assert [len(s) for s in shards] == [
        len(load_data(path, batch_size=3, shard=(r, 3))) for r in range(3)
    ]
    assert _rows([b for s in shards for b in s]) == _rows(whole)
    assert torch.equal(shards[1][0], whole[1])


def test_file_split_by_batch_is_the_one_process_batches(tmp_path: Path) -> None:
    """Every batch exactly once, the same batches one process makes; uneven ranks, and a
    rank with none when there are fewer batches than ranks."""
    path = tmp_path / "x.pt"
    torch.save(_samples(11), path)
    whole = list(load_data(path, batch_size=3))  # 3, 3, 3, 2
    for world in (2, 3, 5):
        parts = [load_data(path, batch_size=3, shard=(rank, world)) for rank in range(world)]
        assert all(part.split == "by_batch" for part in parts)
        fed = [list(part) for part in parts]
        assert [len(batches) for batches in fed] == [len(whole[r::world]) for r in range(world)]
        for rank, batches in enumerate(fed):
            assert all(torch.equal(a, b) for a, b in zip(batches, whole[rank::world], strict=True))
        assert sum(part.num_samples() for part in parts) == 11
        assert {part.total_samples() for part in parts} == {11}
    assert list(load_data(path, batch_size=3, shard=(4, 5))) == []


def test_callable_is_this_ranks_part_never_split(user_module: str) -> None:
    """A callable that already shards by rank is fed whole: bnfold never takes every
    world-th of its batches."""
    data = load_data(f"{user_module}:batches", shard=(1, 2))
    assert data.split == "as_given" and data.notes == ()
    assert [len(b) for b in data] == [2, 4] and len(data) == 2 and data.total_samples() is None
    assert load_data(f"{user_module}:batches").split == "as_given"  # with or without shard


def _loader_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    (tmp_path / "loaders.py").write_text(
        "import torch\nfrom torch.utils.data import DataLoader, DistributedSampler, "
        f"TensorDataset\nDATA = TensorDataset(torch.arange(20.0).view(10, 2))\n{body}"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "loaders", raising=False)
    return "loaders"


@pytest.mark.parametrize(
    ("sampler", "note"),
    [
        ("DistributedSampler(DATA, num_replicas=3, rank=1)", "repeats 2 of the 10 samples"),
        (
            "DistributedSampler(DATA, num_replicas=3, rank=1, drop_last=True)",
            "leaves out 1 of the 10 samples",
        ),
        ("DistributedSampler(DATA, num_replicas=2, rank=1)", None),
        ("None", "without a DistributedSampler"),
    ],
    ids=["pads", "drops", "even", "no-sampler"],
)
def test_data_loader_sampler_notes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sampler: str, note: str | None
) -> None:
    world = 2 if "num_replicas=2" in sampler else 3
    module = _loader_module(
        tmp_path,
        monkeypatch,
        f"def loader():\n    return DataLoader(DATA, batch_size=3, sampler={sampler})\n",
    )
    data = load_data(f"{module}:loader", shard=(1, world))
    assert data.split == "as_given"
    fed = sum(len(batch[0]) for batch in data)  # all of this rank's loader, never a part
    assert fed == len(data.iterable.sampler)
    if note is None:
        assert data.notes == ()
    else:
        assert len(data.notes) == 1 and note in data.notes[0]
    monkeypatch.delitem(sys.modules, "loaders", raising=False)


def test_distributed_sampler_for_other_ranks_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _loader_module(
        tmp_path,
        monkeypatch,
        "def loader():\n    sampler = DistributedSampler(DATA, num_replicas=4, rank=0)\n"
        "    return DataLoader(DATA, batch_size=2, sampler=sampler)\n",
    )
    with pytest.raises(LoadError, match="rank 0 of 4, but this process is rank 1 of 2"):
        load_data(f"{module}:loader", shard=(1, 2))
    assert load_data(f"{module}:loader").split == "as_given"  # one process: nothing to check
    monkeypatch.delitem(sys.modules, "loaders", raising=False)


def test_usage_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(_samples(4), path)
    with pytest.raises(UsageError, match="batch_size"):
        load_data(path, batch_size=0)
    with pytest.raises(UsageError, match="shard"):
        load_data(path, shard=(2, 2))
    with pytest.raises(LoadError, match="no such file"):
        load_data(tmp_path / "missing.pt")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(LoadError, match="cannot tell"):
        load_data(tmp_path / "x.csv")


def test_recalibrate_consumes_a_data_source(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(torch.randn(50, 4, dtype=torch.float64) * 2 + 1, path)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4)).eval()
    report = recalibrate(model, load_data(path, batch_size=16, dtype=torch.float32))
    assert report.batches == 4 and report.samples == 50
    values = torch.load(path).float().double()
    assert torch.allclose(model[0].running_var.double(), values.var(dim=0), rtol=1e-6)


def test_num_samples(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(_samples(20), path)
    assert load_data(path, batch_size=6).num_samples() == 20  # batches of 6, 6, 6, 2
    assert load_data(path, batch_size=6).num_samples(2) == 12
    assert load_data(path, batch_size=6, shard=(1, 2)).num_samples() == 8
    torch.save([_samples(3), _samples(4)], tmp_path / "list.pt")
    assert load_data(tmp_path / "list.pt").num_samples() == 7


def test_a_symlink_loop_or_dangling_link_is_named_as_such(tmp_path: Path) -> None:
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    with pytest.raises(LoadError, match="symbolic link loop"):
        load_data(loop)
    dangling = tmp_path / "samples.pt"
    dangling.symlink_to(tmp_path / "moved-away.pt")
    with pytest.raises(LoadError, match=r"symbolic link to .*moved-away\.pt, which does not exist"):
        load_data(dangling)


@pytest.mark.parametrize(
    ("batch", "items"),
    [
        (torch.ones(5, 3), 5),
        (torch.tensor(2.0), 1),
        (("label", torch.ones(4, 2), torch.ones(7)), 4),
        ({"mask": torch.ones(6, 1), "x": torch.ones(9, 2)}, 6),
        ((), 0),
        (["no tensor"], 0),
    ],
    ids=["tensor", "0-d", "tuple", "dict", "empty", "no-tensor"],
)
def test_batch_walkers_see_every_kind_of_batch(batch: object, items: int) -> None:
    """A batch's items come from its first tensor; every tensor is mapped and every other value
    and container kept."""
    assert batch_items(batch) == items
    mapped = map_tensors(batch, lambda t: t * 2)
    leaves = [batch] if isinstance(batch, torch.Tensor) else torch.utils._pytree.tree_leaves(batch)
    new = [mapped] if isinstance(mapped, torch.Tensor) else torch.utils._pytree.tree_leaves(mapped)
    assert type(mapped) is type(batch) and len(new) == len(leaves)
    for old, value in zip(leaves, new, strict=True):
        if isinstance(old, torch.Tensor):
            assert torch.equal(value, old * 2)
        else:
            assert value is old
