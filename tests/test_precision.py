"""Dtypes, autocast, memory formats and devices: masks stay exact, scaffolding math stays sane."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tost_surgery as tost
from tost_surgery import Recipe

from .conftest import TinyNet, bernoulli_mask

STEPS = 4
RECIPE = dict(total_steps=STEPS, warmup=0.5)
"""Every technique retires after 2 of the 4 steps."""


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(200 + step)
    return torch.randn(4, 3, 16, 16, generator=generator).to(dtype), torch.randint(0, 10, (4,), generator=generator)


def prepared(cast=None) -> tuple[TinyNet, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyNet()
    if cast is not None:
        cast(model)
    mask = bernoulli_mask(model)
    return tost.prepare(model, mask, Recipe.tost(**RECIPE)), mask


def train(model: nn.Module, *, dtype: torch.dtype = torch.float32, autocast: bool = False,
          memory_format: torch.memory_format = torch.contiguous_format, steps: int = STEPS) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tost.bind(model, optimizer)
    losses = []
    for step in range(steps):
        x, y = batch(step, dtype)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x.contiguous(memory_format=memory_format))
        loss = F.cross_entropy(out.float(), y, label_smoothing=tost.label_smoothing(model))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def masked(model: nn.Module, mask: dict[str, torch.Tensor]):
    """(name, effective weight, trainable original, attached mask) of each masked layer."""
    for name, m in mask.items():
        module_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        parametrization = module.parametrizations[attr]
        yield name, getattr(module, attr).detach(), parametrization.original.detach(), parametrization[0].mask, m


def assert_masks_exact(model: nn.Module, mask: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for name, effective, original, attached, m in masked(model, mask):
        assert attached.dtype == dtype and set(attached.unique().tolist()) <= {0.0, 1.0}, name
        assert torch.equal(attached.bool(), m), name
        assert (effective[~m] == 0).all() and (original[~m] == 0).all(), name
        assert effective.dtype == dtype and torch.isfinite(effective).all(), name


def assert_finalize_round_trip(model: nn.Module, mask: dict[str, torch.Tensor], dtype: torch.dtype,
                               memory_format: torch.memory_format = torch.contiguous_format) -> None:
    model.eval()
    x = batch(9, dtype)[0].contiguous(memory_format=memory_format)
    with torch.no_grad():
        before = model(x)
        tost.finalize(model)
        after = model(x)
    assert (after - before).abs().max() <= 1e-6 * before.abs().max()
    for name, m in mask.items():
        assert (dict(model.named_parameters())[name][~m] == 0).all()
    fresh = TinyNet().to(dtype).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), after)


def test_float64_after_prepare() -> None:
    model, mask = prepared()
    model.double()
    assert model.tost.schedule.step.dtype == torch.int64  # the step counter is not a float
    losses = train(model, dtype=torch.float64)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_masks_exact(model, mask, torch.float64)
    assert_finalize_round_trip(model, mask, torch.float64)


@pytest.mark.parametrize("when", ["before-prepare", "after-prepare"])
def test_bfloat16_model(when) -> None:
    if when == "before-prepare":
        model, mask = prepared(cast=lambda m: m.bfloat16())
    else:
        model, mask = prepared()
        model.bfloat16()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the ghost skips too
    losses = train(model, dtype=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_masks_exact(model, mask, torch.bfloat16)
    assert_finalize_round_trip(model, mask, torch.bfloat16)


def prepared_for_thirds() -> nn.Module:
    """Ghost neurons over 3 steps: after one step the blend is 1/3, which bfloat16 cannot hold."""
    torch.manual_seed(0)
    model = TinyNet()
    return tost.prepare(model, bernoulli_mask(model), Recipe.tost(total_steps=10, warmup=0.3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_annealed_coefficients_stay_float32_when_the_model_is_cast(dtype) -> None:
    model = prepared_for_thirds()
    model.to(dtype)
    tost.step(model, 1)
    schedule = model.tost.schedule
    assert schedule("neurons").dtype == schedule("skips").dtype == torch.float32
    assert schedule("neurons").item() == torch.tensor(1 / 3).item()
    model.to(dtype)  # a second cast keeps them too
    assert schedule("neurons").dtype == torch.float32 and schedule("neurons").item() == torch.tensor(1 / 3).item()
    model(batch(0, dtype)[0])


def test_cast_coefficients_are_rounded_but_their_ends_are_exact() -> None:
    """After ``model.bfloat16()`` the blend is within one rounding of the schedule; 0 and 1 are exact."""
    model = prepared_for_thirds()
    model.bfloat16()
    tost.step(model, 1)
    assert abs(model.tost.schedule("neurons").float().item() - 1 / 3) <= 2**-9
    tost.step(model, 2)
    assert model.tost.schedule("neurons").item() == 1.0 and model.tost.schedule("skips").item() == 0.0


def test_autocast_bfloat16_keeps_scaffolding_state_in_float32() -> None:
    model, mask = prepared()
    reference = copy.deepcopy(model)
    x = batch(0)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.bfloat16
    high = reference(x)
    assert (low.float() - high).abs().max() <= 0.05 * high.abs().max()  # bfloat16 has 8 bits of mantissa
    losses = train(model, autocast=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    schedule = model.tost.schedule
    assert schedule("neurons").dtype == schedule("skips").dtype == torch.float32
    for skip in model.tost.skips.values():  # the branches' BatchNorm statistics stay float32
        assert skip.bn.running_var.dtype == torch.float32 and torch.isfinite(skip.bn.running_var).all()
    assert_masks_exact(model, mask, torch.float32)


def plain_copy(model: nn.Module) -> TinyNet:
    """A plain TinyNet holding the prepared model's tensors as they act (masked weights masked)."""
    plain = TinyNet()
    with torch.no_grad():
        for name, tensor in itertools.chain(plain.named_parameters(), plain.named_buffers()):
            module_name, attr = name.rsplit(".", 1)
            tensor.copy_(getattr(model.get_submodule(module_name), attr))
    return plain


def test_retired_model_under_autocast_is_the_plain_masked_model_bit_for_bit() -> None:
    model, _ = prepared()
    tost.step(model, STEPS)
    plain = plain_copy(model)
    x = batch(0)[0]
    for mode in (True, False):
        model.train(mode)
        plain.train(mode)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            assert torch.equal(model(x), plain(x)), f"training={mode}"


@pytest.mark.parametrize("when", ["before-prepare", "after-prepare"])
def test_channels_last(when) -> None:
    channels_last = torch.channels_last
    if when == "before-prepare":
        model, mask = prepared(cast=lambda m: m.to(memory_format=channels_last))
    else:
        model, mask = prepared()
    contiguous = copy.deepcopy(model)
    model.to(memory_format=channels_last)
    x = batch(0)[0]
    torch.testing.assert_close(model(x.contiguous(memory_format=channels_last)), contiguous(x), rtol=0, atol=1e-5)
    train(model, memory_format=channels_last)
    for name, effective, original, _, _ in masked(model, mask):
        if original.dim() == 4:
            assert original.is_contiguous(memory_format=channels_last), name
            assert effective.is_contiguous(memory_format=channels_last), name
    assert_masks_exact(model, mask, torch.float32)
    assert_finalize_round_trip(model, mask, torch.float32, memory_format=channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_move_after_prepare() -> None:
    model, mask = prepared()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # created before the move
    model.cuda()
    tost.bind(model, optimizer)
    for step in range(STEPS):
        x, y = batch(step)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x.cuda())
        F.cross_entropy(out.float(), y.cuda()).backward()
        optimizer.step()
    assert model.tost.schedule.step.device.type == "cuda" and model.tost.schedule.steps_taken == STEPS
    for name, effective, original, attached, m in masked(model, mask):
        assert attached.device.type == "cuda"
        assert (effective[~m.cuda()] == 0).all() and (original[~m.cuda()] == 0).all(), name
    tost.finalize(model)
    model.cpu()
    fresh = TinyNet()
    fresh.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_takes_a_cpu_mask() -> None:
    torch.manual_seed(0)
    model = TinyNet().cuda()
    mask = bernoulli_mask(model)
    tost.prepare(model, {k: v.cpu() for k, v in mask.items()}, Recipe.tost(**RECIPE))
    assert model.conv1.parametrizations.weight[0].mask.device.type == "cuda"
    assert model.tost.schedule("neurons").device.type == "cuda"
    model(batch(0)[0].cuda()).sum().backward()
