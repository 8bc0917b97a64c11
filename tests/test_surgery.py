"""prepare / finalize on small models: structure, numerics of each rewrite, lifecycle."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import tost_surgery as tost
from tost_surgery import Recipe

from .conftest import PreActNet, TinyNet, bernoulli_mask, masked_reference


def tagged(model: nn.Module, technique: str, mode: bool = True) -> list:
    return [n for n in tost.graph(model, training=mode).graph.nodes if n.meta.get("tost") == technique]


def count_targets(model: nn.Module, target: object) -> int:
    return sum(1 for n in tost.graph(model).graph.nodes if n.target is target)


def manual_forward(net: TinyNet, x: torch.Tensor, act, skip=None) -> torch.Tensor:
    """TinyNet's forward with ``act`` for every ReLU and ``skip(i, x, out)`` after each conv(+BN)."""
    skip = skip or (lambda i, inp, out: out)
    h = act(skip(0, x, net.bn1(net.conv1(x))))
    y = act(skip(1, h, net.bn2(net.conv2(h))))
    h = act(h + y)
    h = act(skip(2, h, net.conv3(h)))
    return net.fc(h.mean(dim=(2, 3)))


def test_prepare_works_in_place_and_keeps_the_class(tiny: TinyNet, images: torch.Tensor) -> None:
    params = {name: id(p) for name, p in tiny.named_parameters()}
    prepared = tost.prepare(tiny, bernoulli_mask(tiny), Recipe.tost(total_steps=10))
    assert prepared is tiny and type(prepared) is TinyNet and isinstance(prepared, TinyNet)
    assert "forward" in prepared.__dict__
    assert isinstance(prepared.tost, nn.Module)
    for name, param in prepared.named_parameters():  # the model's own parameters are the same objects
        original_name = name.replace(".parametrizations.weight.original", ".weight")
        if not name.startswith("tost."):
            assert params[original_name] == id(param)
    prepared(images).sum().backward()


def test_scaffolding_lives_under_one_attribute(tiny: TinyNet) -> None:
    before = {n for n, _ in tiny.named_parameters()}
    keys = set(tiny.state_dict())
    mask = bernoulli_mask(tiny)
    tost.prepare(tiny, mask, Recipe.tost(total_steps=10))
    added = {n for n, _ in tiny.named_parameters()} - {
        n.replace(".weight", ".parametrizations.weight.original") if n in mask else n for n in before
    }
    assert added and all(name.startswith("tost.") for name in added)
    assert all(name.startswith("tost.") or "parametrizations" in name or name in keys for name in tiny.state_dict())


def test_site_counts(tiny: TinyNet) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny), Recipe.tost(total_steps=10))
    assert count_targets(tiny, torch.lerp) == 4  # nn.ReLU, F.relu, Tensor.relu_, torch.relu
    assert count_targets(tiny, torch.addcmul) == 3  # three Conv2d
    assert len(tiny.tost.skips) == 3


@pytest.mark.parametrize(("soft", "function"), [("silu", F.silu), ("mish", F.mish), ("softplus", F.softplus),
                                                ("gelu", F.gelu)])
def test_ghost_neurons_start_as_the_soft_activation(soft, function, tiny, images) -> None:
    mask = bernoulli_mask(tiny)
    reference = masked_reference(tiny, mask).eval()
    recipe = Recipe.tost(total_steps=10, ghost_skips=False, rescale_init=False, soft_activation=soft)
    tost.prepare(tiny, mask, recipe).eval()
    torch.testing.assert_close(tiny(images), manual_forward(reference, images, function), rtol=0, atol=0)


def test_ghost_neurons_blend_midway(tiny, images) -> None:
    mask = bernoulli_mask(tiny)
    reference = masked_reference(tiny, mask).eval()
    tost.prepare(tiny, mask, Recipe.tost(total_steps=10, warmup=1.0, ghost_skips=False, rescale_init=False)).eval()
    tost.step(tiny, 3)
    expected = manual_forward(reference, images, lambda x: 0.7 * F.silu(x) + 0.3 * F.relu(x))
    torch.testing.assert_close(tiny(images), expected)


def test_ghost_skips_start_at_full_strength(tiny, images) -> None:
    mask = bernoulli_mask(tiny)
    reference = masked_reference(tiny, mask).eval()
    tost.prepare(tiny, mask, Recipe.tost(total_steps=10, ghost_neurons=False, rescale_init=False)).eval()
    skips = list(tiny.tost.skips.values())
    expected = manual_forward(reference, images, F.relu, lambda i, inp, out: out + skips[i](inp))
    torch.testing.assert_close(tiny(images), expected)


def test_auto_branch_is_a_batchnorm_where_channels_match(tiny, images) -> None:
    mask = bernoulli_mask(tiny)
    reference = masked_reference(tiny, mask).eval()
    recipe = Recipe.tost(total_steps=10, ghost_neurons=False, rescale_init=False, skip_branch="auto")
    tost.prepare(tiny, mask, recipe).eval()
    skips = list(tiny.tost.skips.values())
    # conv2 is 8 -> 8: its branch is a BatchNorm of the input, no conv.
    assert [s.branch for s in skips] == ["conv_bn", "bn", "conv_bn"]
    assert skips[1].conv is None
    expected = manual_forward(reference, images, F.relu, lambda i, inp, out: out + skips[i](inp))
    torch.testing.assert_close(tiny(images), expected)
    torch.testing.assert_close(skips[1](images[:, :3].repeat(1, 3, 1, 1)[:, :8]), skips[1].bn(
        images[:, :3].repeat(1, 3, 1, 1)[:, :8]))


def test_scaffolding_retires_and_equals_the_masked_model(tiny, images) -> None:
    mask = bernoulli_mask(tiny)
    reference = masked_reference(tiny, mask).eval()
    recipe = Recipe.tost(total_steps=10, warmup=0.5, skip_warmup=0.2, rescale_init=False)
    tost.prepare(tiny, mask, recipe).eval()
    tost.step(tiny, 2)
    assert not tagged(tiny, "skips") and tagged(tiny, "neurons")  # skips retired first
    tost.step(tiny, 3)
    assert not tagged(tiny, "neurons") and not tagged(tiny, "skips")
    torch.testing.assert_close(tiny(images), reference(images), rtol=0, atol=0)
    tiny.train()
    reference.train()
    torch.testing.assert_close(tiny(images), reference(images), rtol=0, atol=0)


def test_inplace_relu_readers_see_the_ghost_output(images) -> None:
    class InplaceReuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.conv(x)
            self.relu(h)  # result unused: later readers of h rely on the mutation
            return h * 2

    torch.manual_seed(0)
    model = InplaceReuse()
    mask = bernoulli_mask(model)
    reference = masked_reference(model, mask)
    tost.prepare(model, mask, Recipe.tost(total_steps=4, ghost_skips=False, rescale_init=False))
    torch.testing.assert_close(model(images), F.silu(reference.conv(images)) * 2)
    tost.step(model, 4)
    torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd-nesterov", "adam", "adamw"],
)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_masked_weights_stay_exactly_zero(make_optimizer, autocast, tiny, images) -> None:
    mask = bernoulli_mask(tiny, density=0.3)
    tost.prepare(tiny, mask, Recipe.tost(total_steps=6))
    optimizer = make_optimizer(tiny.parameters())
    tost.bind(tiny, optimizer)
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(tiny(images), torch.arange(4), label_smoothing=tost.label_smoothing(tiny))
        loss.backward()
        optimizer.step()
    for name, m in mask.items():
        module_name, _ = name.rsplit(".", 1)
        effective = tiny.get_submodule(module_name).weight
        assert (effective[~m] == 0).all()
        assert (effective[m] != 0).any()
    tost.step(tiny, 2)
    tost.finalize(tiny)
    for name, m in mask.items():
        assert (dict(tiny.named_parameters())[name][~m] == 0).all()


def test_fan_in_rescaling(tiny) -> None:
    mask = bernoulli_mask(tiny, density=0.25)
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    tost.prepare(tiny, mask, Recipe.tost(total_steps=10, rescale_scope="all"))
    for name, m in mask.items():
        module = tiny.get_submodule(name.rsplit(".", 1)[0])
        kept = m.flatten(1).sum(1).clamp_min(1).float()
        scale = (m[0].numel() / kept).sqrt().view((-1,) + (1,) * (m.dim() - 1))
        expected = before[name] * m * scale
        torch.testing.assert_close(module.parametrizations.weight.original.detach(), expected)


def test_rescaling_skips_layers_that_feed_a_norm(tiny) -> None:
    mask = bernoulli_mask(tiny, density=0.25)
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    tost.prepare(tiny, mask, Recipe.tost(total_steps=10))  # no layer ends a residual branch
    assert set(tiny.tost.surgery.decided.rescaled) == {"conv3.weight", "fc.weight"}
    torch.testing.assert_close(
        tiny.conv1.parametrizations.weight.original.detach(), before["conv1.weight"] * mask["conv1.weight"]
    )


def test_layer_rule_rescaling(tiny) -> None:
    mask = bernoulli_mask(tiny, density=0.25)
    before = tiny.fc.weight.detach().clone()
    tost.prepare(tiny, mask, Recipe.tost(total_steps=10, rescale_rule="layer"))
    density = mask["fc.weight"].float().mean()
    torch.testing.assert_close(
        tiny.fc.parametrizations.weight.original.detach(), before * mask["fc.weight"] / density.sqrt()
    )


def test_finalize_is_exact_and_restores_the_model(tiny, images) -> None:
    keys = list(tiny.state_dict())
    params = [id(p) for p in tiny.parameters()]
    mask = bernoulli_mask(tiny)
    tost.prepare(tiny, mask, Recipe.tost(total_steps=3))
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.05, momentum=0.9)
    tost.bind(tiny, optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        tiny(images).square().mean().backward()
        optimizer.step()
    tiny.eval()
    prepared_out = tiny(images)
    finalized = tost.finalize(tiny)
    assert finalized is tiny and type(tiny) is TinyNet
    assert "forward" not in tiny.__dict__ and not hasattr(tiny, "tost")
    assert list(tiny.state_dict()) == keys
    assert [id(p) for p in tiny.parameters()] == params
    assert not any(parametrize.is_parametrized(m) for m in tiny.modules())
    scale = prepared_out.abs().max()
    assert (tiny(images) - prepared_out).abs().max() <= 1e-6 * scale
    fresh = TinyNet()
    fresh.load_state_dict(tiny.state_dict(), strict=True)
    optimizer.step()  # the binding is gone: no error from a stale hook


def test_finalize_refuses_before_the_end_unless_forced(tiny, images) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny), Recipe.tost(total_steps=10))
    tost.step(tiny, 2)
    with pytest.raises(tost.StateError, match=r"ghost neurons at step 2 of 3"):
        tost.finalize(tiny)
    assert hasattr(tiny, "tost")  # refused: still prepared
    tost.finalize(tiny, force=True)
    assert not hasattr(tiny, "tost")
    tiny(images)


def test_state_dict_resume_is_exact(images) -> None:
    recipe = Recipe.tost(total_steps=10)
    torch.manual_seed(0)
    first = TinyNet()
    mask = bernoulli_mask(first)
    tost.prepare(first, mask, recipe)
    tost.step(first, 2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    assert "tost.schedule.step" in first.state_dict()

    second = tost.prepare(TinyNet(), mask, recipe)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer), strict=True)
    assert second.tost.schedule.steps_taken == 2
    first.eval()
    second.eval()
    torch.testing.assert_close(second(images), first(images), rtol=0, atol=0)


def test_loading_a_checkpoint_moves_retirement_both_ways(tiny, images) -> None:
    recipe = Recipe.tost(total_steps=10)
    mask = bernoulli_mask(tiny)
    late = tost.prepare(copy.deepcopy(tiny), mask, recipe)
    tost.step(late, 5)
    assert not tagged(late, "neurons")
    early = tost.prepare(tiny, mask, recipe)
    early_state = copy.deepcopy(early.state_dict())
    early.load_state_dict(late.state_dict())
    assert not tagged(early, "neurons") and not tagged(early, "skips")
    early.load_state_dict(early_state)
    assert tagged(early, "neurons") and tagged(early, "skips")


def test_bind_counts_optimizer_steps_with_gradient_accumulation(tiny, images) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny), Recipe.tost(total_steps=100))
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.01)
    handle = tost.bind(tiny, optimizer)
    for _ in range(3):
        for _ in range(4):  # four micro-batches per optimizer step
            tiny(images).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert tiny.tost.schedule.steps_taken == 3
    handle.remove()
    optimizer.step()
    assert tiny.tost.schedule.steps_taken == 3
    tost.bind(tiny, optimizer)  # may bind again once removed


def test_label_smoothing_follows_the_recipe(tiny) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny), Recipe.tost(total_steps=10, warmup=0.5))
    assert tost.label_smoothing(tiny) == pytest.approx(0.1)
    tost.step(tiny, 2)
    assert tost.label_smoothing(tiny) == pytest.approx(0.06)
    tost.step(tiny, 3)
    assert tost.label_smoothing(tiny) == 0.0


def test_graph_shows_the_tagged_rewrite(tiny) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny), Recipe.tost(total_steps=10))
    gm = tost.graph(tiny)
    assert isinstance(gm, torch.fx.GraphModule)
    assert "torch.lerp" in gm.code and "tost.skips.tost_skip_0" in str(gm.graph)


def test_train_and_eval_each_run_their_own_graph(images) -> None:
    class FunctionalDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = F.relu(self.conv(x)).mean(dim=(2, 3))
            return self.fc(F.dropout(x, 0.5, training=self.training))

    torch.manual_seed(0)
    model = FunctionalDropout()
    mask = bernoulli_mask(model)
    reference = masked_reference(model, mask).eval()
    tost.prepare(model, mask).train()
    assert not torch.equal(model(images), model(images))  # dropout on in train mode
    model.eval()
    torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)


def test_one_graph_when_modes_agree(tiny) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny))
    forwards = tiny.tost.surgery.runner.default_variant.forwards
    assert forwards[True] is forwards[False]


def test_compile_once_while_coefficients_move(tiny, images) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    tost.prepare(tiny, bernoulli_mask(tiny), Recipe.tost(total_steps=8, warmup=0.5))
    counter = CompileCounter()
    compiled = torch.compile(tiny, backend=counter)
    for _ in range(3):
        compiled(images)
        tost.step(tiny)
    assert counter.frame_count == 1
    tost.step(tiny)  # step 4 of 4: the scaffolding retires
    compiled(images)
    compiled(images)
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_deepcopy_is_independent(tiny, images) -> None:
    tost.prepare(tiny, bernoulli_mask(tiny), Recipe.tost(total_steps=10))
    clone = copy.deepcopy(tiny)
    tost.step(clone, 5)
    assert tiny.tost.schedule.steps_taken == 0 and clone.tost.schedule.steps_taken == 5
    with torch.no_grad():
        clone.fc.parametrizations.weight.original.zero_()
        clone.fc.bias.zero_()
    assert clone(images).abs().max() == 0
    assert tiny(images).abs().max() > 0
    tost.finalize(clone)
    assert hasattr(tiny, "tost")


def test_keyword_and_optional_arguments(images) -> None:
    class WithOptional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, mask=None, scale=False):
            out = torch.relu(self.conv(x))
            return out * 2 if scale else out

    torch.manual_seed(0)
    model = WithOptional()
    tost.prepare(model, bernoulli_mask(model))
    torch.testing.assert_close(model(x=images), model(images))
    assert model(images, mask=None).shape == (4, 4, 14, 14)


def test_tracing_leaves_python_caches_clean(images) -> None:
    class CachingAttention(nn.Module):
        """Caches a tensor in a dict when not training, as timm's levit does."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bias = nn.Parameter(torch.zeros(4, 1, 1))
            self.cache: dict[str, torch.Tensor] = {}

        def forward(self, x):
            if not self.training:
                if "bias" not in self.cache:
                    self.cache["bias"] = self.bias * 2
                return self.conv(x) + self.cache["bias"]
            return self.conv(x) + self.bias

    model = CachingAttention()
    tost.prepare(model, bernoulli_mask(model))
    assert model.cache == {}
    model.eval()
    model(images)
    tost.finalize(model)
    model.cache.clear()
    assert model(images).shape == (4, 4, 16, 16)


def test_leaf_modules_are_called_whole(images) -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x)) if x.sum() > 0 else x  # data-dependent: untraceable

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()
            self.head = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return torch.relu(self.head(self.block(x)))

    model = Net()
    tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=2), leaf_modules=[Block])
    nodes = [n.target for n in tost.graph(model).graph.nodes if n.op == "call_module"]
    assert "block" in nodes
    assert count_targets(model, torch.lerp) == 1  # the ReLU inside the leaf is not rewritten
    model(images.abs())


class DataDependentBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x)) if x.sum() > 0 else x


def test_untraceable_block_is_called_whole_with_a_warning(images) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = DataDependentBlock()
            self.head = nn.Conv2d(3, 2, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.head(self.block(x)))

    torch.manual_seed(0)
    model = Net()
    mask = bernoulli_mask(model)
    reference = masked_reference(model, mask)
    with pytest.warns(tost.TostSurgeryWarning, match=r"submodule 'block' \(DataDependentBlock\) cannot be traced"):
        tost.prepare(model, mask, Recipe.tost(total_steps=2))
    assert any("block" in note for note in model.tost.surgery.runner.notes)
    assert count_targets(model, torch.lerp) == 1 and count_targets(model, torch.addcmul) == 1
    tost.step(model, 2)
    x = images.abs()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_untraceable_model_runs_eagerly_with_ghost_relu_modules(images) -> None:
    torch.manual_seed(0)
    model = DataDependentBlock()
    mask = bernoulli_mask(model)
    reference = masked_reference(model, mask)
    with pytest.warns(tost.TostSurgeryWarning, match="cannot be traced.*runs eagerly"):
        tost.prepare(model, mask, Recipe.tost(total_steps=4, rescale_init=False))
    assert type(model.relu).__name__ == "EagerGhostNeuron"
    assert "ghost skips not applied" in " ".join(model.tost.surgery.runner.notes)
    x = images.abs()
    torch.testing.assert_close(model(x), F.silu(reference.conv(x)))
    with pytest.raises(tost.StateError, match="runs eagerly"):
        tost.graph(model)
    tost.step(model, 4)
    assert type(model.relu) is nn.ReLU  # retired: the original module is back
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    keys = list(reference.state_dict())
    tost.finalize(model)
    assert list(model.state_dict()) == keys and type(model.relu) is nn.ReLU
    assert "forward" not in model.__dict__


def test_callable_mask(tiny, images) -> None:
    def keep_positive(name, param):
        return param > 0 if name.startswith("conv") and name.endswith("weight") else None

    tost.prepare(tiny, keep_positive)
    assert [e.name for e in tiny.tost.surgery.decided.entries] == ["conv1.weight", "conv2.weight", "conv3.weight"]
    assert (tiny.conv2.weight >= 0).all()


def test_relu6_sites_by_setting(images) -> None:
    class WithRelu6(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.ReLU6(inplace=True)

        def forward(self, x):
            return F.relu6(self.act(self.conv(x))) + torch.relu(x).mean()

    # (setting, ghost neurons, F.relu6 nodes): off, the module and F.relu6 stay as they are;
    # on, both ReLU6 sites become ghosts whose hard branch is F.relu6.
    for relu6, ghosts, relu6_nodes in ((False, 1, 1), (True, 3, 2)):
        model = WithRelu6()
        tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=2, ghost_skips=False, neuron_relu6=relu6))
        assert count_targets(model, torch.lerp) == ghosts
        assert count_targets(model, F.relu6) == relu6_nodes
        model(images)


def test_tensors_created_in_forward_are_kept_as_constants() -> None:
    class WithConstant(nn.Module):
        """forward builds a tensor: torch.fx stores it on the model as ``_tensor_constant0``."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(x)) + torch.tensor([1.0, 2.0, 3.0, 4.0])

    torch.manual_seed(0)
    model = WithConstant()
    keys = list(model.state_dict())
    x = torch.randn(2, 4)
    mask = {"fc.weight": torch.rand(4, 4) > 0.5}
    expected = masked_reference(model, mask)(x)
    tost.prepare(model, mask)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert not any("constant" in key for key in model.state_dict())  # kept out of checkpoints
    assert "_tensor_constant0" not in model.__dict__
    tost.finalize(model)
    assert list(model.state_dict()) == keys and "_tensor_constant0" not in model.__dict__
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_auto_branch_is_the_1x1_conv_everywhere_on_a_pre_activation_network(images) -> None:
    """conv3 and conv5 end residual branches with no norm after them: ``auto`` is then ``conv_bn`` at
    every conv (the same modules, the same outputs), and ``bn`` keeps a BatchNorm where channels match."""
    branches, outputs = {}, {}
    for choice in ("auto", "bn", "conv_bn"):
        torch.manual_seed(0)
        model = PreActNet()
        tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=10, skip_branch=choice)).eval()
        assert model.tost.surgery.runner.context.preactivation
        branches[choice] = [s.branch for s in model.tost.skips.values()]
        outputs[choice] = model(images)
    assert branches["auto"] == branches["conv_bn"] == ["conv_bn"] * 5
    assert branches["bn"] == ["conv_bn", "bn", "bn", "conv_bn", "bn"]  # conv1 and conv4 change channels
    torch.testing.assert_close(outputs["auto"], outputs["conv_bn"], rtol=0, atol=0)
    assert not torch.allclose(outputs["auto"], outputs["bn"])


def test_auto_branch_does_not_depend_on_ghost_neurons(images) -> None:
    """Here conv2 reaches the residual sum through a ReLU, no norm between: the network is
    pre-activation whether or not ghost neurons rewrite that ReLU first (decided on the traced graph)."""

    class ReluBeforeSum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv1(x)
            x = x + F.relu(self.conv2(self.bn(x)))
            return self.fc(x.mean(dim=(2, 3)))

    for neurons in (False, True):
        model = ReluBeforeSum()
        tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=10, ghost_neurons=neurons))
        assert model.tost.surgery.runner.context.preactivation, neurons
        assert [s.branch for s in model.tost.skips.values()] == ["conv_bn", "conv_bn"], neurons
        assert count_targets(model, torch.lerp) == (1 if neurons else 0)
        model(images)


def test_skip_pointwise_off_leaves_1x1_convs_without_a_branch() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=4, skip_pointwise=False))
    assert count_targets(model, torch.addcmul) == 1  # only the depthwise 3x3
    assert [s.branch for s in model.tost.skips.values()] == ["bn"]  # auto: channels match
