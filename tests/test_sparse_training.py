"""prepare(..., sparse_kernels=...): the masked layers train on sparse kernels, and nothing else changes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tost_surgery as tost
from tost_surgery import Recipe, TostSurgeryError
from tost_surgery._sparse_kernels.native import training_native_available
from tost_surgery.deploy import PairedTimer, Timing

from .conftest import PreActNet, TinyNet, bernoulli_mask

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05),
    "SGD momentum wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def data(seed: int = 1, batch: int = 6, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator), torch.randint(0, 10, (batch,), generator=generator)


def fixed_timer(**seconds: float):  # noqa: ANN201
    """A timer that returns these per-call seconds for every layer, and records what it was asked."""
    asked: list[tuple[str, tuple[str, ...]]] = []

    def timer(layer: str, candidates: dict) -> Timing:
        for run in candidates.values():
            run()  # the candidates must run: forward and backward on the layer's shapes
        asked.append((layer, tuple(candidates)))
        return Timing.of(**seconds)

    timer.asked = asked
    return timer


def train(model: nn.Module, optimizer_name: str, steps: int, seed: int = 1) -> list[float]:
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    losses = []
    for i in range(steps):
        x, y = data(seed + i)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def pair(
    net: type[nn.Module] = PreActNet, mode: str = "on", timer=None, native: bool = False  # noqa: ANN001
) -> tuple[nn.Module, nn.Module]:
    """The same masked model prepared twice: kernels off, and kernels ``mode`` (compiled too with ``native``)."""
    torch.manual_seed(0)
    base = net()
    mask = bernoulli_mask(base, 0.3)
    dense = tost.prepare(copy.deepcopy(base), mask)
    sparse = tost.prepare(copy.deepcopy(base), mask, sparse_kernels=mode, kernel_timer=timer, native_kernels=native)
    return dense, sparse


def kept_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {e.name: e.mask for e in model.tost.surgery.decided.entries}


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_twenty_steps_match_the_masked_dense_path(optimizer: str) -> None:
    dense, sparse = pair()
    reference, found = train(dense, optimizer, 20), train(sparse, optimizer, 20)
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(reference, found)), (reference, found)
    assert set(tost.status(sparse).sparse_kernels.values()) == {"sparse"}
    assert "tost.kernels" in tost.graph(sparse).code


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_masked_weights_stay_exactly_zero(optimizer: str) -> None:
    _, sparse = pair(TinyNet)
    train(sparse, optimizer, 4)
    modules = dict(sparse.named_modules())
    for name, kept in kept_masks(sparse).items():
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        assert bool((getattr(module, attr)[~kept] == 0).all()), name
        assert bool((module.parametrizations[attr].original.grad[~kept] == 0).all()), name


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_state_dict_is_unchanged_and_training_resumes_exactly(native: bool) -> None:
    if native and not training_native_available()[0]:
        pytest.skip(f"no C++ toolchain here: {training_native_available()[1]}")
    dense, sparse = pair(TinyNet, native=native)
    assert list(sparse.state_dict()) == list(dense.state_dict())
    optimizer = OPTIMIZERS["SGD momentum wd"](sparse.parameters())
    resumed_model = copy.deepcopy(sparse)
    for i in range(2):
        x, y = data(i)
        optimizer.zero_grad()
        F.cross_entropy(sparse(x), y).backward()
        optimizer.step()
        tost.step(sparse)
    checkpoint = {"model": copy.deepcopy(sparse.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = OPTIMIZERS["SGD momentum wd"](resumed_model.parameters())
    resumed.load_state_dict(checkpoint["optimizer"])
    for model, opt in ((sparse, optimizer), (resumed_model, resumed)):
        for i in range(2, 4):
            x, y = data(i)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, a), (_, b) in zip(sparse.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    kinds = set(tost.status(resumed_model).sparse_kernels.values())
    assert ("native" in kinds) == native and "sparse" in kinds, kinds


def test_auto_runs_the_sparse_kernels_where_timing_favours_them() -> None:
    timer = fixed_timer(dense=2.0, sparse=1.0)
    dense, sparse = pair(TinyNet, "auto", timer)
    x, _ = data()
    assert torch.allclose(sparse(x), dense(x), atol=1e-6)
    assert [name for name, _ in timer.asked] == ["conv1", "conv2", "conv3", "fc"]
    assert all(candidates == ("dense", "sparse") for _, candidates in timer.asked)
    assert tost.status(sparse).sparse_kernels["conv2"] == "sparse (2.00x)"


def test_auto_keeps_the_dense_path_where_timing_does_not_favour_them() -> None:
    timer = fixed_timer(dense=1.0, sparse=2.0)
    reference, model = pair(TinyNet, "auto", timer)
    x, _ = data()
    assert torch.equal(model(x), reference(x))  # the layers' own dense path, bit for bit
    assert tost.status(model).sparse_kernels["conv2"] == "dense: dense faster (sparse 0.50x)"
    model(x)
    assert len(timer.asked) == 4  # decided once per layer


def test_the_default_timer_decides_on_a_training_call_only() -> None:
    torch.manual_seed(0)
    base = TinyNet()
    timer = PairedTimer(rounds=2, min_rounds=1, turn_seconds=1e-4, inference=False)
    model = tost.prepare(base, bernoulli_mask(base, 0.3), sparse_kernels="auto", kernel_timer=timer)
    x, y = data()
    model.eval()
    with torch.no_grad():
        model(x)
    assert set(tost.status(model).sparse_kernels.values()) == {"pending"}
    model.train()
    F.cross_entropy(model(x), y).backward()
    states = tost.status(model).sparse_kernels.values()
    assert all(s.startswith("sparse (") or s.startswith("dense: ") for s in states), states


def test_kernels_wait_for_the_scaffolding_to_retire() -> None:
    torch.manual_seed(0)
    base = TinyNet()
    recipe = Recipe.tost(total_steps=4, warmup=0.5)
    model = tost.prepare(base, bernoulli_mask(base, 0.3), recipe, sparse_kernels="on")
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    assert "tost.kernels" not in tost.graph(model).code
    assert set(tost.status(model).sparse_kernels.values()) == {"pending"}
    tost.step(model, 2)
    assert tost.status(model).retired
    F.cross_entropy(model(x), y).backward()
    assert "tost.kernels" in tost.graph(model).code
    assert set(tost.status(model).sparse_kernels.values()) == {"sparse"}


def test_layers_without_a_kernel_are_listed_with_the_reason() -> None:
    class WithConv3d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(2, 4, 1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3, 4)))

    model = WithConv3d()
    mask = {"conv.weight": torch.ones(4, 2, 1, 1, 1), "fc.weight": torch.rand(3, 4) < 0.5, "fc.bias": torch.ones(3)}
    mask["fc.weight"][0, 0] = True
    tost.prepare(model, mask, sparse_kernels="on")
    states = tost.status(model).sparse_kernels
    assert states == {"conv": "off: Conv3d: no sparse training kernel", "fc": "pending"}
    model(torch.randn(2, 2, 3, 3, 3)).sum().backward()
    assert tost.status(model).sparse_kernels["fc"] == "sparse"
    assert tost.status(model).to_dict()["sparse_kernels"]["conv"].startswith("off: ")


def test_finalize_after_sparse_training_gives_the_plain_model() -> None:
    dense, sparse = pair(TinyNet)
    train(sparse, "SGD", 2)
    keys = list(TinyNet().state_dict())
    clean = tost.finalize(sparse)
    assert not hasattr(clean, "tost") and list(clean.state_dict()) == keys
    TinyNet().load_state_dict(clean.state_dict(), strict=True)


def test_an_unknown_sparse_kernels_value_is_refused() -> None:
    model = TinyNet()
    with pytest.raises(TostSurgeryError, match=r"must be one of 'off', 'auto', 'on';\nfound: 'autp'. Did you mean"):
        tost.prepare(model, bernoulli_mask(model), sparse_kernels="autp")
    assert not hasattr(model, "tost")
    with pytest.raises(TostSurgeryError, match="found: True"):
        tost.prepare(model, bernoulli_mask(model), sparse_kernels=True)
