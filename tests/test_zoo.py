"""DESIGN.md invariants on real torchvision / timm architectures (2x3x32x32 inputs, no downloads).

- ``test_structure_and_retirement``: prepare is in place; ghost neuron / skip counts match an
  independent count; retired scaffolding leaves the plain masked model, bit for bit (inv. 1, 6, 7).
- ``test_baseline_matches_masked_reference``: masks only == hand-masked model, eval and train;
  dropout off in eval, on in train (inv. 8).
- ``test_finalize_exact_and_lifecycle``: finalize refuses early, is exact at the end, and hands back
  the original class, forward, state_dict keys and parameters (inv. 1, 4, 5).
- ``test_masks_stay_exact``: SGD/Adam/AdamW and bf16 autocast keep masked weights exactly zero;
  finalize(force=True) (inv. 3, 5).

Every model is built (and masked) once per test worker (``_pristine``) and deep-copied by each test,
so vgg11_bn (133M parameters) is built at most once per worker. Tests never mutate the cached copy.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

import tost_surgery as tost

pytestmark = pytest.mark.zoo

SPARSITY = 0.9


@dataclass(frozen=True)
class Spec:
    """One architecture and what an independent reading of it says the passes must find."""

    library: str
    build: Callable[[object], nn.Module]
    neurons: int
    """ReLU call sites (each becomes one ``torch.lerp`` ghost neuron)."""
    skips: int
    """Conv2d call sites (each gets one ``torch.addcmul`` ghost skip)."""
    dropout: bool
    """Whether train mode is stochastic (dropout with p > 0 somewhere)."""
    relu6: int = 0
    """ReLU6 call sites, ghost neurons only with ``Recipe(neuron_relu6=True)``."""
    pointwise: int = 0
    """Of the Conv2d call sites, the 1x1 ``groups=1`` ones: ghost skips only with ``skip_pointwise=True``."""


# The expected counts are derived by hand from each architecture; the test also re-derives them
# by hooking an eager forward (``_eager_counts``), so the hand numbers and the hooks must agree.
SPECS: dict[str, Spec] = {
    # BasicBlock x 8: stem conv + 2 convs per block + 3 downsample 1x1 convs = 20 Conv2d (3 pointwise);
    # ReLU: stem + 2 calls of each block's (shared) self.relu = 17.
    "tv_resnet18": Spec("torchvision", lambda tv: tv.models.resnet18(weights=None), 17, 20, False, pointwise=3),
    # ReLU6 everywhere, no ReLU: 0 ghost neurons by default. Conv2d: stem 1 + first block (t=1:
    # depthwise, project) 2 + 16 blocks x (expand, depthwise, project) 48 + final 1x1 1 = 52.
    # ReLU6 (ghosted with neuron_relu6=True): stem 1 + first block 1 + 16 x (expand, dw) 32 + final 1 = 35.
    # Pointwise: first block's project 1 + 16 x (expand, project) 32 + final 1 = 34.
    # The classifier has nn.Dropout(0.2).
    "tv_mobilenet_v2": Spec("torchvision", lambda tv: tv.models.mobilenet_v2(weights=None), 0, 52, True, 35, 34),
    # 8 conv-BN-ReLU in features + 2 ReLU in the classifier = 10 ReLU; 8 Conv2d. nn.Dropout(0.5) x 2.
    "tv_vgg11_bn": Spec("torchvision", lambda tv: tv.models.vgg11_bn(weights=None), 10, 8, True),
    # Same layout as torchvision's resnet18 (act_layer nn.ReLU, conv+BN downsample).
    "timm_resnet18": Spec(
        "timm", lambda timm: timm.create_model("resnet18", pretrained=False), 17, 20, False, pointwise=3
    ),
    # SiLU everywhere -> 0 ReLU. Conv2d: stem 1 + DepthwiseSeparable (dw, se.reduce, se.expand, pw) 4
    # + 15 InvertedResidual x (pw, dw, se.reduce, se.expand, pwl) 75 + conv_head 1 = 81; all but the
    # stem and the 16 depthwise convs are pointwise: 3 + 15 x 4 + 1 = 64.
    # drop_rate=0.5: timm's forward_head calls F.dropout(training=self.training), baked in by tracing.
    "timm_efficientnet_b0": Spec(
        "timm",
        lambda timm: timm.create_model("efficientnet_b0", pretrained=False, drop_rate=0.5),
        0,
        81,
        True,
        pointwise=64,
    ),
    # GELU -> 0 ReLU. Conv2d: stem 1 + 3 downsample + 12 blocks x (conv_dw + conv_mlp fc1, fc2: atto
    # uses conv_mlp=True, so its MLP is two 1x1 convs) 36 = 40, of which 24 pointwise (the MLPs).
    "timm_convnext_atto": Spec(
        "timm", lambda timm: timm.create_model("convnext_atto", pretrained=False), 0, 40, False, pointwise=24
    ),
    # GELU -> 0 ReLU; the only Conv2d is patch_embed.proj. attn_drop_rate makes the fused attention's
    # dropout_p depend on self.training (baked in by tracing), drop_rate adds the head's nn.Dropout.
    "timm_vit_tiny": Spec(
        "timm",
        lambda timm: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, drop_rate=0.5, attn_drop_rate=0.5
        ),
        0,
        1,
        True,
    ),
}
NAMES = list(SPECS)


def _library(spec: Spec) -> object:
    return pytest.importorskip(spec.library)


def _build(name: str) -> nn.Module:
    """A fresh, deterministic instance of the architecture (a new object, new parameters)."""
    spec = SPECS[name]
    library = _library(spec)
    torch.manual_seed(0)
    return spec.build(library)


@functools.cache
def _pristine(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Cached per worker: the model (weights unmasked) and its ERK mask. Never mutate; deep-copy.

    Its BatchNorm running statistics are those of the *masked* network on random images: with
    fresh statistics (mean 0, var 1) a 90%-sparse network's eval output vanishes with depth
    (mobilenet_v2: 5e-15, efficientnet_b0: 3e-13, vgg11_bn: 6e-5), and every "same output" check
    in eval mode would pass for any model.
    """
    model = _build(name)
    big = sum(p.numel() for p in model.parameters()) > 50_000_000
    mask = _erk_mask_fast(model) if big else tost.masks.erk(model, sparsity=SPARSITY, seed=0)
    _calibrate_batch_norms(model, _masked_reference(model, mask))
    return model, mask


def _erk_mask_fast(model: nn.Module) -> dict[str, torch.Tensor]:
    """ERK layer densities (the library's), each weight kept with that probability.

    ``tost.masks.erk`` draws exact counts with a randperm: 7 s for vgg11_bn's 103M-weight layer on
    this machine, per worker. Bernoulli draws take a fraction of that, and any mask will do here.
    """
    weights = tost.masks.prunable_weights(model)
    densities = tost.masks.erk_densities({n: tuple(w.shape) for n, w in weights.items()}, 1.0 - SPARSITY)
    generator = torch.Generator().manual_seed(0)
    mask = {}
    for name, weight in weights.items():
        keep = torch.rand(weight.shape, generator=generator) < densities[name]
        keep.view(-1)[0] = True  # a layer may not be emptied
        mask[name] = keep
    return mask


def _calibrate_batch_norms(model: nn.Module, masked: nn.Module) -> None:
    """Give ``model`` the BatchNorm statistics ``masked`` has on a few random batches."""
    norms = [m for m in masked.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    generator = torch.Generator().manual_seed(2)
    masked.train()
    with torch.no_grad():
        for _ in range(4):
            masked(torch.randn(8, 3, 32, 32, generator=generator))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    with torch.no_grad():
        for (key, mine), (other, theirs) in zip(model.named_buffers(), masked.named_buffers()):
            assert key == other
            mine.copy_(theirs)


@pytest.fixture(params=NAMES)
def zoo(request: pytest.FixtureRequest) -> tuple[str, nn.Module, dict[str, torch.Tensor]]:
    """(name, a private copy of the pristine model, the mask)."""
    name = request.param
    _library(SPECS[name])
    pristine, mask = _pristine(name)
    torch.manual_seed(0)
    return name, copy.deepcopy(pristine), mask


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def y() -> torch.Tensor:
    return torch.tensor([3, 7])


# ---------------------------------------------------------------------------------------------
# helpers


class _ActivationCalls(TorchFunctionMode):
    """Counts ReLU and ReLU6 applications in eager code, however they are spelled.

    A mode sees the outermost overridable call only (it is disabled inside its own handler), so
    ``nn.ReLU`` -> ``F.relu`` -> ``torch.relu_`` counts once. ``nn.ReLU6`` calls
    ``F.hardtanh(x, 0.0, 6.0)``, which reaches the mode with its bounds as keywords.
    """

    RELU = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})

    def __init__(self) -> None:
        super().__init__()
        self.relu = self.relu6 = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.RELU:
            self.relu += 1
        elif func is F.relu6 or (func is F.hardtanh and self._bounds(args, kwargs) == (0.0, 6.0)):
            self.relu6 += 1
        return func(*args, **kwargs)

    @staticmethod
    def _bounds(args: tuple, kwargs: dict) -> tuple[float, float]:
        """hardtanh's (min_val, max_val), passed by position or (through the override) by name."""
        bounds = dict(zip(("min_val", "max_val"), args[1:3]), **kwargs)
        return bounds.get("min_val", -1.0), bounds.get("max_val", 1.0)


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return tuple(conv.kernel_size) == (1, 1) and conv.groups == 1


def _eager_counts(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(ReLU calls, ReLU6 calls, Conv2d calls, distinct Conv2d modules called, and both again for the
    pointwise convs) of one eager eval forward."""
    called: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda m, i, o: called.append(m)) for m in model.modules() if isinstance(m, nn.Conv2d)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), _ActivationCalls() as activations:
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    pointwise = [m for m in called if _is_pointwise(m)]
    return (
        activations.relu,
        activations.relu6,
        len(called),
        len({id(m) for m in called}),
        len(pointwise),
        len({id(m) for m in pointwise}),
    )


def _prepare_traced(model: nn.Module, mask: dict[str, torch.Tensor], recipe: tost.Recipe) -> nn.Module:
    """prepare, requiring that the whole model was traced (no block kept whole, no eager fallback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", tost.TostSurgeryWarning)
        return tost.prepare(model, mask, recipe=recipe)


def _ghost_counts(model: nn.Module, training: bool) -> tuple[int, int]:
    """(ghost neurons, ghost skips) in the prepared model's graph of one mode."""
    nodes = list(tost.graph(model, training=training).graph.nodes)
    lerps = [n for n in nodes if n.op == "call_function" and n.target is torch.lerp]
    addcmuls = [n for n in nodes if n.op == "call_function" and n.target is torch.addcmul]
    assert all(n.meta.get("tost") == "neurons" for n in lerps)
    assert all(n.meta.get("tost") == "skips" for n in addcmuls)
    return len(lerps), len(addcmuls)


def _tagged_nodes(model: nn.Module, training: bool) -> list[str]:
    return [n.name for n in tost.graph(model, training=training).graph.nodes if "tost" in n.meta]


def _masked_reference(model: nn.Module, mask: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of ``model`` whose masked weights are zeroed by hand."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in mask.items():
            reference.get_parameter(name).mul_(m)
    return reference


def _effective(model: nn.Module, key: str) -> torch.Tensor:
    """``model``'s tensor under an original state_dict key; parametrized weights come out masked."""
    module_name, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


def _reference_like(pristine: nn.Module, prepared: nn.Module) -> nn.Module:
    """A plain model of the original class holding the prepared model's effective state."""
    reference = copy.deepcopy(pristine)
    with torch.no_grad():
        reference.load_state_dict({k: _effective(prepared, k).detach().clone() for k in reference.state_dict()})
    return reference


def _assert_masked_zero(model: nn.Module, mask: dict[str, torch.Tensor], where: str) -> None:
    """The effective weight is exactly zero (no tolerance) wherever the mask is 0."""
    for name, m in mask.items():
        with torch.no_grad():
            weight = _effective(model, name)
            assert weight.shape == m.shape
            leaked = weight.ne(0).logical_and_(m.logical_not())  # a cheap test first: vgg has 100M weights
        if bool(leaked.any()):
            pytest.fail(f"{where}: {name} has {int(leaked.sum())} nonzero weights where the mask is 0")


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6) -> None:
    """``max |actual - expected| <= rel * max |expected|``, on a non-degenerate, finite output."""
    assert torch.isfinite(expected).all() and torch.isfinite(actual).all()
    assert actual.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 1e-3, f"degenerate output (max |y| = {scale:.3g}): the comparison would prove nothing"
    diff = float((actual - expected).abs().max())
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel:g} * {scale:.3g}"


def _eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _train_out(model: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    model.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step, gradients clipped to norm 1.

    Why clip: at batch 2 BatchNorm sees 2 values per channel in the pooled (1x1) stages, and a ghost
    skip's branch (1x1 conv filled with 1e-4, then its own BatchNorm) is scale invariant, so its
    gradient is ~1/1e-4 times a normal one. Unclipped, one SGD step (lr 0.01, momentum 0.9) moves
    those weights by orders of magnitude while the branch BatchNorm's running stats lag, and
    efficientnet_b0's eval output overflows to NaN after two steps: every equality below would be
    vacuous. None of the invariants tested here depends on the size of a step.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out, y, label_smoothing=tost.label_smoothing(model))
    assert torch.isfinite(loss)
    loss.backward()  # under autocast too, as AMP recipes do
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def _assert_plain(model: nn.Module, cls: type, keys: list[str], param_ids: list[tuple[str, int]]) -> None:
    """Lifecycle invariants of a finalized model."""
    assert type(model) is cls
    assert not hasattr(model, "tost")
    assert "forward" not in model.__dict__
    assert model.forward.__func__ is cls.forward
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert list(model.state_dict().keys()) == keys
    assert [(n, id(p)) for n, p in model.named_parameters()] == param_ids
    assert all(type(p) is nn.Parameter for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# 1. structure, 2b. retirement


def test_structure_and_retirement(zoo, x):
    name, model, mask = zoo
    spec = SPECS[name]
    cls = type(model)
    pristine = _pristine(name)[0]  # read only (hooks are removed, flags restored)
    relu_calls, relu6_calls, conv_calls, conv_modules, pointwise_calls, pointwise_modules = _eager_counts(pristine, x)
    # The hand-derived counts (SPECS) and the hooks of an eager forward agree.
    assert (relu_calls, relu6_calls, conv_calls, pointwise_calls) == (
        spec.neurons,
        spec.relu6,
        spec.skips,
        spec.pointwise,
    )
    if name in ("tv_resnet18", "timm_resnet18"):
        assert (spec.neurons, spec.skips) == (17, 20)

    own_params = {id(p) for p in model.parameters()}
    modules = list(model.modules())
    flags = [m.training for m in modules]

    prepared = _prepare_traced(model, mask, tost.Recipe.tost(total_steps=4, skip_pointwise=True))  # every site
    assert prepared is model
    assert type(model) is cls and isinstance(model, cls)
    assert [m.training for m in modules] == flags  # tracing in both modes left the flags alone
    for training in (True, False):
        assert _ghost_counts(model, training) == (spec.neurons, spec.skips), f"training={training}"
    # One ghost module per conv module. The model keeps its own parameters (no
    # copies), and every parameter prepare added lives under model.tost.
    assert len(model.tost.skips) == conv_modules
    params_now = {id(p) for p in model.parameters()}
    scaffold = {id(p) for p in model.tost.parameters()}
    assert own_params <= params_now
    assert params_now - own_params == scaffold and scaffold

    out0 = _eval_out(model, x)
    assert out0.shape == _eval_out(pristine, x).shape and torch.isfinite(out0).all()

    tost.step(model, 4)
    for training in (True, False):
        assert _tagged_nodes(model, training) == [], f"training={training}"
    _assert_masked_zero(model, mask, "after retirement")
    # Retired scaffolding contributes nothing: the output is the plain model's with the same
    # effective weights, bit for bit. The effective weights are the hand-masked ones, except that
    # Recipe.tost's rescaled init (LRsI) multiplied the surviving weights of layers feeding no norm;
    # everything the mask does not cover is untouched.
    reference = _reference_like(pristine, model)
    untouched = pristine.state_dict()
    for key, value in reference.state_dict().items():
        if key not in mask:
            assert torch.equal(value, untouched[key]), key
    expected = _eval_out(reference, x)
    _assert_same(_eval_out(model, x), expected)
    torch.testing.assert_close(_eval_out(model, x), expected, rtol=0, atol=0)  # in fact bit for bit

    # The default recipe leaves the pointwise convs without a branch (it would be a dense copy of the layer).
    default = _prepare_traced(copy.deepcopy(pristine), mask, tost.Recipe.tost(total_steps=4))
    for training in (True, False):
        assert _ghost_counts(default, training) == (spec.neurons, spec.skips - spec.pointwise)
    assert len(default.tost.skips) == conv_modules - pointwise_modules

    if spec.relu6:
        # Opt-in: ReLU6 sites become ghost neurons too (lerp of soft(x) and relu6(x)).
        relu6_model = _prepare_traced(copy.deepcopy(pristine), mask, tost.Recipe.tost(total_steps=4, neuron_relu6=True))
        for training in (True, False):
            assert _ghost_counts(relu6_model, training) == (spec.neurons + spec.relu6, spec.skips - spec.pointwise)


# ---------------------------------------------------------------------------------------------
# 2a. baseline numerics, 6. train/eval


def test_baseline_matches_masked_reference(zoo, x):
    name, model, mask = zoo
    reference = _masked_reference(model, mask)
    _prepare_traced(model, mask, tost.Recipe.baseline())
    for training in (True, False):
        assert _tagged_nodes(model, training) == []

    _assert_same(_eval_out(model, x), _eval_out(reference, x))
    # Train mode: BatchNorm uses batch statistics and updates its running ones; dropout draws from
    # the global RNG. One forward each from identical states and seeds.
    _assert_same(_train_out(model, x), _train_out(reference, x))
    buffers = dict(model.named_buffers())
    for key, value in reference.named_buffers():
        torch.testing.assert_close(buffers[key], value, rtol=1e-6, atol=1e-6, msg=f"buffer {key}")

    if SPECS[name].dropout:
        # Dropout is off in eval (same output as the reference, checked above, and repeatable)
        # and on in train (two calls in a row differ).
        assert torch.equal(_eval_out(model, x), _eval_out(model, x))
        first = _train_out(model, x, seed=1)
        with torch.no_grad():
            second = model(x)
        assert not torch.equal(first, second)


# ---------------------------------------------------------------------------------------------
# 3. finalize exact, 4. lifecycle, 7. original forward


def test_finalize_exact_and_lifecycle(zoo, x, y):
    name, model, mask = zoo
    cls = type(model)
    keys = list(model.state_dict().keys())
    param_ids = [(n, id(p)) for n, p in model.named_parameters()]

    _prepare_traced(model, mask, tost.Recipe.tost(total_steps=10))  # warm-up: 3 steps
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tost.bind(model, optimizer)
    torch.manual_seed(0)
    for _ in range(2):
        _train_step(model, optimizer, x, y)
    assert _tagged_nodes(model, True), "the scaffolding should still be there after 2 of 3 warm-up steps"
    assert int(model.state_dict()["tost.schedule.step"]) == 2  # bind counted the optimizer steps

    with pytest.raises(tost.StateError, match="annealing"):
        tost.finalize(model)
    assert isinstance(model.tost, nn.Module)  # refused: nothing was undone
    assert all(parametrize.is_parametrized(model.get_submodule(n.rpartition(".")[0])) for n in mask)

    tost.step(model, 8)
    before = _eval_out(model, x)
    assert tost.finalize(model) is model
    after = _eval_out(model, x)
    _assert_same(after, before)  # max abs diff <= 1e-6 * scale

    _assert_plain(model, cls, keys, param_ids)
    _assert_masked_zero(model, mask, "after finalize")

    fresh = _build(name)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(_eval_out(fresh, x), after, rtol=0, atol=0)

    # The class's own forward runs again, in both modes, with autograd.
    model.train()
    model(x).sum().backward()
    assert torch.isfinite(_eval_out(model, x)).all()


# ---------------------------------------------------------------------------------------------
# 5. masks stay exact under optimizers and AMP; finalize(force=True)


OPTIMIZERS: dict[str, Callable] = {
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def test_masks_stay_exact(zoo, x, y):
    """Every optimizer on one prepared model, one after the other: vgg11_bn is prepared once."""
    name, model, mask = zoo
    cls = type(model)
    keys = list(model.state_dict().keys())
    param_ids = [(n, id(p)) for n, p in model.named_parameters()]
    # A long run: the scaffolding stays in the graph and trains along.
    _prepare_traced(model, mask, tost.Recipe.tost(total_steps=1000))
    _assert_masked_zero(model, mask, "after prepare")
    torch.manual_seed(0)
    for label, make in OPTIMIZERS.items():
        optimizer = make(model.parameters())
        for step in range(2):
            _train_step(model, optimizer, x, y)
            tost.step(model)
            _assert_masked_zero(model, mask, f"{label} step {step}")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _train_step(model, optimizer, x, y)
    _assert_masked_zero(model, mask, "bf16 autocast step")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert _tagged_nodes(model, True), "scaffolding should still be annealing"

    with pytest.raises(tost.StateError):
        tost.finalize(model)
    assert tost.finalize(model, force=True) is model
    _assert_plain(model, cls, keys, param_ids)
    _assert_masked_zero(model, mask, "after finalize(force=True)")
    assert torch.isfinite(_eval_out(model, x)).all()
    assert torch.isfinite(_train_out(model, x)).all()
