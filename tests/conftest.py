"""Shared fixtures: small models built here, no downloads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# Two test workers on two cores: one thread each keeps them from fighting.
torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Conv-BN-ReLU stem, a residual block with functional and in-place ReLUs, a head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        x = (x + y).relu_()
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


class PreActNet(nn.Module):
    """Two pre-activation blocks (BN-ReLU before each conv): an identity skip, then a 1x1 conv shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2, self.conv3 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3, self.conv4 = nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn4, self.conv5 = nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # the stem: read by the first block's norm and by its identity skip
        x = x + self.conv3(F.relu(self.bn2(self.conv2(F.relu(self.bn1(x))))))
        pre = F.relu(self.bn3(x))
        x = torch.add(self.shortcut(pre), self.conv5(F.relu(self.bn4(self.conv4(pre)))))
        return self.fc(x.mean(dim=(2, 3)))


def bernoulli_mask(model: nn.Module, density: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random mask over conv and linear weights that keeps >= 1 weight per layer."""
    generator = torch.Generator().manual_seed(seed)
    mask = {}
    for name, param in model.named_parameters():
        if name.endswith("weight") and param.dim() >= 2:
            m = torch.rand(param.shape, generator=generator) < density
            m.view(-1)[0] = True
            mask[name] = m
    return mask


def masked_reference(model: nn.Module, mask: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with masked weights zeroed by hand: the plain masked model."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in mask:
                param.mul_(mask[name])
    return reference


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
