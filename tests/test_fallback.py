"""The recorded-dataflow path: what the recorder must see so that no fold is ever wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from wild_checks import fold_checked, folded, reasons
from wild_models import BatchNormAct2d, D2FrozenBatchNorm2d, randomise

import bnfold
import bnfold.find.recorded
from bnfold import zoo
from bnfold.find.recording import record


class Untraceable(nn.Module):
    """Base: a shape check fx cannot trace (it reads no tensor values)."""

    def gate(self, x: torch.Tensor) -> None:
        if x.dim() < 2:  # a proxy cannot decide this
            raise ValueError("expects a batch")


def _fold(model: nn.Module, *shape: int, **kw) -> bnfold.FoldResult:
    return fold_checked(randomise(model), (torch.randn(*shape),), method="recorded", **kw)


def test_result_is_the_users_own_module_class_not_a_graph() -> None:
    class Net(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.gate(x)
            return self.bn(self.conv(x))

    result = _fold(Net(), 2, 3, 8, 8)
    assert type(result.model) is Net and not result.graph_rewritten
    assert isinstance(result.model.bn, nn.Identity) and result.model.conv.bias is not None


def test_consumer_by_keyword_argument_is_seen() -> None:
    class Net(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.other = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.gate(x)
            y = self.conv(x)
            return torch.cat([self.bn(y), self.other(input=y)], 1)

    assert reasons(_fold(Net(), 2, 3, 4, 4)) == {"bn": "producer_fanout"}


def test_in_place_op_and_value_read_on_the_layer_output_are_consumers() -> None:
    class Net(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)  # b1 -> c2: no

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.gate(x)
            y = self.c1(x)
            y.clamp_(min=-1.0)  # in place: the BN reads a changed tensor
            z = self.c2(self.b1(y))
            scale = 2.0 if float(z.abs().amax()) > 1e9 else 1.0  # reads z's values
            return self.b2(z) * scale

    result = _fold(Net(), 2, 3, 4, 4)
    assert not folded(result)  # b1 reads the clamped tensor, not c1's output
    assert reasons(result)["b2"] == "producer_fanout"


def test_tensor_escaping_in_a_custom_object_or_a_cache_is_a_consumer() -> None:
    class Result:  # not a pytree container: invisible to output flattening
        def __init__(self, features: torch.Tensor, out: torch.Tensor) -> None:
            self.features, self.out = features, out

    class Net(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)  # b1 -> c2: no

        def forward(self, x: torch.Tensor) -> Result:
            self.gate(x)
            features = self.c1(x)
            y = self.c2(self.b1(features))
            self.cache = y  # kept on the module for a later call
            return Result(features, self.b2(y))

    model = randomise(Net())
    result = bnfold.fold(model, torch.randn(2, 3, 4, 4))
    assert result.plan.method == "recorded"
    assert reasons(result) == {"b1": "producer_fanout", "b2": "producer_fanout"}


def test_norm_tensors_or_layer_weight_read_elsewhere_are_not_folded() -> None:
    class Net(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.gate(x)
            y = self.b1(self.c1(x)) + self.b1.bias.view(1, -1, 1, 1)
            return self.b2(self.c2(y)) + F.conv2d(y, self.c2.weight)

    assert reasons(_fold(Net(), 2, 3, 4, 4)) == {"b1": "bn_shared", "b2": "producer_shared"}


def test_functional_and_unregistered_batch_norms_are_reported() -> None:
    class Net(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.register_buffer("mean", torch.randn(4))
            self.register_buffer("var", torch.rand(4) + 0.5)
            # not registered as submodules (so .double() does not reach them either)
            self.hidden = [nn.Conv2d(4, 4, 1).double(), nn.BatchNorm2d(4).double().eval()]
            self.inorm = nn.InstanceNorm2d(4)  # runs a batch-norm kernel inside; not a BN

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.gate(x)
            y = F.batch_norm(self.conv(x), self.mean, self.var, training=False)
            y = self.hidden[1](self.hidden[0](y))
            return self.inorm(y)

    result = _fold(Net(), 2, 3, 4, 4)
    assert set(reasons(result).values()) == {"not_traceable"}
    assert len(result.skipped) == 2
    assert "outside a registered BatchNorm module" in result.skipped[0].detail


def test_bn_subclass_and_detectron2_frozen_norm_in_a_recorded_model() -> None:
    class Net(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 4, 3), BatchNormAct2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3), D2FrozenBatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.gate(x)
            return self.b2(self.c2(self.b1(self.c1(x))))

    result = _fold(Net(), 2, 3, 8, 8)
    assert folded(result) == {"b1": "c1", "b2": "c2"}
    assert not isinstance(result.model.b1, nn.Identity)  # the activation stays


def test_bn_before_a_layer_in_a_recorded_model() -> None:
    class Net(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(6), nn.Linear(6, 3)
            self.bn_pad, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.gate(x)
            y = self.conv(self.bn_pad(x))  # zero padding: not exact
            return self.fc(self.bn(y.flatten(2).mean(-1).repeat(1, 3)))

    result = _fold(Net(), 2, 3, 5, 5)
    assert folded(result) == {"bn": "fc"}
    assert reasons(result) == {"bn_pad": "zero_padding"}


def test_bn_modules_that_do_not_run_are_not_in_the_plan_and_hooks_are_cleaned_up() -> None:
    class Net(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.unused = nn.BatchNorm2d(5)  # another width: it cannot stand in for bn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.gate(x)
            return self.bn(self.conv(x))

    hooks = torch.nn.modules.module
    before = (len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks))
    result = _fold(Net(), 1, 3, 4, 4)
    assert folded(result) == {"bn": "conv"}
    assert any("never ran on the example inputs" in n and "unused" in n for n in result.plan.notes)
    assert (len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks)) == before


def test_model_that_rejects_the_input_names_the_layer() -> None:
    class Net(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.gate(x)
            return self.conv(x)

    hooks = torch.nn.modules.module
    before = len(hooks._global_forward_hooks)
    with pytest.raises(bnfold.ModelInputError, match="layer 'conv'"):
        bnfold.find_pairs(Net(), torch.randn(1, 5, 4, 4))
    assert len(hooks._global_forward_hooks) == before


def test_model_no_method_can_read_gets_a_bnfold_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Net(Untraceable):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.gate(x)
            return x

    def broken(model: nn.Module, inputs: object) -> None:
        raise RuntimeError("dispatch mode refused")

    monkeypatch.setattr(bnfold.find.recorded, "record", broken)
    with pytest.raises(bnfold.TraceError) as info:
        bnfold.find_pairs(Net(), torch.randn(1, 3))
    message = str(info.value)
    assert "cannot trace Net with torch.fx" in message and "dispatch mode refused" in message
    assert "torch.export program" in message  # says what to do


def test_recording_reads_every_leaf_call_in_order() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    rec = record(model.eval(), torch.randn(1, 3, 2, 2))
    calls = [n.target for n in rec.module.graph.nodes if n.op == "call_module"]
    assert calls == ["0", "1", "3"]
    assert rec.read_detail is None and not rec.loose_norms
    bn = next(n for n in rec.module.graph.nodes if n.target == "1")
    assert bn.args[0].target == "0" and bn.meta["bnfold_shape"] == (1, 4, 2, 2)


class KeepsFeature(nn.Module):
    """Keeps the conv's output on a module (an attribute, a list or a dict cache), as feature
    extractors do: an output the fx graph does not show."""

    def __init__(self, store: str) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.store = store
        self.cache: list[torch.Tensor] = []
        self.named: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.store == "attribute":
            self.feature = y
        elif self.store == "list":
            self.cache.append(y)
        else:
            self.named["conv"] = y
        return self.bn(y)


@pytest.mark.parametrize("store", ["attribute", "list", "dict"])
def test_a_value_kept_on_a_module_is_an_output_and_the_trace_leaves_no_trace(store: str) -> None:
    model = KeepsFeature(store).eval()
    result = _fold(model, 2, 3, 6, 6)  # the recorded dataflow sees the kept value escape
    assert reasons(result) == {"bn": "producer_fanout"}
    with pytest.raises(bnfold.TraceError, match="keeps a traced value on a module"):
        bnfold.find.trace.trace_model(model)
    assert model.cache == [] and model.named == {} and not hasattr(model, "feature")


class Counts(nn.Module):
    """Rebinds attributes and fills a set while it runs, as call counters and caches do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.calls = 0
        self.shapes: set[tuple[int, ...]] = {(0,)}
        self.last: list[int] = [7]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.shapes.add((1,))
        self.last = [self.calls]
        return self.bn(self.conv(x))


def test_tracing_restores_rebound_attributes_and_container_contents() -> None:
    model = Counts().eval()
    last = model.last
    bnfold.find.trace.trace_model(model)
    assert model.calls == 0 and model.shapes == {(0,)}
    assert model.last is last and last == [7]


class RecordedView(nn.Module):
    """fx cannot trace it (a branch on a size); its BN reaches the Linear across a view whose
    first size is written out."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(6), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 0:
            return self.fc(self.bn(x).reshape(2, -1))
        return x


def test_a_recorded_fold_across_a_view_notes_the_sizes_and_extra_inputs_check_them() -> None:
    model = zoo.randomize_bn(RecordedView()).double().eval()
    x = torch.randn(2, 6, 2, dtype=torch.float64)
    result = bnfold.fold(model, x)
    assert result.plan.method == "recorded" and len(result.folded) == 1
    notes = [note for note in result.plan.notes if note.startswith("bn -> fc: ")]
    assert len(notes) == 1 and "as recorded" in notes[0], result.plan.notes
    other = torch.randn(1, 6, 4, dtype=torch.float64)  # the view puts channels elsewhere here
    checked = bnfold.fold(model, x, extra_inputs=[other])
    assert [s.reason for s in checked.skipped] == [bnfold.SkipReason.INPUT_DEPENDENT]
    assert torch.equal(checked.model(other), model(other))
