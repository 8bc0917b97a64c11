"""``F.linear`` for a masked weight: CSR forward, CSR of W^T for the input gradient, the weight
gradient at the mask's nonzeros only.

The structure (which positions are kept) is fixed by the mask and built once; the values are
gathered from the dense weight on every call (``nnz`` reads), so the weight stays the dense
tensor an optimizer, a checkpoint and a data-parallel wrapper know. Its gradient is dense with
exact zeros off the mask, as the masked dense path gives.

- forward: ``zeros(out, B).addmm_(W_csr, x.T)`` (the deploy kernel, MKL's row-major route);
- input gradient: the same route with ``W^T`` in CSR: ``grad_x = grad_out @ W``;
- weight gradient: ``torch.sparse.sampled_addmm`` of ``grad_out^T @ x`` on the mask's CSR.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..deploy.kernels.csr_linear import linear
from ._index import csr_positions, position_matrix


@dataclass(frozen=True)
class LinearStructure:
    """The kept positions of an ``(out, in)`` weight as CSR, for ``W`` and for ``W^T``.

    Example:
        >>> structure = LinearStructure.of(torch.rand(4, 3) < 0.5)
        >>> structure.positions.dtype
        torch.int64
    """

    shape: tuple[int, int]
    crow: torch.Tensor
    col: torch.Tensor
    positions: torch.Tensor
    """Flat positions in the weight of ``W``'s CSR values, in CSR order."""
    t_crow: torch.Tensor
    t_col: torch.Tensor
    t_positions: torch.Tensor
    """Flat positions in the weight of ``W^T``'s CSR values, in CSR order."""

    @classmethod
    def of(cls, mask: torch.Tensor) -> LinearStructure:
        """The structure of a 2-D boolean (or 0/1) mask."""
        positions = position_matrix(mask)
        return cls(tuple(mask.shape), *csr_positions(positions), *csr_positions(positions.T))

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """``W`` in CSR, its values read from ``weight`` now."""
        return _csr(self.crow, self.col, weight.reshape(-1)[self.positions], self.shape)

    def pattern(self, dtype: torch.dtype) -> torch.Tensor:
        """``W``'s CSR structure with zero values: where ``sampled_addmm`` computes (``beta=0`` ignores them)."""
        return _csr(self.crow, self.col, torch.zeros(self.positions.numel(), dtype=dtype), self.shape)

    def transposed(self, weight: torch.Tensor) -> torch.Tensor:
        """``W^T`` in CSR, its values read from ``weight`` now."""
        return _csr(self.t_crow, self.t_col, weight.reshape(-1)[self.t_positions], self.shape[::-1])


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class SparseLinearFunction(torch.autograd.Function):
    """``F.linear(x, weight * mask, bias)`` on the mask's nonzeros, forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, structure):  # noqa: ANN001, ANN205 - autograd's protocol
        ctx.structure = structure
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return linear(x, structure.matrix(weight), bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        structure: LinearStructure = ctx.structure
        grad_x = grad_weight = grad_bias = None
        rows = grad_out.reshape(-1, structure.shape[0])
        if ctx.needs_input_grad[0]:
            grad_x = linear(grad_out, structure.transposed(weight), None)
        if ctx.needs_input_grad[1]:
            grad_weight = weight_gradient(rows, x.reshape(-1, structure.shape[1]), structure, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias, None


def weight_gradient(
    grad_rows: torch.Tensor, x_rows: torch.Tensor, structure: LinearStructure, weight: torch.Tensor
) -> torch.Tensor:
    """``grad_out^T @ x`` at the kept positions, scattered into a dense zero gradient shaped like ``weight``."""
    sampled = torch.sparse.sampled_addmm(structure.pattern(weight.dtype), grad_rows.T, x_rows, beta=0.0)
    grad = weight.new_zeros(weight.numel())
    grad[structure.positions] = sampled.values()
    return grad.view(weight.shape)


def sparse_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, structure: LinearStructure
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with ``weight`` read (and differentiated) only at ``structure``'s positions.

    Example:
        >>> weight = torch.randn(6, 4, requires_grad=True)
        >>> out = sparse_linear(torch.randn(2, 4), weight, None, LinearStructure.of(torch.rand(6, 4) < 0.3))
        >>> out.sum().backward()
    """
    return SparseLinearFunction.apply(x, weight, bias, structure)
