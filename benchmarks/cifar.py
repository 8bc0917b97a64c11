"""CIFAR-10 pieces shared by the accuracy benchmark: the networks, tensor data and augmentation, training.

Everything runs on tensors (no DataLoader, no worker processes): the whole subset fits in
memory, and batches, flips and crops come from one seeded ``torch.Generator`` on the CPU, so
two runs with the same seed see the same batches on any device.

    model = resnet20()
    data = load_cifar(path, val_split=0.1, device="cpu")
    history = train(model, data, TrainConfig(epochs=20), seed=0, on_step=...)
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import cifar_models  # noqa: E402
from cifar_models import BasicBlock  # noqa: E402  (1x1 conv-BN shortcuts: "option B")

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
SPLIT_SEED = 0
"""The train/val split is the same whatever the run's seed, so runs with different seeds compare."""


# --------------------------------------------------------------------------- model


class ResNetCifar(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers): 16-32-64 channels, global average pool, linear head.

    Deliberately not ``examples/cifar_models.py``'s ResNet-20 (parameter-free "option A" shortcuts):
    its blocks have 1x1 conv-BN shortcuts ("option B", 0.27M parameters), the network every run in
    ``results/accuracy.jsonl`` used.
    """

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def resnet20(num_classes: int = 10) -> ResNetCifar:
    """CIFAR ResNet-20: 3 BasicBlocks per stage, 0.27M parameters."""
    return ResNetCifar(3, num_classes)


def resnet32(num_classes: int = 10) -> ResNetCifar:
    """CIFAR ResNet-32: 5 of the same BasicBlocks per stage, 0.47M parameters."""
    return ResNetCifar(5, num_classes)


def vgg16_half(num_classes: int = 10) -> nn.Module:
    """VGG-16 with BatchNorm at half width (32 to 256 channels), 3.7M parameters."""
    config = tuple(item if item == "M" else item // 2 for item in cifar_models.VGG16)
    return cifar_models.VGG(num_classes, config)


def mobilenetv2_quarter(num_classes: int = 10) -> nn.Module:
    """MobileNetV2 at width 0.25 (a 1280-channel head), 0.25M parameters."""
    return cifar_models.MobileNetV2(num_classes, width=0.25)


def preact_resnet18_quarter(num_classes: int = 10) -> nn.Module:
    """PreAct ResNet-18 at quarter width (16-32-64-128 channels), 0.70M parameters."""
    return cifar_models.PreActResNet(width=16, num_classes=num_classes)


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "vgg16_x0.5": vgg16_half,
    "mobilenetv2_x0.25": mobilenetv2_quarter,
    "preact_resnet18_x0.25": preact_resnet18_quarter,
}
"""The benchmark's networks; ``_x<w>`` is a width multiplier that fits a run into about 15 CPU-minutes."""
DESCRIPTIONS = {
    "resnet20": "CIFAR ResNet-20 (16-32-64 channels, 1x1 conv-BN shortcuts, 0.27M parameters)",
    "resnet32": "CIFAR ResNet-32 (the same blocks, 5 per stage, 0.47M parameters)",
    "vgg16_x0.5": "VGG-16 with BatchNorm at half width (32-64-128-256-256 channels, 3.7M parameters)",
    "mobilenetv2_x0.25": "MobileNetV2 at width 0.25 (8 to 80 channels, a 1280-channel head, 0.25M parameters)",
    "preact_resnet18_x0.25": "PreAct ResNet-18 at quarter width (16-32-64-128 channels, 0.70M parameters)",
}


# --------------------------------------------------------------------------- data


@dataclass
class CifarData:
    """Normalized float images (N, 3, 32, 32) and int64 labels, on one device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def eval_split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``val`` or ``test``."""
        return {"val": (self.x_val, self.y_val), "test": (self.x_test, self.y_test)}[name]


def load_cifar(
    path: str | Path = DEFAULT_DATA,
    *,
    val_split: float = 0.1,
    subset: int | None = None,
    device: str | torch.device = "cpu",
) -> CifarData:
    """The npz subset, split into train / val (seeded, stratified-free shuffle) and test.

    ``subset`` keeps the first ``subset`` training images (after the split) and as many test and
    validation images, for smoke runs. Normalization uses the training split's channel statistics.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 subset not found at {path}.\n"
            "Hint: it lives in ../shared/data/cifar10-subset.npz next to the project root; pass --data PATH."
        )
    with np.load(path) as archive:
        x_all = torch.from_numpy(archive["x_train"]).float().div_(255)
        y_all = torch.from_numpy(archive["y_train"]).long()
        x_test = torch.from_numpy(archive["x_test"]).float().div_(255)
        y_test = torch.from_numpy(archive["y_test"]).long()
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = int(round(val_split * len(y_all)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    x_train, y_train, x_val, y_val = x_all[train_idx], y_all[train_idx], x_all[val_idx], y_all[val_idx]
    if subset is not None:
        x_train, y_train = x_train[:subset], y_train[:subset]
        x_val, y_val = x_val[:subset], y_val[:subset]
        x_test, y_test = x_test[:subset], y_test[:subset]
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean) / std).contiguous().to(device)

    return CifarData(prep(x_train), y_train.to(device), prep(x_val), y_val.to(device), prep(x_test), y_test.to(device))


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and a random crop of a ``pad``-pixel reflect-padded image, per sample.

    Random numbers come from ``generator`` (CPU) so batches match across devices.
    """
    n, _, h, w = x.shape
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    samples = torch.arange(n, device=x.device).view(n, 1, 1)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, w)
    return padded.permute(0, 2, 3, 1)[samples, rows, cols].permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """The training protocol (the same for every recipe)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    """Peak of the one-cycle learning rate."""
    warmup_fraction: float = 0.15
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / self.batch_size)

    def total_steps(self, n_train: int) -> int:
        return self.epochs * self.steps_per_epoch(n_train)


def make_optimizer(model: nn.Module, config: TrainConfig, total_steps: int):
    """SGD (Nesterov momentum, weight decay on every parameter) and a one-cycle LR stepped per batch."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=config.warmup_fraction, cycle_momentum=False
    )
    return optimizer, scheduler


@dataclass
class EpochLog:
    epoch: int
    loss: float
    accuracy: float
    seconds: float


def train(
    model: nn.Module,
    data: CifarData,
    config: TrainConfig,
    seed: int,
    *,
    label_smoothing: Callable[[], float] = lambda: 0.0,
    after_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> list[EpochLog]:
    """Train ``model`` in place; the batch order and augmentation depend only on ``seed``.

    ``after_optimizer(optimizer)`` is called once, after the optimizer exists and before the
    first step (``tost.bind`` goes there). ``label_smoothing()`` is read at every step.
    """
    n_train = len(data.y_train)
    total_steps = config.total_steps(n_train)
    optimizer, scheduler = make_optimizer(model, config, total_steps)
    if after_optimizer is not None:
        after_optimizer(optimizer)
    generator = torch.Generator().manual_seed(seed)
    history: list[EpochLog] = []
    model.train()
    for epoch in range(config.epochs):
        start = time.perf_counter()
        order = torch.randperm(n_train, generator=generator).to(data.x_train.device)
        loss_sum = torch.zeros((), device=data.x_train.device)
        correct = torch.zeros((), device=data.x_train.device, dtype=torch.long)
        for i in range(0, n_train, config.batch_size):
            batch = order[i : i + config.batch_size]
            x = augment(data.x_train[batch], generator)
            y = data.y_train[batch]
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=label_smoothing())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(batch)
            correct += (out.detach().argmax(1) == y).sum()
        log = EpochLog(epoch + 1, loss_sum.item() / n_train, correct.item() / n_train, time.perf_counter() - start)
        if not math.isfinite(log.loss):
            raise FloatingPointError(f"training loss is {log.loss} at epoch {epoch + 1}")
        history.append(log)
        if on_epoch is not None:
            on_epoch(log)
    return history


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in eval mode (BatchNorm running statistics)."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(y)
