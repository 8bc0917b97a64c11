"""The paper's CIFAR architectures, for 32x32 inputs: CIFAR ResNet-20/32/56, ResNet-18, VGG-16, MobileNetV2,
and PreAct ResNet-18 (pre-activation blocks, whose last conv feeds the residual addition).

model = create_model("resnet20", num_classes=10)
model = create_model("timm:resnet18", num_classes=100)    # any timm model, randomly initialized
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("resnet20", "resnet32", "resnet56", "resnet18", "preact_resnet18", "vgg16", "mobilenetv2")


# --------------------------------------------------------------------------- CIFAR ResNet (He et al., 2016)


class ShortcutA(nn.Module):
    """He et al.'s CIFAR shortcut ("option A"): subsample by 2, zero-pad the new channels. No parameters."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, plus the shortcut, then ReLU.

    When the shape changes the shortcut is a 1x1 conv-BN (``"conv"``, ResNet-18's, "option B"),
    or strided subsampling with zero channels appended (``"a"``, the CIFAR ResNets' "option A").
    """

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str = "conv") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity() if shortcut == "a" else nn.Sequential()
        if stride != 1 or c_in != c_out:
            if shortcut == "a":
                self.shortcut = ShortcutA(c_out - c_in)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet: 16-32-64 channels, n BasicBlocks per stage, global pool, linear head."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has 6n+2 layers, found depth={depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, c_in = [], 16
        for index, c_out in enumerate((16, 32, 64)):
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if index > 0 and block == 0 else 1, shortcut="a"))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():  # He init for the convs; the head keeps PyTorch's default (initial loss ~ln 10)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- ResNet-18, CIFAR variant


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: a 3x3 stride-1 stem and no max-pool; 64-128-256-512 channels."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, c_in = [], 64
        for index, c_out in enumerate((64, 128, 256, 512)):
            stride = 1 if index == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- pre-activation ResNet (He et al., 2016b)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut ("Identity Mappings in Deep Residual Networks").

    The shortcut is the identity, or a 1x1 conv of the pre-activated input where the shape changes.
    No norm follows the second conv (nor the shortcut conv): their outputs meet in the addition.
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 32x32 inputs: a 3x3 stem, stages of :class:`PreActBlock`, BN-ReLU, pool, head.

    ``blocks=(2, 2, 2, 2)`` with ``width=64`` (64-128-256-512 channels) is PreAct ResNet-18;
    ``width`` scales every stage (``width=16``: 16-32-64-128 channels, 1/16 of the multiply-adds).
    """

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        stages, c_in = [], width
        for index, count in enumerate(blocks):
            c_out = width * 2**index
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(*(PreActBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                          for i in range(count))))
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        for module in self.modules():  # He init for the convs, as the CIFAR ResNets
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- VGG-16 with BatchNorm, CIFAR variant

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs: 13 conv3x3-BN-ReLU, five max-pools, one linear head."""

    def __init__(self, num_classes: int = 10, config: tuple = VGG16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                c_in = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- MobileNetV2, CIFAR variant

# (expansion, output channels, blocks, first stride); strides of the stem and of the 24-channel stage
# are 1 instead of 2 for 32x32 inputs.
MOBILENETV2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN; a residual when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.conv1 = nn.Conv2d(c_in, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.has_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + x if self.has_residual else out


def _divisible_by_8(channels: float) -> int:
    """torchvision's ``_make_divisible(channels, 8)``: the nearest multiple of 8, at least 8, never 10% below."""
    rounded = max(8, int(channels + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * channels else rounded


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) for 32x32 inputs, with ReLU activations.

    ``width`` is the paper's width multiplier: every channel count times ``width``, rounded to a
    multiple of 8 as torchvision does; the 1280-channel head is not narrowed below 1280.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c_in = _divisible_by_8(32 * width)
        self.conv1 = nn.Conv2d(3, c_in, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        blocks = []
        for expansion, channels, count, stride in MOBILENETV2:
            c_out = _divisible_by_8(channels * width)
            for index in range(count):
                blocks.append(InvertedResidual(c_in, c_out, expansion, stride if index == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        head = _divisible_by_8(1280 * max(1.0, width))
        self.conv2 = nn.Conv2d(c_in, head, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(self.layers(x))))
        return self.fc(x.mean(dim=(2, 3)))


def create_model(arch: str, num_classes: int) -> nn.Module:
    """One of :data:`ARCHITECTURES`, or ``timm:NAME`` for any timm model (``pretrained=False``)."""
    if arch.startswith("timm:"):
        import timm

        return timm.create_model(arch.removeprefix("timm:"), pretrained=False, num_classes=num_classes)
    if arch in ("resnet20", "resnet32", "resnet56"):
        return CifarResNet(int(arch.removeprefix("resnet")), num_classes)
    builders = {"resnet18": ResNet18, "preact_resnet18": PreActResNet, "vgg16": VGG, "mobilenetv2": MobileNetV2}
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)} or timm:NAME")
    return builders[arch](num_classes=num_classes)
