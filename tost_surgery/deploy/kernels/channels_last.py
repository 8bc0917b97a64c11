"""A dense layer run in channels-last memory format, handing back a contiguous (NCHW) tensor.

Not a sparse kernel: a layout. On these CPUs torch's NCHW kernels for a few shapes are far
slower than their channels-last ones (measured, one thread, batch 1: max_pool2d 3x3/2 over
64x112x112, 18-23 ms NCHW against 3.6-3.9 ms with both conversions; resnet18's 3-channel 7x7
stem, 8-12 ms against 4.4-7.2 ms). Such layers stay dense, and this runs them where it
measured faster. The values are those of the wrapped layer (for max pooling, bit for bit).
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelsLast(nn.Module):
    """Run ``layer`` on a channels-last copy of a 4-D input; return a contiguous result.

    Example:
        >>> pool = ChannelsLast(nn.MaxPool2d(3, 2, 1))
        >>> pool(torch.randn(1, 64, 112, 112)).is_contiguous()
        True
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return self.layer(x)
        return self.layer(x.contiguous(memory_format=torch.channels_last)).contiguous()
