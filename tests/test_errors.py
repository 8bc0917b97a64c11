"""Every bad input gets a TostSurgeryError that names the layer and value, and changes nothing."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import tost_surgery as tost
from tost_surgery import MaskError, Recipe, StateError, TostSurgeryError, TraceError

from .conftest import TinyNet, bernoulli_mask


def snapshot(model: nn.Module) -> tuple:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return type(model), state, {type(m) for m in model.modules()}, dict(model.__dict__.items())


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    cls, state, module_types, attributes = before
    assert type(model) is cls
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    assert {type(m) for m in model.modules()} == module_types
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert "forward" not in model.__dict__ and not hasattr(model, "tost")
    assert model.__dict__.keys() == attributes.keys()


def mask_with(change: Callable[[dict], None]) -> Callable[[nn.Module], dict]:
    def make(model: nn.Module) -> dict:
        mask = bernoulli_mask(model)
        change(mask)
        return mask

    return make


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1))

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return self.block(x)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda mask: mask.__setitem__(key, value)


# (id, model factory, mask factory, prepare keyword arguments, error class, message pattern)
PREPARE_CASES = [
    ("mask-not-a-dict", TinyNet, lambda m: [1, 2], {}, MaskError, "A mask is a dict"),
    ("mask-covers-nothing", TinyNet, lambda m: {}, {}, MaskError, "covers nothing"),
    ("unknown-name", TinyNet, mask_with(lambda d: d.__setitem__("conv9.weight", d.pop("conv1.weight"))), {},
     MaskError, r"'conv9.weight' names no parameter of TinyNet. Did you mean 'conv"),
    ("non-string-key", TinyNet, mask_with(_set(3, torch.ones(1))), {}, MaskError, "names no parameter"),
    ("wrong-shape", TinyNet, mask_with(_set("fc.weight", torch.ones(10, 15))), {}, MaskError,
     r"'fc.weight' has the wrong shape.\n  expected: \(10, 16\)\n  found:    \(10, 15\)"),
    ("not-binary", TinyNet, mask_with(_set("fc.weight", torch.full((10, 16), 0.5))), {}, MaskError,
     r"'fc.weight' is not binary: found the value 0.5"),
    ("nan", TinyNet, mask_with(_set("fc.weight", torch.full((10, 16), float("nan")))), {}, MaskError,
     "is not binary: found the value nan"),
    ("complex", TinyNet, mask_with(_set("fc.weight", torch.ones(10, 16, dtype=torch.cfloat))), {}, MaskError,
     "must be real"),
    ("not-a-tensor", TinyNet, mask_with(_set("fc.weight", [[1.0] * 16] * 10)), {}, MaskError,
     "'fc.weight' must be a torch.Tensor, found list"),
    ("empty-layer", TinyNet, mask_with(_set("conv2.weight", torch.zeros(8, 8, 3, 3))), {}, MaskError,
     r"'conv2.weight' keeps no weight: the whole layer would be empty \(0 of 576 kept\)"),
    ("tied-twice-differently", Tied, lambda m: {"a.weight": torch.ones(4, 4), "b.weight": torch.eye(4)}, {},
     MaskError, r"'a.weight' and 'b.weight' name the same \(tied\) parameter with different masks \(12 of 16"),
    ("recipe-wrong-type", TinyNet, bernoulli_mask, {"recipe": {"ghost_neurons": True}}, TostSurgeryError,
     "recipe must be a tost_surgery.Recipe, found dict"),
    ("leaf-unknown-name", TinyNet, bernoulli_mask, {"leaf_modules": ["blocks"]}, TraceError,
     "leaf_modules names 'blocks', which is no submodule"),
    ("leaf-bad-type", TinyNet, bernoulli_mask, {"leaf_modules": [3]}, TraceError,
     "leaf_modules takes nn.Module subclasses or qualified names, found 3"),
    ("untraceable-strict", Untraceable, bernoulli_mask, {"strict": True}, TraceError,
     r"could not trace Untraceable in Untraceable.forward: TraceError: symbolically traced.*\nHint: pass leaf_modules"),
]


@pytest.mark.parametrize(
    ("make_model", "make_mask", "kwargs", "error", "message"),
    [case[1:] for case in PREPARE_CASES],
    ids=[case[0] for case in PREPARE_CASES],
)
def test_bad_prepare_input_changes_nothing(make_model, make_mask, kwargs, error, message) -> None:
    torch.manual_seed(0)
    model = make_model()
    mask = make_mask(model)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        tost.prepare(model, mask, **kwargs)
    assert_unchanged(model, before)
    assert issubclass(error, ValueError)


def test_a_failure_while_zeroing_the_masked_weights_changes_nothing(monkeypatch) -> None:
    """The last step of prepare (zero masked weights, rescale) builds every multiplier before changing any weight."""
    import tost_surgery._surgery as surgery_module

    def bad_factors(entries, recipe, normalized):
        first, second = entries[0], entries[1]
        return {first.name: 2.0, second.name: torch.ones(3, 3, 3, 3, 3)}  # cannot broadcast: raises

    monkeypatch.setattr(surgery_module, "rescale_factors", bad_factors)
    torch.manual_seed(0)
    model = TinyNet()
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=4))
    assert_unchanged(model, before)


def test_untraceable_submodule_is_named() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Untraceable()

        def forward(self, x):
            return self.inner(x)

    model = Outer()
    before = snapshot(model)
    with pytest.raises(TraceError, match=r"(?s)in submodule 'inner' \(Untraceable\).*leaf_modules=\['inner'\]"):
        tost.prepare(model, bernoulli_mask(model), strict=True)
    assert_unchanged(model, before)
    tost.prepare(model, bernoulli_mask(model), leaf_modules=["inner"])  # the hint works


def test_already_parametrized_parameter(tiny) -> None:
    class Double(nn.Module):
        def forward(self, w):
            return w * 2

    parametrize.register_parametrization(tiny.fc, "weight", Double())
    state = copy.deepcopy(tiny.state_dict())
    with pytest.raises(MaskError, match="'fc.weight' already has a parametrization"):
        tost.prepare(tiny, {"fc.weight": torch.ones(10, 16)})
    assert list(tiny.state_dict()) == list(state)


def test_prepare_twice(tiny) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny))
    with pytest.raises(StateError, match="already prepared"):
        tost.prepare(tiny, bernoulli_mask(tiny))


def test_model_with_its_own_tost_attribute(tiny) -> None:
    tiny.tost = 3
    with pytest.raises(StateError, match="already has an attribute 'tost'"):
        tost.prepare(tiny, bernoulli_mask(tiny))


def test_instance_forward_and_wrappers(tiny) -> None:
    with pytest.raises(StateError, match="OptimizedModule wrapper"):
        tost.prepare(torch.compile(tiny), bernoulli_mask(tiny))
    tiny.forward = lambda x: x
    with pytest.raises(StateError, match="forward set on the instance"):
        tost.prepare(tiny, bernoulli_mask(tiny))


def test_not_a_module() -> None:
    with pytest.raises(TostSurgeryError, match="prepare takes an nn.Module, found str"):
        tost.prepare("resnet18", {})


@pytest.mark.parametrize(
    "call",
    [
        tost.finalize,
        tost.step,
        tost.label_smoothing,
        tost.graph,
        lambda m: tost.bind(m, torch.optim.SGD(m.parameters(), lr=1)),
    ],
    ids=["finalize", "step", "label_smoothing", "graph", "bind"],
)
def test_calls_on_an_unprepared_model(call, tiny) -> None:
    with pytest.raises(StateError, match="TinyNet is not prepared by tost_surgery"):
        call(tiny)


def test_step_counts(tiny) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny))
    for n in (0, -1, 1.5, True):
        with pytest.raises(TostSurgeryError, match="positive number of optimizer steps"):
            tost.step(tiny, n)
    assert tiny.tost.schedule.steps_taken == 0


def test_bind_errors(tiny) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny))
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.1)
    tost.bind(tiny, optimizer)
    with pytest.raises(StateError, match="already bound"):
        tost.bind(tiny, optimizer)
    with pytest.raises(TostSurgeryError, match="takes a torch.optim.Optimizer, found str"):
        tost.bind(tiny, "sgd")


def test_finalize_too_early(tiny) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny), Recipe.tost(total_steps=10, skip_warmup=0.5))
    with pytest.raises(StateError, match=r"(?s)ghost neurons at step 0 of 3, ghost skips at step 0 of 5.*force=True"):
        tost.finalize(tiny)


def test_prepare_with_extra_keyword_argument(tiny, images) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny))
    with pytest.raises(TypeError, match="unexpected keyword argument 'y'"):
        tiny(images, y=1)
