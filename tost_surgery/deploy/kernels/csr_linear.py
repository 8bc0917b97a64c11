"""Linear layers as CSR x dense on the MKL route: ``zeros(out, B).addmm_(W_csr, x.T)``.

Measured on this project's machines (torch 2.14.1, one thread): with the activations
feature-major (``x.T``), MKL's row-major SpMM beats the dense layer from 5-10% density at
batch 1 and at every density tried from batch 32. ``F.linear(x, W_csr)`` and ``x @ W_csc``
take MKL's column-major route instead, 3-11x slower: do not "simplify" to those.
"""

from __future__ import annotations

import torch
from torch import nn

from ._csr import to_csr


class CsrLinear(nn.Module):
    """Inference-only ``nn.Linear`` with its weight held as an int32 CSR matrix.

    Example:
        >>> sparse = CsrLinear.from_linear(nn.Linear(512, 1000))
        >>> sparse(torch.randn(4, 512)).shape
        torch.Size([4, 1000])
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight_csr = to_csr(weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> CsrLinear:
        """The same map as ``layer`` (its current weight and bias)."""
        return cls(layer.weight.detach(), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_inference(x, self)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.bias is None:
            out_t = torch.zeros(self.out_features, rows.shape[0], dtype=x.dtype)
        else:
            out_t = self.bias.unsqueeze(1).expand(-1, rows.shape[0]).clone()
        out_t.addmm_(self.weight_csr, rows.T)
        return out_t.T.contiguous().view(*lead, self.out_features)

    def _apply(self, fn, recurse=True):  # .to(dtype) / .double() reach the CSR matrix too
        self.weight_csr = fn(self.weight_csr)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        nnz = self.weight_csr.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def check_inference(x: torch.Tensor, layer: nn.Module) -> None:
    """These kernels have no backward: refuse an input that asks for gradients."""
    if x.requires_grad and torch.is_grad_enabled():
        from ..._errors import TostSurgeryError

        raise TostSurgeryError(
            f"{type(layer).__name__} is an inference kernel (deploy.accelerate) and has no backward;\n"
            "expected: an input without requires_grad, or torch.no_grad()\n"
            "found: an input that requires grad\n"
            "Hint: train the model you passed to deploy.accelerate, not its accelerated copy."
        )
