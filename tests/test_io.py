"""bnfold.io.models: loading every model format safely, saving folded models that load
without bnfold, atomic writes, and a clear error (nothing written, nothing lost) for every bad
input."""

from __future__ import annotations

import importlib
import os
import pickle
import stat
import sys
from pathlib import Path

import pytest
import torch
from model_files import (
    USER_MODULE,
    MarkerOnLoad,
    install_user_module,
    pickled_bytes,
    rewrite_pt2,
    run_without_bnfold,
)
from safetensors.torch import save_file
from torch import nn

import bnfold
from bnfold.errors import LoadError, ModelInputError, SaveError, UnsafeFileError, UsageError
from bnfold.io.inputs import check_inputs, make_example_inputs
from bnfold.io.models import (
    ModelFormat,
    check_output_path,
    default_output_path,
    load_model,
    save_model,
    write_text_atomic,
)

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The user's model module, importable as ``bnfold_usermodels`` for this test only."""
    package = tmp_path / "userpkg"
    package.mkdir()
    install_user_module(package)
    monkeypatch.syspath_prepend(str(package))
    sys.modules.pop(USER_MODULE, None)
    module = importlib.import_module(USER_MODULE)
    module.DIR = package
    yield module
    sys.modules.pop(USER_MODULE, None)


def export_program(model: nn.Module, path: Path, x: torch.Tensor = X) -> Path:
    dims = ({0: torch.export.Dim.AUTO},)
    torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=dims), path)
    return path


def assert_no_temp_files(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")], "temp file left"


# ------------------------------------------------------------------ formats that load


def test_pt2_loads_as_foldable_module_with_its_example_inputs(tmp_path, user):
    model = user.build()
    loaded = load_model(export_program(model, tmp_path / "m.pt2"))
    assert loaded.format is ModelFormat.EXPORTED_PROGRAM
    assert loaded.example_inputs[0].shape == X.shape
    assert loaded.dynamic_dims == ((0,),)
    assert isinstance(loaded.model.conv1, nn.Conv2d)
    assert isinstance(loaded.model.bn3, nn.BatchNorm1d)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), model(X))
    result = bnfold.fold(loaded.model, loaded.example_inputs)
    assert len(result.folded) == 3 and not result.skipped
    assert bnfold.count_bn_kernels(result.model, X) == 0


def test_factory_state_dict_safetensors_and_checkpoint_dicts_load(tmp_path, user):
    reference = user.build()
    factory = load_model(f"{USER_MODULE}:build")
    assert factory.format is ModelFormat.FACTORY
    state = reference.state_dict()
    torch.save(state, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    arch = f"{USER_MODULE}:Net"
    for name, fmt in [
        ("w.pt", ModelFormat.STATE_DICT),
        ("w.safetensors", ModelFormat.SAFETENSORS),
        ("ckpt.pth", ModelFormat.STATE_DICT),
        ("ddp.pt", ModelFormat.STATE_DICT),
    ]:
        loaded = load_model(tmp_path / name, arch=arch)
        assert loaded.format is fmt and loaded.arch == arch
        for key, value in reference.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[key], value), (name, key)
    assert "'state_dict' entry" in load_model(tmp_path / "ckpt.pth", arch=arch).notes[0]
    assert "module." in load_model(tmp_path / "ddp.pt", arch=arch).notes[0]


def test_pickled_module_loads_only_when_trusted(tmp_path, user):
    torch.save(user.build(), tmp_path / "model.pt")
    with pytest.raises(UnsafeFileError) as caught:
        load_model(tmp_path / "model.pt")
    message = str(caught.value)
    assert "full pickled model" in message and "runs code from the file" in message
    assert "--trust-pickle" in message and ".pt2" in message and "state dict" in message
    assert f"{USER_MODULE}.Net" in message
    loaded = load_model(tmp_path / "model.pt", trust_pickle=True)
    assert loaded.format is ModelFormat.PICKLED_MODULE
    assert default_output_path(loaded) == tmp_path / "model.folded.pt"


# ------------------------------------------------------------------ round trips without bnfold


def test_every_output_format_loads_back_without_bnfold(tmp_path, user):
    """.pt2 from a .pt2, .pt2 from a state dict, and a pickled module from a pickled module:
    each is loaded in a python where bnfold cannot be imported, and computes the folded
    function (which equals the original's) on a batch size it was not exported with."""
    model = user.build()
    export_program(model, tmp_path / "m.pt2")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save(model, tmp_path / "p.pt")
    jobs = [
        (load_model(tmp_path / "m.pt2"), "m.folded.pt2"),
        (load_model(tmp_path / "w.pt", arch=f"{USER_MODULE}:Net"), "w.folded.pt2"),
        (load_model(tmp_path / "p.pt", trust_pickle=True), "p.folded.pt"),
    ]
    for loaded, name in jobs:
        result = bnfold.fold(loaded.model, X)
        saved = save_model(
            result.model, tmp_path / name, example_inputs=X, dynamic_dims=loaded.dynamic_dims
        )
        assert saved.path == str(tmp_path / name) and saved.bytes > 0
    x5 = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.save({"x": x5, "y": model(x5)}, tmp_path / "io.pt")
    out = run_without_bnfold(
        """
        import torch
        data = torch.load("io.pt")
        models = {
            "m.folded.pt2": torch.export.load("m.folded.pt2").module(),
            "w.folded.pt2": torch.export.load("w.folded.pt2").module(),
            "p.folded.pt": torch.load("p.folded.pt", weights_only=False),
        }
        for name, model in models.items():
            with torch.no_grad():
                err = (model(data["x"]) - data["y"]).abs().max().item()
            assert err < 1e-4, (name, err)
            print(name, "ok")
        bns = [n for n in torch.export.load("m.folded.pt2").graph.nodes
               if "batch_norm" in str(n.target)]
        assert not bns, bns
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                       for m in models["p.folded.pt"].modules())
    """,
        paths=(user.DIR,),
        cwd=tmp_path,
    )
    assert out.count(" ok") == 3
    assert_no_temp_files(tmp_path)


# ------------------------------------------------------------------ bad files


def test_missing_empty_directory_and_non_model_files(tmp_path):
    with pytest.raises(LoadError, match="no such file"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(LoadError, match="directory"):
        load_model(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(LoadError, match="empty"):
        load_model(tmp_path / "empty.pt")
    (tmp_path / "notes.pt").write_text("hello, I am not a model\n")
    with pytest.raises(LoadError, match="not a model file"):
        load_model(tmp_path / "notes.pt")
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(LoadError, match="no PyTorch model"):
        load_model(tmp_path / "other.zip")


def test_a_fifo_or_device_is_refused_before_it_is_read(tmp_path):
    """Reading a FIFO blocks until a writer comes, a device may never end: neither is read."""
    os.mkfifo(tmp_path / "model.pt2")
    os.mkfifo(tmp_path / "samples.pt")
    with pytest.raises(LoadError, match="not a regular file"):
        load_model(tmp_path / "model.pt2")
    with pytest.raises(LoadError, match="not a regular file"):
        load_model("/dev/zero", arch="bnfold.zoo:small_cnn")
    with pytest.raises(LoadError, match="not a regular file"):
        bnfold.load_data(tmp_path / "samples.pt")
    os.mkfifo(tmp_path / "model.onnx")
    with pytest.raises(LoadError, match="not a regular file"):
        bnfold.verify(nn.Identity(), tmp_path / "model.onnx", torch.randn(2, 3), providers=["cpu"])
    with pytest.raises(LoadError, match=r"missing\.npz: no such file"):
        bnfold.load_data(tmp_path / "missing.npz:arr_0")  # a file, not a module to import


@pytest.mark.parametrize("kind", ["pt2", "zip", "legacy", "safetensors"])
def test_truncated_files_are_a_clear_load_error(tmp_path, user, kind):
    model = user.build()
    full = tmp_path / f"full.{kind}"
    if kind == "pt2":
        export_program(model, full)
    elif kind == "zip":
        torch.save(model.state_dict(), full)
    elif kind == "legacy":
        torch.save(model.state_dict(), full, _use_new_zipfile_serialization=False)
    else:
        save_file(model.state_dict(), full.with_suffix(".safetensors"))
        full = full.with_suffix(".safetensors")
    cut = tmp_path / f"cut{full.suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(LoadError) as caught:
        load_model(cut, arch=None if kind == "pt2" else f"{USER_MODULE}:Net")
    assert not isinstance(caught.value, UnsafeFileError)
    assert str(cut) in str(caught.value)


@pytest.mark.parametrize("container", ["torch.save", "pickle", "legacy"])
def test_pickle_that_runs_code_is_never_executed(tmp_path, container):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.ones(2), "surprise": MarkerOnLoad(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    elif container == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))
    for arch in (None, "torch.nn:Identity"):
        with pytest.raises(UnsafeFileError) as caught:
            load_model(path, arch=arch)
        assert "runs code from the file" in str(caught.value)
        assert "open" in str(caught.value)  # names what it would have called
    assert not marker.exists()


def _pt2_attacks(marker: Path) -> dict:
    code = f"__import__('os').system('touch {marker}')"

    def pickled_sample_inputs(name: str, data: bytes) -> bytes:
        if name.endswith("sample_inputs/model.pt"):
            return pickled_bytes(((torch.ones(1),), {"x": MarkerOnLoad(marker)}))
        return data

    def expression(program: dict) -> None:
        for value in _walk_dicts(program):
            if "expr_str" in value:
                value["expr_str"] = f"{code} or {value['expr_str']}"

    def inside_arithmetic(program: dict) -> None:  # Add/Mul/Pow are allowed calls
        for value in _walk_dicts(program):
            if "expr_str" in value:
                value["expr_str"] = f"Mul(Add({code}, 1), Pow('{code}', 2))"

    def guard(program: dict) -> None:
        program["guards_code"] = [f"{code} == 0"]

    def pickled_weight(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            return data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
        return data

    def foreign_call(program: dict) -> None:
        for node in program["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.relu.default":
                node["target"] = "torch.serialization.os.system"

    return {
        "pickled sample inputs": dict(members=pickled_sample_inputs),
        "shape expression": dict(program=expression),
        "code inside arithmetic": dict(program=inside_arithmetic),
        "guard code": dict(program=guard),
        "pickled weight": dict(members=pickled_weight),
        "foreign call": dict(program=foreign_call),
    }


def _walk_dicts(value):
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _walk_dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_dicts(item)


@pytest.mark.parametrize("attack", list(_pt2_attacks(Path("m"))))
def test_crafted_pt2_that_would_run_code_is_refused(tmp_path, user, attack):
    """torch.export.load itself would run each of these (pickle fallback, sympify, exec of
    guards, a non-operator call target); bnfold refuses them before any of it happens."""
    marker = tmp_path / "MARKER"
    clean = export_program(user.build(), tmp_path / "clean.pt2")
    evil = rewrite_pt2(clean, tmp_path / "evil.pt2", **_pt2_attacks(marker)[attack])
    # torch's own verifier already rejects a non-operator target at load; the rest it would run
    expected = LoadError if attack == "foreign call" else UnsafeFileError
    with pytest.raises(expected):
        load_model(evil)
    assert not marker.exists()


def test_aot_compiled_package_and_torchscript_are_refused_with_alternatives(tmp_path, user):
    clean = export_program(user.build(), tmp_path / "clean.pt2")
    aoti = tmp_path / "aoti.pt2"
    rewrite_pt2(clean, aoti)
    import zipfile

    with zipfile.ZipFile(aoti, "a") as archive:
        archive.writestr("clean/data/aotinductor/model/model.wrapper.so", b"\x7fELF")
    with pytest.raises(LoadError, match="AOTInductor"):
        load_model(aoti)
    torch.jit.save(torch.jit.script(user.build()), tmp_path / "scripted.pt")
    with pytest.raises(LoadError) as caught:
        load_model(tmp_path / "scripted.pt")
    message = str(caught.value)
    assert "TorchScript" in message and ".pt2" in message and "--arch" in message


# ------------------------------------------------------------------ state dicts and factories


def test_state_dict_that_does_not_fit_arch_names_the_keys(tmp_path, user):
    folded = bnfold.fold(user.build(), X).model
    torch.save(folded.state_dict(), tmp_path / "folded_weights.pt")
    with pytest.raises(LoadError) as caught:
        load_model(tmp_path / "folded_weights.pt", arch=f"{USER_MODULE}:Net")
    message = str(caught.value)
    assert "missing keys" in message and "bn1.running_var" in message
    assert "unexpected keys" in message and "conv1.bias" in message
    assert "save folded models as .pt2" in message
    torch.save(user.build().state_dict(), tmp_path / "w.pt")
    with pytest.raises(LoadError, match=r"size mismatch for conv1\.weight"):
        load_model(tmp_path / "w.pt", arch=f"{USER_MODULE}:build_wide")


def test_state_dict_needs_arch_and_arch_needs_a_state_dict(tmp_path, user):
    torch.save(user.build().state_dict(), tmp_path / "w.pt")
    with pytest.raises(UsageError, match="--arch"):
        load_model(tmp_path / "w.pt")
    with pytest.raises(UsageError, match="state-dict"):
        load_model(export_program(user.build(), tmp_path / "m.pt2"), arch=f"{USER_MODULE}:Net")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(LoadError, match="not a state dict"):
        load_model(tmp_path / "meta.pt", arch=f"{USER_MODULE}:Net")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_such_pkg_xyz.models:build", "cannot import module 'no_such_pkg_xyz.models'"),
        (f"{USER_MODULE}:nothing_here", "has no attribute 'nothing_here'"),
        (f"{USER_MODULE}:broken", "the factory failed on purpose"),
        (f"{USER_MODULE}:not_a_module", "returned a int, not a torch.nn.Module"),
    ],
)
def test_factory_errors_name_the_spec(user, spec, expected):
    with pytest.raises(LoadError) as caught:
        load_model(spec)
    assert expected in str(caught.value)


# ------------------------------------------------------------------ inputs


def test_input_the_model_rejects_names_the_layer_and_leaves_model_unchanged(user):
    model = user.build().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelInputError) as caught:
        check_inputs(model, torch.randn(2, 4, 8, 8))
    assert "layer 'conv1' (Conv2d)" in str(caught.value)
    assert "2x4x8x8 float32" in str(caught.value)
    with pytest.raises(ModelInputError, match="layer '1' \\(Linear\\)"):
        check_inputs(nn.Sequential(nn.Flatten(), nn.Linear(7, 2)).eval(), torch.randn(2, 5))
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_example_inputs_are_seeded_and_typed():
    first = make_example_inputs([((2, 3), None), ((2, 4), "int64")])
    again = make_example_inputs([((2, 3), None), ((2, 4), "int64")])
    assert torch.equal(first[0], again[0]) and first[0].dtype == torch.float32
    assert first[1].dtype == torch.int64 and not first[1].any()
    with pytest.raises(UsageError):
        make_example_inputs([((2, 0), None)])
    with pytest.raises(UsageError, match="unknown dtype"):
        make_example_inputs([((2,), "float8")])


# ------------------------------------------------------------------ saving


def test_output_checks(tmp_path, user):
    existing = tmp_path / "out.pt2"
    existing.write_bytes(b"precious")
    with pytest.raises(UsageError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.pt2")
    with pytest.raises(UsageError, match="--force"):
        check_output_path(existing)
    assert check_output_path(existing, overwrite=True) == existing
    with pytest.raises(UsageError, match="never overwrites its input"):
        check_output_path(existing, inputs=[tmp_path / "." / "out.pt2"], overwrite=True)
    with pytest.raises(UsageError, match="output format"):
        save_model(user.build(), tmp_path / "out.onnx", example_inputs=X)
    with pytest.raises(UsageError, match="does not exist"):
        save_model(user.build(), tmp_path / "missing" / "out.pt2", example_inputs=X)
    assert not (tmp_path / "missing").exists()
    assert existing.read_bytes() == b"precious"


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_save_leaves_no_partial_file_and_keeps_the_old_one(
    tmp_path, monkeypatch, user, failure, existing
):
    target = tmp_path / "model.folded.pt2"
    if existing:
        target.write_bytes(b"the previous model")

    def half_write(program, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half of an archive")
        raise failure

    monkeypatch.setattr(torch.export, "save", half_write)
    expected = SaveError if isinstance(failure, Exception) else KeyboardInterrupt
    with pytest.raises(expected):
        save_model(user.build(), target, example_inputs=X, overwrite=True)
    if existing:
        assert target.read_bytes() == b"the previous model"
    else:
        assert not target.exists()
    assert_no_temp_files(tmp_path)


def test_write_text_atomic_replaces_whole_file_only_when_asked(tmp_path):
    path = tmp_path / "report.json"
    write_text_atomic(path, "first")
    with pytest.raises(UsageError, match="already exists"):
        write_text_atomic(path, "second")
    assert path.read_text() == "first"
    write_text_atomic(path, "second", overwrite=True)
    assert path.read_text() == "second"
    assert_no_temp_files(tmp_path)


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    path = tmp_path / "report.json"
    old = os.umask(0o022)
    try:
        write_text_atomic(path, "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_default_output_names(tmp_path, user):
    export_program(user.build(), tmp_path / "m.pt2")
    torch.save(user.build().state_dict(), tmp_path / "weights.pth")
    assert default_output_path(load_model(tmp_path / "m.pt2")) == tmp_path / "m.folded.pt2"
    loaded = load_model(tmp_path / "weights.pth", arch=f"{USER_MODULE}:Net")
    assert default_output_path(loaded) == tmp_path / "weights.folded.pt2"
    factory = load_model(f"{USER_MODULE}:build")
    assert default_output_path(factory, cwd=tmp_path) == tmp_path / "build.folded.pt2"


# ------------------------------------------------------------------ .pt2 → foldable module


class _Mixed(nn.Module):
    """Transposed grouped conv, 1-D conv on 3-D data, affine=False BN, a conv called twice,
    and a functional batch norm on a parameter that is also used elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, groups=2)
        self.bn_up = nn.BatchNorm2d(6, affine=False)
        self.shared = nn.Conv2d(6, 6, 1)
        self.bn_a = nn.BatchNorm2d(6)
        self.seq = nn.Conv1d(6, 8, 3)
        self.bn_seq = nn.BatchNorm1d(8, eps=1e-3)

    def forward(self, x):
        y = self.bn_up(self.up(x))
        y = self.bn_a(self.shared(y)) + self.shared(y)
        return self.bn_seq(self.seq(y.flatten(2)))


def test_program_layers_become_modules_and_fold_exactly(tmp_path):
    from bnfold.zoo import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(_Mixed()).double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    loaded = load_model(export_program(model, tmp_path / "mixed.pt2", x))
    lifted = loaded.model
    assert isinstance(lifted.up, nn.ConvTranspose2d) and lifted.up.groups == 2
    assert lifted.up.output_padding == (1, 1) and lifted.up.stride == (2, 2)
    assert isinstance(lifted.bn_up, nn.BatchNorm2d) and not lifted.bn_up.affine
    assert isinstance(lifted.seq, nn.Conv1d) and lifted.bn_seq.eps == 1e-3
    calls = [n.target for n in lifted.graph.nodes if n.op == "call_module"]
    assert calls.count("shared") == 2  # one module, two call sites: the fold must see sharing
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(lifted(x), expected, rtol=0, atol=1e-12)
        result = bnfold.fold(lifted, x)
        folded = {item.pair.bn for item in result.folded}
        assert {"bn_up", "bn_seq"} <= folded and "bn_a" not in folded
        assert [s.reason.value for s in result.skipped] == ["producer_shared"]
        error = (result.model(x) - expected).abs().max() / expected.abs().max()
    assert error < 1e-10


def test_program_exported_in_train_mode_keeps_its_batch_norm_with_a_note(tmp_path, user):
    model = user.build().train()
    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(model, (X,)), path)
    loaded = load_model(path)
    assert any("train mode" in note for note in loaded.notes)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in loaded.model.modules())


@pytest.mark.parametrize("fmt", ["EXPORTED_PROGRAM", "STATE_DICT", "SAFETENSORS"])
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_model_format_gets_the_permissions_of_a_new_file(tmp_path, user, fmt, umask):
    """safetensors creates its file owner-only; bnfold's outputs all follow the umask."""
    path = tmp_path / "model.out"
    old = os.umask(umask)
    try:
        save_model(user.build(), path, example_inputs=X, format=getattr(ModelFormat, fmt))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert_no_temp_files(tmp_path)


def test_a_filesystem_that_refuses_modes_still_gets_the_file(tmp_path, monkeypatch):
    """Permissions are best effort: a chmod the filesystem refuses does not fail the save."""

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    write_text_atomic(tmp_path / "report.json", "x")
    assert (tmp_path / "report.json").read_text() == "x"
    assert_no_temp_files(tmp_path)
