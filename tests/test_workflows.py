"""Real training workflows: EMA and averaged copies, tied weights, any forward signature, writes after prepare."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

import tost_surgery as tost
from tost_surgery import MaskError, Recipe

from .conftest import TinyNet, bernoulli_mask, masked_reference

STEPS = 6  # warm-up 0.5: the scaffolding retires after 3 optimizer steps


def batches(count: int = STEPS + 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 10, (4,), generator=generator))
            for _ in range(count)]


def prepared_tiny() -> tuple[TinyNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyNet()
    tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=STEPS, warmup=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tost.bind(model, optimizer)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    loss = F.cross_entropy(model(x), y, label_smoothing=tost.label_smoothing(model))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def copy_loop(ema: nn.Module, model: nn.Module) -> None:
    with torch.no_grad():
        for target, source in zip(ema.state_dict().values(), model.state_dict().values()):
            target.copy_(source)


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# --- 1. copies of the state follow the schedule --------------------------------------------------


def _timm_ema_v3(model: nn.Module):
    timm_utils = pytest.importorskip("timm.utils")
    ema = timm_utils.ModelEmaV3(model, decay=0.0)
    return ema.module, lambda: ema.update(model)


def _copy_loop_ema(model: nn.Module):
    ema = copy.deepcopy(model)
    return ema, lambda: copy_loop(ema, model)


def _averaged(model: nn.Module):
    averaged = AveragedModel(model, use_buffers=False)
    return averaged.module, lambda: averaged.update_parameters(model)


@pytest.mark.parametrize("make_copy", [_timm_ema_v3, _copy_loop_ema, _averaged], ids=["ModelEmaV3", "copy_", "swa"])
def test_a_copy_of_the_state_follows_the_schedule(make_copy) -> None:
    model, optimizer = prepared_tiny()
    ema, update = make_copy(model)
    data = batches()
    probe = data[-1][0]
    for x, y in data[:-1]:
        train_step(model, optimizer, x, y)
        update()
        if make_copy is _averaged:
            # SWA keeps a running mean of the weights: equal to the model's only in its schedule
            assert ema.tost.schedule.steps_taken == model.tost.schedule.steps_taken
            assert ema.tost.surgery.pending() == model.tost.surgery.pending()
            continue
        torch.testing.assert_close(eval_out(ema, probe), eval_out(model, probe), atol=1e-6, rtol=0)
    assert model.tost.surgery.runner.active == frozenset() and ema.tost.schedule.steps_taken == STEPS + 1
    ema(probe)
    assert ema.tost.surgery.runner.active == frozenset()  # retired, so it runs at the masked model's speed
    expected = eval_out(ema, probe)
    tost.finalize(ema)
    torch.testing.assert_close(eval_out(ema, probe), expected, atol=1e-6, rtol=0)
    train_step(model, optimizer, *data[0])  # the original model is still bound and prepared
    assert model.tost.schedule.steps_taken == STEPS + 2


def test_averaged_model_with_buffers_averages_the_step_too() -> None:
    """AveragedModel(use_buffers=True) averages every buffer, the step included (see docs/guide.md)."""
    model, optimizer = prepared_tiny()
    data = batches()
    train_step(model, optimizer, *data[0])
    averaged = AveragedModel(model, use_buffers=True)  # first update copies, later ones average
    for x, y in data[1:5]:
        train_step(model, optimizer, x, y)
        averaged.update_parameters(model)
    mask = averaged.module.conv2.parametrizations.weight[0].mask
    assert torch.equal(mask, model.conv2.parametrizations.weight[0].mask)  # 0/1 masks average to themselves
    assert averaged.module.tost.schedule.steps_taken < model.tost.schedule.steps_taken
    averaged.module(data[0][0])
    assert averaged.module.tost.surgery.runner.active == averaged.module.tost.surgery.pending()


def test_deepcopy_of_a_bound_model_is_not_bound() -> None:
    model, optimizer = prepared_tiny()
    clone = copy.deepcopy(model)
    assert dict(clone.tost.surgery.bindings) == {}
    tost.step(clone, STEPS)
    tost.finalize(clone)  # must not unbind the original's optimizer
    train_step(model, optimizer, *batches()[0])
    assert model.tost.schedule.steps_taken == 1


def test_loading_a_state_into_a_copy_retires_and_restores() -> None:
    model, optimizer = prepared_tiny()
    ema = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    for x, y in batches()[:4]:
        train_step(model, optimizer, x, y)
    copy_loop(ema, model)
    ema(batches()[0][0])
    assert ema.tost.surgery.runner.active == frozenset()
    with torch.no_grad():
        ema.tost.schedule.step.copy_(start["tost.schedule.step"])  # back to step 0 by hand
    ema(batches()[0][0])
    assert ema.tost.surgery.runner.active == {"neurons", "skips"}


# --- 2. tied weights --------------------------------------------------------------------------------


class TiedLM(nn.Module):
    """An embedding and an LM head that share one weight."""

    def __init__(self, vocab: int = 24, width: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.embed(tokens))))


class TwoLinearsOneWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_a_tied_weight_is_one_masked_tensor_in_every_use() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    mask = tost.masks.erk(model, 0.5, seed=0)
    assert "head.weight" in mask and "embed.weight" not in mask  # erk masks the Linear, the Embedding shares it
    tost.prepare(model, mask, Recipe.tost(total_steps=4, warmup=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    tost.bind(model, optimizer)
    tokens = torch.randint(0, 24, (5, 7), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    dropped = ~mask["head.weight"]
    assert (model.embed.weight.detach()[dropped] == 0).all() and (model.head.weight.detach()[dropped] == 0).all()
    before = eval_out(model, tokens)
    tost.finalize(model)
    assert model.head.weight is model.embed.weight  # still tied
    assert (model.embed.weight.detach()[dropped] == 0).all()
    torch.testing.assert_close(eval_out(model, tokens), before, atol=1e-6, rtol=0)
    assert list(model.state_dict()) == list(TiedLM().state_dict())


@pytest.mark.parametrize("maker", ["erk", "random", "magnitude"])
def test_mask_makers_give_a_shared_weight_one_entry(maker) -> None:
    torch.manual_seed(0)
    model = TwoLinearsOneWeight()
    make = getattr(tost.masks, maker)
    mask = make(model, 0.5, **({"seed": 0} if maker != "magnitude" else {}))
    assert sorted(mask) == ["a.weight"]
    x = torch.randn(3, 8)
    expected = masked_reference(model, {"a.weight": mask["a.weight"]})
    expected.b.weight = expected.a.weight
    tost.prepare(model, mask)
    torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)


def test_a_tied_weight_named_twice_with_one_mask_is_accepted() -> None:
    torch.manual_seed(0)
    model = TwoLinearsOneWeight()
    m = torch.rand(8, 8) > 0.5
    tost.prepare(model, {"a.weight": m, "b.weight": m.clone()})
    assert len(model.tost.surgery.decided.entries) == 1
    assert torch.equal(model.b.weight != 0, m & (model.b.parametrizations.weight.original != 0))


# --- 3. any forward signature -----------------------------------------------------------------------


class Flags(nn.Module):
    """Arguments of every kind: a bool flag, an optional tensor, a keyword-only scale, *args, **kwargs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x, return_features: bool = False, bias=None, *extra, scale: float = 1.0, **options):
        features = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        if bias is not None:
            features = features + bias
        for more in extra:
            features = features + more.mean()
        if options.get("double"):
            features = features * 2
        if "offset" in options:
            features = features + options["offset"]
        out = self.fc(features) * scale
        return (out, features) if return_features else out


CALLS = [
    ("positional", lambda x: ((x,), {})),
    ("bool-flag", lambda x: ((x, True), {})),
    ("flag-by-keyword", lambda x: ((x,), {"return_features": True})),
    ("optional-tensor", lambda x: ((x, False, torch.ones(4)), {})),
    ("varargs", lambda x: ((x, False, None, torch.ones(2), torch.full((3,), 2.0)), {})),
    ("keyword-only", lambda x: ((x,), {"scale": 0.5})),
    ("kwargs-flag", lambda x: ((x,), {"double": True})),
    ("kwargs-tensor", lambda x: ((x,), {"offset": torch.arange(4.0)})),
]


@pytest.mark.parametrize("recipe", ["baseline", "retired"])
def test_every_argument_kind_equals_the_hand_masked_model(recipe) -> None:
    torch.manual_seed(0)
    model = Flags()
    mask = bernoulli_mask(model)
    reference = masked_reference(model, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tost.TostSurgeryWarning)  # traced, not run eagerly
        tost.prepare(model, mask, Recipe.baseline() if recipe == "baseline" else Recipe.tost(2, rescale_init=False))
    assert tost.graph(model) is not None
    if recipe == "retired":
        tost.step(model, 2)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for mode in (True, False):
        model.train(mode)
        reference.train(mode)
        for name, make in CALLS:
            args, kwargs = make(x)
            torch.testing.assert_close(model(*args, **kwargs), reference(*args, **kwargs), rtol=0, atol=0, msg=name)


def test_a_flag_runs_the_scaffolded_graph_of_its_own_value() -> None:
    torch.manual_seed(0)
    model = Flags()
    tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=10))
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    out, features = model(x, True)
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    assert any("tost" in str(n.target) for n in tost.graph(model).graph.nodes)
    keys = {(method, layout) for method, layout in model.tost.surgery.runner.variants}
    assert len(keys) == 2  # one graph per value of the flag


def test_a_value_the_tracer_cannot_follow_is_a_clear_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, gate=None):
            return self.fc(x) if gate is None or bool(gate.sum() > 0) else -self.fc(x)

    torch.manual_seed(0)
    model = Branchy()
    tost.prepare(model, {"fc.weight": torch.rand(4, 4) > 0.5})
    with pytest.raises(tost.TraceError, match=r"Branchy.forward cannot be traced for a call with x=<input>, "
                                              r"gate=<input>.*\nHint: pass leaf_modules"):
        model(torch.randn(2, 4), torch.ones(1))


def test_timm_feature_and_head_methods_run_the_rewritten_network() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    tost.prepare(model, tost.masks.erk(model, 0.9, seed=0), Recipe.tost(total_steps=10))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        whole = model(x)
        split = model.forward_head(model.forward_features(x))
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=0)
    assert pre.shape == (2, 512)
    tost.finalize(model, force=True)
    assert not {"forward", "forward_features", "forward_head"} & set(model.__dict__)


def test_a_method_the_user_names_runs_the_rewritten_network() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def embed(self, x):
            return F.relu(self.conv(x)).mean(dim=(2, 3))

        def forward(self, x):
            return self.fc(self.embed(x))

    torch.manual_seed(0)
    model = TwoHeads()
    tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=10), methods=["embed"])
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.fc(model.embed(x)), model(x), rtol=0, atol=0)
    with pytest.raises(tost.TostSurgeryError, match="methods names 'embedd', which is no method of TwoHeads. "
                                                     "Did you mean 'embed'"):
        tost.prepare(TwoHeads(), bernoulli_mask(model), methods=["embedd"])


# --- 4. writes after prepare --------------------------------------------------------------------------


def test_in_place_writes_after_prepare_reach_the_trainable_weight(tiny, images) -> None:
    mask = bernoulli_mask(tiny)
    tost.prepare(tiny, mask)
    kept = mask["conv1.weight"]
    nn.init.ones_(tiny.conv1.weight)
    assert torch.equal(tiny.conv1.weight.detach(), kept.float())
    tiny.conv1.weight.data.mul_(3)
    with torch.no_grad():
        tiny.conv1.weight[0] = 5.0
        tiny.conv1.weight.mul_(2)
    expected = kept.float() * 6
    expected[0] = 10.0 * kept[0]
    assert torch.equal(tiny.conv1.weight.detach(), expected)
    reference = copy.deepcopy(tiny)
    tost.finalize(tiny)
    assert torch.equal(tiny.conv1.weight.detach(), expected)
    torch.testing.assert_close(tiny(images), reference(images), rtol=0, atol=0)


def test_a_masked_weight_read_from_outside_is_plain_to_save_and_compute(tiny, images, tmp_path) -> None:
    mask = bernoulli_mask(tiny)
    tost.prepare(tiny, mask)
    weight = tiny.fc.weight
    torch.save({"w": weight}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)["w"]
    assert type(loaded) is torch.Tensor and torch.equal(loaded, weight.detach())
    out = F.linear(torch.ones(2, 16), weight)
    assert type(out) is torch.Tensor
    (out.sum()).backward()
    grad = tiny.fc.parametrizations.weight.original.grad
    assert torch.equal(grad != 0, mask["fc.weight"])


def test_nan_at_masked_positions_never_reaches_the_effective_weight(tiny, images) -> None:
    mask = bernoulli_mask(tiny)
    tost.prepare(tiny, mask)
    original = tiny.conv2.parametrizations.weight.original
    with torch.no_grad():
        original[~mask["conv2.weight"]] = float("nan")
    assert torch.isfinite(tiny.conv2.weight).all()
    out = tiny(images)
    assert torch.isfinite(out).all()
    weight = tiny.conv2.weight
    weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    F.conv2d(torch.ones(1, 8, 4, 4), weight).sum().backward()
    assert (original.grad[~mask["conv2.weight"]] == 0).all()
    tost.finalize(tiny)
    assert (tiny.conv2.weight.detach()[~mask["conv2.weight"]] == 0).all()


# --- 6. messages -------------------------------------------------------------------------------------------


def test_a_module_name_as_mask_key_suggests_its_weight(tiny) -> None:
    with pytest.raises(MaskError, match="Mask key 'conv1' names no parameter of TinyNet. Did you mean 'conv1.weight'"):
        tost.prepare(tiny, {"conv1": torch.ones(8, 3, 3, 3)})


@pytest.mark.parametrize("sparsity", [np.float32(0.9), np.float64(0.9), torch.tensor(0.9), torch.tensor([0.9])])
def test_sparsity_as_numpy_or_tensor_scalar(tiny, sparsity) -> None:
    mask = tost.masks.erk(tiny, sparsity, seed=0)
    assert mask.keys() == tost.masks.erk(tiny, 0.9, seed=0).keys()


def test_swapped_snip_arguments_say_what_was_found(tiny, images) -> None:
    batch = [(images, torch.zeros(4, dtype=torch.long))]
    with pytest.raises(MaskError, match=r"sparsity is .* found a list\.\nHint: .*order of the arguments") as info:
        tost.masks.snip(tiny, batch, 0.95)
    assert "tensor(" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_mask_has_the_multiplys_first_and_second_derivatives(dtype) -> None:
    from tost_surgery._masking import MaskParametrization

    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 5, generator=generator) < 0.5
    weight = torch.randn(6, 5, generator=generator).to(dtype).requires_grad_(True)
    masking = MaskParametrization(mask.to(dtype))

    def second_order(masked):
        grad, = torch.autograd.grad((masked(weight) ** 3).sum(), weight, create_graph=True)
        return grad, torch.autograd.grad((grad**2).sum(), weight)[0]

    from tost_surgery._write_through import plain_reads

    with plain_reads:
        ours = second_order(masking)
    reference = second_order(lambda w: w * mask.to(dtype))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
