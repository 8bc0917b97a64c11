"""CPU inference kernels, one file per family, and which of them fits a layer.

- ``csr_linear``: ``nn.Linear`` as CSR x dense, activations feature-major (MKL's fast route).
- ``csr_conv``: ``nn.Conv1d`` / ``nn.Conv2d`` (any kernel size, stride, dilation, padding and
  padding mode, groups, bias) as one CSR matrix per kernel tap over shifted views.
- ``channels_last``: a dense Conv2d or pooling layer run in channels-last memory format.
- ``native_conv`` (optional, compiled on first use): Conv1d / Conv2d with the tap loop fused,
  blocked over output pixels.

Every kernel is a module built from the layer, with the same map; which one runs is decided by
measurement (``deploy.accelerate``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ._csr import has_sparse_matmul, to_csr
from .channels_last import ChannelsLast
from .csr_conv import ConvGeometry, CsrConv
from .csr_linear import CsrLinear
from .native_conv import NativeConv, native_available

Builder = Callable[[nn.Module], nn.Module]

__all__ = [
    "Builder", "ChannelsLast", "ConvGeometry", "CsrConv", "CsrLinear", "NativeConv", "POOLS", "candidates",
    "has_sparse_matmul", "is_sparse", "native_available", "to_csr",
]  # fmt: skip

POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_DTYPES = (torch.float32, torch.float64)


def candidates(layer: nn.Module, native: bool = False) -> tuple[dict[str, Builder], str]:
    """``({kernel name: builder}, "")`` for a layer some kernel computes, else ``({}, why not)``.

    CSR kernels need MKL's CSR matmul (see :func:`has_sparse_matmul`); without it a conv or
    Linear gets only the layout candidate, if any. ``native`` adds the compiled conv kernel
    (float32), which needs no MKL.

    Example:
        >>> candidates(nn.Linear(4, 2))[0].keys()
        dict_keys(['csr'])
        >>> candidates(nn.Conv3d(2, 2, 3))[1]
        'Conv3d: no sparse kernel'
    """
    kind = type(layer).__name__
    if isinstance(layer, POOLS):
        if type(layer) not in POOLS or getattr(layer, "return_indices", False):
            return {}, f"{kind}: only plain MaxPool2d / AvgPool2d have a kernel"
        return {"channels_last": ChannelsLast}, ""
    if isinstance(layer, nn.modules.conv._ConvNd) and not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return {}, f"{kind}: no sparse kernel"
    if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return {}, f"{kind}: no kernel"
    base = nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Conv1d
    if type(layer).forward is not base.forward:
        return {}, f"{kind} has its own forward, e.g. weight standardization or dynamic padding"
    if layer.weight.dtype not in _DTYPES:
        return {}, f"weight dtype {layer.weight.dtype}: the CPU kernels take float32/float64"
    builders: dict[str, Builder] = {}
    if has_sparse_matmul():
        builders["csr"] = CsrLinear.from_linear if isinstance(layer, nn.Linear) else CsrConv.from_conv
    if native and not isinstance(layer, nn.Linear) and layer.weight.dtype == torch.float32:
        builders["native"] = NativeConv.from_conv
    if isinstance(layer, nn.Conv2d):
        builders["channels_last"] = ChannelsLast
    return builders, "" if builders else "torch has no MKL sparse support here"


def is_sparse(kernel: str) -> bool:
    """Whether a kernel name stands for a sparse kernel (rather than dense or a layout)."""
    return kernel in ("csr", "native")
