"""Training kernels for masked layers: forward, input gradient and weight gradient on the mask's nonzeros.

- ``linear``: ``nn.Linear`` (any leading batch dimensions) on CSR of ``W`` and of ``W^T``.
- ``conv``: ``nn.Conv1d`` / ``nn.Conv2d`` (stride, padding and padding mode, dilation, groups,
  bias) on per-tap CSR of ``W`` and of ``W^T``, over shifted views of a padded input.

The weight stays a dense tensor; each kernel reads it at the kept positions and hands back a
dense gradient with exact zeros elsewhere. Built on the deploy inference kernels.
"""

from .conv import ConvStructure, SparseConvFunction, sparse_conv
from .linear import LinearStructure, SparseLinearFunction, sparse_linear

__all__ = [
    "ConvStructure", "LinearStructure", "SparseConvFunction", "SparseLinearFunction", "sparse_conv", "sparse_linear",
]  # fmt: skip
