"""Modules tost_surgery adds to a model; all of them live under ``model.tost``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ._schedule import Schedule

if TYPE_CHECKING:
    from ._recipe import Recipe

# oneDNN 3.12's AVX2 kernel for the weight gradient of a strided 1x1 conv with 2-7 input channels
# in channels_last fp32 (jit_avx2_1x1_convolution_bwd_weights_t, taken when the stride divides
# the input size) writes past its buffers: the process aborts ("double free or corruption"),
# segfaults or hangs on CPUs without AVX-512 (AMD EPYC before Zen 4). From 8 channels on, and
# with AVX-512, the gradient is right. Grouped convs got oneDNN's general kernel where measured;
# below 8 channels per group they subsample too.
_SAFE_STRIDED_1X1_CHANNELS = 8


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class GhostSkip(nn.Module):
    """Temporary branch beside a Conv2d, from the conv's input to its (norm's) output.

    The input is sampled at the centre of each output pixel's receptive field, so the
    branch's output has the conv's spatial size for every kernel, stride, padding and
    dilation. Then, by ``branch``:

    - ``conv_bn``: a 1x1 conv with the conv's groups and output channels, filled with
      ``init``, and its own BatchNorm (the paper's code). Beside a depthwise conv that 1x1 conv
      is one weight per channel, applied as a broadcast multiply (same values, 3-5x faster on
      CPU than a grouped convolution);
    - ``bn``: a BatchNorm of the sampled input (channels must match): as cheap as identity,
      but normalized, so stacking one per conv does not compound the variance with depth;
    - ``identity``: the sampled input itself.
    """

    def __init__(
        self, conv: nn.Conv2d, *, branch: str = "conv_bn", init: float = 1e-4, dynamic_same: bool = False
    ) -> None:
        super().__init__()
        self.stride = _pair(conv.stride)
        dilation, kernel = _pair(conv.dilation), _pair(conv.kernel_size)
        reach = tuple(d * (k - 1) for d, k in zip(dilation, kernel))
        if conv.padding == "same":
            padding = tuple(r // 2 for r in reach)
        elif conv.padding == "valid":
            padding = (0, 0)
        else:
            padding = _pair(conv.padding)  # type: ignore[arg-type]
        self.padding, self.reach = padding, reach
        # "same" pads ``reach`` in total (``reach // 2`` before, the rest after).
        self.total_padding = reach if conv.padding == "same" else tuple(2 * p for p in padding)
        # Receptive-field centre of output pixel i in input coordinates: i * stride + offset.
        self.offset = tuple(r // 2 - p for r, p in zip(reach, padding))
        # timm's Conv2dSame pads for "same" output size from each input's size (TF style).
        self.dynamic_same = dynamic_same
        self.is_aligned = not dynamic_same and all(2 * p == r for p, r in zip(padding, reach))
        self.conv: nn.Conv2d | None = None
        self.bn: nn.BatchNorm2d | None = None
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        if branch != "conv_bn" and conv.in_channels != conv.out_channels:
            raise ValueError(f"A {branch!r} ghost skip needs in_channels == out_channels, found {conv}.")
        self.branch = branch
        self.per_channel = branch == "conv_bn" and conv.groups == conv.in_channels == conv.out_channels
        if branch == "bn":
            self.bn = nn.BatchNorm2d(conv.out_channels, **factory)
        # Branches that subsample the input themselves, then run at stride 1 (the same products):
        # those without a full 1x1 conv, and those with few input channels per group, because the
        # ghost skip beside an RGB stem conv is the strided 1x1 conv oneDNN gets wrong (see
        # _SAFE_STRIDED_1X1_CHANNELS).
        few_channels = conv.in_channels // conv.groups < _SAFE_STRIDED_1X1_CHANNELS
        self.subsamples = (
            self.is_aligned and self.stride != (1, 1) and (branch != "conv_bn" or self.per_channel or few_channels)
        )
        if branch == "conv_bn":
            stride = self.stride if self.is_aligned and not self.subsamples else 1
            self.conv = nn.Conv2d(
                conv.in_channels, conv.out_channels, 1, stride=stride, groups=conv.groups, bias=False, **factory
            )
            nn.init.constant_(self.conv.weight, init)
            self.bn = nn.BatchNorm2d(conv.out_channels, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_aligned:
            x = self._sample(x)
        elif self.subsamples:
            x = x[..., :: self.stride[0], :: self.stride[1]]
        if self.per_channel:
            x = x * self.conv.weight.to(x.dtype).view(1, -1, 1, 1)
        elif self.conv is not None:
            x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return x

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        sizes = x.shape[-2:]
        if self.dynamic_same:
            lengths = [-(-n // s) for n, s in zip(sizes, self.stride)]
            totals = [max((m - 1) * s + r + 1 - n, 0) for m, s, r, n in zip(lengths, self.stride, self.reach, sizes)]
            offset = [r // 2 - t // 2 for r, t in zip(self.reach, totals)]
        else:
            lengths = [
                (n + t - r - 1) // s + 1 for n, t, r, s in zip(sizes, self.total_padding, self.reach, self.stride)
            ]
            offset = self.offset
        before = [max(0, -o) for o in offset]
        after = [max(0, o + (m - 1) * s + 1 - n) for o, m, s, n in zip(offset, lengths, self.stride, sizes)]
        if any(before) or any(after):
            x = F.pad(x, (before[1], after[1], before[0], after[0]))
        (oh, ow), (sh, sw) = [o + b for o, b in zip(offset, before)], self.stride
        return x[..., oh : oh + (lengths[0] - 1) * sh + 1 : sh, ow : ow + (lengths[1] - 1) * sw + 1 : sw]

    @property
    def kind(self) -> str:
        """What the branch computes, in words: ``conv1x1+bn``, ``per-channel scale+bn``, ``bn``, ``identity``."""
        if self.per_channel:
            return "per-channel scale+bn"
        return {"conv_bn": "conv1x1+bn", "bn": "bn", "identity": "identity"}[self.branch]

    def extra_repr(self) -> str:
        padding = ", dynamic_same" if self.dynamic_same else ""
        return f"{self.kind}, stride={self.stride}, aligned={self.is_aligned}{padding}"


class Scaffold(nn.Module):
    """The one attribute (``model.tost``) holding the schedule and every ghost module.

    Its parameters are the scaffolding's; ``tost_surgery.finalize`` removes it whole.
    """

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.schedule = Schedule(recipe)
        self.skips = nn.ModuleDict()
        self.constants = nn.Module()

    def add_constants(self, constants: dict[str, torch.Tensor]) -> None:
        """Keep tensors torch.fx lifted out of forward, as buffers left out of ``state_dict``."""
        for name, value in constants.items():
            self.constants.register_buffer(name, value.detach() if isinstance(value, torch.Tensor) else value,
                                           persistent=False)

    def add_skip(self, skip: GhostSkip) -> str:
        """Register ``skip`` under the next free name; return its graph target."""
        name = f"tost_skip_{len(self.skips)}"
        self.skips[name] = skip
        return f"tost.skips.{name}"

    def skip_at(self, target: str) -> GhostSkip:
        """The skip :meth:`add_skip` registered under graph target ``target``."""
        return self.skips[target.rsplit(".", 1)[-1]]
