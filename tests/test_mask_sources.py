"""Masks from elsewhere: ``from_state_dict`` / ``from_torch_prune`` / ``from_callable``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import tost_surgery as tost
from tost_surgery import MaskError
from tost_surgery.masks import from_callable, from_state_dict, from_torch_prune

from .conftest import TinyNet, bernoulli_mask


def assert_same_mask(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(found) == list(expected)
    for name, mask in expected.items():
        assert found[name].dtype == torch.bool, name
        assert torch.equal(found[name], mask), name


def pruned_with_torch(model: nn.Module, mask: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with every masked weight under ``prune.custom_from_mask``."""
    for name, value in mask.items():
        prune.custom_from_mask(model.get_submodule(name.rpartition(".")[0]), "weight", value)
    return model


def saved_and_loaded(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def check_preparable(mask: dict[str, torch.Tensor], images: torch.Tensor) -> None:
    model = TinyNet()
    tost.prepare(model, mask, tost.Recipe.baseline())
    assert torch.isfinite(model(images)).all()
    tost.finalize(model)
    for name, value in mask.items():
        assert torch.equal(model.get_parameter(name) != 0, value), name


# --- torch.nn.utils.prune ------------------------------------------------------------------------------------


def test_from_torch_prune_gives_back_the_mask_and_leaves_the_model_clean(tiny: TinyNet, images: torch.Tensor) -> None:
    mask = bernoulli_mask(tiny, density=0.3)
    reference = copy.deepcopy(tiny)
    model = pruned_with_torch(tiny, mask)
    originals = {name: model.get_submodule(name.rpartition(".")[0]).weight_orig for name in mask}
    expected = {name: originals[name].detach() * mask[name] for name in mask}

    found = from_torch_prune(model)

    assert_same_mask(found, mask)
    for name in mask:
        module = model.get_submodule(name.rpartition(".")[0])
        assert not hasattr(module, "weight_orig") and not hasattr(module, "weight_mask")
        assert "weight_orig" not in module._parameters and "weight_mask" not in module._buffers
        assert not module._forward_pre_hooks
        assert isinstance(module.weight, nn.Parameter)
        assert module.weight is originals[name]  # the same object: optimizers stay valid
        assert torch.equal(module.weight.detach(), expected[name])
    assert list(model.state_dict()) == list(reference.state_dict())
    TinyNet().load_state_dict(model.state_dict(), strict=True)
    check_preparable(found, images)


def test_from_torch_prune_takes_any_pruned_tensor_and_combined_masks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[0], "weight", amount=0.5)  # a PruningContainer: masks combined
    prune.l1_unstructured(model[2], "bias", amount=1)
    combined = model[0].weight_mask.bool().clone()
    bias_mask = model[2].bias_mask.bool().clone()

    found = from_torch_prune(model)

    assert set(found) == {"0.weight", "2.bias"}
    assert torch.equal(found["0.weight"], combined) and int(combined.sum()) < 15
    assert torch.equal(found["2.bias"], bias_mask)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_from_torch_prune_refuses_a_model_without_pruning(tiny: TinyNet) -> None:
    with pytest.raises(MaskError, match="not pruned with torch.nn.utils.prune.*\n.*from_state_dict"):
        from_torch_prune(tiny)
    with pytest.raises(MaskError, match="takes an nn.Module, found dict"):
        from_torch_prune({})


def test_from_torch_prune_changes_nothing_when_a_layer_is_pruned_whole(tiny: TinyNet) -> None:
    prune.l1_unstructured(tiny.conv1, "weight", amount=0.5)
    prune.custom_from_mask(tiny.fc, "weight", torch.zeros_like(tiny.fc.weight))
    with pytest.raises(MaskError, match=r"'fc.weight' is pruned whole \(0 of 160 weights kept\).*\n.*prune.remove"):
        from_torch_prune(tiny)
    assert hasattr(tiny.conv1, "weight_orig") and hasattr(tiny.fc, "weight_mask")


# --- state dicts and models ----------------------------------------------------------------------------------


def test_from_state_dict_of_a_pruned_checkpoint_gives_back_the_mask(tiny: TinyNet, images: torch.Tensor) -> None:
    mask = bernoulli_mask(tiny, density=0.3)
    with torch.no_grad():
        for name, value in mask.items():
            tiny.get_parameter(name).mul_(value)
    state_dict = saved_and_loaded(tiny.state_dict())

    found = from_state_dict(state_dict)

    assert_same_mask(found, mask)  # biases and BatchNorm vectors are not masks
    assert_same_mask(from_state_dict(tiny), mask)
    check_preparable(found, images)


def test_from_state_dict_leaves_dense_layers_out(tiny: TinyNet) -> None:
    with torch.no_grad():
        tiny.conv2.weight[0, 0, 0, 0] = 0.0
        tiny.bn1.weight.zero_()  # a 1-d "weight": never a mask
    state_dict = tiny.state_dict()
    state_dict["steps"] = torch.zeros(3, 3, dtype=torch.long)  # not floating

    found = from_state_dict(state_dict)

    assert list(found) == ["conv2.weight"]
    assert int(found["conv2.weight"].sum()) == found["conv2.weight"].numel() - 1
    # Given the model, every prunable weight is in the mask, dense ones all True.
    assert list(from_state_dict(tiny)) == ["conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"]


def test_from_state_dict_reads_torch_prune_checkpoints(tiny: TinyNet, images: torch.Tensor) -> None:
    mask = bernoulli_mask(tiny, density=0.3)
    state_dict = saved_and_loaded(pruned_with_torch(tiny, mask).state_dict())
    assert "conv1.weight_orig" in state_dict and "conv1.weight_mask" in state_dict

    found = from_state_dict(state_dict)

    assert_same_mask(found, mask)
    check_preparable(found, images)


def test_from_state_dict_reads_checkpoints_of_prepared_models(tiny: TinyNet) -> None:
    mask = bernoulli_mask(tiny, density=0.3)
    tost.prepare(tiny, mask, tost.Recipe.baseline())
    assert "conv1.parametrizations.weight.0.mask" in tiny.state_dict()
    assert_same_mask(from_state_dict(tiny.state_dict()), mask)


def test_from_state_dict_include_and_exclude(tiny: TinyNet) -> None:
    mask = bernoulli_mask(tiny, density=0.3)
    with torch.no_grad():
        for name, value in mask.items():
            tiny.get_parameter(name).mul_(value)
    state_dict = tiny.state_dict()
    assert list(from_state_dict(state_dict, exclude=["fc.*"])) == ["conv1.weight", "conv2.weight", "conv3.weight"]
    assert list(from_state_dict(state_dict, include=["conv*"], exclude=["conv1.*"])) == [
        "conv2.weight",
        "conv3.weight",
    ]
    assert list(from_state_dict(tiny, include=[nn.Linear])) == ["fc.weight"]
    with pytest.raises(MaskError, match="glob patterns over keys.*\n.*pass the model"):
        from_state_dict(state_dict, include=[nn.Linear])


def test_from_state_dict_errors(tiny: TinyNet) -> None:
    with pytest.raises(MaskError, match="found nothing pruned.*\n.*dense checkpoint"):
        from_state_dict(tiny.state_dict())
    with pytest.raises(MaskError, match=r"checkpoint holding \['model'\]; pass checkpoint\['model'\]"):
        from_state_dict({"model": tiny.state_dict(), "epoch": 3})
    with pytest.raises(MaskError, match="takes an nn.Module or a state_dict, found list"):
        from_state_dict([tiny.state_dict()])
    with torch.no_grad():
        tiny.fc.weight.zero_()
    with pytest.raises(MaskError, match=r"'fc.weight' is pruned whole \(0 of 160"):
        from_state_dict(tiny)
    assert list(from_state_dict(tiny, exclude=["fc.*"])) == ["conv1.weight", "conv2.weight", "conv3.weight"]
    prune.l1_unstructured(tiny.conv1, "weight", amount=0.5)
    with pytest.raises(MaskError, match="pruned with torch.nn.utils.prune.*\n.*from_torch_prune"):
        from_state_dict(tiny)


# --- from_callable -------------------------------------------------------------------------------------------


def test_from_callable(tiny: TinyNet, images: torch.Tensor) -> None:
    calls = []

    def large_conv_weights(name: str, param: torch.Tensor) -> torch.Tensor | None:
        calls.append(name)
        assert not torch.is_grad_enabled()
        if name.startswith("conv") and name.endswith("weight"):
            return param.abs() > param.abs().median()
        return None

    found = from_callable(tiny, large_conv_weights)

    assert calls == [name for name, _ in tiny.named_parameters()]
    assert list(found) == ["conv1.weight", "conv2.weight", "conv3.weight"]
    for name, value in found.items():
        weight = tiny.get_parameter(name).detach()
        assert value.dtype == torch.bool and not value.requires_grad
        assert torch.equal(value, weight.abs() > weight.abs().median())
    as_float = from_callable(tiny, lambda name, p: torch.ones_like(p) if name == "fc.weight" else None)
    assert list(as_float) == ["fc.weight"] and as_float["fc.weight"].dtype == torch.bool
    model = TinyNet()
    tost.prepare(model, found, tost.Recipe.baseline())
    assert torch.isfinite(model(images)).all()


def test_from_callable_errors(tiny: TinyNet) -> None:
    with pytest.raises(MaskError, match="None for every parameter.*\n.*Hint"):
        from_callable(tiny, lambda name, p: None)
    with pytest.raises(MaskError, match=r"fn\('conv1.weight', param\) returned a bool"):
        from_callable(tiny, lambda name, p: True)
    with pytest.raises(MaskError, match="'conv1.weight' is not binary"):
        from_callable(tiny, lambda name, p: p.abs() if name == "conv1.weight" else None)
    with pytest.raises(MaskError, match="'fc.weight' has the wrong shape"):
        from_callable(tiny, lambda name, p: torch.ones(3, dtype=torch.bool) if name == "fc.weight" else None)
    with pytest.raises(MaskError, match="'fc.weight' keeps no weight"):
        from_callable(tiny, lambda name, p: torch.zeros_like(p) if name == "fc.weight" else None)
    with pytest.raises(MaskError, match="takes a function"):
        from_callable(tiny, "conv1.weight")
