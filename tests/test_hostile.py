"""Hostile and odd inputs: properties over random small architectures and masks (hypothesis),
and bad inputs not already in test_errors.py, each refused clearly with the model untouched.

Properties, for any architecture the strategy draws (depth, widths, groups, kernel, stride,
bias, BatchNorm or not, ReLU as a module / shared module / function / method, in place or not,
an in-place ReLU whose input is read again, a conv and norm called twice, residual adds) and any
mask (any subset of parameters, biases and norm weights included, any density):

1. prepare keeps every tensor and every parameter object: unmasked tensors are unchanged and
   masked ones are only masked (and rescaled where the recipe says);
2. masked weights, and the trainable tensors behind them, stay exactly zero after every step
   of SGD (momentum, Nesterov, weight decay), Adam or AdamW with weight decay, with and
   without bfloat16 autocast;
3. once the scaffolding retired the model is the plain masked model, bit for bit, and
   finalize round-trips: original class, forward, parameter objects and state_dict keys, and
   a fresh instance loads the state_dict strictly and computes the same outputs;
4. a bad mask on any such model raises a MaskError and changes nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import tost_surgery as tost
from tost_surgery import MaskError, Recipe, RecipeError, StateError, TostSurgeryError, TraceError

from .conftest import TinyNet, bernoulli_mask

ACTIVATIONS = (
    "module", "module_inplace", "shared_module", "functional", "functional_inplace", "torch", "torch_inplace",
    "method", "method_inplace", "inplace_then_reuse", "silu", "none",
)
STEPS = 4
PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@dataclass(frozen=True)
class Layer:
    out_channels: int
    kernel: int
    stride: int
    groups: int
    bias: bool
    norm: bool
    activation: str
    residual: bool
    twice: bool


class RandomNet(nn.Module):
    """A stack of conv(-norm)-activation layers described by ``layers``, then a linear head."""

    def __init__(self, layers: tuple[Layer, ...], classes: int = 3) -> None:
        super().__init__()
        self.layers = layers
        self.convs, self.norms, self.acts = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        channels = 3
        for layer in layers:
            self.convs.append(nn.Conv2d(channels, layer.out_channels, layer.kernel, layer.stride, layer.kernel // 2,
                                        groups=layer.groups, bias=layer.bias))
            self.norms.append(nn.BatchNorm2d(layer.out_channels) if layer.norm else nn.Identity())
            self.acts.append(nn.ReLU(inplace=layer.activation == "module_inplace"))
            channels = layer.out_channels
        self.shared = nn.ReLU()  # one module called at several sites
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = self.norms[i](self.convs[i](x))
            if layer.twice:
                h = self.norms[i](self.convs[i](h))
            h = self._activate(i, layer.activation, h)
            x = h + x if layer.residual else h
        return self.head(x.mean(dim=(2, 3)))

    def _activate(self, i: int, kind: str, h: torch.Tensor) -> torch.Tensor:
        if kind in ("module", "module_inplace"):
            return self.acts[i](h)
        if kind == "shared_module":
            return self.shared(h)
        if kind == "functional":
            return F.relu(h)
        if kind == "functional_inplace":
            return F.relu(h, inplace=True)
        if kind == "torch":
            return torch.relu(h)
        if kind == "torch_inplace":
            return torch.relu_(h)
        if kind == "method":
            return h.relu()
        if kind == "method_inplace":
            return h.relu_()
        if kind == "inplace_then_reuse":
            a = F.relu(h, inplace=True)  # h itself is now relu(h): the add reads it again
            return a + h
        if kind == "silu":
            return F.silu(h)
        return h


often = st.sampled_from([True, True, False])


@st.composite
def architectures(draw) -> tuple[Layer, ...]:
    layers, channels = [], 3
    for _ in range(draw(st.integers(1, 3))):
        out_channels = draw(st.sampled_from([channels, channels, 2, 4, 6]))
        stride = draw(st.sampled_from([1, 1, 2]))
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0 and out_channels % g == 0]))
        square = channels == out_channels and stride == 1
        layers.append(Layer(
            out_channels=out_channels,
            kernel=draw(st.sampled_from([1, 3])),
            stride=stride,
            groups=groups,
            bias=draw(st.booleans()),
            norm=draw(st.booleans()),
            activation=draw(st.sampled_from(ACTIVATIONS)),
            residual=square and draw(often),
            twice=square and draw(often),
        ))
        channels = out_channels
    return tuple(layers)


@st.composite
def masks_for(draw, model: nn.Module) -> dict[str, torch.Tensor]:
    """A mask over a random subset of parameters (at least one), at a random density."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    density = draw(st.sampled_from([0.05, 0.3, 0.5, 0.9, 1.0]))
    params = list(model.named_parameters())
    chosen = [name for name, p in params if draw(st.booleans()) or (p.dim() > 1 and draw(st.booleans()))]
    chosen = chosen or [params[0][0]]
    mask = {}
    for name, p in params:
        if name in chosen:
            m = torch.rand(p.shape, generator=generator) < density
            m.view(-1)[int(torch.randint(p.numel(), (1,), generator=generator))] = True
            mask[name] = m
    return mask


recipes = st.builds(
    Recipe.tost,
    total_steps=st.just(STEPS),
    warmup=st.sampled_from([0.25, 0.5, 1.0]),
    anneal=st.sampled_from(["linear", "cosine"]),
    ghost_neurons=often,
    soft_activation=st.sampled_from(["silu", "mish", "softplus", "gelu"]),
    ghost_skips=often,
    skip_branch=st.sampled_from(["conv_bn", "auto", "bn"]),
    rescale_init=st.booleans(),
    rescale_scope=st.sampled_from(["all", "unnormalized", "unnormalized_nonresidual"]),
)

OPTIMIZERS: dict[str, Callable] = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def build(layers: tuple[Layer, ...], seed: int = 0) -> RandomNet:
    torch.manual_seed(seed)
    return RandomNet(layers)


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def effective(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


def trainable(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


def plain_copy(model: RandomNet) -> RandomNet:
    """A fresh RandomNet holding the tensors of ``model`` as they act (masked weights masked)."""
    plain = RandomNet(model.layers)
    with torch.no_grad():
        for name, tensor in itertools.chain(plain.named_parameters(), plain.named_buffers()):
            tensor.copy_(effective(model, name))
    return plain


@PROPERTY_SETTINGS
@given(data=st.data(), layers=architectures(), recipe=recipes, optimizer=st.sampled_from(sorted(OPTIMIZERS)),
       autocast=st.booleans())
def test_prepare_train_retire_finalize_on_random_architectures(data, layers, recipe, optimizer, autocast) -> None:
    model = build(layers)
    mask = data.draw(masks_for(model))
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = {name: p for name, p in model.named_parameters()}

    tost.prepare(model, mask, recipe)
    rescaled = model.tost.surgery.decided.rescaled
    for name, value in before.items():  # 1. nothing but masking (and rescaling) happened
        now = effective(model, name).detach()
        if name not in mask:
            assert torch.equal(now, value), name
        elif name not in rescaled:
            assert torch.equal(now, value * mask[name]), name
        else:
            assert (now[~mask[name]] == 0).all() and torch.equal(now != 0, (value * mask[name]) != 0), name
        if name in objects:
            assert trainable(model, name) is objects[name], name

    opt = OPTIMIZERS[optimizer](model.parameters())
    tost.bind(model, opt)
    for step in range(STEPS):  # 2. masked weights stay exactly zero
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(inputs(step))
        loss = F.cross_entropy(out.float(), torch.arange(3), label_smoothing=tost.label_smoothing(model))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        for name, m in mask.items():
            assert (effective(model, name)[~m] == 0).all(), (step, name)
            assert (trainable(model, name)[~m] == 0).all(), (step, name)

    plain = plain_copy(model)  # 3. retired: the plain masked model, bit for bit
    x = inputs(99)
    with torch.no_grad():
        for mode in (True, False):
            model.train(mode)
            plain.train(mode)
            assert torch.equal(model(x), plain(x)), f"training={mode}"
        prepared_out = model(x)
        tost.finalize(model)
        assert torch.equal(model(x), prepared_out)
    assert type(model) is RandomNet and "forward" not in model.__dict__ and not hasattr(model, "tost")
    assert list(model.state_dict()) == keys
    assert {name: p for name, p in model.named_parameters()} == objects
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    fresh = RandomNet(layers).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


BAD_MASK_EDITS = {
    "unknown-name": lambda mask, name: mask.__setitem__(name + "_typo", mask.pop(name)),
    "wrong-shape": lambda mask, name: mask.__setitem__(name, torch.ones(*mask[name].shape, 2)),
    "not-binary": lambda mask, name: mask.__setitem__(name, torch.full(mask[name].shape, 0.5)),
    "empty-layer": lambda mask, name: mask.__setitem__(name, torch.zeros(mask[name].shape, dtype=torch.bool)),
    "not-a-tensor": lambda mask, name: mask.__setitem__(name, mask[name].tolist()),
}


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(data=st.data(), layers=architectures(), edit=st.sampled_from(sorted(BAD_MASK_EDITS)), recipe=recipes)
def test_a_bad_mask_on_a_random_architecture_changes_nothing(data, layers, edit, recipe) -> None:
    model = build(layers)
    mask = data.draw(masks_for(model))
    BAD_MASK_EDITS[edit](mask, data.draw(st.sampled_from(sorted(mask))))
    before = snapshot(model)
    with pytest.raises(MaskError):
        tost.prepare(model, mask, recipe)
    assert_unchanged(model, before)


# --- bad inputs that test_errors.py does not have -------------------------------------------------------------------


def snapshot(model: nn.Module) -> tuple:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [(name, type(m)) for name, m in model.named_modules()]
    return type(model), state, classes, set(model.__dict__), [id(p) for p in model.parameters()]


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values; for meta tensors, which hold none, the same shape and dtype."""
    return a.shape == b.shape and a.dtype == b.dtype and (a.is_meta and b.is_meta or torch.equal(a, b))


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    cls, state, classes, attributes, parameter_ids = before
    assert type(model) is cls
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(same_tensor(after[k], v) for k, v in state.items())
    assert [(name, type(m)) for name, m in model.named_modules()] == classes
    assert set(model.__dict__) == attributes and "forward" not in model.__dict__ and not hasattr(model, "tost")
    assert [id(p) for p in model.parameters()] == parameter_ids
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def replace(key: str, value: Callable[[], object]) -> Callable[[nn.Module], dict]:
    def make(model: nn.Module) -> dict:
        mask = bernoulli_mask(model)
        mask[key] = value()
        return mask

    return make


def on_meta() -> TinyNet:
    with torch.device("meta"):
        return TinyNet()


# (model factory, mask factory, prepare keyword arguments, error class, message pattern); the id names the case.
NEW_BAD_INPUTS = [
    pytest.param(TinyNet, replace("bn1.running_mean", lambda: torch.ones(8)), {}, MaskError,
                 "'bn1.running_mean' names no parameter of TinyNet", id="mask-names-a-buffer"),
    pytest.param(TinyNet, replace("fc", lambda: torch.ones(10, 16)), {}, MaskError,
                 "'fc' names no parameter", id="mask-names-a-module"),
    pytest.param(TinyNet, replace("note", lambda: "keep the head dense"), {}, MaskError,
                 "'note' names no parameter", id="mask-with-an-extra-string-entry"),
    pytest.param(TinyNet, replace("fc.weight", lambda: None), {}, MaskError,
                 "'fc.weight' must be a torch.Tensor, found NoneType", id="mask-value-none"),
    pytest.param(TinyNet, replace("fc.weight", lambda: "ones"), {}, MaskError,
                 "'fc.weight' must be a torch.Tensor, found str", id="mask-value-a-string"),
    pytest.param(TinyNet, lambda m: {"state_dict": bernoulli_mask(m)}, {}, MaskError,
                 "'state_dict' names no parameter", id="mask-nested-in-a-checkpoint-dict"),
    pytest.param(TinyNet, lambda m: torch.ones(10, 16), {}, MaskError, "A mask is a dict .* found Tensor",
                 id="mask-is-one-tensor"),
    pytest.param(TinyNet, lambda m: m, {}, MaskError, "A mask is a dict .* found TinyNet", id="mask-is-the-model"),
    pytest.param(TinyNet, replace("fc.weight", lambda: torch.tensor(True)), {}, MaskError,
                 r"'fc.weight' has the wrong shape.\n  expected: \(10, 16\)\n  found:    \(\)", id="mask-0-d-bool"),
    pytest.param(TinyNet, replace("fc.weight", lambda: -torch.zeros(10, 16)), {}, MaskError,
                 "'fc.weight' keeps no weight", id="mask-of-negative-zeros"),
    pytest.param(TinyNet, replace("fc.weight", lambda: -torch.ones(10, 16, dtype=torch.int8)), {}, MaskError,
                 "'fc.weight' is not binary: found the value -1", id="mask-int8-minus-one"),
    pytest.param(TinyNet, replace("fc.weight", lambda: torch.full((10, 16), float("inf"))), {}, MaskError,
                 "'fc.weight' is not binary: found the value inf", id="mask-of-inf"),
    pytest.param(TinyNet, bernoulli_mask, {"recipe": Recipe}, RecipeError,
                 "recipe must be a tost_surgery.Recipe, found type", id="recipe-class-not-instance"),
    pytest.param(TinyNet, bernoulli_mask, {"recipe": lambda: Recipe.tost(total_steps=10, warmup="0.3")}, RecipeError,
                 "warmup is a fraction of total_steps", id="recipe-warmup-a-string"),
    pytest.param(TinyNet, bernoulli_mask, {"recipe": lambda: Recipe.tost(total_steps=10, skip_init="1e-4")},
                 RecipeError, "skip_init must be a finite number.* found '1e-4'", id="recipe-skip-init-a-string"),
    pytest.param(TinyNet, bernoulli_mask, {"recipe": lambda: Recipe.tost(total_steps=10, label_smoothing="0.1")},
                 RecipeError, "label_smoothing must be in", id="recipe-label-smoothing-a-string"),
    pytest.param(TinyNet, bernoulli_mask, {"recipe": lambda: Recipe.tost(total_steps=10, soft_activation=None)},
                 RecipeError, "soft_activation must be one of", id="recipe-soft-activation-none"),
    # Once refused only by a torch error, or an error about the wrong thing.
    pytest.param(TinyNet, replace("fc.weight", lambda: torch.ones(10, 16, device="meta")), {}, MaskError,
                 "'fc.weight' is on the meta device", id="mask-on-meta-device"),
    pytest.param(TinyNet, replace("fc.weight", lambda: torch.ones(10, 16).to_sparse()), {}, MaskError,
                 "(?s)'fc.weight' must be a dense tensor, found layout torch.sparse_coo.*to_dense", id="mask-sparse"),
    pytest.param(TinyNet, replace("fc.weight", lambda: torch.nested.nested_tensor([torch.ones(16)] * 10)), {},
                 MaskError, "'fc.weight' must be a dense tensor", id="mask-nested-tensor",
                 marks=[pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")]),
    pytest.param(TinyNet, bernoulli_mask, {"leaf_modules": "fc"}, TraceError,
                 r"leaf_modules takes a list .* found the str 'fc'.\nHint: leaf_modules=\['fc'\]",
                 id="leaf-modules-str"),
    pytest.param(TinyNet, bernoulli_mask, {"leaf_modules": nn.Conv2d}, TraceError,
                 r"leaf_modules takes a list .* found the class Conv2d", id="leaf-modules-a-class"),
    pytest.param(on_meta, lambda m: bernoulli_mask(TinyNet()), {"recipe": lambda: Recipe.tost(total_steps=10)},
                 StateError, r"(?s)TinyNet has parameters on the meta device \('conv1.weight'\).*to_empty",
                 id="model-on-meta-device"),
    pytest.param(on_meta, lambda m: bernoulli_mask(TinyNet()), {}, StateError,
                 "TinyNet has parameters on the meta device", id="model-on-meta-device-baseline"),
    pytest.param(TinyNet, bernoulli_mask, {"recipe": lambda: Recipe.tost(total_steps=10, warmup=True)}, RecipeError,
                 "warmup is a fraction of total_steps in \\(0, 1\\], found True", id="recipe-warmup-true"),
    pytest.param(TinyNet, bernoulli_mask, {"recipe": lambda: Recipe.tost(total_steps=10, skip_init=True)},
                 RecipeError, "skip_init must be a finite number.* found True", id="recipe-skip-init-true"),
    pytest.param(TinyNet, bernoulli_mask, {"recipe": lambda: Recipe.tost(total_steps=10, label_smoothing=False)},
                 RecipeError, "label_smoothing must be in \\[0, 1\\), found False", id="recipe-label-smoothing-false"),
    pytest.param(TinyNet, bernoulli_mask, {"recipe": lambda: Recipe.tost(total_steps=10, skip_init=1e300)},
                 RecipeError, "skip_init must be a finite number.*float32, found 1e\\+300",
                 id="recipe-skip-init-1e300"),
]


@pytest.mark.parametrize(("make_model", "make_mask", "kwargs", "error", "message"), NEW_BAD_INPUTS)
def test_new_bad_inputs_are_refused_and_change_nothing(make_model, make_mask, kwargs, error, message) -> None:
    torch.manual_seed(0)
    model = make_model()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        mask = make_mask(model)
        kwargs = {k: v() if k == "recipe" and not isinstance(v, type) else v for k, v in kwargs.items()}
        tost.prepare(model, mask, **kwargs)
    assert_unchanged(model, before)
    assert issubclass(error, TostSurgeryError)


def test_prepare_under_inference_mode_is_refused() -> None:
    """Masks and ghost modules made there would be inference tensors: training fails later, far from the cause."""
    torch.manual_seed(0)
    model = TinyNet()
    before = snapshot(model)
    with torch.inference_mode(), pytest.raises(StateError, match=r"(?s)inference_mode.*Hint: call prepare outside"):
        tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=10))
    assert_unchanged(model, before)


def test_prepare_under_no_grad_is_fine() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=10))
    model(inputs().repeat(2, 1, 2, 2)).sum().backward()
    assert model.conv1.parametrizations.weight.original.grad is not None


# Odd masks that are fine: accepted, copied (never aliased), never trainable.
ODD_BUT_VALID = {
    "float16-zeros-and-ones": lambda: (torch.rand(10, 16) < 0.5).half(),
    "requires-grad": lambda: (torch.rand(10, 16) < 0.5).float().requires_grad_(),
    "an-nn-parameter": lambda: nn.Parameter((torch.rand(10, 16) < 0.5).float()),
    "expanded-stride-0": lambda: (torch.rand(1, 16) < 0.5).expand(10, 16),
    "uint8": lambda: (torch.rand(10, 16) < 0.5).to(torch.uint8),
    "int64": lambda: (torch.rand(10, 16) < 0.5).long(),
    "non-contiguous": lambda: (torch.rand(16, 10) < 0.5).t(),
}


@pytest.mark.parametrize("make", list(ODD_BUT_VALID.values()), ids=list(ODD_BUT_VALID))
def test_odd_but_valid_masks_are_copied_as_constants(make) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    value = make()
    expected = value.detach().bool().clone()
    tost.prepare(model, {"fc.weight": value}, Recipe.tost(total_steps=10))
    attached = model.fc.parametrizations.weight[0].mask
    assert torch.equal(attached.bool(), expected) and attached.dtype == torch.float32
    assert not attached.requires_grad and not isinstance(attached, nn.Parameter)
    assert attached.data_ptr() != value.data_ptr()
    assert all(not name.endswith("mask") for name, _ in model.named_parameters())
    if 0 not in value.stride():  # an expanded tensor cannot be written in place
        value.detach().zero_()
    assert torch.equal(attached.bool(), expected)  # the user's tensor is not the model's
