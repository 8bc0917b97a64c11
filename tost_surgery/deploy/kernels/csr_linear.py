"""Linear layers as CSR x dense on the MKL route: ``zeros(out, B).addmm_(W_csr, x.T)``.

With the activations feature-major (``x.T``) MKL's row-major SpMM beats the dense layer.
Measured here (Intel Xeon, one thread, 512 -> 1000, against ``F.linear``): 2.3-3.9x at 2%
density and 1.2-2.4x at 5-10% at batch 1; 3.4-4.6x at 2-10% at batch 32.
``F.linear(x, W_csr)`` and ``x @ W_csc`` take MKL's column-major route instead: 1.3-1.5x
slower than this at batch 1 and 7-17x at batch 32, slower than dense. Do not "simplify" to
those.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ._csr import to_csr


class CsrLinear(nn.Module):
    """Inference-only ``nn.Linear`` with its weight held as an int32 CSR matrix.

    The matrix's parts are buffers (``crow``, ``col``, ``values``); under ``torch.export`` /
    ``torch.compile`` the layer is one custom op, ``torch.ops.tost_surgery_deploy.csr_linear``.

    Example:
        >>> sparse = CsrLinear.from_linear(nn.Linear(512, 1000))
        >>> sparse(torch.randn(4, 512)).shape
        torch.Size([4, 1000])
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        matrix = to_csr(weight)  # its parts are copied out: a view of a CSR tensor cannot be exported
        self.register_buffer("crow", matrix.crow_indices().clone())
        self.register_buffer("col", matrix.col_indices().clone())
        self.register_buffer("values", matrix.values().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.weight_csr = _matrix(self.crow, self.col, self.values, self.in_features)

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> CsrLinear:
        """The same map as ``layer`` (its current weight and bias)."""
        return cls(layer.weight.detach(), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_inference(x, self)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return torch.ops.tost_surgery_deploy.csr_linear(
                x, self.crow, self.col, self.values, self.bias, self.in_features
            )
        return linear(x, self.weight_csr, self.bias)

    def _apply(self, fn, recurse=True):  # .to(dtype) / .double() replace the buffers: rebuild the view
        module = super()._apply(fn, recurse)
        self.weight_csr = _matrix(self.crow, self.col, self.values, self.in_features)
        return module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}"


def linear(x: torch.Tensor, weight_csr: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W, b)`` with ``W`` in CSR, on MKL's row-major route."""
    out_features, in_features = weight_csr.shape
    lead = x.shape[:-1]
    rows = x.reshape(-1, in_features)
    if bias is None:
        out_t = torch.zeros(out_features, rows.shape[0], dtype=x.dtype)
    else:
        out_t = bias.unsqueeze(1).expand(-1, rows.shape[0]).clone()
    out_t.addmm_(weight_csr, rows.T)
    return out_t.T.contiguous().view(*lead, out_features)


def _matrix(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, (crow.numel() - 1, in_features), check_invariants=False)


@torch.library.custom_op("tost_surgery_deploy::csr_linear", mutates_args=())
def _csr_linear_op(
    x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:  # fmt: skip
    """``CsrLinear`` as one op, so that ``torch.export`` and ``torch.compile`` keep it whole."""
    return linear(x, _matrix(crow, col, values, in_features), bias)


@_csr_linear_op.register_fake
def _(x, crow, col, values, bias, in_features):
    return x.new_empty(*x.shape[:-1], crow.numel() - 1)


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
