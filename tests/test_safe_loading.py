"""No code from a model or data file ever runs, archives are read with bounded memory, and every
damaged or hostile file is one ``error:`` line with exit 3.

Every hostile file is built here from a real ``.pt2`` (``hostile_files``): each pickled member in
each pickle protocol 0-5 and container (bare pickle, ``torch.save`` archive, legacy
``torch.save``), payloads flagged ``use_pickle``, custom and opaque objects, unknown and legacy
members, duplicate names, overlapping members, headers that lie about sizes, zip bombs kept small
on disk, broken JSON, absurd tensor metadata. A payload creates a marker file when it runs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from hostile_files import (
    CONTAINERS,
    HOSTILE_PT2,
    PROTOCOLS,
    Entry,
    InputsThatRunCode,
    bomb_state_dict,
    edit,
    legacy_state,
    pickles,
    read_members,
    root,
    write,
    zip_bytes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_files import MarkerOnLoad
from torch import nn

from bnfold.calibrate.data import load_data
from bnfold.errors import LoadError, UnsafeFileError
from bnfold.io.models import load_model

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Tiny(nn.Module):
    """conv -> bn -> relu, times a tensor constant (so the archive holds weights and constants)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.scale = torch.linspace(0.5, 1.5, 4).view(1, 4, 1, 1)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) * self.scale


def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "clean.pt2"
    dims = ({0: torch.export.Dim.AUTO},)
    torch.export.save(torch.export.export(tiny(), (X,), dynamic_shapes=dims), path)
    return path


@pytest.fixture
def no_unsafe_loaders(monkeypatch):
    """Record (without changing what they do) the calls of every torch or pickle loader that
    can run code from bytes; ``deserialize_torch_artifact`` counts only when given bytes."""
    import torch._export.serde.serialize as serde  # noqa: PLC2701 (torch has no public name for it)
    import torch.export.pt2_archive._package as package  # noqa: PLC2701 (torch has no public name for it)

    calls: list[str] = []

    def spy(name, real):
        def wrapper(*args, **kwargs):
            if name != "deserialize_torch_artifact" or isinstance(args[0], (bytes, bytearray)):
                calls.append(name)
            return real(*args, **kwargs)

        return wrapper

    class SpyUnpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            calls.append("pickle.Unpickler")
            super().__init__(*args, **kwargs)

    for owner, name in [
        (torch, "load"),
        (torch.export, "load"),
        (package, "load_pt2"),
        (serde, "deserialize_torch_artifact"),
        (pickle, "loads"),
        (pickle, "load"),
    ]:
        monkeypatch.setattr(owner, name, spy(name, getattr(owner, name)))
    monkeypatch.setattr(pickle, "Unpickler", SpyUnpickler)
    return calls


def build(clean: Path, directory: Path, attack: str) -> tuple[Path, Path]:
    marker = directory / "MARKER"
    result = HOSTILE_PT2[attack](read_members(clean), marker)
    path = directory / "evil.pt2"
    if isinstance(result, bytes):
        path.write_bytes(result)
    else:
        write(path, result)
    return path, marker


def outputs_match(loaded_model: nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(loaded_model(X), tiny()(X))


# ------------------------------------------------------------------ the table, in-process


@pytest.mark.parametrize("attack", list(HOSTILE_PT2))
def test_hostile_pt2_is_refused_and_runs_nothing(clean, tmp_path, attack, no_unsafe_loaders):
    path, marker = build(clean, tmp_path, attack)
    with pytest.raises(LoadError) as caught:
        load_model(path)
    message = str(caught.value)
    assert not marker.exists(), "code from the file ran"
    assert not no_unsafe_loaders, f"called {no_unsafe_loaders} on the file's bytes"
    assert str(path) in message and "\n" not in message


def test_pickle_payloads_are_refused_as_unsafe_naming_what_they_call(clean, tmp_path):
    """Every pickled member torch would read, in every container and protocol: UnsafeFileError
    naming io.open (unknown members are refused unread, by name)."""
    pickled = [a for a in HOSTILE_PT2 if re.search(r" p[0-5]$", a)]
    for attack in [a for a in pickled if not a.startswith(("unknown", "custom", "opaque"))]:
        path, marker = build(clean, tmp_path, attack)
        with pytest.raises(UnsafeFileError) as caught:
            load_model(path)
        assert "io.open" in str(caught.value) or "use_pickle" in attack, attack
        assert not marker.exists(), attack


def test_a_clean_pt2_still_loads_and_computes_the_same(clean, no_unsafe_loaders):
    loaded = load_model(clean)
    assert outputs_match(loaded.model)
    assert torch.equal(loaded.example_inputs[0], X)
    assert loaded.dynamic_dims == ((0,),)
    assert isinstance(loaded.model.conv, nn.Conv2d) and isinstance(loaded.model.bn, nn.BatchNorm2d)
    assert not no_unsafe_loaders


class _TokensLinearBN(nn.Module):
    """LeViT's Linear -> flatten(0, 1) -> BatchNorm1d: a dynamic batch B gives sizes B*N."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 12, bias=False)
        self.bn = nn.BatchNorm1d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class _StridedConvBN(nn.Module):
    """A stride-2 conv: dynamic H and W give sizes and strides that are expressions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


DERIVED_SIZES = {
    "tokens": (_TokensLinearBN, (2, 7, 6), (0,)),
    "strided": (_StridedConvBN, (2, 3, 9, 9), (0, 2, 3)),
}


@pytest.mark.parametrize("name", DERIVED_SIZES)
def test_a_pt2_whose_dynamic_sizes_are_expressions_loads(tmp_path, name, no_unsafe_loaders):
    """Sizes derived from dynamic dims are stored as sympy arithmetic (``Mul(Integer(7),
    Symbol('s77', ...))``): plain expressions, not code."""
    build, shape, dims = DERIVED_SIZES[name]
    x = torch.randn(*shape)
    dynamic = ({d: torch.export.Dim.AUTO for d in dims},)
    program = torch.export.export(build().eval(), (x,), dynamic_shapes=dynamic)
    path = tmp_path / f"{name}.pt2"
    torch.export.save(program, path)
    loaded = load_model(path)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), program.module()(x))
    assert not no_unsafe_loaders


def test_members_torch_never_reads_are_ignored_not_unpickled(clean, tmp_path):
    marker = tmp_path / "MARKER"
    entries = read_members(clean)
    extras = [
        Entry(f"{root(entries)}extra/evil_{c}_{p}.pkl", pickles(marker, c, p))
        for c in CONTAINERS
        for p in PROTOCOLS
    ]
    loaded = load_model(write(tmp_path / "extras.pt2", [*entries, *extras]))
    assert outputs_match(loaded.model)
    assert not marker.exists()


# ------------------------------------------------------------------ formats that must keep loading


def test_legacy_weights_and_deflated_members_load_exactly(clean, tmp_path):
    """Archives torch also reads: a legacy data/weights/model.pt state dict, and every member
    re-compressed with deflate (a .pt2 zipped again by a user's tool)."""
    entries = read_members(clean)
    program = torch.export.load(clean)
    buffer = io.BytesIO()
    torch.save(dict(program.state_dict), buffer)
    legacy = write(tmp_path / "legacy.pt2", legacy_state(entries, "weights", buffer.getvalue()))
    deflated = write(tmp_path / "deflated.pt2", [Entry(e.name, e.raw, method=8) for e in entries])
    for path in (legacy, deflated):
        loaded = load_model(path)
        assert outputs_match(loaded.model), path.name
        assert torch.equal(loaded.example_inputs[0], X)


class _Tied(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, dtype=dtype)
        self.b = nn.Linear(4, 4, dtype=dtype)
        self.b.weight = self.a.weight  # one storage, two names
        self.bn = nn.BatchNorm1d(4, dtype=dtype)

    def forward(self, x):
        return self.bn(self.b(self.a(x)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_pt2_weights_keep_dtype_values_and_sharing(tmp_path, dtype):
    """bnfold's reader builds the same state dict as torch.export.load (on a trusted file):
    names, dtypes, values, parameters, and tied weights still sharing one storage."""
    from bnfold.io.pt2 import read_program

    torch.manual_seed(0)
    model = _Tied(dtype).eval()
    x = torch.randn(3, 4, dtype=dtype)
    path = tmp_path / "tied.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    ours, torchs = read_program(path).state_dict, torch.export.load(path).state_dict
    assert list(ours) == list(torchs)
    for name, value in torchs.items():
        assert type(ours[name]) is type(value) and ours[name].dtype == value.dtype, name
        assert torch.equal(ours[name], value), name
    assert ours["a.weight"].data_ptr() == ours["b.weight"].data_ptr()
    with torch.no_grad():
        assert torch.equal(load_model(path).model(x), model(x))


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("legacy", [False, True])
def test_state_dicts_of_every_protocol_and_format_load_exactly(tmp_path, protocol, legacy):
    model = tiny()
    path = tmp_path / "w.pt"
    torch.save(
        model.state_dict(),
        path,
        pickle_protocol=protocol,
        _use_new_zipfile_serialization=not legacy,
    )
    loaded = load_model(path, arch="test_safe_loading:tiny")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name


# ------------------------------------------------------------------ state dicts and data files


@pytest.mark.parametrize("container", ["torch.save", "legacy", "raw"])
@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_hostile_state_dict_and_data_files_are_refused(tmp_path, container, protocol):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickles(marker, container, protocol, {"w": MarkerOnLoad(marker)}))
    if path.read_bytes()[:1] in (b"\x80", b"P"):  # what bnfold takes for a torch file
        with pytest.raises(UnsafeFileError, match=r"io\.open"):
            load_model(path, arch="torch.nn:Identity")
    else:
        with pytest.raises(LoadError):
            load_model(path, arch="torch.nn:Identity")
    with pytest.raises(UnsafeFileError, match=r"io\.open"):
        load_data(path)
    assert not marker.exists()


def _torch_save_bytes(value: object, edit_pickle=None, edit_storage=None) -> bytes:
    """``torch.save(value)``, with its data.pkl or storage 0 edited."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    entries = [Entry(e.name, e.raw) for e in read_members_bytes(buffer.getvalue())]
    out = []
    for e in entries:
        if edit_pickle and e.name.endswith("data.pkl"):
            e = Entry(e.name, edit_pickle(e.raw))
        if edit_storage and e.name.endswith("/data/0"):
            e = Entry(e.name, edit_storage(e.raw))
        out.append(e)
    return zip_bytes(out)


def read_members_bytes(data: bytes) -> list[Entry]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [Entry(i.filename, archive.read(i)) for i in archive.infolist()]


def _nested_lists(depth: int) -> bytes:
    """Each list holds the previous one twice: tiny, but 2**depth values when walked."""
    out = b"\x80\x02]q\x00."[:-1]
    for level in range(1, depth + 1):
        out += b"h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"\x86q" + bytes([level])
    return out + b"."


_REFUSED_PICKLES = {
    "INST opcode": b"(i__builtin__\nset\n.",
    "OBJ opcode": b"\x80\x02(c__builtin__\nset\no.",
    "NEWOBJ opcode": b"\x80\x02c__builtin__\nset\n)\x81.",
    "EXT1 opcode": b"\x80\x02\x82\x01.",
    "REDUCE of a dtype": b"\x80\x02ctorch\nfloat32\n)R.",
    "REDUCE of a storage type": b"\x80\x02ctorch\nFloatStorage\n)R.",
    "BUILD on an OrderedDict with another attribute": b"\x80\x02ccollections\nOrderedDict"
    b"\n)R}X\x04\x00\x00\x00keysK\x01sb.",
    "STACK_GLOBAL of os.system": b"\x80\x04\x8c\x02os\x8c\x06system\x93.",
    "a list that contains itself": b"\x80\x02]q\x00h\x00a.",
    "2**60 values in 60 nested pairs": _nested_lists(60),
    "a tensor reaching past its storage": _torch_save_bytes(
        torch.ones(4), edit_pickle=lambda raw: raw.replace(b"K\x04\x85", b"M\xe8\x03\x85", 1)
    ),
    "a storage shorter than declared": _torch_save_bytes(
        torch.ones(4), edit_storage=lambda raw: raw[:8]
    ),
    "a tensor with a backward hook": _torch_save_bytes(
        torch.ones(4),
        edit_pickle=lambda raw: raw.replace(b")R", b"]K\x01K\x02\x86a\x85R", 1),
    ),
}


_WHY = {
    "INST opcode": "opcode b'i'",
    "OBJ opcode": "opcode b'o'",
    "NEWOBJ opcode": "opcode b'\\x81'",
    "EXT1 opcode": "opcode b'\\x82'",
    "REDUCE of a dtype": "calls torch.float32",
    "REDUCE of a storage type": "calls storage type",
    "BUILD on an OrderedDict with another attribute": "sets the state of OrderedDict",
    "STACK_GLOBAL of os.system": "references os.system",
    "a list that contains itself": "cyclic",
    "2**60 values in 60 nested pairs": "more than 1000000 values",
    "a tensor reaching past its storage": "reaches past its storage",
    "a storage shorter than declared": "holds 8 bytes, not 16",
    "a tensor with a backward hook": "hooks",
}


@pytest.mark.parametrize("case", list(_REFUSED_PICKLES))
def test_restricted_unpickler_refuses_what_a_weights_only_load_must(tmp_path, case):
    from bnfold.io.unpickle import load_torch_file

    path = tmp_path / "x.pt"
    path.write_bytes(_REFUSED_PICKLES[case])
    with pytest.raises(LoadError) as caught:
        load_torch_file(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert _WHY[case] in str(caught.value)
    with pytest.raises(LoadError):
        load_data(path)


def test_restricted_unpickler_keeps_state_dict_metadata_and_sharing(tmp_path):
    from bnfold.io.unpickle import load_torch_file

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    state = model.state_dict(keep_vars=False)
    torch.save({"state": state, "view": state["0.weight"][1:, ::2], "n": 3}, tmp_path / "s.pt")
    loaded = load_torch_file(tmp_path / "s.pt")
    assert loaded["state"]._metadata == state._metadata
    assert loaded["state"]["0.weight"].data_ptr() == loaded["state"]["1.weight"].data_ptr()
    assert torch.equal(loaded["view"], state["0.weight"][1:, ::2]) and loaded["n"] == 3


def test_state_dict_zip_bomb_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.pt"
    path.write_bytes(bomb_state_dict(1025))
    assert path.stat().st_size < 2 * 1024 * 1024
    with pytest.raises(LoadError, match="zip bomb"):
        load_model(path, arch="torch.nn:Identity")
    with pytest.raises(LoadError, match="zip bomb"):
        load_data(path)


def test_empty_files_and_symlink_loops_say_what_is_wrong(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(LoadError, match=r"empty \(0 bytes\)"):
        load_data(tmp_path / "empty.pt")
    (tmp_path / "a.pt2").symlink_to(tmp_path / "b.pt2")
    (tmp_path / "b.pt2").symlink_to(tmp_path / "a.pt2")
    with pytest.raises(LoadError, match="symbolic link loop"):
        load_model(tmp_path / "a.pt2")
    (tmp_path / "dangling.pt2").symlink_to(tmp_path / "gone.pt2")
    with pytest.raises(LoadError, match=r"gone\.pt2, which does not exist"):
        load_model(tmp_path / "dangling.pt2")


def test_archive_limits_are_enforced(clean, tmp_path, monkeypatch):
    from bnfold.io import archive as _archive
    from bnfold.io import pt2 as _pt2

    entries = read_members(clean)
    many = [*entries, *(Entry(f"{root(entries)}extra/{i}", b"") for i in range(10_000))]
    with pytest.raises(LoadError, match=f"{len(many)} members, more than the 10000"):
        load_model(write(tmp_path / "many.pt2", many))
    monkeypatch.setattr(_pt2, "MAX_JSON_BYTES", 1000)
    with pytest.raises(LoadError, match=r"JSON member .*model\.json is .* more than the 1000"):
        load_model(clean)
    monkeypatch.setattr(_pt2, "MAX_JSON_BYTES", 64 << 20)
    monkeypatch.setattr(_pt2, "ALLOWANCE", 1000)
    with pytest.raises(LoadError, match="tensors the program declares plus 1000 bytes"):
        load_model(clean)
    assert _archive.MAX_RATIO == 100


# ------------------------------------------------------------------ through the CLI

_CHILD = textwrap.dedent("""
    import contextlib, io, json, resource, sys, traceback
    from bnfold_cli.main import main

    def run(argv):
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code
            except BaseException:
                code = "traceback"
                err.write(traceback.format_exc())
        return code, err.getvalue()

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    jobs = json.load(open(sys.argv[1]))
    warm = run(jobs["warmup"])
    base = peak_mib()
    results = {name: run(argv) for name, argv in jobs["cases"].items()}
    json.dump({"warm": warm, "base": base, "peak": peak_mib(), "results": results},
              open(sys.argv[2], "w"))
""")


def test_cli_refuses_every_hostile_file_with_one_line_exit_3_and_bounded_memory(clean, tmp_path):
    """``bnfold inspect`` and ``bnfold fold`` on every hostile file, in one fresh process (so
    its peak memory means something): exit 3, one ``error:`` line, no marker, and less than
    150 MiB above the peak of loading the clean file, while the bombs inflate to > 1 GiB."""
    cases = {}
    for i, attack in enumerate(HOSTILE_PT2):
        directory = tmp_path / f"case{i}"
        directory.mkdir()
        path, _ = build(clean, directory, attack)
        cases[f"inspect: {attack}"] = ["inspect", str(path)]
        cases[f"fold: {attack}"] = ["fold", str(path), "-o", str(directory / "out.pt2")]
    for container in ("torch.save", "legacy"):
        for protocol in PROTOCOLS:
            path = tmp_path / f"evil_{container}_{protocol}.pt"
            path.write_bytes(pickles(tmp_path / "MARKER", container, protocol))
            cases[f"state dict {container} p{protocol}"] = [
                "inspect",
                str(path),
                "--arch",
                "torch.nn:Identity",
                "--input-shape",
                "2x3",
            ]
            cases[f"data {container} p{protocol}"] = [
                "fold",
                str(clean),
                "--data",
                str(path),
                "-o",
                str(tmp_path / "o.pt2"),
            ]
    silent = _silent_payload(clean, tmp_path)
    cases["inspect: silent payload"] = ["inspect", str(silent)]
    cases["fold: silent payload"] = ["fold", str(silent), "-o", str(tmp_path / "o.pt2")]
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(bomb_state_dict(1025))
    cases["state dict bomb"] = ["inspect", str(bomb), "--arch", "torch.nn:Identity"]
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"warmup": ["inspect", str(clean)], "cases": cases}))
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(jobs), str(tmp_path / "out.json")],
        check=True,
        timeout=600,
        cwd=tmp_path,
    )
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["warm"][0] == 0, report["warm"]
    bad = {}
    for name, (code, err) in report["results"].items():
        lines = [line for line in err.splitlines() if line.strip()]
        if code != 3 or len(lines) != 1 or not lines[0].startswith("error: "):
            bad[name] = (code, err[-300:])
    assert not bad, bad
    assert not list(tmp_path.rglob("MARKER")), "code from a file ran"
    assert not list(tmp_path.rglob("out.pt2")) and not (tmp_path / "o.pt2").exists()
    assert report["peak"] - report["base"] < 150, report


def _bnfold() -> list[str]:
    script = shutil.which("bnfold", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "bnfold_cli.main"]


def _silent_payload(clean: Path, directory: Path) -> Path:
    """Sample inputs whose (legacy, protocol 0) pickle runs code and then returns valid example
    inputs: torch.export.load would run it, and the fold would go on and exit 0."""
    marker = directory / "MARKER"
    payload = pickles(marker, "legacy", 0, InputsThatRunCode(marker, tuple(X.shape)))
    entries = edit(read_members(clean), "sample_inputs/model.pt", raw=payload)
    return write(directory / "silent.pt2", entries)


def test_payload_that_would_fold_silently_is_refused_by_the_bnfold_command(clean, tmp_path):
    evil = _silent_payload(clean, tmp_path)
    command = [*_bnfold(), "fold", str(evil), "-o", str(tmp_path / "o.pt2")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "builtins.eval" in lines[0]
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "o.pt2").exists()


# ------------------------------------------------------------------ mutations of a valid .pt2


def _mutate(data: bytes, members: list[Entry], kind: str, at: int, value: int, pick: int):
    """One mutation of the archive ``data`` (whose members are ``members``)."""
    if kind == "truncate":
        return data[: at % len(data)]
    if kind == "flip":
        out = bytearray(data)
        out[at % len(out)] ^= value or 1
        return bytes(out)
    a, b = members[at % len(members)], members[pick % len(members)]
    if kind == "swap data":  # contents trade places; names and CRCs stay
        other = {a.name: b.raw, b.name: a.raw}
        return zip_bytes(
            [
                Entry(e.name, other[e.name], crc=zlib.crc32(e.raw)) if e.name in other else e
                for e in members
            ]
        )
    if kind == "rename":
        return zip_bytes([Entry(b.name, e.raw) if e is a else e for e in members])
    if kind == "duplicate":
        return zip_bytes([*members, Entry(a.name, b.raw)])
    return zip_bytes([b if e is a else a if e is b else e for e in members])  # reorder


MUTATIONS = st.tuples(
    st.sampled_from(["truncate", "flip", "swap data", "rename", "duplicate", "reorder"]),
    st.integers(0, 1 << 30),
    st.integers(0, 255),
    st.integers(0, 1 << 30),
)


def _check_mutant(clean: Path, tmp_path: Path, mutation, calls: list[str]) -> None:
    members = read_members(clean)
    path = tmp_path / "mutant.pt2"
    path.write_bytes(_mutate(clean.read_bytes(), members, *mutation))
    try:
        loaded = load_model(path)
    except LoadError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert outputs_match(loaded.model), f"{mutation} loaded a different model"
    assert not calls, f"{mutation}: called {calls}"


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutation=MUTATIONS)
def test_mutated_pt2_never_tracebacks_never_loads_a_changed_model(
    clean, tmp_path, mutation, no_unsafe_loaders
):
    _check_mutant(clean, tmp_path, mutation, no_unsafe_loaders)


@pytest.mark.slow
@settings(
    max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutation=MUTATIONS)
def test_mutated_pt2_long_campaign(clean, tmp_path, mutation, no_unsafe_loaders):
    _check_mutant(clean, tmp_path, mutation, no_unsafe_loaders)
